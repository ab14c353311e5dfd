"""Portfolio experiments through the runner (sentio_lab.experiment.portfolio_runner) on a tiny 3-asset panel: CPCV
on dates with purge/embargo from the longest reach; a fold's training never reads its test groups' bars
(perturbation); agents and baselines are evaluated on identical folds; a rerun (killed cells recomputed, finished ones
reused) gives the same numbers; the report's tables come from those files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.data.panel import load_panel
from sentio_lab.experiment import portfolio_cells, portfolio_plan
from sentio_lab.experiment import portfolio_runner as runner
from sentio_lab.experiment.__main__ import main as experiment_main
from sentio_lab.experiment.config import AgentSpec
from sentio_lab.experiment.portfolio_config import (
    PortfolioExperimentConfig,
    is_portfolio_file,
    load_portfolio_config,
)
from sentio_lab.experiment.portfolio_summary import write_portfolio_report
from tests.data.test_panel import synthetic_frames

ROOT = Path(__file__).resolve().parents[2]
TINY_ARGS = ("--total-timesteps", "128", "--num-envs", "4", "--num-steps", "16", "--update-epochs", "1",
             "--num-minibatches", "2", "--d-model", "8", "--ff-size", "16", "--hidden-size", "16")
COMMON = ("--window", "4", "--episode-length", "16", "--fee-bps", "2", "--slippage-bps", "1")


def tiny_config(**changes) -> PortfolioExperimentConfig:
    fields = dict(name="tiny_portfolio", agents=(AgentSpec("pp", "ppo_portfolio", TINY_ARGS),), common_args=COMMON,
                  n_groups=3, n_test_groups=2, seeds=(1,), baselines=("equal_weight", "minimum_variance"),
                  rebalance_every=10, lookback=100, min_returns=20, bootstrap_samples=50)
    return PortfolioExperimentConfig(**{**fields, **changes})


@pytest.fixture
def panel_of(monkeypatch):
    """Make the runner read the given frames as its panel (instead of the sp500_20 download-free data set)."""
    def use(frames):
        portfolio_plan._PANELS.clear()
        monkeypatch.setattr(portfolio_plan, "load_sp500_panel", lambda start=None, end=None: load_panel(frames))
    yield use
    portfolio_plan._PANELS.clear()


def test_plan_folds_are_cpcv_on_dates_with_gaps_from_the_longest_reach(panel_of):
    panel_of(synthetic_frames(3, seed=1))
    plan = portfolio_plan.plan_portfolio(tiny_config())
    assert len(plan.folds) == 3 and len(plan.cells) == 3 and plan.assets == ("A0", "A1", "A2")
    # close bank: 20-bar look-back; window 4: the embargo covers window - 1 + span
    assert (plan.gaps.window, plan.gaps.feature_span, plan.gaps.embargo) == (4, 20, 23)
    assert plan.first_valid == 20
    for fold in plan.folds:  # the training segments stop a purge before and an embargo after every test group
        test = fold.test_mask(plan.n_bars)
        for start, stop in fold.train:
            assert not test[max(0, start - plan.gaps.reach):stop].any()


def test_plan_refusals_name_the_problem(panel_of):
    panel_of(synthetic_frames(3, seed=1))
    with pytest.raises(ValueError, match="not a portfolio variant"):
        portfolio_plan.plan_portfolio(tiny_config(agents=(AgentSpec("p", "ppo", ()),)))
    with pytest.raises(ValueError, match="differ in window"):
        portfolio_plan.plan_portfolio(tiny_config(agents=(AgentSpec("a", "ppo_portfolio", TINY_ARGS),
                                                  AgentSpec("b", "ppo_portfolio", (*TINY_ARGS, "--fee-bps", "9")))))
    with pytest.raises(ValueError, match="select-on"):
        portfolio_plan.plan_portfolio(tiny_config(agents=(AgentSpec("a", "ppo_portfolio", (*TINY_ARGS, "--select-on",
                                                                                   "validation_sharpe")),)))


def trained_weights(output: Path, cell) -> dict[str, torch.Tensor]:
    return load_checkpoint(output / "cells" / cell.cell_id / "checkpoint.pt")["agent"]


def perturbed(frames: dict[str, pd.DataFrame], rows: np.ndarray, seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, frame in frames.items():
        frame = frame.copy()
        factor = np.exp(rng.normal(0.0, 0.05, len(rows)))
        for column in ("open", "high", "low", "close"):
            frame.iloc[rows, frame.columns.get_loc(column)] *= factor
        out[name] = frame
    return out


@pytest.mark.slow
def test_training_never_reads_test_group_bars(panel_of, tmp_path):
    """Every bar of the fold's test groups moved (every asset): the trained cell's weights and fitted features are
    bit-identical. A moved training bar moves them (the check can fail)."""
    frames = synthetic_frames(3, seed=2)
    panel_of(frames)
    plan = portfolio_plan.plan_portfolio(tiny_config(n_groups=4))
    # a fold with a test group between two training segments: the span of its training range holds test bars
    cell = next(c for c in plan.cells
                if any(plan.folds[c.fold].train[0][1] <= a < plan.folds[c.fold].train[-1][0]
                       for a, _ in plan.folds[c.fold].test))
    fold = plan.folds[cell.fold]
    portfolio_cells.run_portfolio_cell(plan, cell, tmp_path / "clean")
    clean = trained_weights(tmp_path / "clean", cell)
    test_rows = np.flatnonzero(fold.test_mask(plan.n_bars))
    panel_of(perturbed(frames, test_rows, seed=3))
    portfolio_cells.run_portfolio_cell(plan, cell, tmp_path / "moved_test")
    moved = trained_weights(tmp_path / "moved_test", cell)
    assert clean.keys() == moved.keys()
    for key in clean:
        assert torch.equal(clean[key], moved[key]), key
    # ... while its test-group evaluation did see the moved prices
    groups = [pd.read_parquet(tmp_path / run / "cells" / cell.cell_id / "groups.parquet")
              for run in ("clean", "moved_test")]
    assert not np.array_equal(groups[0]["equity"], groups[1]["equity"])
    start, stop = fold.train[0]
    panel_of(perturbed(frames, np.arange(start + 30, stop), seed=4))
    portfolio_cells.run_portfolio_cell(plan, cell, tmp_path / "moved_train")
    moved_train = trained_weights(tmp_path / "moved_train", cell)
    assert any(not torch.equal(clean[k], moved_train[k]) for k in clean)


@pytest.mark.slow
def test_agents_and_baselines_share_folds_and_a_rerun_gives_the_same_numbers(panel_of, tmp_path):
    panel_of(synthetic_frames(3, seed=5))
    plan = portfolio_plan.plan_portfolio(tiny_config(name="first"))
    # the first run through the command line: a kind = "portfolio" file goes to the portfolio runner
    config_file = tmp_path / "tiny.toml"
    config_file.write_text("\n".join([
        'kind = "portfolio"', 'name = "first"', f"common_args = {json.dumps(list(COMMON))}",
        "n_groups = 3", "n_test_groups = 2", "seeds = [1]", 'baselines = ["equal_weight", "minimum_variance"]',
        "rebalance_every = 10", "lookback = 100", "min_returns = 20", "bootstrap_samples = 50",
        "[agents.pp]", 'variant = "ppo_portfolio"', f"args = {json.dumps(list(TINY_ARGS))}"]))
    assert load_portfolio_config(config_file) == plan.config
    first = experiment_main(["--config", str(config_file), "--output-root", str(tmp_path), "--no-progress"])
    assert first == tmp_path / "first"
    results = pd.read_parquet(first / "results.parquet")
    # identical folds: every baseline's test-group marks are the agent's, bar for bar, on every fold
    for cell in plan.cells:
        agent = pd.read_parquet(first / "cells" / cell.cell_id / "groups.parquet")
        for name in plan.config.baselines:
            base = pd.read_parquet(first / "baselines" / f"{name}__fold{cell.fold:03d}" / "groups.parquet")
            for column in ("group", "path", "timestamp", "start"):
                assert agent[column].tolist() == base[column].tolist()
    assert set(results["name"]) == {"pp", "equal_weight", "minimum_variance"}
    assert (results.groupby("name").size() == 2).all()  # 2 backtest paths each
    # a killed run: one cell and one baseline fold lost; rerunning recomputes them and nothing else changes
    second = tmp_path / "second"
    shutil.copytree(first, second)
    shutil.rmtree(second / "cells" / plan.cells[0].cell_id)
    shutil.rmtree(second / "baselines" / "minimum_variance__fold002")
    again = runner.run_portfolio_experiment(plan, second)
    pd.testing.assert_frame_equal(results, again)
    for name in (runner.PATHS_FILE, runner.MEMORISATION_FILE, "equity.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(first / name), pd.read_parquet(second / name))
    # contributions and costs add up to each path's total return (the report's identity on real runs)
    paths = pd.read_parquet(first / runner.PATHS_FILE)
    contributions = paths[[c for c in paths if c.startswith("contrib:")]].sum(axis=1) - paths["costs"]
    np.testing.assert_allclose(contributions, paths["total_return"], atol=1e-12)
    np.testing.assert_allclose(paths["total_return_check"], paths["total_return"], atol=1e-12)
    # the report is built from those files alone
    tables = write_portfolio_report(first, tmp_path / "report", labels={"range": "synthetic"}, reps=100)
    assert list(tables["tests"].columns) == ["pp"]
    assert tables["tests"].loc["best_baseline", "pp"] in {"equal_weight", "minimum_variance"}
    assert list(tables["asset_contribution"].columns) == ["A0", "A1", "A2", "costs"]
    assert tables["memorisation"].loc["pp", "cells"] == 3
    memo = pd.read_parquet(first / runner.MEMORISATION_FILE)
    record = json.loads((first / "cells" / plan.cells[0].cell_id / "cell.json").read_text())
    assert memo.loc[0, "test_sharpe"] == record["test_sharpe"] and np.isfinite(record["in_sample_sharpe"])
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Portfolio experiment report")
    # a folder finished with other arguments is refused, not mixed in
    other = portfolio_plan.plan_portfolio(tiny_config(common_args=(*COMMON, "--gamma", "0.9")))
    with pytest.raises(ValueError, match="other arguments"):
        runner.run_portfolio_experiment(other, first)


def test_config_file_and_refusals(tmp_path):
    config = load_portfolio_config(ROOT / "experiments/configs/sp500_20_portfolio_cpcv.toml")
    assert config.n_trials == 1 and len(config.seeds) >= 5 and len(config.baselines) == 6
    assert is_portfolio_file(ROOT / "experiments/configs/sp500_20_portfolio_cpcv.toml")
    assert not is_portfolio_file(ROOT / "experiments/configs/sp500_cpcv.toml")
    assert not is_portfolio_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    for text, match in [('name = "x"', "not a portfolio"), ('kind = "portfolio"\nfoo = 1', "unknown keys"),
                        ('kind = "portfolio"\n[agents.a]\nbar = 1', "unknown keys"),
                        ('kind = "portfolio"', "no \\[agents")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_portfolio_config(bad)
    with pytest.raises(FileNotFoundError):
        load_portfolio_config(tmp_path / "missing.toml")
    agent = (AgentSpec("a", "ppo_portfolio"),)
    for changes, match in [({"agents": (AgentSpec("a", "ppo_portfolio"),) * 2}, "repeat"),
                           ({"dataset": "sp500"}, "panel"), ({"baselines": ("nope",)}, "baselines"),
                           ({"seeds": (1, 1)}, "seeds"), ({"rebalance_every": 0}, "rebalance_every")]:
        with pytest.raises(ValueError, match=match):
            PortfolioExperimentConfig(**{"name": "x", "agents": agent, **changes})


def test_committed_report_tables_are_todays_from_its_own_inputs():
    """reports/sp500_20_portfolio_cpcv: the portfolio tables recomputed from its committed paths.csv and
    memorisation_cells.csv are the committed files (the summary tables: tests/experiment/test_committed_reports.py)."""
    from sentio_lab.evaluation.portfolio_report import asset_table, concentration_table
    from sentio_lab.experiment.portfolio_summary import memorisation_table

    report = ROOT / "reports" / "sp500_20_portfolio_cpcv"
    paths = pd.read_csv(report / "paths.csv")
    memo = pd.read_csv(report / "memorisation_cells.csv")
    contribution = asset_table(paths, "contrib").assign(costs=paths.groupby("name", sort=False)["costs"].median())
    expected = {"asset_contribution": contribution, "asset_turnover": asset_table(paths, "turnover"),
                "concentration": concentration_table(paths), "memorisation": memorisation_table(memo)}
    for stem, table in expected.items():
        committed = pd.read_csv(report / f"{stem}.csv", index_col=0)
        pd.testing.assert_frame_equal(table, committed, check_names=False, rtol=1e-12)
    # the identity behind the contribution table holds on every committed path
    contributions = paths[[c for c in paths if c.startswith("contrib:")]].sum(axis=1) - paths["costs"]
    np.testing.assert_allclose(contributions, paths["total_return"], atol=1e-10)
    assert len(memo) == 5 * 6 and memo["seed"].nunique() >= 5
