"""Baselines: causal signals, hand-checked rules, and the agents' own accounting (env equity == vectorbt)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.data import chronological_split, to_market
from sentio_lab.env import MarketArrays
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation import backtest as bt
from sentio_lab.evaluation.baselines import (
    BASELINES,
    Baseline,
    BuyAndHold,
    PriceHistory,
    RandomPolicy,
    SmaCrossover,
    TimeSeriesMomentum,
    VolTarget,
    WeightPolicy,
    evaluate_baseline,
    evaluate_random,
    nearest_levels,
    run_policy,
    trailing_mean,
)
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.features import ObservationFeatures

COSTS = CostModel(fee_bps=1.0, slippage_bps=2.0)


def prices(n=1500, seed=0, sigma=None):
    """Business-day OHLCV from log returns with per-bar volatility ``sigma`` (default 1%)."""
    rng = np.random.default_rng(seed)
    sigma = np.full(n, 0.01) if sigma is None else sigma
    close = 100 * np.exp(np.cumsum(rng.normal(0.0002, 1, n) * sigma))
    opens = np.concatenate([[100.0], close[:-1]]) * np.exp(rng.normal(0, 0.001, n))
    return pd.DataFrame({"open": opens, "high": np.maximum(opens, close) * 1.002,
                         "low": np.minimum(opens, close) * 0.998, "close": close, "volume": 1e6},
                        index=pd.bdate_range("2005-01-03", periods=n, name="timestamp"))


def prepared(frame, train=0.4, validation=0.2):
    """A PreparedMarket on ``frame`` with a constant dummy feature (baselines read prices, not features)."""
    data = to_market(frame, name="synthetic")
    values = np.zeros((len(frame), 1), np.float32)
    features = ObservationFeatures(values=values, names=["zero"], first_valid=0, blocks={"base": slice(0, 1)},
                                   state={})
    return PreparedMarket(data=data, splits=chronological_split(data, train, validation), features=features,
                          arrays=MarketArrays.from_frame(data.frame, values, 0))


class CountingAgent:
    """Drives ``evaluate_policy`` with a baseline: the k-th call is the decision at bar ``start + k``."""

    def __init__(self, policy, start):
        self.policy, self.t = policy, start

    def parameters(self):
        yield torch.zeros(1)

    def act_greedy(self, obs):
        action = self.policy.act(torch.tensor([self.t]))
        self.t += 1
        return action


# ---------------------------------------------------------------------------------------------- accounting
def test_buy_and_hold_through_the_env_equals_vectorbt(sp500_market):
    evaluation = evaluate_baseline("buy_and_hold", sp500_market, window=8, positions=(-1.0, 0.0, 1.0), costs=COSTS)
    frame = sp500_market.data.frame
    replay = bt.equity(bt.buy_and_hold(frame, evaluation.start, len(evaluation.weights), COSTS))
    assert replay.index.equals(evaluation.equity.index)
    np.testing.assert_allclose(evaluation.equity.to_numpy(), replay.to_numpy(), rtol=0, atol=1e-9)
    start, stop = sp500_market.range("test")
    assert evaluation.start == start and evaluation.equity.index[-1] == frame.index[stop - 1]
    assert (evaluation.weights == 1.0).all() and not evaluation.ruined


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_the_runner_is_evaluate_policy(sp500_market, name):
    """The batched runner and evaluate_policy (the agents' path) give identical weights and equity."""
    positions = (-1.0, 0.0, 0.5, 1.0)
    policy = WeightPolicy(BASELINES[name](), PriceHistory.from_market(sp500_market), positions)
    ours = evaluate_baseline(name, sp500_market, window=8, positions=positions, costs=COSTS)
    theirs = evaluate_policy(CountingAgent(policy, ours.start), sp500_market, window=8, positions=positions,
                             costs=COSTS)
    pd.testing.assert_series_equal(ours.weights, theirs.weights)
    pd.testing.assert_series_equal(ours.equity, theirs.equity)
    assert ours.start == theirs.start and ours.range_name == theirs.range_name


class Leveraged(Baseline):
    """Wants 50x long: the nearest level of (0, 50) is 50 (plain buy-and-hold's 1 would map to flat)."""

    name, wants = "leveraged", (1.0,)

    def weights(self, history):
        return np.full(len(history.close), 50.0)


def test_ruin_stops_an_episode_like_evaluate_policy(sp500_market):
    positions = (0.0, 50.0)  # 50x leverage goes bust on the first big down day
    assert set(WeightPolicy(BuyAndHold(), PriceHistory.from_market(sp500_market), positions).levels) == {0}
    policy = WeightPolicy(Leveraged(), PriceHistory.from_market(sp500_market), positions)
    (ours,) = run_policy(policy, sp500_market, window=8, positions=positions, costs=COSTS, range_name="train")
    start = max(sp500_market.range("train")[0], sp500_market.arrays.first_valid + 7)
    theirs = evaluate_policy(CountingAgent(policy, start), sp500_market, window=8, positions=positions,
                             costs=COSTS, range_name="train")
    assert ours.ruined and theirs.ruined and ours.equity.iloc[-1] == 1e-12
    pd.testing.assert_series_equal(ours.equity, theirs.equity)


# ----------------------------------------------------------------------------------------------- look-ahead
LOOKAHEAD_CASES = [BuyAndHold(), SmaCrossover(), TimeSeriesMomentum(), TimeSeriesMomentum(long_only=True),
                   VolTarget(max_level=10.0)]


@pytest.mark.parametrize("baseline", LOOKAHEAD_CASES, ids=lambda b: b.name)
@pytest.mark.parametrize("calendar", [True, False])
def test_signals_do_not_see_the_future(baseline, calendar):
    frame = prices()
    close = frame["close"].to_numpy()
    index = frame.index if calendar else None
    history = PriceHistory(close=close, index=index, train=((0, 300),))
    base = baseline.weights(history)
    rng = np.random.default_rng(1)
    for t in rng.integers(300, len(close) - 2, 12):
        future = close.copy()
        future[t + 1 :] *= np.exp(rng.normal(0, 0.2, len(close) - t - 1))
        shifted = index
        if calendar:  # later bar times move too (still sorted): month anchors must not care
            shifted = index[: t + 1].append(index[t + 1 :] + pd.Timedelta(days=int(rng.integers(1, 30))))
        changed = baseline.weights(PriceHistory(close=future, index=shifted, train=history.train))
        assert np.array_equal(changed[: t + 1], base[: t + 1], equal_nan=True), (baseline.name, t)
    # control: the bar itself does move a signal that depends on it
    if isinstance(baseline, VolTarget):
        now = close.copy()
        now[900] *= 1.2
        assert baseline.weights(PriceHistory(close=now, index=index, train=history.train))[900] != base[900]


# ------------------------------------------------------------------------------------------ the rules by hand
def test_sma_crossover_switches_exactly_where_the_hand_means_cross():
    n = 1000
    t = np.arange(n)
    close = 100 + 10 * np.sin(t / 50.0) + 0.5 * np.cos(t / 7.0)
    history = PriceHistory(close=close, index=None, train=())
    weights = SmaCrossover().weights(history)
    hand = np.full(n, np.nan)
    for k in range(199, n):
        fast = math.fsum(close[k - 49 : k + 1]) / 50
        slow = math.fsum(close[k - 199 : k + 1]) / 200
        hand[k] = fast - slow
    assert np.isnan(weights[:199]).all() and not np.isnan(weights[199:]).any()
    clear = np.abs(hand) > 1e-9
    np.testing.assert_array_equal(weights[clear], (hand[clear] > 0).astype(float))
    switches = np.flatnonzero(np.diff(weights[199:]) != 0) + 200
    hand_crosses = np.flatnonzero(np.diff(np.sign(hand[199:])) != 0) + 200
    assert len(switches) >= 4 and np.array_equal(switches, hand_crosses)
    # through the env: the weight changes at exactly those decision bars (filled at the next open)
    frame = prices(n)
    frame["close"] = close
    frame["open"] = np.concatenate([[close[0]], close[:-1]])
    frame["high"] = frame[["open", "close"]].max(axis=1) * 1.001
    frame["low"] = frame[["open", "close"]].min(axis=1) * 0.999
    market = prepared(frame)
    evaluation = evaluate_baseline(SmaCrossover(), market, window=1, positions=(0.0, 1.0), costs=COSTS,
                                   bars=(199, n))
    env_switches = np.flatnonzero(np.diff(evaluation.weights.to_numpy()) != 0) + 200
    assert np.array_equal(env_switches, hand_crosses) and evaluation.range_name == f"bars[199:{n})"


def test_momentum_is_the_sign_of_the_12_1_return():
    frame = prices(900, seed=3)
    close, index = frame["close"].to_numpy(), frame.index
    calendar = TimeSeriesMomentum().weights(PriceHistory(close=close, index=index, train=()))
    bars = TimeSeriesMomentum().weights(PriceHistory(close=close, index=None, train=()))
    days = [d.to_pydatetime() for d in index]

    def last_bar_at_or_before(t, months):
        target = (index[t] - pd.DateOffset(months=months)).to_pydatetime()
        j = t
        while j >= 0 and days[j] > target:
            j -= 1
        return j

    signs = []
    for t in range(0, 900, 7):
        twelve, one = last_bar_at_or_before(t, 12), last_bar_at_or_before(t, 1)
        if twelve < 0:
            assert np.isnan(calendar[t])
        else:
            assert calendar[t] == np.sign(close[one] - close[twelve])
            signs.append(calendar[t])
        assert np.isnan(bars[t]) if t < 252 else bars[t] == np.sign(close[t - 21] - close[t - 252])
    assert {-1.0, 1.0} <= set(signs)
    long_flat = TimeSeriesMomentum(long_only=True).weights(PriceHistory(close=close, index=index, train=()))
    np.testing.assert_array_equal(long_flat[261:], np.maximum(calendar[261:], 0))


def test_vol_target_scales_down_in_a_volatility_spike():
    sigma = np.full(1000, 0.005)
    sigma[700:740] = 0.04
    frame = prices(1000, seed=2, sigma=sigma)
    close = frame["close"].to_numpy()
    history = PriceHistory(close=close, index=frame.index, train=((0, 500),))
    target = VolTarget()
    weights = target.weights(history)
    r = np.diff(np.log(close), prepend=np.nan)
    train_vol = np.sqrt(np.mean(r[1:500] ** 2))
    assert target.train_vol(history) == pytest.approx(train_vol, rel=1e-12)
    for t in (100, 650, 720, 900):  # the EWMA by hand: sum lam^i r_{t-i}^2 / sum lam^i over returns 1..t
        w = 0.94 ** np.arange(t)
        forecast = np.sqrt(np.sum(w * r[t:0:-1] ** 2) / np.sum(w))
        assert weights[t] == pytest.approx(min(train_vol / forecast, 1.0), rel=1e-9)
    assert np.isnan(weights[:20]).all() and not np.isnan(weights[20:]).any()
    assert weights[600:700].mean() > 0.8 and weights[715:745].max() < 0.3 and weights[950:].mean() > 0.8
    market = prepared(frame)
    levels = (0.0, 0.25, 0.5, 0.75, 1.0)
    evaluation = evaluate_baseline(target, market, window=1, positions=levels, costs=COSTS, bars=(600, 800),
                                   train=((0, 500),))
    held = evaluation.weights
    assert held.iloc[:100].mean() > 0.8 and held.iloc[115:140].max() <= 0.25
    with pytest.raises(ValueError, match="hold no return"):
        target.weights(PriceHistory(close=close, index=None, train=((5, 6),)))


# ------------------------------------------------------------------------------------------------- random
def test_random_is_reproducible_by_seed_and_reported_as_the_mean():
    market = prepared(prices(600))
    positions = (-1.0, 0.0, 1.0)
    three = evaluate_random(market, (1, 2, 3), window=4, positions=positions, costs=COSTS)
    alone = evaluate_random(market, (3,), window=4, positions=positions, costs=COSTS)
    again = evaluate_random(market, (1, 2, 3), window=4, positions=positions, costs=COSTS)
    pd.testing.assert_series_equal(three.evaluations[2].weights, alone.evaluations[0].weights)
    pd.testing.assert_series_equal(three.evaluations[2].equity, alone.evaluations[0].equity)
    pd.testing.assert_series_equal(three.mean_equity, again.mean_equity)
    assert not three.evaluations[0].weights.equals(three.evaluations[1].weights)
    assert set(three.evaluations[0].weights.unique()) == set(positions)
    curves = np.column_stack([e.equity.to_numpy() for e in three.evaluations])
    np.testing.assert_allclose(three.mean_equity.to_numpy(), curves.mean(axis=1), rtol=1e-15)
    final = three.mean_over_seeds(lambda e: float(e.equity.iloc[-1]))
    assert final == pytest.approx(curves[-1].mean()) and three.seeds == (1, 2, 3)
    with pytest.raises(ValueError, match="distinct"):
        RandomPolicy((1, 1), 3)
    with pytest.raises(ValueError, match="3 envs for 2 seeds"):
        RandomPolicy((1, 2), 3).act(torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------------------- position sets
def test_weights_map_to_the_nearest_level_and_missing_sides_raise():
    assert nearest_levels([0.5, -0.5, 0.74, 2.0, -3.0, 0.0], (-1.0, 0.0, 1.0)).tolist() == [1, 1, 2, 2, 0, 1]
    assert nearest_levels([0.3, 0.9], (0.0, 0.5, 1.0)).tolist() == [1, 2]
    history = PriceHistory(close=prices(400)["close"].to_numpy(), index=None, train=((0, 100),))
    with pytest.raises(ValueError, match="buy_and_hold wants long exposure .* no long level"):
        WeightPolicy(BuyAndHold(), history, (-1.0, 0.0))
    with pytest.raises(ValueError, match="momentum wants short exposure .* long_only=True"):
        WeightPolicy(TimeSeriesMomentum(), history, (0.0, 1.0))
    policy = WeightPolicy(TimeSeriesMomentum(long_only=True), history, (0.0, 1.0))
    assert policy.first_defined == 252 and set(policy.levels[:252]) == {0}
    sma = WeightPolicy(SmaCrossover(), history, (0.0, 1.0))
    assert sma.first_defined == 199
    assert sma.act(torch.tensor([0, 250, 399])).tolist() == sma.levels[[0, 250, 399]].tolist()
    with pytest.raises(KeyError, match="unknown baseline"):
        evaluate_baseline("nope", prepared(prices(400)), window=2, positions=(0.0, 1.0), costs=COSTS)
    for bad in (SmaCrossover(fast=200, slow=50), TimeSeriesMomentum(skip_months=12), VolTarget(lam=1.0)):
        with pytest.raises(ValueError, match="need"):
            bad.weights(history)
    assert np.isnan(trailing_mean(np.ones(3), 5)).all()
