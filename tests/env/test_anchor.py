"""Benchmark-anchored actions (sentio_lab.env.anchor): a zero tilt is the benchmark bit for bit, a tilted agent's
accounting agrees across the torch env, the numpy reference, the vectorbt replay and the independent ledger, and
each option (excess reward, deviation penalty, no-trade band) does what its formula says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.data import load_market
from sentio_lab.env import MarketArrays, NumpyTradingEnv, TradingEnv
from sentio_lab.env.anchor import AnchorConfig, anchored_targets, check_tilts
from sentio_lab.env.costs import CostModel
from sentio_lab.env.masks import MaskConfig
from sentio_lab.evaluation import backtest as bt
from sentio_lab.evaluation.baselines import (
    BASELINES,
    PriceHistory,
    SmaCrossover,
    TimeSeriesMomentum,
    VolTarget,
    WeightPolicy,
    benchmark_span,
    benchmark_weights,
    make_baseline,
    run_policy,
)
from tests.evaluation.test_baselines import prepared, prices
from tests.evaluation.test_ledger import STARTS, STEPS, ledger_equity, nonflat_costs, nonflat_ledger_equity

COSTS = CostModel(fee_bps=10.0, slippage_bps=20.0, borrow_bps=500.0)
TILTS = (-0.5, -0.25, 0.0, 0.25, 0.5)
POSITIONS = (-1.0, 0.0, 1.0)
TOL = 1e-9


@pytest.fixture(scope="module")
def market():
    return prepared(prices(1500, seed=3))


@pytest.fixture(scope="module")
def nasdaq():
    frame = load_market("nasdaq").frame
    returns = np.log(frame["close"]).diff().fillna(0.0).to_numpy()[:, None]
    return frame, MarketArrays.from_frame(frame, returns, first_valid=1)


def torch_run(arrays, anchor, actions, starts, costs=COSTS, positions=POSITIONS):
    """Step a TradingEnv from ``starts`` with ``actions`` (steps, envs); return the per-step info arrays."""
    env = TradingEnv(arrays, num_envs=len(starts), window=4, episode_length=len(actions) + 1, positions=positions,
                     costs=costs, ruin_fraction=0.0, anchor=anchor)
    env.reset(starts=starts)
    out = {"equity": [], "weight": [], "reward": [], "benchmark_equity": [], "tilt": []}
    for a in actions:
        _, reward, _, _, info = env.step(torch.as_tensor(a))
        out["reward"].append(reward.numpy().copy())
        for key in ("equity", "weight", "benchmark_equity", "tilt"):
            out[key].append(info[key].numpy().copy())
    return {k: np.array(v) for k, v in out.items()}


def numpy_run(arrays, anchor, actions, starts, costs=COSTS, positions=POSITIONS):
    out = {"equity": [], "weight": [], "reward": [], "benchmark_equity": []}
    for i, start in enumerate(starts):
        env = NumpyTradingEnv(arrays, window=4, episode_length=len(actions) + 1, positions=positions, costs=costs,
                              ruin_fraction=0.0, anchor=anchor)
        env.reset(options={"start": start})
        columns = {k: [] for k in out}
        for a in actions[:, i]:
            _, reward, _, _, info = env.step(int(a))
            columns["reward"].append(reward)
            for key in ("equity", "weight", "benchmark_equity"):
                columns[key].append(info[key])
        for k in out:
            out[k].append(columns[k])
    return {k: np.array(v).T for k, v in out.items()}


def ledger_of_weights(frame, start, weights, **kwargs):
    """The independent ledger (tests/test_ledger.py) on a weight path: its positions are the distinct weights."""
    levels = tuple(sorted(set(weights.tolist()) | {0.0}))
    return np.array(ledger_equity(frame, start, levels, [levels.index(w) for w in weights.tolist()], **kwargs))


# ------------------------------------------------------------------------------------- zero tilt = benchmark
@pytest.mark.parametrize("costs", [CostModel(fee_bps=1.0, slippage_bps=2.0), COSTS,
                                   CostModel(fee_bps=1.0, spread="corwin_schultz", impact="sqrt", capital=1e9)],
                         ids=["flat", "borrow", "spread+impact"])
@pytest.mark.parametrize("name", ["buy_and_hold", "sma_crossover", "momentum"])
def test_zero_tilt_is_the_benchmark_bit_for_bit(market, name, costs):
    """The zero-tilt agent's equity, step by step, is the baseline's own run through the same env (run_policy),
    exactly; so is the shadow account's, and the excess reward of the zero tilt is exactly 0."""
    window, start = 8, market.range("test")[0]
    first = max(start, window - 1)
    history = PriceHistory.from_market(market, market.training_segments())
    (expected,) = run_policy(WeightPolicy(make_baseline(name), history, POSITIONS), market, window=window,
                             positions=POSITIONS, costs=costs)
    anchor = AnchorConfig(benchmark_weights(name, market), tilts=TILTS, excess_reward=True)
    length = len(expected.weights)
    env = TradingEnv(market.arrays, num_envs=1, window=window, episode_length=length, start=start,
                     stop=market.range("test")[1], positions=POSITIONS, costs=costs, ruin_fraction=0.0, anchor=anchor)
    env.reset(starts=[first])
    equity, bench, weights, rewards = [1.0], [1.0], [], []
    for _ in range(length):
        _, reward, _, _, info = env.step(torch.tensor([anchor.zero_action]))
        equity.append(float(info["equity"][0]))
        bench.append(float(info["benchmark_equity"][0]))
        weights.append(float(info["weight"][0]))
        rewards.append(float(reward[0]))
    assert np.array_equal(np.array(equity), expected.equity.to_numpy())
    assert np.array_equal(np.array(bench), expected.equity.to_numpy())
    assert np.array_equal(np.array(weights), expected.weights.to_numpy())
    assert set(rewards) == {0.0}
    assert len(set(weights)) > 1 or name == "buy_and_hold"  # the benchmark traded on this range


def test_a_tilt_is_not_the_benchmark(market):
    """The comparison above can fail: a constant +0.25 tilt on sma_crossover differs from the baseline."""
    anchor = AnchorConfig(benchmark_weights("sma_crossover", market), tilts=TILTS)
    actions = np.full((300, 1), TILTS.index(0.25))
    run = torch_run(market.arrays, anchor, actions, [800])
    assert np.abs(run["equity"][:, 0] / run["benchmark_equity"][:, 0] - 1).max() > 1e-3
    assert set(np.unique(run["weight"])) <= {0.25, 1.0}


# --------------------------------------------------------------------- tilted agent: four accountings agree
@pytest.mark.parametrize("fill_price", ["next_open", "next_close"])
def test_tilted_agent_envs_replay_and_ledger_agree(nasdaq, fill_price):
    frame, arrays = nasdaq
    arrays = dataclasses.replace(arrays, fill_price=fill_price)
    fill_at = "close" if fill_price == "next_close" else "open"
    anchor = AnchorConfig(np.clip(np.sin(np.arange(len(frame)) / 40.0) * 1.3, -1.0, 1.0), tilts=TILTS,
                          limits=(-1.0, 1.5))
    actions = np.random.default_rng(5).integers(0, len(TILTS), (STEPS, len(STARTS)))
    ours, reference = torch_run(arrays, anchor, actions, STARTS), numpy_run(arrays, anchor, actions, STARTS)
    assert np.max(np.abs(ours["equity"] / reference["equity"] - 1)) < TOL
    assert np.array_equal(ours["weight"], reference["weight"])
    assert np.max(np.abs(ours["benchmark_equity"] / reference["benchmark_equity"] - 1)) < TOL
    assert ours["weight"].max() > 1.0 and ours["weight"].min() == -1.0  # leverage and the clip both happen
    for i, start in enumerate(STARTS):
        weights = ours["weight"][:, i]
        replayed = bt.equity(bt.replay(frame, start, weights, COSTS, fill_price=fill_price)).to_numpy()[1:]
        ledger = ledger_of_weights(frame, start, weights, fill_at=fill_at)
        assert np.max(np.abs(replayed / ours["equity"][:, i] - 1)) < TOL
        assert np.max(np.abs(ledger / ours["equity"][:, i] - 1)) < TOL


@pytest.mark.parametrize("params", [dict(impact="sqrt", impact_y=0.7, capital=1e10),
                                    dict(spread="corwin_schultz"),
                                    dict(impact="sqrt", participation=2e-4, capital=1e10, remainder="carry")],
                         ids=["sqrt-impact", "corwin-schultz", "cap-carry"])
def test_tilted_agent_under_nonflat_costs(nasdaq, params):
    frame, arrays = nasdaq
    costs = nonflat_costs(params)
    anchor = AnchorConfig(np.where(np.arange(len(frame)) % 70 < 35, 1.0, 0.25), tilts=TILTS, no_trade_band=0.1)
    actions = np.random.default_rng(7).integers(0, len(TILTS), (STEPS, len(STARTS)))
    ours, reference = torch_run(arrays, anchor, actions, STARTS, costs), numpy_run(arrays, anchor, actions, STARTS,
                                                                                   costs)
    assert np.max(np.abs(ours["equity"] / reference["equity"] - 1)) < TOL
    assert np.max(np.abs(ours["benchmark_equity"] / reference["benchmark_equity"] - 1)) < TOL
    for i, start in enumerate(STARTS):
        weights = ours["weight"][:, i]
        levels = tuple(sorted(set(weights.tolist()) | {0.0}))
        ledger = nonflat_ledger_equity(frame, start, levels, [levels.index(w) for w in weights.tolist()], **params)[0]
        replayed = bt.equity(bt.replay(frame, start, weights, costs)).to_numpy()[1:]
        assert np.max(np.abs(np.array(ledger) / ours["equity"][:, i] - 1)) < TOL
        assert np.max(np.abs(replayed / ours["equity"][:, i] - 1)) < TOL


# ----------------------------------------------------------------------------------------------- options
def test_excess_reward_subtracts_the_benchmarks_own_log_return(nasdaq):
    frame, arrays = nasdaq
    base = np.where(np.arange(len(frame)) % 50 < 25, 1.0, 0.5)
    actions = np.random.default_rng(1).integers(0, len(TILTS), (120, 2))
    plain = torch_run(arrays, AnchorConfig(base, tilts=TILTS), actions, [100, 900])
    excess = torch_run(arrays, AnchorConfig(base, tilts=TILTS, excess_reward=True), actions, [100, 900])
    bench = np.vstack([np.ones((1, 2)), plain["benchmark_equity"]])
    np.testing.assert_allclose(excess["reward"], plain["reward"] - np.log(bench[1:] / bench[:-1]), rtol=0, atol=1e-12)
    assert np.abs(excess["reward"] - plain["reward"]).max() > 1e-3
    reference = numpy_run(arrays, AnchorConfig(base, tilts=TILTS, excess_reward=True), actions, [100, 900])
    np.testing.assert_allclose(reference["reward"], excess["reward"], rtol=0, atol=1e-12)


def test_deviation_penalty_is_l2_on_the_clipped_tilt(nasdaq):
    frame, arrays = nasdaq
    base = np.full(len(frame), 0.75)
    actions = np.tile(np.array([[TILTS.index(0.5)], [TILTS.index(-0.5)], [TILTS.index(0.0)]]), (20, 2))
    plain = torch_run(arrays, AnchorConfig(base, tilts=TILTS), actions, [100, 900])
    penalised = torch_run(arrays, AnchorConfig(base, tilts=TILTS, deviation_penalty=0.3), actions, [100, 900])
    deviation = np.array([0.25, -0.5, 0.0])[np.arange(len(actions)) % 3]  # 0.75 + 0.5 clips to 1: tilt 0.25
    np.testing.assert_allclose(penalised["tilt"][:, 0], deviation, rtol=0, atol=1e-15)
    np.testing.assert_allclose(penalised["reward"], plain["reward"] - 0.3 * deviation[:, None] ** 2, rtol=0,
                               atol=1e-15)
    reference = numpy_run(arrays, AnchorConfig(base, tilts=TILTS, deviation_penalty=0.3), actions, [100, 900])
    np.testing.assert_allclose(reference["reward"], penalised["reward"], rtol=0, atol=1e-12)


def test_no_trade_band_holds_targets_within_it(nasdaq):
    frame, arrays = nasdaq
    base = np.full(len(frame), 1.0)
    small = np.tile(np.array([[TILTS.index(0.0)], [TILTS.index(-0.25)]]), (30, 1))
    held = torch_run(arrays, AnchorConfig(base, tilts=TILTS, no_trade_band=0.25), small, [200])
    traded = torch_run(arrays, AnchorConfig(base, tilts=TILTS, no_trade_band=0.2), small, [200])
    assert set(held["weight"][:, 0]) == {1.0}  # 0.75 is within 0.25 of 1.0: never traded
    np.testing.assert_array_equal(held["equity"], held["benchmark_equity"])
    assert set(traded["weight"][:, 0]) == {0.75, 1.0}
    # the band compares with the weight held, not the benchmark: from 0.5, a move to 0.75 is in a 0.25 band
    path = np.array([[TILTS.index(-0.5)], [TILTS.index(-0.25)], [TILTS.index(0.0)]])
    banded = torch_run(arrays, AnchorConfig(base, tilts=TILTS, no_trade_band=0.25), path, [200])
    assert banded["weight"][:, 0].tolist() == [0.5, 0.5, 1.0]


def test_anchored_targets_by_hand():
    b, tilt, held = np.array([0.9, 0.9, 0.2, -0.8]), np.array([0.5, -0.25, 0.0, -0.5]), np.array([0.0, 0.7, 0.2, 0])
    target, trade, deviation = anchored_targets(b, tilt, held, -1.0, 1.0, 0.05)
    np.testing.assert_allclose(target, [1.0, 0.7, 0.2, -1.0])
    assert trade.tolist() == [True, False, False, True]
    np.testing.assert_allclose(deviation, [0.1, -0.25, 0.0, -0.2])
    t_target, t_trade, t_dev = anchored_targets(*(torch.tensor(x) for x in (b, tilt, held)), -1.0, 1.0, 0.05)
    assert np.array_equal(t_target.numpy(), target) and np.array_equal(t_trade.numpy(), trade)


# -------------------------------------------------------------------------------------- observation, state
def test_observation_holds_the_benchmark_weight_and_the_held_weight(market):
    weights = np.round(np.sin(np.arange(len(market.arrays.close)) / 3.0), 3)  # a new weight on every bar
    anchor = AnchorConfig(weights, tilts=TILTS)
    env = TradingEnv(market.arrays, num_envs=2, window=4, episode_length=50, positions=POSITIONS, anchor=anchor,
                     costs=COSTS)
    obs = env.reset(starts=[700, 1100])
    layout = env.obs_layout
    assert np.array_equal(obs[:, layout["benchmark"]].numpy()[:, 0], weights[[700, 1100]].astype(np.float32))
    assert obs[:, layout["position"]].abs().sum() == 0  # episodes start flat
    obs, *_ = env.step(torch.tensor([TILTS.index(-0.25), TILTS.index(0.5)]))
    expected = np.clip(weights[[700, 1100]] + np.array([-0.25, 0.5]), -1, 1)
    np.testing.assert_array_equal(obs[:, layout["position"]].numpy()[:, 0], expected.astype(np.float32))
    np.testing.assert_array_equal(obs[:, layout["benchmark"]].numpy()[:, 0], weights[[701, 1101]].astype(np.float32))
    reference = NumpyTradingEnv(market.arrays, window=4, episode_length=50, positions=POSITIONS, anchor=anchor,
                                costs=COSTS)
    first = reference.reset(options={"start": 1100})[0]
    second = reference.step(TILTS.index(0.5))[0]
    np.testing.assert_array_equal(second, obs[1].numpy())
    assert first.shape == second.shape == (env.obs_dim,)
    assert env.num_actions == reference.action_space.n == len(TILTS)


def test_state_dict_resumes_the_anchored_env_exactly(market):
    anchor = AnchorConfig(benchmark_weights("momentum", market), tilts=TILTS, excess_reward=True)

    def make():
        return TradingEnv(market.arrays, num_envs=3, window=4, episode_length=20, positions=POSITIONS, anchor=anchor,
                          costs=COSTS, seed=4)

    actions = torch.randint(0, len(TILTS), (60, 3), generator=torch.Generator().manual_seed(0))
    env = make()
    env.reset()
    for a in actions[:30]:
        env.step(a)
    state = env.state_dict()
    assert {"held", "bench_equity", "bench_cash"} <= set(state)
    rest = [env.step(a)[1] for a in actions[30:]]
    other = make()
    other.load_state_dict(state)
    again = [other.step(a)[1] for a in actions[30:]]
    assert all(torch.equal(x, y) for x, y in zip(rest, again, strict=True))


def test_auto_reset_restarts_the_shadow_account_flat(market):
    """Staggered episodes end on different steps: exactly the ended ones restart flat with a fresh shadow account."""
    anchor = AnchorConfig(np.ones(len(market.arrays.close)), tilts=TILTS)
    env = TradingEnv(market.arrays, num_envs=4, window=4, episode_length=5, positions=POSITIONS, anchor=anchor,
                     costs=COSTS, seed=2)
    env.reset()
    partial = 0
    for _ in range(12):
        obs, _, _, _, info = env.step(torch.full((4,), TILTS.index(0.25)))
        done = info["done"]
        partial += int(bool(done.any()) and not bool(done.all()))
        assert env.bench_equity[done].eq(1.0).all() and env.held[done].eq(0.0).all()
        assert torch.equal(env.bench_equity[~done], info["benchmark_equity"][~done])
        assert torch.equal(env.held[~done], info["weight"][~done]) and info["weight"].eq(1.0).all()
        assert obs[done][:, env.obs_layout["position"]].abs().sum() == 0
    assert partial > 0


# ------------------------------------------------------------------------------------------- causality
def scaled(frame, rows, factors):
    """A copy of ``frame`` with every price of ``rows`` multiplied by ``factors`` (a valid OHLCV frame)."""
    out = frame.copy()
    for column in ("open", "high", "low", "close"):
        out.iloc[rows, out.columns.get_loc(column)] *= factors
    return out


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_benchmark_weight_at_t_reads_only_its_declared_span(market, name):
    """Perturbing closes after t, or before t - span, leaves the weight at t unchanged (vol_target: the EWMA's
    fading memory below 1 % moves it at most slightly; its training volatility reads training bars only)."""
    frame = market.data.frame
    t = 1000
    span = benchmark_span(name, market)
    weights = benchmark_weights(name, market)
    for rows in (slice(t + 1, None), slice(0, t - span)):
        changed = scaled(frame, rows, np.exp(np.random.default_rng(0).normal(0, 0.05, len(frame.iloc[rows]))))
        other = benchmark_weights(name, prepared(changed))
        if name == "vol_target" and rows.start == 0:  # the forecast's memory; the scale reads training bars
            noise = np.exp(np.random.default_rng(0).normal(0, 0.01, t - span))
            forecast = VolTarget().forecast_vol(scaled(frame, rows, noise)["close"].to_numpy())
            original = VolTarget().forecast_vol(frame["close"].to_numpy())
            assert 0 < abs(forecast[t] / original[t] - 1) < 0.05
        else:
            assert other[t] == weights[t], rows
    if name == "sma_crossover":
        assert span == 199
    # a change inside the span can move it: the span is not too generous
    trend = np.linspace(0.5, 1.5, span + 1) if weights[t] <= 0 else np.linspace(1.5, 0.5, span + 1)
    inside = scaled(frame, slice(t - span, t + 1), trend)
    if name != "buy_and_hold":
        assert benchmark_weights(name, prepared(inside))[t] != weights[t]


def test_vol_target_benchmark_scales_by_training_segments_only(market):
    frame = market.data.frame
    start, stop = market.range("test")
    changed = scaled(frame, slice(start, stop), np.exp(np.linspace(0, 1, stop - start)))
    same = benchmark_weights("vol_target", prepared(changed))
    original = benchmark_weights("vol_target", market)
    assert np.array_equal(same[: start], original[: start])
    assert VolTarget().span(PriceHistory.from_market(market)) == 76


def test_momentum_span_follows_the_calendar(market):
    span = TimeSeriesMomentum().span(PriceHistory.from_market(market))
    assert 255 <= span <= 265  # 12 calendar months of business days
    assert SmaCrossover(fast=5, slow=20).span(PriceHistory.from_market(market)) == 19


# ------------------------------------------------------------------------------------------------ errors
def test_invalid_anchors_are_refused(market):
    n = len(market.arrays.close)
    with pytest.raises(ValueError, match="zero offset"):
        check_tilts((-0.5, 0.5))
    with pytest.raises(ValueError, match="distinct"):
        AnchorConfig(np.ones(n), tilts=(0.0, 0.0))
    with pytest.raises(ValueError, match="not finite at bars \\[3\\]"):
        AnchorConfig(np.where(np.arange(n) == 3, np.nan, 1.0))
    with pytest.raises(ValueError, match="float64"):
        AnchorConfig(np.ones(n, dtype=np.float32))
    with pytest.raises(ValueError, match="limits"):
        AnchorConfig(np.ones(n), limits=(0.5, 1.0))
    with pytest.raises(ValueError, match="deviation_penalty"):
        AnchorConfig(np.ones(n), deviation_penalty=-1.0)
    with pytest.raises(ValueError, match="no_trade_band"):
        AnchorConfig(np.ones(n), no_trade_band=-0.1)
    with pytest.raises(ValueError, match="benchmark has 10 weights"):
        TradingEnv(market.arrays, window=4, episode_length=20, anchor=AnchorConfig(np.ones(10)))
    with pytest.raises(ValueError, match="anchor with masks"):
        NumpyTradingEnv(market.arrays, window=4, episode_length=20, anchor=AnchorConfig(np.ones(n)),
                        masks=MaskConfig(long_only=True))
    with pytest.raises(KeyError, match="unknown baseline"):
        benchmark_weights("nope", market)
    with pytest.raises(ValueError, match="outside \\[0, 5\\)"):
        env = NumpyTradingEnv(market.arrays, window=4, episode_length=20, anchor=AnchorConfig(np.ones(n)))
        env.reset(options={"start": 100})
        env.step(5)


def test_a_baseline_without_a_span_cannot_anchor(market):
    class NoSpan(type(make_baseline("buy_and_hold"))):
        name = "no_span"

        def span(self, history):
            return super(type(make_baseline("buy_and_hold")), self).span(history)

    with pytest.raises(TypeError, match="declares no span"):
        benchmark_span(NoSpan(), market)


def test_unanchored_env_is_unchanged(market):
    """Without an anchor nothing of the above appears: no benchmark block, no extra info, no extra state."""
    env = TradingEnv(market.arrays, num_envs=1, window=4, episode_length=20, positions=POSITIONS, costs=COSTS)
    env.reset(starts=[100])
    _, _, _, _, info = env.step(torch.tensor([2]))
    assert "benchmark" not in env.obs_layout and "weight" not in info and "held" not in env.state_dict()
    assert isinstance(pd.Series(dtype=float), pd.Series)


# ------------------------------------------------------------------------------------------------ evaluation
class ConstantAgent:
    """Always the same action (the zero tilt: the benchmark)."""

    def __init__(self, action):
        self.action = action

    def parameters(self):
        yield torch.zeros(1)

    def act_greedy(self, obs):
        return torch.full((len(obs),), self.action, dtype=torch.long)


def test_evaluation_of_an_anchored_agent_records_its_weights(market):
    """evaluate_policy / evaluate_policies through an anchored env: the zero-tilt agent's evaluation is the
    baseline's (weights and equity); an untrained network's batched evaluation is its one-by-one one, bit for bit."""
    from sentio_lab.agents.nets import MLPActorCritic
    from sentio_lab.evaluation.baselines import evaluate_baseline
    from sentio_lab.evaluation.episodes import evaluate_policies, evaluate_policy

    anchor = AnchorConfig(benchmark_weights("sma_crossover", market), tilts=TILTS)
    options = {"anchor": anchor}
    expected = evaluate_baseline("sma_crossover", market, window=8, positions=POSITIONS, costs=COSTS)
    ours = evaluate_policy(ConstantAgent(anchor.zero_action), market, window=8, positions=POSITIONS, costs=COSTS,
                           env_options=options)
    pd.testing.assert_series_equal(ours.weights, expected.weights)
    pd.testing.assert_series_equal(ours.equity, expected.equity)
    torch.manual_seed(0)
    obs_dim = TradingEnv(market.arrays, window=8, episode_length=10, anchor=anchor).obs_dim
    agents = [MLPActorCritic(obs_dim, len(TILTS), hidden=8) for _ in range(2)]
    batched = evaluate_policies(agents, market, ["validation", "test"], window=8, positions=POSITIONS, costs=COSTS,
                                env_options=options)
    for i, agent in enumerate(agents):
        for j, name in enumerate(["validation", "test"]):
            single = evaluate_policy(agent, market, window=8, positions=POSITIONS, costs=COSTS, range_name=name,
                                     env_options=options)
            pd.testing.assert_series_equal(batched[i][j].weights, single.weights)
            pd.testing.assert_series_equal(batched[i][j].equity, single.equity)
    assert not set(np.unique(batched[0][1].weights)) <= set(POSITIONS)  # tilted weights, not levels


def test_anchor_config_from_a_baseline_name(market):
    from sentio_lab.evaluation.baselines import anchor_config

    config = anchor_config("vol_target", market, tilts=(0.0, 0.5), excess_reward=True, deviation_penalty=0.1,
                           no_trade_band=0.05)
    assert config.name == "vol_target" and config.tilts == (0.0, 0.5) and config.excess_reward
    assert (config.deviation_penalty, config.no_trade_band) == (0.1, 0.05)
    np.testing.assert_array_equal(config.benchmark, benchmark_weights("vol_target", market))
    assert config.bounds((0.0, 1.0)) == (0.0, 1.0) and config.bounds((-1.0, 0.0, 2.0)) == (-1.0, 2.0)


def test_agent_obs_dim_counts_the_benchmark_block(market):
    from sentio_lab import ppo
    from sentio_lab.agents.variants import agent_obs_dim, env_options

    args = ppo.Args.from_flat(window=8, anchor="buy_and_hold", tilts=(0.0, 0.5, 1.0))
    options = env_options(args, market)
    np.testing.assert_array_equal(options["anchor"].benchmark, benchmark_weights("buy_and_hold", market))
    env = TradingEnv(market.arrays, window=8, episode_length=10, **options)
    assert agent_obs_dim(args, market) == env.obs_dim == 8 * market.arrays.features.shape[1] + 2
    assert env.num_actions == 3


# ----------------------------------------------------------------------------------------- shadow account ruin
def test_a_ruined_shadow_account_stays_flat_at_the_floor(nasdaq):
    """A 3x leveraged short benchmark through a rally: its mark falls below 0; from that bar the shadow account is
    flat at the floor (no NaN, no later jump), in the torch env and the numpy reference alike."""
    from sentio_lab.env.arrays import _MIN_EQUITY

    frame, arrays = nasdaq
    start = 3000
    close = arrays.close.copy()
    close[start + 5 : start + 40] *= np.linspace(1.1, 1.6, 35)  # a rally a 3x short does not survive
    rally = dataclasses.replace(arrays, close=close, fill_price="next_close")
    anchor = AnchorConfig(np.full(len(frame), -3.0), tilts=(0.0, 3.0), limits=(-3.0, 3.0), excess_reward=True)
    actions = np.full((60, 1), 1)  # the agent stays flat (-3 + 3) and survives the rally its benchmark does not
    ours = torch_run(rally, anchor, actions, [start], costs=CostModel())
    reference = numpy_run(rally, anchor, actions, [start], costs=CostModel())
    bench = ours["benchmark_equity"][:, 0]
    ruined = np.flatnonzero(bench == _MIN_EQUITY)
    assert len(ruined) and (bench[ruined[0]:] == _MIN_EQUITY).all()
    assert np.isfinite(ours["reward"]).all() and np.isfinite(reference["reward"]).all()
    np.testing.assert_allclose(reference["benchmark_equity"][:, 0], bench, rtol=TOL, atol=0)
    assert (ours["equity"][:, 0] == 1.0).all() and ours["reward"][ruined[0], 0] > 0  # -log(1e-12 / prev): once
    np.testing.assert_array_equal(ours["reward"][ruined[0] + 1 :, 0], 0.0)  # then nothing: flat at the floor
