"""Anchored and long-short portfolio agents through the runner (sentio_lab.experiment.portfolio_runner): each cell is
evaluated in the agent's own env (allocation, gross limit, anchor, costs). An anchored agent forced to the zero tilt
*is* the equal-weight benchmark, bar for bar, on the runner's folds; a long-short cell's equity is a hand replay of
its checkpoint through a long-short env; the baselines do not move."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data.panel import load_panel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_anchor import equal_weight_benchmark
from sentio_lab.evaluation.portfolio_report import record_episode
from sentio_lab.experiment import portfolio_cells, portfolio_plan
from sentio_lab.experiment import portfolio_runner as runner
from sentio_lab.experiment.config import AgentSpec
from tests.data.test_panel import synthetic_frames
from tests.experiment.test_portfolio_runner import TINY_ARGS, tiny_config


@pytest.fixture
def panel_of(monkeypatch):
    """Make the runner read the given frames as its panel."""
    def use(frames):
        portfolio_plan._PANELS.clear()
        monkeypatch.setattr(portfolio_plan, "load_sp500_panel", lambda start=None, end=None: load_panel(frames))
    yield use
    portfolio_plan._PANELS.clear()


def _forced_zero_tilt(monkeypatch) -> None:
    real = portfolio_cells.load_cell_agent

    def forced(*args, **kwargs):
        agent = real(*args, **kwargs)
        assert agent.policy == "tilt"  # the agent's own action distribution reached the evaluation
        agent.act_greedy = lambda obs: torch.zeros(obs.shape[0], agent.action_dim)
        return agent
    monkeypatch.setattr(portfolio_cells, "load_cell_agent", forced)


@pytest.mark.slow
def test_zero_tilt_anchored_agent_scores_the_equal_weight_benchmark_on_every_fold(panel_of, monkeypatch, tmp_path):
    """Rebalancing every bar, the equal_weight baseline is the anchor's benchmark: the forced zero-tilt agent's
    results, equity paths and per-asset tables equal it exactly. An unanchored evaluation env (the runner before this
    change) would read the zero action as invalid weights; a tilt of +0.1 on one asset moves the equity."""
    panel_of(synthetic_frames(3, seed=7))
    _forced_zero_tilt(monkeypatch)
    agent = AgentSpec("anchored", "ppo_portfolio", (*TINY_ARGS, "--anchor", "equal_weight", "--excess-reward"))
    plan = portfolio_plan.plan_portfolio(tiny_config(agents=(agent,), baselines=("equal_weight",), rebalance_every=1))
    results = runner.run_portfolio_experiment(plan, tmp_path)
    stats = ["sharpe", "cagr", "max_drawdown", "total_return", "turnover_per_year", "costs_paid"]
    mine = results[results["name"] == "anchored"].reset_index(drop=True)
    base = results[results["name"] == "equal_weight"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[stats], base[stats], check_exact=True)
    curves = pd.read_parquet(tmp_path / "equity.parquet")
    assert np.array_equal(curves.loc[curves["name"] == "anchored", "equity"].to_numpy(),
                          curves.loc[curves["name"] == "equal_weight", "equity"].to_numpy())
    # and the same cell with a real tilt is not the benchmark (the comparison can fail)
    cell = plan.cells[0]
    fold = plan.folds[cell.fold]
    module, args = load_variant(cell.variant), parse_variant_args(cell.variant, cell.args)
    market = portfolio_plan.fold_market(plan, fold, module, args)
    env, start, steps = portfolio_cells.agent_env(plan, module, args, market, fold.test[0])
    assert env.anchor is not None and env.anchor.excess_reward
    tilt = np.zeros(4)
    tilt[0] = 0.1
    tilted = record_episode(env, lambda k, t, obs: (tilt, False), start, steps)
    groups = pd.read_parquet(tmp_path / "cells" / cell.cell_id / "groups.parquet")
    first = groups[groups["group"] == fold.groups[0]]
    assert not np.allclose(tilted.equity, first["equity"].to_numpy())
    # the benchmark's own weights, run as a policy through a plain long-only env: the same equity, bit for bit
    weights = equal_weight_benchmark(1, 3)[0]
    plain, start, steps = portfolio_cells.segment_env(plan, market.arrays, fold.test[0])
    plain_run = record_episode(plain, lambda k, t, obs: (weights, False), start, steps)
    assert np.array_equal(plain_run.equity, first["equity"].to_numpy())


@pytest.mark.slow
def test_long_short_cell_equity_is_a_hand_replay_through_its_env(panel_of, tmp_path):
    """A long-short cell (gross limit 1.5, borrow on the shorts): its test-group equity is the checkpoint's greedy
    signed weights replayed by hand through a long-short PortfolioEnv; it holds shorts; contributions and costs
    (borrow included) add up to each path's return. That sum is not true by construction: the recorder computes the
    borrow as the env charges it and checks every step's P&L identity (it raises otherwise; the unit checks are in
    test_portfolio_report_figures.py), so here it checks the chaining of the groups' episodes into paths."""
    panel_of(synthetic_frames(3, seed=8))
    agent = AgentSpec("ls", "ppo_portfolio", (*TINY_ARGS, "--long-short", "--gross-limit", "1.5",
                                              "--borrow-bps", "300"))
    plan = portfolio_plan.plan_portfolio(tiny_config(agents=(agent,), baselines=("equal_weight",)))
    results = runner.run_portfolio_experiment(plan, tmp_path)
    assert set(results["name"]) == {"ls", "equal_weight"}
    cell = plan.cells[0]
    fold = plan.folds[cell.fold]
    module, args = load_variant(cell.variant), parse_variant_args(cell.variant, cell.args)
    market = portfolio_plan.fold_market(plan, fold, module, args)
    arrays = market.arrays
    net = module.build_agent(args, arrays.num_assets * (4 * arrays.features.shape[2] + 1) + 1, arrays.num_assets)
    net.load_state_dict(load_checkpoint(tmp_path / "cells" / cell.cell_id / "checkpoint.pt")["agent"])
    net.eval()
    groups = pd.read_parquet(tmp_path / "cells" / cell.cell_id / "groups.parquet")
    shorts = 0
    for group, segment in zip(fold.groups, fold.test, strict=True):
        start = max(segment[0], arrays.first_valid + 3)
        steps = segment[1] - 1 - start
        env = PortfolioEnv(arrays, num_envs=1, window=4, episode_length=steps, start=segment[0], stop=segment[1],
                           allocation="long_short", gross_limit=1.5, costs=module.cost_model(args))
        obs, equity = env.reset([start]), [1.0]
        for _ in range(steps):
            action = net.act_greedy(obs)
            shorts += int((action < 0).sum())
            obs, _, _, _, info = env.step(action)
            equity.append(float(info["equity"][0]))
        assert np.array_equal(groups.loc[groups["group"] == group, "equity"].to_numpy(), np.array(equity))
    assert shorts > 0
    paths = pd.read_parquet(tmp_path / runner.PATHS_FILE)
    contributions = paths[[c for c in paths if c.startswith("contrib:")]].sum(axis=1) - paths["costs"]
    np.testing.assert_allclose(contributions, paths["total_return"], atol=1e-12)


def test_plan_refuses_what_the_variant_refuses(panel_of):
    panel_of(synthetic_frames(3, seed=1))
    for flags, match in [(("--excess-reward",), "--excess-reward only acts with --anchor"),
                         (("--anchor", "equal_weight", "--long-short"), "--anchor with --long-short")]:
        with pytest.raises(ValueError, match=match):
            portfolio_plan.plan_portfolio(tiny_config(agents=(AgentSpec("a", "ppo_portfolio", (*TINY_ARGS, *flags)),)))
