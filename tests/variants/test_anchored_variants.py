"""Benchmark-anchored policies wired into every variant: the --anchor flags, the same anchored env for training and
evaluation, the untrained agent *is* the benchmark (greedy, bit for bit), checkpoints rebuild it, the runner's
embargo counts the benchmark's lookback, and masks are refused with one line."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import torch

from sentio_lab import ppo, ppo_masked, ppo_risk, ppo_transformer
from sentio_lab.agents import arguments, training
from sentio_lab.agents.nets import MLPActorCritic, favour_action
from sentio_lab.agents.variants import agent_obs_dim, env_options, load_trained
from sentio_lab.env.anchor import DEFAULT_TILTS
from sentio_lab.env.benchmarks import BASELINES, benchmark_span, benchmark_weights, on_levels
from sentio_lab.evaluation.baselines import evaluate_anchor_benchmark, evaluate_baseline
from sentio_lab.evaluation.episodes import evaluate_policy

VARIANTS = {"ppo": ppo, "ppo_masked": ppo_masked, "ppo_risk": ppo_risk, "ppo_transformer": ppo_transformer}
TRANSFORMER = {"token_timeframes": (), "token_counts": (), "d_model": 8, "ff_size": 16}
FLAGS = ("--anchor", "--tilts", "--excess-reward", "--deviation-penalty", "--no-trade-band", "--zero-tilt-prob")


def small(module, **changes):
    """A variant's arguments for a fast test (a transformer without token timeframes: daily data)."""
    extra = TRANSFORMER if module is ppo_transformer else {}
    return module.Args.from_flat(window=8, hidden_size=16, track=False, progress=False, **extra, **changes)


# ------------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_shows_the_anchor_flags(name, capsys):
    import tyro

    with pytest.raises(SystemExit):
        tyro.cli(VARIANTS[name].Args, args=["--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in FLAGS), [flag for flag in FLAGS if flag not in out]
    args = tyro.cli(VARIANTS[name].Args, args=["--anchor", "vol_target", "--tilts", "-0.5", "0", "0.5",
                                               "--excess-reward", "--deviation-penalty", "0.1", "--no-trade-band",
                                               "0.05"])
    env = args.env
    assert (env.anchor, env.tilts, env.excess_reward, env.deviation_penalty, env.no_trade_band) == (
        "vol_target", (-0.5, 0.0, 0.5), True, 0.1, 0.05)


def test_the_anchor_choices_are_the_baselines():
    (choices,) = [a for a in typing.get_args(arguments.EnvArgs.__annotations__["anchor"]
                                             if not isinstance(arguments.EnvArgs.__annotations__["anchor"], str)
                                             else typing.get_type_hints(arguments.EnvArgs)["anchor"])
                  if a is not type(None)]
    assert set(typing.get_args(choices)) == set(BASELINES)
    assert arguments.EnvArgs().tilts == DEFAULT_TILTS and arguments.EnvArgs().anchor is None


# --------------------------------------------------------------------------- the same env, train and evaluate
def test_training_and_evaluation_build_the_same_anchored_env(sp500_market):
    args = small(ppo, anchor="sma_crossover", tilts=(-0.5, 0.0, 0.25, 0.5), excess_reward=True,
                 deviation_penalty=0.3, no_trade_band=0.05, num_envs=2, episode_length=24)
    env = training.training_env(args, sp500_market)
    anchor = env.anchor
    assert (anchor.name, anchor.tilts, anchor.excess_reward, anchor.deviation_penalty, anchor.no_trade_band) == (
        "sma_crossover", (-0.5, 0.0, 0.25, 0.5), True, 0.3, 0.05)
    np.testing.assert_array_equal(anchor.benchmark, benchmark_weights("sma_crossover", sp500_market))
    evaluation = env_options(args, sp500_market)["anchor"]
    assert dataclasses.astuple(evaluation)[1:] == dataclasses.astuple(anchor)[1:]
    np.testing.assert_array_equal(evaluation.benchmark, anchor.benchmark)
    assert env.num_actions == training.num_actions(args) == 4
    assert env.obs_dim == agent_obs_dim(args, sp500_market)
    unanchored = small(ppo, num_envs=2, episode_length=24)
    assert training.training_env(unanchored, sp500_market).anchor is None
    assert env_options(unanchored, sp500_market) == {} and training.num_actions(unanchored) == 3


@pytest.mark.parametrize("option", ["excess_reward", "deviation_penalty", "no_trade_band"])
def test_each_option_acts_in_the_training_env(sp500_market, option):
    """The same actions through the training env with and without one option: the reward (or the weight held) moves
    by the option's formula, so an option that is dropped on its way to the env, or flipped, fails here."""
    value = {"excess_reward": True, "deviation_penalty": 0.5, "no_trade_band": 0.3}[option]
    common = dict(anchor="buy_and_hold", num_envs=2, episode_length=40, seed=3)
    plain_env = training.training_env(small(ppo, **common), sp500_market)
    env = training.training_env(small(ppo, **common, **{option: value}), sp500_market)
    starts = [plain_env.start_low + 10, plain_env.start_low + 200]
    plain_env.reset(starts=starts)
    env.reset(starts=starts)
    tilts = DEFAULT_TILTS
    path = [tilts.index(-0.25), tilts.index(-0.5), tilts.index(0.0), tilts.index(-0.25)] * 5
    held, plain_held = set(), set()
    for action in path:
        actions = torch.full((2,), action)
        _, plain, _, _, plain_info = plain_env.step(actions)
        before = env.bench_equity.clone()
        _, reward, _, _, info = env.step(actions)
        if option == "excess_reward":
            expected = plain - torch.log(info["benchmark_equity"] / before)
            torch.testing.assert_close(reward, expected, rtol=0, atol=1e-12)
        elif option == "deviation_penalty":
            torch.testing.assert_close(reward, plain - 0.5 * info["tilt"].square(), rtol=0, atol=1e-12)
            assert info["tilt"].abs().max() > 0 or action == tilts.index(0.0)
        held |= set(info["weight"].tolist())
        plain_held |= set(plain_info["weight"].tolist())
    assert plain_held == {0.5, 0.75, 1.0}
    if option == "no_trade_band":  # the first fill goes to 0.75; 0.5 and 1.0 are then within the 0.3 band
        assert held == {0.75}
        assert not torch.equal(info["equity"], plain_info["equity"])
    else:
        assert held == plain_held


def test_anchor_options_without_an_anchor_are_refused(sp500_market):
    with pytest.raises(ValueError, match="--excess-reward, --no-trade-band only act with --anchor"):
        training.training_env(small(ppo, excess_reward=True, no_trade_band=0.1), sp500_market)
    with pytest.raises(ValueError, match="--zero-tilt-prob 1.0"):
        training.anchor_from(small(ppo, anchor="buy_and_hold", zero_tilt_prob=1.0), sp500_market)


def test_masks_with_an_anchor_are_refused_in_one_line(tmp_path):
    from sentio_lab.run_loop import run_cli

    argv = ["--anchor", "buy_and_hold", "--no-track", "--no-progress", "--total-timesteps", "256", "--num-envs", "8",
            "--num-steps", "16", "--window", "8", "--episode-length", "24", "--run-dir", str(tmp_path),
            "--feature-cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match="error: anchor with masks: .*drop --masks or --anchor"):
        run_cli(ppo_masked.Args, ppo_masked.train, prog="ppo_masked", argv=argv)


# ---------------------------------------------------------------------- the untrained agent is the benchmark
@pytest.mark.parametrize(("name", "baseline"), [("ppo", rule) for rule in sorted(BASELINES)]
                         + [(name, rule) for name in ("ppo_risk", "ppo_transformer")
                            for rule in ("sma_crossover", "vol_target")])
def test_a_fresh_variant_agent_is_its_benchmark_bit_for_bit(sp500_market, name, baseline):
    """Built as training builds it and evaluated greedily through the anchored env, the untrained agent's weights and
    equity are the benchmark's exactly; for level-valued rules that is also the baseline policy's own run."""
    module = VARIANTS[name]
    torch.manual_seed(0)
    args = small(module, anchor=baseline, positions=(-1.0, 0.0, 1.0))
    agent = module.build_agent(args, agent_obs_dim(args, sp500_market), training.num_actions(args))
    bars = (400, len(sp500_market.arrays.close))  # 2014-12 .. 2018: falls in 2015, 2016 and 2018, each rule trades
    common = dict(window=8, positions=args.env.positions, costs=module.cost_model(args), bars=bars)
    ours = evaluate_policy(agent, sp500_market, env_options=env_options(args, sp500_market), **common)
    benchmark = evaluate_anchor_benchmark(baseline, sp500_market, **common)
    assert ours.equity.equals(benchmark.equity) and ours.weights.equals(benchmark.weights)
    weights = benchmark_weights(baseline, sp500_market)
    if on_levels(weights, args.env.positions):
        policy = evaluate_baseline(baseline, sp500_market, **common)
        assert ours.equity.equals(policy.equity) and ours.weights.equals(policy.weights)
    else:  # vol_target: the anchor trades the unrounded weight, which the rounded policy does not
        assert baseline == "vol_target" and not ours.weights.isin(args.env.positions).all()
    assert ours.weights.nunique() > 1 or baseline == "buy_and_hold"


def test_without_the_bias_the_fresh_agent_is_not_the_benchmark(sp500_market):
    """The comparison above can fail: the same network without the zero-tilt bias trades other weights."""
    torch.manual_seed(0)
    args = small(ppo, anchor="buy_and_hold")
    agent = MLPActorCritic(agent_obs_dim(args, sp500_market), 5, hidden=16)
    ours = evaluate_policy(agent, sp500_market, window=8, positions=args.env.positions, costs=ppo.cost_model(args),
                           range_name="validation", env_options=env_options(args, sp500_market))
    assert not ours.weights.eq(1.0).all()


def test_favour_action_makes_the_greedy_action_certain_and_sets_the_probability():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 5)  # default init: weights far larger than a policy head's gain 0.01
    favour_action(head, 3, 0.5)
    h = torch.rand(20_000, 16) * 2 - 1
    h[:8] = torch.sign(head.weight[[0, 1, 2, 4, 0, 1, 2, 4]] - head.weight[3])  # the worst corners
    assert head(h).argmax(-1).eq(3).all()
    small_head = torch.nn.Linear(16, 5)
    torch.nn.init.orthogonal_(small_head.weight, 0.01)
    torch.nn.init.zeros_(small_head.bias)
    favour_action(small_head, 1, 0.6)
    p = torch.softmax(small_head.bias.detach(), -1)
    assert abs(float(p[1]) - 0.6) < 1e-6
    with pytest.raises(ValueError, match="probability"):
        favour_action(small_head, 1, 1.0)


def test_unanchored_agents_are_untouched(sp500_market):
    torch.manual_seed(0)
    plain = ppo.build_agent(small(ppo), 50, 3)
    torch.manual_seed(0)
    again = MLPActorCritic(50, 3, hidden=16)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------- train, save, reload
def test_anchored_run_checkpoint_rebuilds_the_same_env_and_agent(tmp_path):
    from sentio_lab.evaluation.episodes import evaluate_checkpoint

    args = small(ppo, anchor="sma_crossover", tilts=(-0.5, 0.0, 0.5), excess_reward=True, total_timesteps=8 * 16 * 2,
                 num_envs=8, num_steps=16, num_minibatches=2, update_epochs=1, episode_length=24,
                 run_dir=str(tmp_path / "runs"), run_name="anchored", checkpoint_every=0,
                 feature_cache_dir=str(tmp_path / "cache"))
    result = ppo.train(args)
    assert result.finished and result.agent.actor[-1].out_features == 3
    trained = load_trained(result.checkpoint_path)
    assert trained.args.env.anchor == "sma_crossover" and trained.args.env.tilts == (-0.5, 0.0, 0.5)
    assert trained.args.env.excess_reward
    assert all(torch.equal(a, b) for a, b in zip(trained.agent.state_dict().values(),
                                                 result.agent.state_dict().values(), strict=True))
    again = evaluate_checkpoint(result.checkpoint_path, "validation")
    live = evaluate_policy(result.agent, result.market, window=8, positions=args.env.positions,
                           costs=ppo.cost_model(args), range_name="validation",
                           env_options=env_options(result.args, result.market))
    assert again.weights.equals(live.weights) and again.equity.equals(live.equity)
    assert not again.weights.isin([-1.0, 0.0, 1.0]).all() or again.weights.isin([0.0, 1.0]).all()


def test_anchored_resume_equals_uninterrupted(tiny_args, synthetic_market):
    args = tiny_args.replace(anchor="buy_and_hold", excess_reward=True, deviation_penalty=0.1, no_trade_band=0.1,
                             total_timesteps=8 * 16 * 3)
    whole = ppo.train(args, market=synthetic_market)
    part = ppo.train(args.replace(run_name="split", max_iterations=1), market=synthetic_market)
    resumed = ppo.train(ppo.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False),
                        market=synthetic_market)
    assert resumed.args.env.anchor == "buy_and_hold" and resumed.global_step == whole.global_step
    assert all(torch.equal(a, b) for a, b in zip(whole.agent.state_dict().values(),
                                                 resumed.agent.state_dict().values(), strict=True))


@pytest.mark.parametrize("name", ["ppo_risk", "ppo_transformer"])
def test_other_variants_train_anchored(tiny_args, synthetic_market, name):
    module = VARIANTS[name]
    extra = TRANSFORMER if name == "ppo_transformer" else {}
    args = module.Args.from_flat(**{**tiny_args.flat(), "exp_name": name, "anchor": "vol_target",
                                    "total_timesteps": 8 * 16, **extra})
    result = module.train(args, market=synthetic_market)
    assert result.finished and result.agent.actor[-1].out_features == len(DEFAULT_TILTS)
    assert result.agent.obs_norm.mean.shape[0] == agent_obs_dim(result.args, synthetic_market)


# -------------------------------------------------------------------------------------- runner, sweep, tune
def test_runner_embargo_counts_the_benchmark_lookback(tmp_path):
    """An anchored agent's benchmark weight at t reads 199 bars back (SMA 200): the plan's embargo covers it."""
    from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
    from sentio_lab.experiment.runner import plan_experiment

    def plan(agent_args):
        return plan_experiment(ExperimentConfig(
            name="anchored", dataset="nasdaq", data_end="2004-12-31", split="cpcv", n_groups=4, n_test_groups=2,
            seeds=(1,), common_args=("--window", "4", "--feature-cache-dir", str(tmp_path / "cache")),
            agents=(AgentSpec("a", "ppo", tuple(agent_args)),)))

    plain, anchored = plan([]), plan(["--anchor", "sma_crossover"])
    assert plain.gaps.observation_reach < 199 <= anchored.gaps.observation_reach
    assert anchored.gaps.embargo >= 199 > plain.gaps.embargo
    assert plan(["--anchor", "buy_and_hold"]).gaps == plain.gaps  # buy-and-hold reads nothing
    for fold in anchored.folds:  # no training range starts within the benchmark's reach after a test group
        for _, stop in fold.test:
            assert all(not (stop <= start < stop + 199) for start, _ in fold.train)


def test_benchmark_span_of_the_runner_is_the_rules(sp500_market):
    args = small(ppo, anchor="momentum")
    assert training.anchor_span(args, sp500_market) == benchmark_span("momentum", sp500_market) > 250
    assert training.anchor_span(small(ppo), sp500_market) == 0


def test_tune_passes_the_anchor_through_and_scores_the_anchored_env(sp500_market, tmp_path):
    """Tune's trial arguments keep --anchor from the variant's argv, and its validation score is taken in the anchored
    env: a fresh anchored agent scores exactly its benchmark's validation Sharpe."""
    from sentio_lab.evaluation import metrics
    from sentio_lab.scale import tune

    config = {"argv": ["--anchor", "momentum", "--window", "8", "--hidden-size", "16"], "overrides": {}, "seed": 1,
              "variant_iterations": 1}
    args = tune.trial_args("ppo", config, tmp_path / "checkpoint.pt")
    assert args.env.anchor == "momentum" and args.run.resume is None
    torch.manual_seed(0)
    agent = ppo.build_agent(args, agent_obs_dim(args, sp500_market), training.num_actions(args))
    score = tune.validation_score("ppo", agent, args, sp500_market)
    benchmark = evaluate_anchor_benchmark("momentum", sp500_market, window=8, positions=args.env.positions,
                                          costs=ppo.cost_model(args), range_name="validation")
    expected = metrics.sharpe_ratio(metrics.simple_returns(benchmark.equity))
    assert score["validation_sharpe_per_period"] == pytest.approx(expected, rel=0, abs=0)
    assert score["validation_total_return"] == benchmark.equity.iloc[-1] - 1.0
