"""Placebo control of portfolio experiments (sentio_lab.experiment.portfolio_placebo and the runner's placebo cells):
one set of bootstrap source bars for every asset (the single-asset scheme, asset by asset, with shared draws), only
training segments resampled, test-group bars never moving the placebo training data, and the floor in the report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data.panel import load_panel, load_sp500_panel
from sentio_lab.experiment import portfolio_cells, portfolio_plan
from sentio_lab.experiment import portfolio_runner as runner
from sentio_lab.experiment.cells import Cell
from sentio_lab.experiment.config import AgentSpec
from sentio_lab.experiment.placebo import bootstrap_training_bars
from sentio_lab.experiment.portfolio_config import PortfolioExperimentConfig, load_portfolio_config
from sentio_lab.experiment.portfolio_placebo import bootstrap_panel, placebo_cells, segment_sources
from sentio_lab.experiment.portfolio_summary import write_portfolio_report
from tests.data.test_panel import synthetic_frames
from tests.experiment.test_portfolio_runner import TINY_ARGS, perturbed, tiny_config

SEGMENTS = [(10, 120), (160, 161), (200, 330)]


def test_every_asset_takes_the_single_asset_bootstrap_with_the_same_source_bars():
    frames = synthetic_frames(3, n_bars=400, seed=3)
    panel = load_panel(frames)
    placebo, sources = bootstrap_panel(panel, SEGMENTS, block_mean=4.0, seed=7)
    for asset in panel.assets:  # the same draws as the single-asset placebo, for every asset
        single, single_sources = bootstrap_training_bars(panel.frames[asset], SEGMENTS, block_mean=4.0, seed=7)
        pd.testing.assert_frame_equal(placebo.frames[asset], single, check_exact=False, rtol=1e-12)
        assert single_sources.keys() == sources.keys()
        for start in sources:
            assert np.array_equal(single_sources[start], sources[start])
    # the cross-section stays coherent: every asset's rebuilt bar t earns its own return of the same source bar
    close, new = panel.column("close"), placebo.column("close")
    rows = np.arange(11, 120)
    np.testing.assert_allclose(new[rows] / new[rows - 1], close[sources[10]] / close[sources[10] - 1], rtol=1e-12)
    # rows outside the segments (and each segment's first bar) are the real bars; rows inside are not
    inside = np.zeros(400, dtype=bool)
    for a, b in SEGMENTS:
        inside[a + 1:b] = True
    assert np.array_equal(new[~inside], close[~inside])
    assert not np.allclose(new[inside], close[inside])
    again, _ = bootstrap_panel(panel, SEGMENTS, block_mean=4.0, seed=7)
    other, _ = bootstrap_panel(panel, SEGMENTS, block_mean=4.0, seed=8)
    assert np.array_equal(again.column("close"), new) and not np.array_equal(other.column("close"), new)


def test_close_only_panel_keeps_its_unknown_columns_unknown():
    panel = load_sp500_panel(start="2019-01-01", end="2019-12-31", assets=["AAPL", "AMD", "BAC"])
    placebo, sources = bootstrap_panel(panel, [(5, 200)], block_mean=5.0, seed=1)
    assert placebo.close_only and np.isnan(placebo.column("open")).all()
    assert np.isfinite(placebo.column("close")).all() and (placebo.column("close") > 0).all()
    assert len(sources[5]) == 194 and sources[5].min() >= 6 and sources[5].max() < 200
    with pytest.raises(ValueError, match="overlap"):
        segment_sources(100, [(0, 50), (40, 90)], block_mean=5.0, seed=0)
    with pytest.raises(ValueError, match="outside the panel"):
        segment_sources(100, [(0, 150)], block_mean=5.0, seed=0)


@pytest.fixture
def panel_of(monkeypatch):
    def use(frames):
        portfolio_plan._PANELS.clear()
        monkeypatch.setattr(portfolio_plan, "load_sp500_panel", lambda start=None, end=None: load_panel(frames))
    yield use
    portfolio_plan._PANELS.clear()


def test_test_group_bars_never_move_the_placebo_training_data(panel_of):
    """Every test-group bar of a fold moved (every asset): the placebo panel's bars and the placebo fold market's
    features and prices on the training rows are identical; moving a training bar moves them."""
    frames = synthetic_frames(3, seed=2)
    panel_of(frames)
    plan = portfolio_plan.plan_portfolio(tiny_config(n_groups=4, placebo="stationary_bootstrap", placebo_seeds=2))
    fold = next(f for f in plan.folds if any(f.train[0][1] <= a < f.train[-1][0] for a, _ in f.test))
    module = load_variant("ppo_portfolio")
    args = parse_variant_args("ppo_portfolio", plan.cells[0].args)
    rows = np.concatenate([np.arange(a, b) for a, b in fold.train])

    def training_inputs():
        market = portfolio_plan.fold_market(plan, fold, module, args, portfolio_cells.placebo_panel(plan, fold, 1))
        return market.arrays.features[rows], market.arrays.close[rows], market.arrays.fill[rows]

    clean = training_inputs()
    panel_of(perturbed(frames, np.flatnonzero(fold.test_mask(plan.n_bars)), seed=3))
    for before, after in zip(clean, training_inputs(), strict=True):
        assert np.array_equal(before, after)
    start, stop = fold.train[0]
    panel_of(perturbed(frames, np.arange(start + 5, stop), seed=4))
    assert not np.array_equal(clean[1], training_inputs()[1])


def test_placebo_cells_and_fields():
    cells = [Cell("a", "ppo_portfolio", (), seed, fold) for seed in (1, 2) for fold in (0, 1)]
    made = placebo_cells(cells, (1, 2), 3)
    assert [(c.agent, c.fold, c.placebo, c.seed) for c in made] == [
        ("a", 0, 0, 1), ("a", 0, 1, 2), ("a", 0, 2, 1), ("a", 1, 0, 1), ("a", 1, 1, 2), ("a", 1, 2, 1)]
    assert len({c.cell_id for c in made}) == 6 and all("__placebo" in c.cell_id for c in made)
    agent = (AgentSpec("a", "ppo_portfolio"),)
    for changes, match in [({"placebo": "shuffle"}, "placebo 'shuffle'"),
                           ({"placebo": "stationary_bootstrap", "placebo_seeds": 0}, "placebo_seeds")]:
        with pytest.raises(ValueError, match=match):
            PortfolioExperimentConfig(**{"name": "x", "agents": agent, **changes})


@pytest.mark.slow
def test_placebo_runs_give_the_floor_next_to_the_real_in_sample_sharpe(panel_of, tmp_path):
    panel_of(synthetic_frames(3, seed=5))
    config = tiny_config(agents=(AgentSpec("pp", "ppo_portfolio", TINY_ARGS),), baselines=("equal_weight",),
                         placebo="stationary_bootstrap", placebo_seeds=2, placebo_block_mean=3.0)
    plan = portfolio_plan.plan_portfolio(config)
    assert len(plan.placebo_cells) == 2 * len(plan.folds)
    runner.run_portfolio_experiment(plan, tmp_path / "out")
    placebo = pd.read_parquet(tmp_path / "out" / runner.PLACEBO_FILE)
    assert len(placebo) == 6 and placebo["in_sample_sharpe"].notna().all()
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["placebo_cells"][0].startswith("pp__placebo0")
    memo = pd.read_parquet(tmp_path / "out" / runner.MEMORISATION_FILE)
    # a placebo cell did not reuse the real cell's training: its in-sample Sharpe differs
    assert not np.allclose(np.sort(placebo["in_sample_sharpe"]), np.sort(memo["in_sample_sharpe"].repeat(2)))
    tables = write_portfolio_report(tmp_path / "out", tmp_path / "report", labels={}, reps=100)
    row = tables["placebo"].loc["pp"]
    assert row["placebo_runs"] == 6
    assert row["floor"] == pytest.approx(np.quantile(placebo["in_sample_sharpe"], 0.95))
    assert row["share_at_or_below_floor"] == pytest.approx(np.mean(memo["in_sample_sharpe"] <= row["floor"]))
    assert "## Placebo floor" in (tmp_path / "report" / "report.md").read_text()
    # a rerun reuses every finished placebo cell: the same table
    runner.run_portfolio_experiment(plan, tmp_path / "out")
    pd.testing.assert_frame_equal(placebo, pd.read_parquet(tmp_path / "out" / runner.PLACEBO_FILE))
    # a file with the placebo on
    file = tmp_path / "p.toml"
    file.write_text('kind = "portfolio"\nplacebo = "stationary_bootstrap"\nplacebo_seeds = 2\n[agents.a]\n')
    assert load_portfolio_config(file).placebo_seeds == 2
