"""The cells of a portfolio run (sentio_lab.experiment.portfolio_cells): a cell and a placebo cell share one
training-and-in-sample step (``train_in_sample``). Their records' in-sample figures are a hand replay of the
checkpoint through a plain long-only env on every training segment that holds two decisions -- on the real panel
for a cell, on the bootstrapped one for its placebo -- and a record written in another format is redone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data.panel import load_panel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.evaluation.metrics import sharpe_ratio
from sentio_lab.evaluation.portfolio_report import record_episode
from sentio_lab.experiment import portfolio_cells, portfolio_plan
from tests.data.test_panel import synthetic_frames
from tests.experiment.test_portfolio_runner import tiny_config


def replayed_in_sample(plan, fold, checkpoint, panel=None) -> tuple[float, int]:
    """(annualised Sharpe of the chained returns, bars) of the checkpoint's greedy weights on ``fold``'s training
    segments, by hand: the window (4) and warm-up fix the first decision, the last mark is the segment's last bar."""
    module = load_variant("ppo_portfolio")
    args = parse_variant_args("ppo_portfolio", plan.cells[0].args)
    arrays = portfolio_plan.fold_market(plan, fold, module, args, panel).arrays
    envs = []
    for a, b in fold.train:
        start = max(a, arrays.first_valid + 3)
        steps = b - 1 - start
        if steps >= 2:
            envs.append((PortfolioEnv(arrays, num_envs=1, window=4, episode_length=steps, start=start, stop=b,
                                      allocation="long_only", costs=plan.accounting["costs"]), start, steps))
    net = module.build_agent(args, envs[0][0].obs_dim, envs[0][0].action_dim)
    net.load_state_dict(load_checkpoint(checkpoint)["agent"])
    net.eval()
    returns, bars = [], 0
    for env, start, steps in envs:
        episode = record_episode(env, lambda k, t, obs: (net.act_greedy(obs)[0].double().numpy(), False), start, steps)
        returns.append(episode.equity[1:] / episode.equity[:-1] - 1.0)
        bars += steps
    return float(sharpe_ratio(np.concatenate(returns), periods=252.0)), bars


def test_a_segment_env_needs_two_decisions_after_the_warm_up(monkeypatch):
    """Decisions run from max(a, warm-up) to b - 2 (the last fill and mark on b - 1): fewer than 2 is no env, for the
    plain env and the agent's own alike; a segment starting inside the warm-up starts at its end."""
    frames = synthetic_frames(3, seed=1)
    portfolio_plan._PANELS.clear()
    monkeypatch.setattr(portfolio_plan, "load_sp500_panel", lambda start=None, end=None: load_panel(frames))
    plan = portfolio_plan.plan_portfolio(tiny_config())
    module = load_variant("ppo_portfolio")
    args = parse_variant_args("ppo_portfolio", plan.cells[0].args)
    market = portfolio_plan.fold_market(plan, plan.folds[0], module, args)
    warm = market.arrays.first_valid + 3  # window 4
    for make in (lambda seg: portfolio_cells.segment_env(plan, market.arrays, seg),
                 lambda seg: portfolio_cells.agent_env(plan, module, args, market, seg)):
        assert make((warm + 10, warm + 12)) is None
        env, start, steps = make((warm + 10, warm + 13))
        assert (start, steps, env.num_envs) == (warm + 10, 2, 1)
        assert make((0, warm + 2)) is None
        assert make((0, warm + 3))[1:] == (warm, 2)
    portfolio_plan._PANELS.clear()


@pytest.mark.slow
def test_a_cell_and_its_placebo_score_their_checkpoint_on_every_training_segment(monkeypatch, tmp_path):
    frames = synthetic_frames(3, seed=6)
    portfolio_plan._PANELS.clear()
    monkeypatch.setattr(portfolio_plan, "load_sp500_panel", lambda start=None, end=None: load_panel(frames))
    plan = portfolio_plan.plan_portfolio(tiny_config(n_groups=4, placebo="stationary_bootstrap", placebo_seeds=1))
    # a fold with several training segments: the in-sample figures chain them
    cell = next(c for c in plan.cells if len(plan.folds[c.fold].train) >= 2)
    fold = plan.folds[cell.fold]
    placebo = next(c for c in plan.placebo_cells if c.fold == cell.fold)
    record = portfolio_cells.run_portfolio_cell(plan, cell, tmp_path)
    sharpe, bars = replayed_in_sample(plan, fold, tmp_path / "cells" / cell.cell_id / record["checkpoint"])
    assert record["in_sample_bars"] == bars and record["in_sample_sharpe"] == pytest.approx(sharpe, rel=1e-12)
    assert np.isfinite(record["test_sharpe"]) and record["format"] == portfolio_cells.PORTFOLIO_FORMAT

    folder = tmp_path / portfolio_cells.PLACEBO_DIR / placebo.cell_id
    shuffled = portfolio_cells.run_portfolio_placebo_cell(plan, placebo, tmp_path)
    panel = portfolio_cells.placebo_panel(plan, fold, int(placebo.placebo))
    sharpe, bars = replayed_in_sample(plan, fold, folder / shuffled["checkpoint"], panel)
    assert shuffled["in_sample_bars"] == bars and shuffled["in_sample_sharpe"] == pytest.approx(sharpe, rel=1e-12)
    assert "test_sharpe" not in shuffled  # a placebo cell never looks at the test groups
    assert shuffled["in_sample_sharpe"] != record["in_sample_sharpe"]  # it trained and ran on the bootstrapped panel

    # a record of another format is redone (to the same numbers: the cell is seeded); this format's is reused
    stale = {**shuffled, "format": portfolio_cells.PORTFOLIO_FORMAT + 1, "in_sample_sharpe": 99.0}
    (folder / "cell.json").write_text(json.dumps(stale))
    assert portfolio_cells.run_portfolio_placebo_cell(plan, placebo, tmp_path) == shuffled
    kept = {**shuffled, "in_sample_sharpe": 99.0}
    (folder / "cell.json").write_text(json.dumps(kept))
    assert portfolio_cells.run_portfolio_placebo_cell(plan, placebo, tmp_path)["in_sample_sharpe"] == 99.0
    portfolio_plan._PANELS.clear()
