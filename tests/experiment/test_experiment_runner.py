"""The experiment runner end to end on a CI-sized CPCV experiment: table, paths, resume, workers, CLI."""

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import load_market
from sentio_lab.env.splits import backtest_paths
from sentio_lab.experiment.__main__ import main
from sentio_lab.experiment.assembly import EQUITY_FILE, RESULTS_FILE, evaluation_folder
from sentio_lab.experiment.cells import cell_done, parse_variant_args
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
from sentio_lab.experiment.memorisation import diagnosis_path
from sentio_lab.experiment.runner import plan_experiment, run_experiment
from sentio_lab.experiment.summary import strategy_table

TINY = ("--total-timesteps", "256", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--hidden-size", "8")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("feature-cache"))
    return ExperimentConfig(
        name="tiny_cpcv", dataset="nasdaq", data_end="2004-12-31", split="cpcv", n_groups=4, n_test_groups=2,
        seeds=(1, 2), random_seeds=2,
        common_args=("--window", "4", "--episode-length", "16", "--feature-cache-dir", cache),
        agents=(AgentSpec("tiny", "ppo", TINY),),
    )


@pytest.fixture(scope="module")
def finished(config, tmp_path_factory):
    plan = plan_experiment(config)
    output = tmp_path_factory.mktemp("runs") / config.name
    return plan, output, run_experiment(plan, output, progress=False)


def test_table_has_every_strategy_seed_and_path(finished, config):
    plan, output, results = finished
    assert len(plan.folds) == 6 and len(plan.cells) == 12  # C(4, 2) folds x 2 seeds
    n_paths = 3  # C(3, 1) backtest paths
    agents = results[results["kind"] == "agent"]
    assert sorted(set(zip(agents["seed"], agents["path"], strict=True))) == [(s, p) for s in (1, 2)
                                                                            for p in range(n_paths)]
    baselines = results[results["kind"] == "baseline"]
    assert sorted(baselines["name"].unique()) == sorted(config.baselines)
    assert (baselines.groupby("name").size() == n_paths).all()
    assert (results["n_trials"] == 1).all()
    assert np.isfinite(results["sharpe"]).all() and np.isfinite(results["max_drawdown"]).all()
    # every strategy's path covers the same bars: one accounting for every row of the comparison
    curves = pd.read_parquet(output / EQUITY_FILE)
    spans = curves.groupby(["name", "seed", "path"])["timestamp"].agg(["min", "max", "count"])
    assert spans.groupby(level="path").nunique().eq(1).all().all()
    table = pd.read_parquet(output / RESULTS_FILE)
    pd.testing.assert_frame_equal(table, results)
    summary = strategy_table(results)
    assert summary.loc[("agent", "tiny"), ("runs", "paths x seeds")] == 2 * n_paths


def test_paths_cover_the_test_bars_once(finished):
    plan, output, _ = finished
    curves = pd.read_parquet(output / EQUITY_FILE)
    bh = curves[curves["name"] == "buy_and_hold"]
    for path, curve in bh.groupby("path"):
        stamps = pd.DatetimeIndex(curve["timestamp"])
        assert stamps.is_monotonic_increasing and stamps.is_unique, path
    # CPCV: each of the 4 groups is tested in 3 folds, and each path uses each group once
    assert sum(len(f.test) for f in plan.folds) == 4 * 3


def test_a_killed_run_resumes_to_the_same_table(finished, config, tmp_path):
    plan, output, results = finished
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    # a training cell killed after its checkpoint but before cell.json, an evaluation never written
    cell = copy / "cells" / plan.cells[3].cell_id
    (cell / "cell.json").unlink()
    shutil.rmtree(evaluation_folder(copy, "tiny", plan.cells[3].fold))
    shutil.rmtree(copy / "baselines" / "momentum__fold002")
    # an evaluation written by an older version of the files (no cost column): redone, not mixed in
    old = evaluation_folder(copy, "tiny", plan.folds[0].fold)
    pd.read_parquet(old / "groups.parquet").drop(columns="cost").to_parquet(old / "groups.parquet")
    record = json.loads((old / "cell.json").read_text())
    (old / "cell.json").write_text(json.dumps({**record, "format": 1}))
    (copy / RESULTS_FILE).unlink()
    again = run_experiment(plan, copy, progress=False)
    pd.testing.assert_frame_equal(again, results, check_exact=True)


@pytest.mark.slow
def test_results_do_not_depend_on_the_worker_count(finished, tmp_path):
    plan, output, results = finished
    # Redo one job of every kind per worker in two spawned worker processes (two training cells of different
    # folds and seeds with their diagnoses, their folds' evaluations, one fold's baselines), keep the rest of the
    # one-worker run: the work done in a worker must give the in-process bits. (Redoing all 12 cells and 6 folds
    # proved nothing more and cost ~1.5 min.)
    copy = tmp_path / "two_workers"
    shutil.copytree(output, copy)
    first = plan.cells[0]
    redone = [first, next(c for c in plan.cells if c.fold != first.fold and c.seed != first.seed)]
    for cell in redone:
        shutil.rmtree(copy / "cells" / cell.cell_id)
        diagnosis_path(copy, cell).unlink(missing_ok=True)
        shutil.rmtree(evaluation_folder(copy, "tiny", cell.fold), ignore_errors=True)
    for folder in (copy / "baselines").glob(f"*__fold{redone[1].fold:03d}"):
        shutil.rmtree(folder)
    (copy / RESULTS_FILE).unlink()
    parallel = run_experiment(plan, copy, workers=2, progress=False)
    assert all(cell_done(copy / "cells" / c.cell_id) is not None and diagnosis_path(copy, c).exists()
               for c in redone)
    # identical, not close: assert_frame_equal's default rtol (1e-5) would hide a worker-dependent last digit
    pd.testing.assert_frame_equal(parallel, results, check_exact=True)
    assert parallel.equals(results)


def test_agents_must_share_the_accounting(config):
    other = ExperimentConfig(**{**config.__dict__, "agents": (
        AgentSpec("a", "ppo", TINY), AgentSpec("b", "ppo", (*TINY, "--fee-bps", "5")))})
    with pytest.raises(ValueError, match="differ in window, positions or costs"):
        plan_experiment(other)


def test_command_line_runs_a_named_file(tmp_path, capsys):
    path = tmp_path / "cli.toml"
    cache = tmp_path / "cache"
    path.write_text(f"""
name = "cli"
dataset = "nasdaq"
data_end = "2003-12-31"
split = "walk_forward"
n_groups = 2
seeds = [1]
baselines = ["buy_and_hold"]
common_args = ["--window", "4", "--episode-length", "16", "--feature-cache-dir", "{cache}"]
[agents.tiny]
args = {list(TINY)!r}
""".replace("'", '"'))
    output = main(["--config", str(path), "--output-root", str(tmp_path / "out"), "--no-progress"])
    printed = capsys.readouterr().out
    assert "cli: 2 folds, 2 cells" in printed and "buy_and_hold" in printed
    assert (output / RESULTS_FILE).exists()


def test_model_selection_on_an_inner_validation_slice_is_recorded(config, tmp_path):
    selecting = ExperimentConfig(**{**config.__dict__, "name": "select", "split": "walk_forward", "n_groups": 2,
                                    "seeds": (1,), "baselines": ("buy_and_hold",), "validation_bars": 40,
                                    "select_every": 1})
    plan = plan_experiment(selecting)
    results = run_experiment(plan, tmp_path / "select", progress=False)
    chosen = [json.loads(v) for v in results.loc[results["kind"] == "agent", "selected_iterations"]]
    assert chosen and all(len(c) == 2 and all(i in (1, 2) for i in c) for c in chosen)  # 2 iterations, 2 folds
    for fold in plan.folds:  # each fold scored its checkpoints on the validation slice and kept the best
        record = json.loads((tmp_path / "select" / "cells" / f"tiny__seed1__fold{fold.fold:03d}" / "cell.json")
                            .read_text())
        history = record["selection_history"]
        assert [h["iteration"] for h in history] == [1, 2] and record["checkpoint"] == "best.pt"
        best = max(history, key=lambda h: h["validation_sharpe"])
        assert record["selected_iteration"] == best["iteration"]


def test_trades_are_counted_per_test_group(finished):
    """Each group's episode starts flat: buy-and-hold enters once per group, and no trade spans two groups."""
    plan, _, results = finished
    bh = results[results["name"] == "buy_and_hold"]
    assert (bh["n_trades"] == 4).all() and (bh["round_trips"] == 4).all()  # 4 groups on every CPCV path


def test_a_ruined_group_is_carried_flat_to_the_end_of_its_group(finished):
    from sentio_lab.evaluation.episodes import Evaluation
    from sentio_lab.experiment.runner import _groups_frame, fold_market
    from sentio_lab.ppo import cost_model, feature_config

    plan, _, _ = finished
    fold = plan.folds[0]
    args = parse_variant_args("ppo", plan.cells[0].args)
    market = fold_market(plan, fold, feature_config(args))
    start, stop = market.range(f"test:{fold.groups[0]}")
    index = market.data.frame.index
    equity = pd.Series([1.0, 0.5, 1e-12], index=index[start : start + 3])
    weights = pd.Series([1.0, 1.0], index=index[start : start + 2])
    ruined = Evaluation("x", start, weights, equity, cost_model(args), ruined=True)
    frame = _groups_frame([ruined], dataclasses.replace(fold, groups=fold.groups[:1], paths=fold.paths[:1]), market)
    assert list(frame["timestamp"]) == list(index[start:stop])
    assert (frame["equity"].iloc[2:] == 1e-12).all() and frame["ruined"].all()
    assert list(frame["weight"].iloc[:2]) == [1.0, 1.0] and (frame["weight"].iloc[2:-1] == 0).all()
    assert np.isnan(frame["weight"].iloc[-1])


def test_costs_paid_add_up_the_fills_of_every_group(finished):
    """Buy-and-hold enters each of the 4 groups of a path from flat: 1 - 1/((1+s)(1+f)) of the equity each time."""
    plan, output, results = finished
    curves = pd.read_parquet(output / EQUITY_FILE)
    entry = 1 - 1 / (1.0001 * 1.0001)  # default 1 bp slippage and 1 bp fee
    starts = sorted({plan.folds[f].test[j][0] for f, j in backtest_paths(plan.folds)[0]})
    bh = results[(results["name"] == "buy_and_hold") & (results["path"] == 0)].iloc[0]
    curve = curves[(curves["name"] == "buy_and_hold") & (curves["path"] == 0)].set_index("timestamp")["equity"]
    index = load_market("nasdaq", end="2004-12-31").frame.index
    expected = sum(entry * curve.loc[index[a]] for a in starts)
    assert bh["costs_paid"] == pytest.approx(expected, rel=1e-9)
    agents = results[results["kind"] == "agent"]
    assert (agents["costs_paid"] > 0).all() and results[results["name"] == "random"]["costs_paid"].isna().all()


def test_masked_and_unmasked_configurations_compare_through_the_runner(config, tmp_path):
    from sentio_lab.experiment.assembly import RULES_FILE
    from sentio_lab.experiment.summary import infer, rule_table

    both = ExperimentConfig(**{**config.__dict__, "name": "masked", "split": "walk_forward", "n_groups": 2,
                               "seeds": (1,), "baselines": ("buy_and_hold",), "agents": (
                                   AgentSpec("plain", "ppo", TINY),
                                   AgentSpec("masked", "ppo_masked", (*TINY, "--masks.long-only",
                                                                      "--masks.cooldown", "3")))})
    plan = plan_experiment(both)
    results = run_experiment(plan, tmp_path / "masked", progress=False)
    assert set(results["name"]) == {"plain", "masked", "buy_and_hold"} and (results["n_trials"] == 2).all()
    for fold in plan.folds:  # the masked agent's greedy episodes obey its rules: never short
        groups = pd.read_parquet(evaluation_folder(tmp_path / "masked", "masked", fold.fold) / "groups.parquet")
        assert (groups["weight"].dropna() >= 0).all()
    rules = rule_table(pd.read_parquet(tmp_path / "masked" / RULES_FILE))
    assert list(rules.index) == ["masked"]  # the unmasked configuration has no rules
    assert rules.loc["masked", ("long_only", "binding")] == 1.0  # short levels are masked at every decision
    assert 0 < rules.loc["masked", ("cooldown", "binding")] < 1
    found = infer(results, pd.read_parquet(tmp_path / "masked" / EQUITY_FILE), "masked", reps=100)
    assert 0 <= found.pbo <= 1 and found.n_trials == 2  # two configurations: PBO and DSR over both


def test_fold_markets_are_not_shared_between_experiments(finished, config):
    """Two plans with a fold 0 each get their own fold market (a cache keyed on the fold number alone did not)."""
    from sentio_lab.experiment.runner import fold_market
    from sentio_lab.ppo import feature_config

    plan, _, _ = finished
    other = plan_experiment(ExperimentConfig(**{**config.__dict__, "split": "walk_forward", "n_groups": 2}))
    args = parse_variant_args("ppo", plan.cells[0].args)
    cpcv = fold_market(plan, plan.folds[0], feature_config(args))
    walk = fold_market(other, other.folds[0], feature_config(args))
    assert cpcv.train_segments == plan.folds[0].train and walk.train_segments == other.folds[0].train
    assert cpcv.train_segments != walk.train_segments


def test_finished_cells_of_other_arguments_are_refused_not_mixed_in(finished, config, tmp_path):
    plan, output, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    planned = (copy / "plan.json").read_text()
    other = plan_experiment(config, ("--gamma", "0.9"))  # same experiment name, same cell ids, other training
    with pytest.raises(ValueError, match="finished with other arguments.*--gamma 0.9"):
        run_experiment(other, copy, progress=False)
    assert (copy / "plan.json").read_text() == planned  # refused before anything was written


def test_the_command_line_and_the_notebook_share_one_run_folder():
    from pathlib import Path

    from sentio_lab.experiment.__main__ import Args
    from sentio_lab.experiment.runner import RUNS_ROOT

    assert Args.__dataclass_fields__["output_root"].default == RUNS_ROOT == "runs/experiments"
    notebook = (Path(__file__).resolve().parents[2] / "notebooks" / "evaluation_report.ipynb").read_text()
    assert 'f\\"{RUNS_ROOT}/{experiment.name}\\"' in notebook  # the notebook's default run_dir


def test_committed_reports_have_the_result_columns_the_runner_writes_today(finished):
    from pathlib import Path

    from test_committed_reports import committed_reports

    _, _, results = finished
    for report in committed_reports():
        header = (report / "results.csv").read_text().splitlines()[0].split(",")
        assert header == list(results.columns), f"{Path(report).name}: regenerate its tables (format changed)"


def test_cells_evaluations_and_results_are_w_and_b_runs_of_one_group(config, tmp_path):
    from sentio_lab.agents.tracking import read_offline_run

    tracked = ExperimentConfig(**{**config.__dict__, "name": "tracked", "split": "walk_forward", "n_groups": 2,
                                  "seeds": (1,), "baselines": ("buy_and_hold",), "validation_bars": 40,
                                  "select_every": 1})
    plan = plan_experiment(tracked)
    output = tmp_path / "tracked"
    results = run_experiment(plan, output, progress=False, track=True)
    runs = {run.name: run for run in map(read_offline_run, (output / "wandb").glob("offline-run-*"))}
    cells = [f"tracked__{c.cell_id}" for c in plan.cells]
    evaluations = [f"tracked__tiny__fold{f.fold:03d}" for f in plan.folds]
    assert sorted(runs) == sorted([*cells, *evaluations, "tracked__results"])
    assert {run.group for run in runs.values()} == {"tracked"}
    assert {runs[n].job_type for n in cells} == {"train"} and {runs[n].job_type for n in evaluations} == {"evaluate"}
    for cell in plan.cells:
        run, folder = runs[f"tracked__{cell.cell_id}"], output / "cells" / cell.cell_id
        record = json.loads((folder / "cell.json").read_text())
        # the variant's training scalars went into the cell's run, over both selection chunks
        assert [row["global_step"] for row in run.history if "global_step" in row] == [128, 256]
        assert run.summary["selected_iteration"] == record["selected_iteration"]
        assert run.summary["validation_sharpe"] == record["validation_sharpe"]
        (staged,) = run.artifacts[f"tracked__{cell.cell_id}-checkpoint"]["files"].values()
        assert open(staged, "rb").read() == (folder / "best.pt").read_bytes()
    first = runs[evaluations[0]]
    table = json.loads((next((output / "wandb").glob(f"offline-run-*-{evaluations[0]}")) / "files" /
                        first.summary["test_groups"]["path"]).read_text())
    groups = pd.read_parquet(evaluation_folder(output, "tiny", 0) / "groups.parquet")
    equity = groups["equity"].to_numpy()
    assert table["data"][0][table["columns"].index("total_return")] == equity[-1] / equity[0] - 1.0
    # the results table is results.parquet, row for row
    final = runs["tracked__results"]
    logged = json.loads((next((output / "wandb").glob("offline-run-*-tracked__results")) / "files" /
                         final.summary["results"]["path"]).read_text())
    assert final.summary["results"]["nrows"] == len(results) == final.summary["rows"]
    assert [row[logged["columns"].index("sharpe")] for row in logged["data"]] == results["sharpe"].tolist()
    assert set(final.artifacts["tracked__results-files"]["files"]) == {RESULTS_FILE, EQUITY_FILE, "plan.json"}
