"""Seed ensembles (issue 19 s3): greedy on the members' mean action probabilities, one more trial in the runner."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab import ppo
from sentio_lab.agents.nets import MLPActorCritic
from sentio_lab.data import load_market
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig, load_config
from sentio_lab.experiment.ensemble import ENSEMBLE_SEED, SeedEnsemble, action_probabilities, ensemble_name
from sentio_lab.experiment.runner import EQUITY_FILE, plan_experiment, run_experiment
from sentio_lab.experiment.summary import infer, strategy_table


def constant_policy(probabilities: list[float], obs_dim: int = 4) -> MLPActorCritic:
    """A real actor-critic whose policy is ``probabilities`` whatever it observes."""
    net = MLPActorCritic(obs_dim, len(probabilities), hidden=8, norm_obs=False)
    with torch.no_grad():
        net.actor[-1].weight.zero_()
        net.actor[-1].bias.copy_(torch.log(torch.tensor(probabilities)))
    return net.eval()


A = [0.899, 0.1, 0.001]  # sure of level 0
B = [0.001, 0.449, 0.55]  # split between levels 1 and 2


def test_the_mean_is_of_probabilities_not_of_logits():
    obs = torch.randn(5, 4)
    a, b = constant_policy(A), constant_policy(B)
    assert torch.allclose(action_probabilities(a, obs, 3), torch.tensor(A).expand(5, 3), atol=1e-6)
    both = SeedEnsemble([a, b], 3)
    assert torch.allclose(both.probabilities(obs), torch.tensor([0.45, 0.2745, 0.2755]).expand(5, 3), atol=1e-6)
    assert both.act_greedy(obs).tolist() == [0] * 5  # the probability mean: 0.45 for level 0
    logit_mean = (torch.log(torch.tensor(A)) + torch.log(torch.tensor(B))) / 2
    assert int(logit_mean.argmax()) == 1  # averaging logits (a geometric mean) would pick level 1
    assert a.act_greedy(obs).tolist() == [0] * 5 and b.act_greedy(obs).tolist() == [2] * 5  # no member vote


def test_under_a_mask_each_member_acts_on_its_own_masked_policy():
    """Level 0 invalid: A renormalises to (0.990, 0.010) over levels 1-2, B to (0.449, 0.551); the mean picks 1
    (masking the unmasked mean would pick 2)."""
    obs = torch.randn(2, 4)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    both = SeedEnsemble([constant_policy(A), constant_policy(B)], 3)
    assert both.act_greedy(obs, mask).tolist() == [1, 0]
    assert float(both.probabilities(obs, mask)[0, 0]) == 0.0


def test_an_empty_ensemble_is_refused():
    with pytest.raises(ValueError, match="at least one member"):
        SeedEnsemble([], 3)


def test_an_ensemble_of_one_is_its_member(tiny_args, synthetic_market):
    member = ppo.train(tiny_args, market=synthetic_market).agent.eval()
    kwargs = {"window": tiny_args.features.window, "positions": tuple(tiny_args.env.positions),
              "costs": ppo.cost_model(tiny_args), "range_name": "test"}
    alone = evaluate_policy(member, synthetic_market, **kwargs)
    one = evaluate_policy(SeedEnsemble([member], 3), synthetic_market, **kwargs)
    pd.testing.assert_series_equal(one.weights, alone.weights)
    pd.testing.assert_series_equal(one.equity, alone.equity)
    assert alone.weights.nunique() > 1  # the member trades: the comparison sees its decisions


# ------------------------------------------------------------------------------------------------ config
def test_config_reads_the_flag_and_counts_the_trial(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('name = "e"\n[agents.a]\nargs = []\nensemble = true\n[agents.b]\nargs = []\n')
    config = load_config(path)
    assert [a.ensemble for a in config.agents] == [True, False] and config.n_trials == 3
    path.write_text('name = "e"\n[agents.a]\nensemble = "yes"\n')
    with pytest.raises(ValueError, match="agents.a.ensemble must be true or false"):
        load_config(path)
    with pytest.raises(ValueError, match=r"\['a_ensemble'\] are taken by seed ensembles"):
        ExperimentConfig(name="x", agents=(AgentSpec("a", "ppo", (), True), AgentSpec("a_ensemble", "ppo")))


# ------------------------------------------------------------------------------------------------ runner
TINY = ("--total-timesteps", "256", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--hidden-size", "8")


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    path = folder / "nasdaq.csv"
    load_market("nasdaq", end="2004-12-31").frame.iloc[:1000].to_csv(path)
    config = ExperimentConfig(
        name="ens", dataset=str(path), split="walk_forward", n_groups=2, seeds=(1, 2), baselines=("buy_and_hold",),
        random_seeds=1, common_args=("--window", "4", "--episode-length", "16", "--feature-cache-dir",
                                     str(folder / "cache")),
        agents=(AgentSpec("tiny", "ppo", TINY, ensemble=True), AgentSpec("solo", "ppo", TINY + ("--seed", "3"))),
    )
    plan = plan_experiment(config)
    output = folder / "run"
    return plan, output, run_experiment(plan, output, progress=False)


def test_the_runner_adds_the_ensemble_as_one_more_strategy_and_trial(ran):
    plan, output, results = ran
    ensemble = results[results["name"] == ensemble_name("tiny")]
    assert len(ensemble) == 1 and (ensemble["seed"] == ENSEMBLE_SEED).all() and (ensemble["kind"] == "agent").all()
    assert (results["n_trials"] == 3).all() and plan.config.n_trials == 3  # two configurations and one ensemble
    assert ("agent", ensemble_name("tiny")) in strategy_table(results).index
    found = infer(results, pd.read_parquet(output / EQUITY_FILE), ensemble_name("tiny"), reps=100)
    assert found.runs == 1 and found.n_trials == 3 and math.isfinite(found.sharpe)
    assert infer(results, pd.read_parquet(output / EQUITY_FILE), "tiny", reps=100).runs == 2


def test_the_ensemble_is_neither_member(ran):
    _, output, _ = ran
    curves = pd.read_parquet(output / EQUITY_FILE)
    equity = {seed: curve["equity"].to_numpy() for (name, seed), curve in curves.groupby(["name", "seed"])
              if name in ("tiny", ensemble_name("tiny"))}
    assert set(equity) == {1, 2, ENSEMBLE_SEED}
    assert len({len(v) for v in equity.values()}) == 1  # the same bars
    assert not np.array_equal(equity[1], equity[2])  # the members differ, so the mean can differ from each
    assert not (np.array_equal(equity[ENSEMBLE_SEED], equity[1]) and np.array_equal(equity[ENSEMBLE_SEED],
                                                                                     equity[2]))
