"""Seed ensembles of portfolio agents (sentio_lab.experiment.portfolio_episodes.ensemble_decide and the runner's
``<name>_ensemble`` strategy): the members' target weights averaged at each decision -- an anchored member's target is
its projected tilt, not the raw tilt -- a hand replay of the averaged weights gives the ensemble's equity, and the
ensemble counts as one more trial."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data.panel import load_panel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_anchor import PortfolioAnchor, equal_weight_benchmark, project_to_simplex
from sentio_lab.env.portfolio_arrays import build_portfolio_arrays
from sentio_lab.experiment import portfolio_plan
from sentio_lab.experiment import portfolio_runner as runner
from sentio_lab.experiment.config import AgentSpec
from sentio_lab.experiment.portfolio_config import PortfolioExperimentConfig, load_portfolio_config
from sentio_lab.experiment.portfolio_episodes import ensemble_decide
from tests.data.test_panel import synthetic_frames
from tests.experiment.test_portfolio_runner import TINY_ARGS, tiny_config


class Fixed(torch.nn.Module):
    """A member whose greedy action is the same row for every observation."""

    def __init__(self, row) -> None:
        super().__init__()
        self.row = torch.tensor([row], dtype=torch.float32)

    def act_greedy(self, obs: torch.Tensor) -> torch.Tensor:
        return self.row.expand(obs.shape[0], -1)


def test_members_average_their_target_weights():
    obs = torch.zeros(1, 5)
    weights = ensemble_decide([Fixed([0.5, 0.5, 0.0]), Fixed([0.0, 0.25, 0.75])], None)
    targets, hold = weights(0, 3, obs)
    np.testing.assert_allclose(targets, [0.25, 0.375, 0.375], rtol=1e-7)
    assert not hold
    signed = ensemble_decide([Fixed([1.0, -0.5]), Fixed([-0.2, 0.3])], None)
    np.testing.assert_allclose(signed(0, 0, obs)[0], [0.4, -0.1], rtol=1e-6)
    # anchored: the mean of the projected targets, as a tilt around b_t; tilts that cancel are not the benchmark
    benchmark = equal_weight_benchmark(10, 3)
    benchmark[4] = [0.5, 0.2, 0.1, 0.2]
    tilts = [[2.0, -1.0, 0.0, 0.0], [-2.0, 1.0, 0.0, 0.0]]
    tilt, _ = ensemble_decide([Fixed(t) for t in tilts], lambda: torch.as_tensor(benchmark[4])[None])(0, 4, obs)
    b = torch.as_tensor(benchmark[4])
    expected = torch.stack([project_to_simplex(b + torch.tensor(t, dtype=torch.float64)) for t in tilts]).mean(0)
    np.testing.assert_allclose(tilt + benchmark[4], expected.numpy(), atol=1e-7)
    assert not np.allclose(tilt, 0.0, atol=1e-3)  # averaging the raw tilts would give the benchmark
    assert torch.allclose(project_to_simplex(b + torch.as_tensor(tilt)), expected, atol=1e-7)


def test_with_a_drifting_anchor_the_ensemble_trades_the_mean_of_its_members_targets():
    """Between the benchmark's re-targets (k = 5) the env tilts around its drifted weights d_t: the ensemble's tilt
    must be measured from there, so that the env trades mean_i P(d_t + tau_i), each member's own target (a member
    alone in a copy of the env: the benchmark's shadow account does not depend on the agent's trades)."""
    arrays, _ = build_portfolio_arrays(load_panel(synthetic_frames(3, n_bars=120)), train_stop=100)
    a = arrays.num_assets
    anchor = PortfolioAnchor(equal_weight_benchmark(len(arrays.close), a), rebalance_every=5)
    tilts = [[0.6, -0.5, 0.0, -0.3], [-0.4, 0.5, 0.2, -0.6], [0.0, 0.1, -0.7, 0.3]]  # each projection binds

    def env():
        built = PortfolioEnv(arrays, num_envs=1, window=4, episode_length=20, anchor=anchor, seed=0)
        built.reset([30])
        return built
    ensemble, alone = env(), [env() for _ in tilts]
    members = [Fixed(t) for t in tilts]
    decide = ensemble_decide(members, ensemble.tilt_base)
    for k in range(12):
        action, _ = decide(k, int(ensemble.t[0]), torch.zeros(1, ensemble.obs_dim))
        traded = ensemble.step(torch.as_tensor(action)[None])[4]["weights"][0]
        targets = [e.step(m.row.to(torch.float64))[4]["weights"][0] for e, m in zip(alone, members, strict=True)]
        assert all(bool((t == 0).any()) for t in targets)  # the projections bind (a corner or a face)
        torch.testing.assert_close(traded, torch.stack(targets).mean(0), rtol=0, atol=1e-12)


def test_ensemble_fields():
    spec = AgentSpec("a", "ppo_portfolio", ensemble=True)
    assert PortfolioExperimentConfig(name="x", agents=(spec,)).n_trials == 2
    for agents, match in [((spec, AgentSpec("a_ensemble", "ppo_portfolio")), "taken by seed ensembles"),
                          ((AgentSpec("a", "ppo_portfolio", gate_margin=0.1),), "gate_margin")]:
        with pytest.raises(ValueError, match=match):
            PortfolioExperimentConfig(name="x", agents=agents)


@pytest.fixture
def panel_of(monkeypatch):
    def use(frames):
        portfolio_plan._PANELS.clear()
        monkeypatch.setattr(portfolio_plan, "load_sp500_panel", lambda start=None, end=None: load_panel(frames))
    yield use
    portfolio_plan._PANELS.clear()


@pytest.mark.slow
def test_ensemble_equity_is_a_hand_replay_of_the_averaged_weights(panel_of, tmp_path):
    panel_of(synthetic_frames(3, seed=9))
    file = tmp_path / "e.toml"
    file.write_text("\n".join(['kind = "portfolio"', "[agents.pp]", "ensemble = true",
                               f"args = {json.dumps(list(TINY_ARGS))}"]))
    spec = load_portfolio_config(file).agents[0]
    assert spec.ensemble
    plan = portfolio_plan.plan_portfolio(tiny_config(agents=(spec,), seeds=(1, 2), baselines=("equal_weight",)))
    results = runner.run_portfolio_experiment(plan, tmp_path / "out")
    assert set(results["name"]) == {"pp", "pp_ensemble", "equal_weight"}
    assert (results["n_trials"] == 2).all()
    assert (results.loc[results["name"] == "pp_ensemble", "seed"] == -2).all()
    fold = plan.folds[0]
    module, args = load_variant("ppo_portfolio"), parse_variant_args("ppo_portfolio", plan.cells[0].args)
    market = portfolio_plan.fold_market(plan, fold, module, args)
    arrays = market.arrays
    members = []
    for cell in (c for c in plan.cells if c.fold == fold.fold):
        net = module.build_agent(args, arrays.num_assets * (4 * arrays.features.shape[2] + 1) + 1,
                                 arrays.num_assets + 1)
        net.load_state_dict(load_checkpoint(tmp_path / "out" / "cells" / cell.cell_id / "checkpoint.pt")["agent"])
        members.append(net.eval())
    assert len(members) == 2
    groups = pd.read_parquet(tmp_path / "out" / "ensembles" / "pp_ensemble__fold000" / "groups.parquet")
    singles = pd.read_parquet(tmp_path / "out" / "cells" / plan.cells[0].cell_id / "groups.parquet")
    segment, group = fold.test[0], fold.groups[0]
    start = max(segment[0], arrays.first_valid + 3)
    steps = segment[1] - 1 - start
    env = PortfolioEnv(arrays, num_envs=1, window=4, episode_length=steps, start=segment[0], stop=segment[1],
                       costs=module.cost_model(args))
    obs, equity = env.reset([start]), [1.0]
    for _ in range(steps):
        mean = (members[0].act_greedy(obs).double() + members[1].act_greedy(obs).double()) / 2
        obs, _, _, _, info = env.step(mean)
        equity.append(float(info["equity"][0]))
    mine = groups.loc[groups["group"] == group, "equity"].to_numpy()
    np.testing.assert_allclose(mine, equity, rtol=1e-12)
    assert not np.allclose(mine, singles.loc[singles["group"] == group, "equity"].to_numpy(), rtol=1e-9)
    # a rerun reuses the finished ensembles and gives the same table
    pd.testing.assert_frame_equal(results, runner.run_portfolio_experiment(plan, tmp_path / "out"))


def test_an_agent_anchored_on_a_skfolio_baseline_must_fit_it_as_the_runners_baseline(panel_of):
    panel_of(synthetic_frames(3, seed=1))
    def config(*anchor, **changes):
        return tiny_config(agents=(AgentSpec("pp", "ppo_portfolio", (*TINY_ARGS, "--anchor", *anchor)),), **changes)
    with pytest.raises(ValueError, match="lookback=252, min_returns=60, but the config's baselines use lookback=100"):
        portfolio_plan.plan_portfolio(config("hrp"))
    with pytest.warns(UserWarning, match="--anchor-rebalance 1 differs from the config's rebalance_every 10"):
        portfolio_plan.plan_portfolio(config("hrp", lookback=252, min_returns=60))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        portfolio_plan.plan_portfolio(config("hrp", "--anchor-rebalance", "10", lookback=252, min_returns=60))  # alike
        portfolio_plan.plan_portfolio(config("equal_weight"))  # fits nothing: any lookback
