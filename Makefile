# sentio-lab: two commands for a new user -- `make demo` and `make test`.
# TORCH_SPEC is installed before anything else. The default is the CPU build these machines carry;
# users with a GPU override it, e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"`.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline experiment tracking by default; W&B files stay inside the project.
export WANDB_MODE ?= offline
export WANDB_DIR ?= $(CURDIR)/runs
export WANDB_SILENT ?= true
export MPLBACKEND ?= Agg
export PYDEVD_DISABLE_FILE_VALIDATION = 1
# mkdocs plugins print a banner about MkDocs' future on every build; the build itself is unaffected.
export NO_MKDOCS_2_WARNING = 1
export DISABLE_MKDOCS_2_WARNING = true

DEMO_OUT ?= reports/demo
DEMO_TIMESTEPS ?= 200000

.PHONY: install demo lab report test lint docs bench bench-features bench-evaluation bench-risk bench-costs bench-scaling bench-transformer \
	capacity sweep-example golden clean dashboard dashboard-screenshot

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(BIN)/papermill notebooks/train_and_report.ipynb $(DEMO_OUT)/train_and_report.ipynb \
		-p dataset sp500 -p total_timesteps $(DEMO_TIMESTEPS) -p output_dir $(DEMO_OUT) -p progress text \
		--kernel python3 --log-output
	@echo "Report written to $(DEMO_OUT)/ (open $(DEMO_OUT)/report.html)"

# JupyterLab on the notebooks (the repository is notebook-first); Ctrl-C stops the server.
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

# The evaluation report of one experiment file into reports/<file stem>/ (folder created: papermill refuses to write
# into a missing one). It reuses the cells of a finished `python -m sentio_lab.experiment --config $(EXPERIMENT)` run
# in runs/experiments/<name>/ and trains only the missing ones.
EXPERIMENT ?= experiments/configs/sp500_cpcv.toml
REPORT_OUT ?= reports/$(basename $(notdir $(EXPERIMENT)))
report: $(STAMP)
	mkdir -p $(REPORT_OUT)
	$(BIN)/papermill notebooks/evaluation_report.ipynb $(REPORT_OUT)/evaluation_report.ipynb --kernel python3 \
		-p config $(EXPERIMENT) -p output_dir $(REPORT_OUT) -p progress text --log-output

lint: $(STAMP)
	$(BIN)/ruff check sentio_lab tests experiments notebooks docs
	$(BIN)/interrogate sentio_lab  # every public name has a docstring ([tool.interrogate]; -vv lists them)

# The documentation site (docs/, mkdocs.yml) into site/, offline; --strict fails on a broken link or reference.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# The suite runs on TEST_WORKERS pytest-xdist workers (default: the usable cores, at most 4: more mostly adds
# memory, the heavy tests start processes of their own). --dist loadgroup keeps tests marked
# xdist_group("name") on one worker, one after another (a shared Ray session, say). pytest-cov combines the workers'
# coverage, so the fail_under gate sees the whole suite.
TEST_WORKERS ?= $(shell $(BIN)/python -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)
test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 \
		--cov=sentio_lab --cov-report=term-missing:skip-covered
	$(BIN)/python -m pytest -q -p no:cacheprovider --nbval $(GOLDEN) --nbval-sanitize-with reports/golden/sanitize.cfg

# The committed, executed CI-sized evaluation report that nbval re-executes (a moved number fails `make test`).
GOLDEN := reports/golden/evaluation_report.ipynb
GOLDEN_PARAMS := -p config experiments/configs/sp500_cpcv.toml -p run_dir temp -p output_dir reports/ci_evaluation -p progress none \
	-y '{"overrides": {"seeds": [1, 2], "n_groups": 4, "random_seeds": 2}, "spa_reps": 200, "extra_args": \
	["--total-timesteps", "512", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2", \
	"--update-epochs", "1", "--hidden-size", "8"]}'

golden: $(STAMP)
	$(BIN)/papermill notebooks/evaluation_report.ipynb $(GOLDEN) --kernel python3 $(GOLDEN_PARAMS)

bench: $(STAMP)
	$(BIN)/python experiments/benchmarks/bench_ppo_vs_sb3.py

bench-features: $(STAMP)
	$(BIN)/python experiments/benchmarks/bench_features.py

bench-evaluation: $(STAMP)
	$(BIN)/python experiments/benchmarks/bench_evaluation.py

bench-risk: $(STAMP)
	$(BIN)/python experiments/benchmarks/bench_ppo_risk.py

bench-costs: $(STAMP)
	$(BIN)/python experiments/benchmarks/bench_costs.py

bench-scaling: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python experiments/benchmarks/bench_scaling.py

bench-transformer: $(STAMP)
	$(BIN)/python experiments/benchmarks/bench_transformer.py

# The issue-10 capacity curve: re-evaluates the sp500_cpcv agents (trained by that experiment) under impact.
capacity: $(STAMP)
	$(BIN)/python -m sentio_lab.experiment.capacity --config experiments/configs/sp500_capacity.toml --workers 2 \
		--report reports/sp500_capacity

sweep-example: $(STAMP)
	$(BIN)/python -m sentio_lab.scale.sweep experiments/sweeps/sp500_fees.toml --workers 2

# The paper-trading monitoring dashboard (Panel) on http://localhost:$(DASHBOARD_PORT); Ctrl-C stops it.
LEDGER ?= runs/paper/ledger.sqlite
ACCOUNT ?= paper
DASHBOARD_PORT ?= 5006
dashboard: $(STAMP)
	$(BIN)/python -m sentio_lab.deploy.dashboard --ledger $(LEDGER) --account $(ACCOUNT) --port $(DASHBOARD_PORT)

# docs/images/dashboard.png from a realistic replay (tiny CPCV experiment, registry, 2018 sp500 paper run; needs
# Debian's chromium): experiments/figures/dashboard_screenshot.py says what it builds in runs/dashboard_demo.
dashboard-screenshot: $(STAMP)
	$(BIN)/python experiments/figures/dashboard_screenshot.py --out runs/dashboard_demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .coverage runs .cache site
