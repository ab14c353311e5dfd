"""ppo_portfolio's options: the equal-weight anchor (the untrained agent is the benchmark, bit for bit), the excess
reward, long-short allocation (legs Dirichlet), fold samplers, and the refusals that name their flag."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sentio_lab import ppo_portfolio as pp
from sentio_lab.agents.nets.portfolio import PortfolioActorCritic
from sentio_lab.data.panel import load_panel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.splits import SegmentEpisodeSampler
from tests.data.test_panel import synthetic_frames
from tests.variants.test_ppo_portfolio import permute_assets, weights_equal


@pytest.fixture
def tiny(tmp_path):
    return pp.Args.from_flat(
        total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2, window=4,
        episode_length=24, progress=False, run_dir=str(tmp_path / "runs"), run_name="tiny", checkpoint_every=0,
        feature_cache_dir=None, d_model=8, ff_size=16, hidden_size=16, fee_bps=2.0,
    )


@pytest.fixture(scope="module")
def panel():
    return load_panel(synthetic_frames(3, n_bars=300))


def obs_dim(market, args):
    return market.arrays.num_assets * (args.features.window * market.arrays.features.shape[2] + 1) + 1


def test_untrained_anchored_agent_is_the_equal_weight_benchmark_bit_for_bit(tiny, panel):
    args = tiny.replace(anchor="equal_weight", excess_reward=True, num_envs=4)
    market = pp.portfolio_market(panel, args)
    torch.manual_seed(0)
    agent = pp.build_agent(args, obs_dim(market, args), 4)
    env, plain = pp.make_env(args, market, "test"), PortfolioEnv(
        market.arrays, num_envs=4, window=4, episode_length=24, start=market.range("test")[0],
        costs=pp.cost_model(args), seed=args.run.seed)
    starts = list(range(env.start_low, env.start_low + 4))  # given starts: no staggering, 20 steps in one episode
    obs = env.reset(starts)
    plain.reset(starts)
    equal = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]], dtype=torch.float64).expand(4, 4)
    for _ in range(20):
        tilt = agent.act_greedy(obs)
        assert torch.equal(tilt, torch.zeros_like(tilt))  # the mean tilt is exactly 0 for every observation
        obs, excess, _, _, info = env.step(tilt)
        _, _, _, _, ref = plain.step(equal)
        assert torch.equal(info["equity"], ref["equity"]) and torch.equal(excess, torch.zeros(4, dtype=excess.dtype))
    assert float(ref["cost"].sum()) > 0 and not torch.equal(ref["equity"], torch.ones(4, dtype=torch.float64))
    # the sampled tilt is a Gaussian around 0 with the declared standard deviation; its log-probability by hand
    with torch.no_grad():
        action, logp, entropy, _ = agent.get_action_and_value(agent.normalise(obs.repeat(500, 1)))
    assert float(action.std()) == pytest.approx(args.tilt_std, rel=0.1)
    by_hand = stats.norm.logpdf(action.double().numpy(), 0.0, args.tilt_std).sum(-1)
    np.testing.assert_allclose(logp.double().numpy(), by_hand, atol=1e-4)
    assert float(entropy[0]) == pytest.approx(4 * stats.norm.entropy(scale=args.tilt_std), abs=1e-5)


def test_anchored_excess_reward_run_trains_and_resumes_exactly(tiny, panel):
    args = tiny.replace(anchor="equal_weight", excess_reward=True)
    market = pp.portfolio_market(panel, args)
    full = pp.train(args, market=market)
    assert full.finished and full.agent.policy == "tilt"
    assert full.agent.log_std.item() != pytest.approx(math.log(0.05), abs=1e-9)  # the spread is learned
    first = pp.train(args.replace(run_name="split", max_iterations=1), market=market)
    resumed = pp.train(pp.Args.from_flat(resume=str(first.checkpoint_path), progress=False), market=market)
    assert resumed.finished and weights_equal(resumed.agent, full.agent)  # the shadow accounts resumed too
    # the excess reward is not the plain reward: same seed without --excess-reward trains other weights
    plain = pp.train(args.replace(run_name="plain", excess_reward=False), market=market)
    assert not weights_equal(plain.agent, full.agent)


def test_long_short_legs_give_signed_weights_within_the_gross_limit(tiny, panel):
    torch.manual_seed(0)
    agent = PortfolioActorCritic(4, 5, d_model=16, heads=2, ff=16, hidden=16, policy="long_short", gross_limit=1.5)
    torch.nn.init.normal_(agent.asset_head[-1].weight, std=1.0)  # concentrations away from equal
    obs = torch.randn(300, 21)
    torch.set_grad_enabled(False)
    try:
        action, logp, entropy, _ = agent.get_action_and_value(obs)
        alpha = agent.concentration(obs[:1])[0].double().numpy()
    finally:
        torch.set_grad_enabled(True)
    assert action.shape == (300, 9) and torch.allclose(action.sum(-1), torch.ones(300))
    weights = agent.env_action(action)
    gross = weights.abs().sum(-1)
    assert weights.shape == (300, 4) and bool((gross < 1.5).all()) and float(gross.max()) > 0.7
    assert bool((weights < 0).any()) and bool((weights > 0).any())
    legs = action.double() / action.double().sum(-1, keepdim=True)
    torch.testing.assert_close(weights, 1.5 * (legs[:, :4] - legs[:, 4:8]))
    assert logp[0].item() == pytest.approx(stats.dirichlet.logpdf(legs[0].numpy(), alpha), abs=1e-4)
    assert entropy[0].item() == pytest.approx(stats.dirichlet.entropy(alpha), abs=1e-4)
    # the assets stay alike: permuting them permutes each leg and the greedy signed weights
    perm = torch.tensor([2, 0, 3, 1])
    moved = permute_assets(obs[:5], perm, 5)
    torch.testing.assert_close(agent.act_greedy(moved), agent.act_greedy(obs[:5])[:, perm], rtol=1e-5, atol=1e-6)


def test_long_short_run_trades_shorts_through_the_env(tiny, panel):
    args = tiny.replace(long_short=True, gross_limit=1.5, borrow_bps=50.0)
    market = pp.portfolio_market(panel, args)
    env = pp.make_env(args, market)
    assert env.allocation == "long_short" and env.gross_limit == 1.5 and env.action_dim == 3
    result = pp.train(args, market=market)
    assert result.finished and result.agent.action_dim == 7
    weights = result.agent.act_greedy(env.reset())
    assert weights.shape == (8, 3) and bool((weights.abs().sum(-1) < 1.5).all())
    assert np.isfinite(result.history[-1]["charts/mean_cash_weight"])


def test_training_episodes_start_inside_the_markets_sampler(tiny, panel):
    market = pp.portfolio_market(panel, tiny)
    market.train_segments = ((0, 60), (120, 180))  # a fold: a test group in between
    env = pp.make_env(tiny, market)
    assert isinstance(env.start_sampler, SegmentEpisodeSampler)
    assert pp.make_env(tiny, market, "test").start_sampler is None
    env.reset()
    for _ in range(60):  # past several episode ends: every bar an account is marked on lies inside one segment
        env.step(torch.full((8, 4), 0.25))
        assert bool(((env.t < 60) | ((env.t >= 120) & (env.t < 180))).all())
    result = pp.train(tiny.replace(total_timesteps=8 * 16), market=market)
    assert result.finished


@pytest.mark.parametrize("flags, message", [
    (dict(deviation_penalty=0.1, anchor="equal_weight"), "--deviation-penalty: single-asset anchor options"),
    (dict(tilts=(-0.1, 0.0, 0.1)), "--tilts: single-asset"),
    (dict(excess_reward=True), "--excess-reward only acts with --anchor"),
    (dict(anchor="equal_weight", long_short=True), "--anchor with --long-short"),
    (dict(gross_limit=1.5), "--gross-limit 1.5 only acts with --long-short"),
])
def test_refusals_name_the_flag(tiny, flags, message):
    with pytest.raises(ValueError, match=message):
        pp.check_args(tiny.replace(**flags))


def test_policy_choice_follows_the_flags(tiny):
    assert pp.policy_of(tiny) == "dirichlet"
    assert pp.policy_of(tiny.replace(long_short=True)) == "long_short"
    assert pp.policy_of(tiny.replace(anchor="equal_weight")) == "tilt"
    with pytest.raises(ValueError, match="policy 'gauss'"):
        PortfolioActorCritic(2, 3, policy="gauss")


def test_tune_iterates_an_anchored_portfolio_trial_and_takes_a_mutation(panel, tmp_path):
    from sentio_lab.scale import tune as T

    argv = ("--num-envs 8 --num-steps 16 --num-minibatches 2 --update-epochs 1 --window 4 --episode-length 24 "
            "--d-model 8 --ff-size 16 --hidden-size 16 --feature-cache-dir None --anchor equal_weight --excess-reward "
            f"--run-dir {tmp_path / 'runs'}")
    tune_args = T.TuneArgs(variant="ppo_portfolio", variant_args=argv, iterations=2, steps_per_iteration=256)
    config = {"variant": "ppo_portfolio", **T.base_arguments(tune_args), "seed": 3, "learning_rate": 3e-4,
              "ent_coef": 0.01, "clip_coef": 0.2, "gae_lambda": 0.95}
    args = T.trial_args("ppo_portfolio", config, tmp_path / T.CHECKPOINT_FILE)
    market = pp.portfolio_market(panel, args)
    # the fitness of the untrained agent is the benchmark's validation equity (one account over the whole range)
    equity = pp.validation_equity(pp.build_agent(args, obs_dim(market, args), 4), args, market)
    start, stop = market.range("validation")
    assert len(equity) == stop - start and equity.iloc[0] == 1.0 and equity.index[-1] == panel.index[stop - 1]
    first = T.run_iteration("ppo_portfolio", config, tmp_path, market)
    second = T.run_iteration("ppo_portfolio", {**config, "ent_coef": 0.02}, tmp_path, market)
    assert (first["global_step"], second["global_step"]) == (256, 512) and second["finished"]
    assert second["mutated"] == ["ent_coef"] and np.isfinite(second[T.METRIC])
    assert first["validation_total_return"] != second["validation_total_return"]  # the trained tilt moved
