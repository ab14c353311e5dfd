"""The batched torch env against the numpy reference env; timing, costs, episode ends (sentio_lab.env)."""

from __future__ import annotations

import dataclasses

import gymnasium.utils.env_checker
import numpy as np
import pandas as pd
import pytest
import torch
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from sentio_lab.data import load_market, to_market
from sentio_lab.env import DEFAULT_POSITIONS, MarketArrays, NumpyTradingEnv, TradingEnv, episode_start_bounds
from sentio_lab.env.costs import CostModel

COSTS = CostModel(5, 3)
BORROW = CostModel(5, 3, borrow_bps=300)  # 3 % a year on the value of a short
FIVE_LEVELS = (-1.0, -0.5, 0.0, 0.5, 1.0)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


# ------------------------------------------------------------------------------------------- helpers
def causal_features(frame: pd.DataFrame) -> np.ndarray:
    """Row t from bars <= t only: close-to-close log return, high/low log range, overnight gap."""
    close = frame["close"].to_numpy()
    prev_close = np.r_[np.nan, close[:-1]]
    log_return = np.log(close / prev_close)
    hl_range = np.log(frame["high"].to_numpy() / frame["low"].to_numpy())
    gap = np.log(frame["open"].to_numpy() / prev_close)
    return np.column_stack([100 * log_return, 100 * hl_range, 100 * gap]).astype(np.float32)


def arrays_from_frame(frame: pd.DataFrame) -> MarketArrays:
    return MarketArrays.from_frame(frame, causal_features(frame), first_valid=1)


def synthetic_arrays(close: np.ndarray) -> MarketArrays:
    """Opens at the previous close; features are log returns (row 0 undefined)."""
    close = np.asarray(close, dtype=np.float64)
    open_ = np.r_[close[0], close[:-1]]
    features = np.r_[np.nan, np.diff(np.log(close))].astype(np.float32)[:, None]
    return MarketArrays(open=open_, close=close, features=features, first_valid=1)


@pytest.fixture(scope="module")
def nasdaq_frame() -> pd.DataFrame:
    return load_market("nasdaq").frame


@pytest.fixture(scope="module")
def nasdaq(nasdaq_frame) -> MarketArrays:
    return arrays_from_frame(nasdaq_frame)


def np_rollout(market, start, actions, **kwargs):
    """Observations (steps+1, D) and rewards (steps,) of one numpy episode under fixed actions."""
    env = NumpyTradingEnv(market, **kwargs)
    obs = [env.reset(options={"start": start})[0]]
    rewards = []
    for a in actions:
        o, r, terminated, truncated, _ = env.step(a)
        assert not (terminated or truncated)
        obs.append(o)
        rewards.append(r)
    return np.array(obs), np.array(rewards)


def torch_rollout(market, starts, actions, **kwargs):
    """Observations (steps+1, N, D) and rewards (steps, N) of a batch that never ends within ``actions``."""
    env = TradingEnv(market, num_envs=len(starts), **kwargs)
    obs = [env.reset(starts=starts).numpy()]
    rewards = []
    for a in actions:
        o, r, terminated, truncated, _ = env.step(torch.as_tensor(a))
        assert not bool((terminated | truncated).any())
        obs.append(o.numpy())
        rewards.append(r.numpy())
    return np.array(obs), np.array(rewards)


# ----------------------------------------------------------------------------------------- MarketArrays
def test_market_arrays_from_frame(nasdaq_frame, nasdaq):
    assert nasdaq.open.dtype == nasdaq.close.dtype == np.float64
    assert nasdaq.features.dtype == np.float32 and nasdaq.features.flags["C_CONTIGUOUS"]
    assert nasdaq.features.shape == (len(nasdaq_frame), 3)
    np.testing.assert_array_equal(nasdaq.open, nasdaq_frame["open"].to_numpy())
    np.testing.assert_array_equal(nasdaq.close, nasdaq_frame["close"].to_numpy())
    assert np.isnan(nasdaq.features[0, [0, 2]]).all()  # warm-up row: allowed before first_valid


def _arrays(n=50, f=2, **overrides):
    fields = dict(open=np.full(n, 10.0), close=np.full(n, 10.0), features=np.zeros((n, f), np.float32))
    fields.update(overrides)
    return MarketArrays(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(open=np.full(49, 10.0)), r"open \(49,\), close \(50,\) .*must share their first dimension"),
        (dict(features=np.zeros(50, np.float32)), r"features \(50,\) must share"),
        (dict(features=np.zeros((51, 2), np.float32)), r"features \(51, 2\) must share"),
        (dict(first_valid=-1), r"first_valid=-1 outside \[0, 50\)"),
        (dict(first_valid=50), r"first_valid=50 outside \[0, 50\)"),
    ],
)
def test_market_arrays_shape_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _arrays(**overrides)


def test_market_arrays_non_finite_features_name_rows():
    features = np.zeros((50, 2), np.float32)
    features[:3] = np.nan  # warm-up: fine
    _arrays(features=features, first_valid=3)
    features[17, 1] = np.inf
    features[40, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite features at rows \[17 40\]"):
        _arrays(features=features, first_valid=3)
    with pytest.raises(ValueError, match=r"rows \[ 2 17 40\]"):
        _arrays(features=features, first_valid=2)


# ------------------------------------------------------------------------------------------ start bounds
def test_episode_start_bounds_values():
    market = _arrays(n=100, features=np.zeros((100, 1), np.float32), first_valid=3)
    # The first observation needs rows t-4..t defined (t >= 3 + 5 - 1); the last step reads bar t + 10.
    assert episode_start_bounds(market, window=5, start=0, stop=100, episode_length=10) == (7, 89)
    assert episode_start_bounds(market, window=5, start=20, stop=60, episode_length=10) == (20, 49)
    assert episode_start_bounds(market, window=1, start=0, stop=100, episode_length=1) == (3, 98)


@pytest.mark.parametrize(
    ("start", "stop", "length", "message"),
    [
        (-1, 100, 10, r"range \[-1, 100\) outside the market's 100 bars"),
        (0, 101, 10, r"range \[0, 101\) outside the market's 100 bars"),
        (50, 50, 10, r"range \[50, 50\) outside"),
        (60, 40, 10, r"range \[60, 40\) outside"),
        (0, 100, 93, r"too short for episodes of 93 steps with a 5-bar window after 3 warm-up bars"),
        (80, 90, 10, r"range \[80, 90\) is too short"),
    ],
)
def test_episode_start_bounds_errors(start, stop, length, message):
    market = _arrays(n=100, features=np.zeros((100, 1), np.float32), first_valid=3)
    with pytest.raises(ValueError, match=message):
        episode_start_bounds(market, 5, start, stop, length)
    with pytest.raises(ValueError, match=message):
        TradingEnv(market, num_envs=2, window=5, episode_length=length, start=start, stop=stop)
    with pytest.raises(ValueError, match=message):
        NumpyTradingEnv(market, window=5, episode_length=length, start=start, stop=stop)


def test_episodes_never_read_outside_their_range():
    n, start, stop, window, length = 300, 100, 200, 4, 30
    rng = np.random.default_rng(1)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = close * np.exp(rng.normal(0, 0.003, n))
    features = rng.normal(size=(n, 2)).astype(np.float32)
    # Bars from `stop` on are poison: a NaN price or a huge feature would show in equity or obs.
    open_[stop:], close[stop:] = np.nan, np.nan
    features[stop:] = 1e30
    market = MarketArrays(open=open_, close=close, features=features)
    env = TradingEnv(market, num_envs=8, window=window, episode_length=length, start=start, stop=stop, seed=3)
    assert (env.start_low, env.start_high) == (start, stop - 1 - length)
    obs = env.reset(starts=[env.start_high] * 4 + [env.start_low] * 4)
    for _ in range(4 * length):
        assert bool((obs.abs() < 1e6).all())
        obs, reward, _, _, info = env.step(torch.randint(0, 3, (8,)))
        assert bool(torch.isfinite(reward).all()) and bool(torch.isfinite(info["equity"]).all())
        assert bool((info["final_obs"].abs() < 1e6).all())


# ---------------------------------------------------------------------------------- torch == numpy reference
def _check_against_reference(market, positions, device, n_envs=16, steps=300, length=120, window=10, seed=0,
                             costs=COSTS):
    env = TradingEnv(market, num_envs=n_envs, window=window, episode_length=length, positions=positions,
                     costs=costs, device=device, seed=seed)
    refs = [NumpyTradingEnv(market, window=window, episode_length=length, positions=positions, costs=costs)
            for _ in range(n_envs)]
    assert env.obs_dim == refs[0].observation_space.shape[0] == window * market.features.shape[1] + 1
    rng = np.random.default_rng(seed)
    starts = rng.integers(env.start_low, env.start_high + 1, n_envs)
    obs = env.reset(starts=torch.as_tensor(starts, device=device))
    assert obs.device.type == torch.device(device).type
    assert obs.dtype == torch.float32 and obs.shape == (n_envs, env.obs_dim)
    expected = np.stack([ref.reset(options={"start": int(s)})[0]
                         for ref, s in zip(refs, starts, strict=True)])
    np.testing.assert_array_equal(obs.cpu().numpy(), expected)

    endings = 0
    for _ in range(steps):
        actions = rng.integers(0, len(positions), n_envs)
        obs, reward, terminated, truncated, info = env.step(torch.as_tensor(actions, device=device))
        assert reward.dtype == torch.float64 and terminated.dtype == truncated.dtype == torch.bool
        results = [ref.step(a) for ref, a in zip(refs, actions, strict=True)]
        ref_obs = np.stack([r[0] for r in results])
        np.testing.assert_allclose(reward.cpu().numpy(), [r[1] for r in results], rtol=1e-9, atol=0)
        np.testing.assert_allclose(info["equity"].cpu().numpy(), [r[4]["equity"] for r in results],
                                   rtol=1e-9, atol=0)
        np.testing.assert_array_equal(terminated.cpu().numpy(), [r[2] for r in results])
        np.testing.assert_array_equal(truncated.cpu().numpy(), [r[3] for r in results])
        done = info["done"].cpu().numpy()
        np.testing.assert_array_equal(done, terminated.cpu().numpy() | truncated.cpu().numpy())
        # final_obs is what the ended episode saw next; obs is the new episode's first observation.
        np.testing.assert_array_equal(info["final_obs"].cpu().numpy(), ref_obs)
        new_t = env.t.cpu().numpy()
        for i in np.flatnonzero(done):
            assert env.start_low <= new_t[i] <= env.start_high
            ref_obs[i] = refs[i].reset(options={"start": int(new_t[i])})[0]
            endings += 1
        np.testing.assert_array_equal(obs.cpu().numpy(), ref_obs)
    assert endings >= n_envs * (steps // length)  # auto-resets were exercised


@pytest.mark.parametrize("positions", [DEFAULT_POSITIONS, (0.0, 1.0), FIVE_LEVELS],
                         ids=["short-flat-long", "long-only", "five-levels"])
def test_torch_env_matches_numpy_reference(nasdaq, positions):
    _check_against_reference(nasdaq, positions, "cpu")


@pytest.mark.parametrize("positions", [DEFAULT_POSITIONS, FIVE_LEVELS, (-1.0, 0.0, 2.0)],
                         ids=["short-flat-long", "five-levels", "leveraged"])
def test_torch_env_matches_numpy_reference_with_borrow(nasdaq, positions):
    _check_against_reference(nasdaq, positions, "cpu", costs=BORROW)


@pytest.mark.parametrize("costs", [COSTS, BORROW], ids=["no-borrow", "borrow"])
@pytest.mark.parametrize("device", DEVICES)
def test_torch_env_on_device(nasdaq, device, costs):
    _check_against_reference(nasdaq, DEFAULT_POSITIONS, device, n_envs=6, steps=130, length=50, costs=costs)


def test_observation_layout(nasdaq):
    window = 6
    env = TradingEnv(nasdaq, num_envs=3, window=window, positions=FIVE_LEVELS, episode_length=20)
    starts = [env.start_low, 1000, env.start_high]
    obs = env.reset(starts=starts).numpy()
    for i, t in enumerate(starts):
        np.testing.assert_array_equal(obs[i, :-1].reshape(window, 3), nasdaq.features[t - window + 1 : t + 1])
        assert obs[i, -1] == 0.0  # flat
    obs, *_ = env.step(torch.tensor([0, 3, 4]))
    np.testing.assert_array_equal(obs[:, -1].numpy(), np.float32([-1.0, 0.5, 1.0]))
    np.testing.assert_array_equal(obs[1, :-1].reshape(window, 3), nasdaq.features[1001 - window + 1 : 1002])


# ------------------------------------------------------------------------------------------- look-ahead
def test_no_fill_at_a_seen_price(nasdaq_frame):
    """The action chosen at bar t fills at the open of bar t+1, not at bar t's close (the last price seen).

    Only the open of bar t+1 is changed, its close is kept: under same-bar execution (a fill at close[t])
    the reward of step t would not move at all, with or without costs. Bar t+1 opens away from close[t]
    (a real open, not a copy of the previous close), so the two fill rules give different rewards even
    at zero cost.
    """
    start, k, window = 800, 7, 5  # step k is taken at bar t = start + k
    t = start + k
    gap = np.log(nasdaq_frame["open"].iloc[t + 1] / nasdaq_frame["close"].iloc[t])
    assert abs(gap) > 1e-3, "bar t+1 must open away from close[t] for this test to tell the fill rules apart"
    changed = nasdaq_frame.copy()
    o = changed["open"].iloc[t + 1] * 1.03
    changed.iloc[t + 1, changed.columns.get_loc("open")] = o
    changed.iloc[t + 1, changed.columns.get_loc("high")] = max(changed["high"].iloc[t + 1], o)
    changed = to_market(changed, name="changed").frame  # still valid OHLC
    base, moved = arrays_from_frame(nasdaq_frame), arrays_from_frame(changed)
    assert base.close[t + 1] == moved.close[t + 1] and base.open[t + 1] != moved.open[t + 1]

    actions = [1] * k + [2, 2, 0]  # flat until step k, buy at step k (filled at the open of bar t+1)
    for costs in (CostModel(0, 0), COSTS):
        kwargs = dict(window=window, episode_length=50, costs=costs)
        for obs_a, rew_a, obs_b, rew_b in [
            (*np_rollout(base, start, actions, **kwargs), *np_rollout(moved, start, actions, **kwargs)),
            (*torch_rollout(base, [start], [[a] for a in actions], **kwargs),
             *torch_rollout(moved, [start], [[a] for a in actions], **kwargs)),
        ]:
            obs_a, obs_b = obs_a.reshape(len(obs_a), -1), obs_b.reshape(len(obs_b), -1)
            rew_a, rew_b = rew_a.ravel(), rew_b.ravel()
            np.testing.assert_array_equal(obs_a[: k + 1], obs_b[: k + 1])  # observations at bars <= t
            np.testing.assert_array_equal(rew_a[:k], rew_b[:k])
            # only open[t+1] differs, so only a fill at that open can move the reward of step k
            assert rew_b[k] == pytest.approx(rew_a[k] - np.log(1.03), abs=1e-12)
            assert not np.array_equal(obs_a[k + 1], obs_b[k + 1])  # the gap feature at t+1 saw the new open
            # Buying with all equity from flat: r_t = log(close[t+1] / (open[t+1] (1 + s)(1 + f))).
            for market, rewards in ((base, rew_a), (moved, rew_b)):
                expected = np.log(market.close[t + 1] / (market.open[t + 1] * (1 + costs.buy_cost_rate)))
                assert rewards[k] == pytest.approx(expected, abs=1e-12)
                same_bar = np.log(market.close[t + 1] / (market.close[t] * (1 + costs.buy_cost_rate)))
                assert abs(rewards[k] - same_bar) > 1e-3  # same-bar execution would differ by the gap


@pytest.mark.parametrize("seed", range(5))
def test_future_rows_do_not_leak_into_observations(nasdaq, seed):
    rng = np.random.default_rng(seed)
    window, n_envs, length = 8, 8, 200
    cut = int(rng.integers(500, len(nasdaq.close) - 300))  # bars <= cut are kept, bars > cut replaced
    future = slice(cut + 1, None)
    m = len(nasdaq.close) - cut - 1
    open_, close, features = nasdaq.open.copy(), nasdaq.close.copy(), nasdaq.features.copy()
    # A different but plausible future: a fresh random walk from the last kept close.
    close[future] = close[cut] * np.exp(np.cumsum(rng.normal(0, 0.02, m)))
    open_[future] = close[future] * np.exp(rng.normal(0, 0.01, m))
    features[future] = rng.normal(0, 5, (m, features.shape[1]))
    perturbed = MarketArrays(open=open_, close=close, features=features, first_valid=1)

    starts = rng.integers(cut - 60, cut, n_envs)
    steps = int(cut - starts.min() + 5)
    actions = rng.integers(0, 3, (steps, n_envs))
    kwargs = dict(window=window, episode_length=length, costs=COSTS)
    obs_a, rew_a = torch_rollout(nasdaq, starts, actions, **kwargs)
    obs_b, rew_b = torch_rollout(perturbed, starts, actions, **kwargs)
    bar = starts[None, :] + np.arange(steps + 1)[:, None]  # the bar each observation stands at
    seen = bar <= cut
    np.testing.assert_array_equal(obs_a[seen], obs_b[seen])
    filled = bar[1:] <= cut  # step s fills and marks on bar s+1
    np.testing.assert_array_equal(rew_a[filled], rew_b[filled])
    assert not np.array_equal(obs_a[~seen], obs_b[~seen])  # the perturbation did reach the env
    assert not np.array_equal(rew_a[~filled], rew_b[~filled])
    # The numpy reference env agrees (one episode).
    np_a, np_ra = np_rollout(nasdaq, int(starts[0]), actions[:, 0], **kwargs)
    np_b, np_rb = np_rollout(perturbed, int(starts[0]), actions[:, 0], **kwargs)
    np.testing.assert_array_equal(np_a[seen[:, 0]], np_b[seen[:, 0]])
    np.testing.assert_array_equal(np_ra[filled[:, 0]], np_rb[filled[:, 0]])


# ---------------------------------------------------------------------------------- truncation vs ruin
def test_truncation_and_auto_reset(nasdaq):
    length, window = 20, 5
    env = TradingEnv(nasdaq, num_envs=4, window=window, episode_length=length, costs=COSTS, seed=11)
    starts = [300, 1200, 2500, 4000]
    refs = [NumpyTradingEnv(nasdaq, window=window, episode_length=length, costs=COSTS) for _ in starts]
    for ref, s in zip(refs, starts, strict=True):
        ref.reset(options={"start": s})
    obs = env.reset(starts=starts)
    actions = torch.tensor([0, 1, 2, 2])
    for step in range(1, 2 * length + 1):
        obs, _, terminated, truncated, info = env.step(actions)
        assert not bool(terminated.any())
        if step % length:
            assert not bool(truncated.any()) and not bool(info["done"].any())
            assert info["final_obs"] is obs or torch.equal(info["final_obs"], obs)
            continue
        assert bool(truncated.all()) and bool(info["done"].all())
        # The final observation is the last bar of the finished episode, with its position.
        assert not torch.equal(info["final_obs"], obs)
        np.testing.assert_array_equal(info["final_obs"][:, -1].numpy(), np.float32([-1, 0, 1, 1]))
        assert not bool((info["equity"] == 1.0).all())  # pre-reset equity, not the fresh account
        # Auto-reset: valid random start, flat, equity 1, step counter back to zero.
        assert bool(((env.t >= env.start_low) & (env.t <= env.start_high)).all())
        assert bool((env.level == 1).all()) and bool((obs[:, -1] == 0).all())
        assert bool((env.equity == 1.0).all()) and bool((env.cash == 1.0).all())
        assert bool((env.shares == 0).all())
        assert bool((env.steps == 0).all())
        for i, t in enumerate(env.t.tolist()):
            np.testing.assert_array_equal(obs[i].numpy(), refs[i].reset(options={"start": t})[0])


def test_truncation_final_obs_and_equity_match_reference(nasdaq):
    length, window = 15, 4
    env = TradingEnv(nasdaq, num_envs=3, window=window, episode_length=length, costs=COSTS)
    starts, actions = [100, 2000, 3000], [2, 0, 1]
    env.reset(starts=starts)
    for _ in range(length):
        obs, reward, terminated, truncated, info = env.step(torch.tensor(actions))
    for i, (s, a) in enumerate(zip(starts, actions, strict=True)):
        ref = NumpyTradingEnv(nasdaq, window=window, episode_length=length, costs=COSTS)
        ref.reset(options={"start": s})
        for _ in range(length):
            o, r, te, tr, ref_info = ref.step(a)
        assert tr and not te
        np.testing.assert_array_equal(info["final_obs"][i].numpy(), o)
        assert float(info["equity"][i]) == pytest.approx(ref_info["equity"], rel=1e-12)
        assert float(reward[i]) == pytest.approx(r, rel=1e-9, abs=1e-15)


def _collapse(n=200, crash_at=100, factor=0.3):
    close = np.full(n, 100.0)
    close[crash_at:] = 100.0 * factor ** np.arange(1, n - crash_at + 1)
    return synthetic_arrays(close)


@pytest.mark.parametrize("length", [12, 30])
def test_ruin_terminates_without_truncation(length):
    market = _collapse()
    env = TradingEnv(market, num_envs=2, window=3, episode_length=length, costs=COSTS, ruin_fraction=0.05)
    env.reset(starts=[90, 50])
    actions = torch.tensor([2, 1])  # env 0 long into the collapse, env 1 flat
    ref = NumpyTradingEnv(market, window=3, episode_length=length, costs=COSTS, ruin_fraction=0.05)
    ref.reset(options={"start": 90})
    for step in range(1, 13):
        obs, reward, terminated, truncated, info = env.step(actions)
        _, ref_reward, ref_term, ref_trunc, ref_info = ref.step(2)
        assert float(reward[0]) == pytest.approx(ref_reward, rel=1e-9)
        assert (bool(terminated[0]), bool(truncated[0])) == (ref_term, ref_trunc)
        if step < 12:
            assert not bool(info["done"].any())
    # Bars 100, 101, 102 close at 30, 9, 2.7: equity 0.027 <= 0.05 at step 12, the long env is ruined.
    assert ref_term and not ref_trunc
    assert bool(terminated[0]) and not bool(truncated[0])
    assert float(info["equity"][0]) == pytest.approx(0.027 / (1 + COSTS.buy_cost_rate), rel=1e-12)
    assert bool(torch.isfinite(reward).all())
    # The flat env is never ruined; it truncates exactly when its episode length is reached.
    assert not bool(terminated[1])
    assert bool(truncated[1]) == (length == 12)
    # The ruined episode restarted: flat, equity 1, valid start, and its final obs is not the new obs.
    assert env.start_low <= int(env.t[0]) <= env.start_high
    assert int(env.level[0]) == 1 and float(env.equity[0]) == 1.0 and float(obs[0, -1]) == 0.0
    assert not torch.equal(info["final_obs"][0], obs[0])
    assert float(info["final_obs"][0, -1]) == 1.0


def test_negative_equity_gives_finite_penalty():
    close = np.full(120, 100.0)
    close[100:] = 350.0  # the price jumps 3.5x overnight; a full short loses more than everything
    market = synthetic_arrays(close)
    env = TradingEnv(market, num_envs=1, window=3, episode_length=20, costs=CostModel(0, 0))
    ref = NumpyTradingEnv(market, window=3, episode_length=20, costs=CostModel(0, 0))
    env.reset(starts=[95])
    ref.reset(options={"start": 95})
    for _ in range(5):  # short from bar 96; bar 100 opens at 350
        _, reward, terminated, truncated, info = env.step(torch.tensor([0]))
        _, ref_reward, ref_term, _, ref_info = ref.step(0)
    assert float(info["equity"][0]) == pytest.approx(2.0 - 3.5)
    assert bool(terminated[0]) and not bool(truncated[0]) and ref_term
    assert float(reward[0]) == pytest.approx(np.log(1e-12 / 1.0))
    assert ref_reward == pytest.approx(float(reward[0]), rel=1e-12)


# ------------------------------------------------------------------------------------------- holding, fees
def test_holding_a_level_trades_nothing(nasdaq):
    env = TradingEnv(nasdaq, num_envs=3, window=4, episode_length=60, costs=COSTS)
    start = 1500
    env.reset(starts=[start] * 3)
    actions = torch.tensor([2, 0, 1])  # long, short, flat
    env.step(actions)
    cash, shares, equity = env.cash.clone(), env.shares.clone(), env.equity.clone()
    assert float(shares[0]) > 0 > float(shares[1]) and float(shares[2]) == 0.0
    for k in range(2, 40):
        _, reward, *_ , info = env.step(actions)
        assert torch.equal(env.cash, cash) and torch.equal(env.shares, shares)
        # Equity moves only with the close: no fee, no slippage while holding.
        expected = cash + shares * nasdaq.close[start + k]
        torch.testing.assert_close(info["equity"], expected, rtol=0, atol=0)
        torch.testing.assert_close(reward, torch.log(expected / equity), rtol=1e-12, atol=1e-15)
        equity = expected
    assert float(info["equity"][2]) == 1.0 and float(reward[2]) == 0.0


@pytest.mark.parametrize(("first", "ratio_of"), [(2, "long"), (0, "short")])
def test_round_trip_pays_the_expected_cost(nasdaq, first, ratio_of):
    start = 2222
    o1, o2 = nasdaq.open[start + 1], nasdaq.open[start + 2]
    s, f = COSTS.slippage, COSTS.fee
    keep = (1 - s) * (1 - f) / ((1 + s) * (1 + f))  # fraction of a full position kept over open + close
    results = {}
    for name, costs in (("free", CostModel(0, 0)), ("costly", COSTS)):
        env = TradingEnv(nasdaq, num_envs=1, window=4, episode_length=10, costs=costs)
        env.reset(starts=[start])
        env.step(torch.tensor([first]))  # open at the open of bar start+1
        _, reward, *_, info = env.step(torch.tensor([1]))  # close at the open of bar start+2
        assert float(env.shares[0]) == 0.0
        results[name] = float(info["equity"][0])
    if ratio_of == "long":
        assert results["free"] == pytest.approx(o2 / o1, rel=1e-12)
        assert results["costly"] == pytest.approx(keep * o2 / o1, rel=1e-12)
    else:
        assert results["free"] == pytest.approx(2 - o2 / o1, rel=1e-12)
        # short 1 / (o1 (2 - (1-s)(1-f))) shares at o1 (1-s), net of fee; buy them back at o2 (1+s)(1+f)
        sold = 1 / (o1 * (2 - (1 - s) * (1 - f)))
        assert results["costly"] == pytest.approx(1 + sold * (o1 * (1 - s) * (1 - f) - o2 * (1 + s) * (1 + f)),
                                                  rel=1e-12)
    assert results["costly"] < results["free"]


def test_level_change_between_positions_charges_fees(nasdaq):
    start = 3333
    equity = {}
    for name, costs in (("free", CostModel(0, 0)), ("costly", COSTS)):
        env = TradingEnv(nasdaq, num_envs=2, window=4, episode_length=10, costs=costs)
        env.reset(starts=[start, start])
        env.step(torch.tensor([2, 2]))
        _, _, _, _, info = env.step(torch.tensor([2, 0]))  # env 1 flips long -> short, env 0 holds
        equity[name] = info["equity"].numpy()
    hold_cost = equity["costly"][0] / equity["free"][0]
    flip_cost = equity["costly"][1] / equity["free"][1]
    assert hold_cost == pytest.approx(1 / (1 + COSTS.buy_cost_rate), rel=1e-12)  # only the initial buy
    assert flip_cost < hold_cost  # the flip paid again


# ------------------------------------------------------------------------------------ state and seeding
def test_reset_does_not_overwrite_returned_equity(nasdaq):
    env = TradingEnv(nasdaq, num_envs=2, window=4, episode_length=30)
    env.reset(starts=[500, 600])
    _, _, _, _, info = env.step(torch.tensor([2, 0]))
    equity = info["equity"]
    before = equity.clone()
    assert not bool((before == 1.0).any())
    env.reset(starts=[500, 600])
    assert torch.equal(equity, before)


def test_auto_reset_does_not_touch_caller_tensors(nasdaq):
    env = TradingEnv(nasdaq, num_envs=2, window=4, episode_length=3)
    env.reset(starts=[500, 600])
    actions = torch.tensor([2, 0])
    for _ in range(3):
        obs, _, _, truncated, info = env.step(actions)
    assert bool(truncated.all())
    assert actions.tolist() == [2, 0]
    assert not bool((info["equity"] == 1.0).any())
    assert info["final_obs"][:, -1].tolist() == [1.0, -1.0]


def test_same_seed_same_starts(nasdaq):
    def run(seed):
        env = TradingEnv(nasdaq, num_envs=16, window=4, episode_length=5, seed=seed)
        obs = [env.reset().clone()]
        starts = [env.t.clone()]
        for k in range(12):
            o, *_ = env.step(torch.full((16,), k % 3))
            obs.append(o)
            starts.append(env.t.clone())
        return torch.stack(obs), torch.stack(starts)

    obs_a, t_a = run(7)
    obs_b, t_b = run(7)
    obs_c, t_c = run(8)
    assert torch.equal(obs_a, obs_b) and torch.equal(t_a, t_b)
    assert not torch.equal(t_a[0], t_c[0])
    assert not torch.equal(t_a, t_c)


def test_numpy_env_seeded_starts(nasdaq):
    env = NumpyTradingEnv(nasdaq, window=4, episode_length=20)
    first = env.reset(seed=5)[0]
    t_first = env.t
    assert np.array_equal(env.reset(seed=5)[0], first) and env.t == t_first
    starts = set()
    for seed in range(10):
        env.reset(seed=seed)
        starts.add(env.t)
        assert env.start_low <= env.t <= env.start_high
    assert len(starts) > 1


def test_state_dict_resumes_exactly(nasdaq):
    def make():
        return TradingEnv(nasdaq, num_envs=4, window=4, episode_length=7, costs=COSTS, seed=1)

    actions = torch.randint(0, 3, (30, 4), generator=torch.Generator().manual_seed(0))
    env = make()
    env.reset()
    for a in actions[:10]:
        env.step(a)
    state = env.state_dict()
    tail = [env.step(a) for a in actions[10:]]
    resumed = TradingEnv(nasdaq, num_envs=4, window=4, episode_length=7, costs=COSTS, seed=99)
    resumed.reset()
    obs = resumed.load_state_dict(state)
    assert obs.shape == (4, resumed.obs_dim)
    for a, (o, r, te, tr, info) in zip(actions[10:], tail, strict=True):
        o2, r2, te2, tr2, info2 = resumed.step(a)
        assert torch.equal(o, o2) and torch.equal(r, r2) and torch.equal(te, te2) and torch.equal(tr, tr2)
        assert torch.equal(info["final_obs"], info2["final_obs"])
    with pytest.raises(ValueError, match="env state holds 4 episodes, this env runs 2"):
        TradingEnv(nasdaq, num_envs=2, window=4, episode_length=7).load_state_dict(state)


# --------------------------------------------------------------------------------------- API checks
@pytest.mark.filterwarnings("ignore:.*A Box observation space:UserWarning")
@pytest.mark.filterwarnings("ignore:.*alternative render modes:UserWarning")
def test_numpy_env_passes_env_checkers(nasdaq):
    sb3_check_env(NumpyTradingEnv(nasdaq, window=8, episode_length=50, costs=COSTS), warn=True)
    gymnasium.utils.env_checker.check_env(NumpyTradingEnv(nasdaq, window=8, episode_length=50))


def test_bad_starts_raise(nasdaq):
    env = NumpyTradingEnv(nasdaq, window=8, episode_length=50)
    for bad in (env.start_low - 1, env.start_high + 1):
        message = rf"reset: start {bad} outside \[{env.start_low}, {env.start_high}\]"
        with pytest.raises(ValueError, match=message):
            env.reset(options={"start": bad})
    batched = TradingEnv(nasdaq, num_envs=3, window=8, episode_length=50)
    with pytest.raises(ValueError, match="reset: 2 starts given for 3 envs"):
        batched.reset(starts=[100, 200])
    with pytest.raises(ValueError, match=rf"starts \[{batched.start_high + 1}\] outside the valid range"):
        batched.reset(starts=[100, batched.start_high + 1, 200])
    with pytest.raises(ValueError, match=r"starts \[0\] outside"):
        batched.reset(starts=torch.tensor([0, 100, 200]))


@pytest.mark.parametrize("positions", [(-1.0, 1.0), (0.5, 1.0), (0.0,), (0.0, 0.0, 1.0), (0.0, float("nan"))])
def test_positions_must_be_distinct_finite_and_include_flat(positions):
    from sentio_lab.env import check_positions

    with pytest.raises(ValueError, match="positions"):
        check_positions(positions)


def test_large_banks_gather_windows_instead_of_precomputing(monkeypatch, nasdaq):
    import sentio_lab.env.trading as env_module

    precomputed = TradingEnv(nasdaq, num_envs=6, window=5, episode_length=40, seed=4)
    monkeypatch.setattr(env_module, "WINDOW_MATRIX_MAX_BYTES", 0)
    gathered = TradingEnv(nasdaq, num_envs=6, window=5, episode_length=40, seed=4)
    assert precomputed._window_matrix is not None and gathered._window_matrix is None
    obs_a, obs_b = precomputed.reset(), gathered.reset()
    actions = torch.Generator().manual_seed(0)
    for _ in range(60):
        assert torch.equal(obs_a, obs_b)
        act = torch.randint(0, 3, (6,), generator=actions)
        obs_a, *_ = precomputed.step(act)
        obs_b, *_ = gathered.step(act)


# ----------------------------------------------------------------------------------------- short borrow
def _weekend(index: pd.DatetimeIndex, after: int = 1000) -> int:
    """Position of the first Monday after ``after`` preceded by bars on Wednesday, Thursday and Friday."""
    for k in range(after, len(index)):
        if [(index[k - j] - index[k - j - 1]).days for j in range(3)] == [3, 1, 1] and index[k].weekday() == 0:
            return k
    raise AssertionError("no Thursday-Friday-Monday stretch found")


def test_a_short_over_a_weekend_pays_three_days(nasdaq_frame, nasdaq):
    monday = _weekend(nasdaq_frame.index)
    start = monday - 3  # decide on Wednesday, sell short at Thursday's open, hold over Friday into Monday
    assert [d.weekday() for d in nasdaq_frame.index[start : monday + 1]] == [2, 3, 4, 0]
    rate = BORROW.borrow_rate
    for run in ("torch", "numpy"):
        cash = {}
        for costs in (COSTS, BORROW):
            if run == "torch":
                env = TradingEnv(nasdaq, num_envs=1, window=4, episode_length=10, costs=costs)
                env.reset(starts=[start])
                path = []
                for _ in range(3):
                    env.step(torch.tensor([0]))
                    path.append((float(env.cash[0]), float(env.shares[0])))
            else:
                env = NumpyTradingEnv(nasdaq, window=4, episode_length=10, costs=costs)
                env.reset(options={"start": start})
                path = []
                for _ in range(3):
                    env.step(0)
                    path.append((env.cash, env.shares))
            cash[costs.borrow_bps] = np.array(path)
        shares = cash[0.0][:, 1]
        np.testing.assert_array_equal(cash[300.0][:, 1], shares)  # borrow never changes the position
        assert shares[0] < 0 and (shares == shares[0]).all()
        charges = -np.diff(np.r_[0.0, cash[300.0][:, 0] - cash[0.0][:, 0]])  # charge booked at each close
        day = rate * -shares[0] / 365.0
        closes = nasdaq.close[start + 1 : monday + 1]
        np.testing.assert_allclose(charges, day * closes * np.array([1.0, 1.0, 3.0]), rtol=1e-9)
        assert charges[2] / (day * closes[2]) == pytest.approx(3.0, rel=1e-9)  # Friday close -> Monday close


@pytest.mark.parametrize("positions", [(0.0, 0.5, 1.0), (0.0, 1.0, 2.0)], ids=["long", "leveraged-long"])
def test_longs_and_flat_pay_no_borrow(nasdaq, positions):
    """Only shorts pay: a long-only (even leveraged) path is bit-for-bit the path without borrow."""
    starts, steps = [400, 1800, 3500], 150
    actions = torch.randint(0, 3, (steps, 3), generator=torch.Generator().manual_seed(4))
    runs = {}
    for costs in (COSTS, CostModel(5, 3, borrow_bps=5_000)):
        _, rewards = torch_rollout(nasdaq, starts, actions, window=4, episode_length=200, positions=positions,
                                   costs=costs)
        _, np_rewards = np_rollout(nasdaq, starts[0], actions[:, 0].tolist(), window=4, episode_length=200,
                                   positions=positions, costs=costs)
        runs[costs.borrow_bps] = rewards, np_rewards
    np.testing.assert_array_equal(runs[0.0][0], runs[5_000.0][0])
    np.testing.assert_array_equal(runs[0.0][1], runs[5_000.0][1])


def test_zero_borrow_rate_is_exactly_the_old_accounting(nasdaq):
    """borrow_bps=0 needs no timestamps and changes nothing; any positive rate does change a short path."""
    no_times = MarketArrays(open=nasdaq.open, close=nasdaq.close, features=nasdaq.features, first_valid=1)
    assert no_times.year_fraction is None and nasdaq.year_fraction is not None
    actions = torch.randint(0, 3, (120, 4), generator=torch.Generator().manual_seed(2))
    kwargs = dict(window=4, episode_length=200, positions=DEFAULT_POSITIONS)
    base = torch_rollout(no_times, [500, 900, 2000, 4200], actions, costs=COSTS, **kwargs)[1]
    zero = torch_rollout(nasdaq, [500, 900, 2000, 4200], actions, costs=CostModel(5, 3, borrow_bps=0.0), **kwargs)[1]
    tiny = torch_rollout(nasdaq, [500, 900, 2000, 4200], actions, costs=CostModel(5, 3, borrow_bps=1e-3), **kwargs)[1]
    np.testing.assert_array_equal(base, zero)
    assert not np.array_equal(base, tiny)
    np_base = np_rollout(no_times, 500, actions[:, 0].tolist(), costs=COSTS, **kwargs)[1]
    np_zero = np_rollout(nasdaq, 500, actions[:, 0].tolist(), costs=CostModel(5, 3, borrow_bps=0.0), **kwargs)[1]
    np.testing.assert_array_equal(np_base, np_zero)
    np.testing.assert_allclose(np_base, base[:, 0], rtol=1e-9, atol=1e-15)


def test_borrow_without_timestamps_is_refused():
    market = synthetic_arrays(np.linspace(100, 120, 80))
    assert market.year_fraction is None
    with pytest.raises(ValueError, match=r"borrow_bps=300 needs bar timestamps.*year_fraction is None"):
        TradingEnv(market, num_envs=2, window=3, episode_length=10, costs=BORROW)
    with pytest.raises(ValueError, match=r"borrow_bps=300 needs bar timestamps"):
        NumpyTradingEnv(market, window=3, episode_length=10, costs=BORROW)
    TradingEnv(market, num_envs=2, window=3, episode_length=10, costs=COSTS)  # no borrow, no timestamps needed


def test_market_arrays_year_fraction_from_the_index(nasdaq_frame, nasdaq):
    years = nasdaq.year_fraction
    assert years.dtype == np.float64 and years.shape == (len(nasdaq_frame),) and years[0] == 0.0
    gaps = np.diff(nasdaq_frame.index.to_numpy()).astype("timedelta64[s]").astype(np.float64) / (365 * 86_400)
    np.testing.assert_allclose(years[1:], gaps, rtol=1e-15)
    with pytest.raises(ValueError, match="year_fraction must be float64"):
        _arrays(year_fraction=np.zeros(49))
    with pytest.raises(ValueError, match=r"negative or non-finite year_fraction at rows \[3\]"):
        _arrays(year_fraction=np.r_[0.0, 0.1, 0.1, -0.1, np.full(46, 0.1)])


# ------------------------------------------------------------------------------------- staggered starts
def _truncation_steps(env: TradingEnv, steps: int) -> list[list[int]]:
    """Step every env flat (no trade, no ruin) and return, per env, the steps (1-based) it truncated on."""
    flat = torch.full((env.num_envs,), env._flat_level)
    ends: list[list[int]] = [[] for _ in range(env.num_envs)]
    for step in range(1, steps + 1):
        _, _, terminated, truncated, _ = env.step(flat)
        assert not bool(terminated.any())
        for i in torch.nonzero(truncated).flatten().tolist():
            ends[i].append(step)
    return ends


def test_staggered_first_episodes_end_on_spread_steps(nasdaq):
    length = 8
    env = TradingEnv(nasdaq, num_envs=256, window=4, episode_length=length, seed=3)
    assert env.stagger_starts  # on by default
    env.reset()
    offsets = env.steps.clone()
    assert bool(((offsets >= 0) & (offsets < length)).all())
    ends = _truncation_steps(env, 3 * length)
    first = np.array([e[0] for e in ends])
    np.testing.assert_array_equal(first, length - offsets.numpy())  # the offset shortens the first episode
    assert set(first.tolist()) == set(range(1, length + 1))  # spread over every step 1..length
    # later episodes (auto-resets) run the full length
    for e in ends:
        assert len(e) >= 3 and set(np.diff(e).tolist()) == {length}


def test_stagger_off_and_given_starts_end_together(nasdaq):
    length = 8
    plain = TradingEnv(nasdaq, num_envs=32, window=4, episode_length=length, seed=3, stagger_starts=False)
    plain.reset()
    assert bool((plain.steps == 0).all())
    staggered = TradingEnv(nasdaq, num_envs=32, window=4, episode_length=length, seed=3)
    starts = torch.randint(staggered.start_low, staggered.start_high + 1, (32,),
                           generator=torch.Generator().manual_seed(0))
    staggered.reset(starts=starts)  # evaluation-style starts never stagger
    assert bool((staggered.steps == 0).all()) and torch.equal(staggered.t, starts)
    for env in (plain, staggered):
        ends = _truncation_steps(env, 2 * length)
        assert all(e == [length, 2 * length] for e in ends)


def test_staggered_starts_are_reproducible_from_the_seed(nasdaq):
    def draw(seed, stagger=True):
        env = TradingEnv(nasdaq, num_envs=64, window=4, episode_length=50, seed=seed, stagger_starts=stagger)
        env.reset()
        return env.t.clone(), env.steps.clone()

    t_a, steps_a = draw(5)
    t_b, steps_b = draw(5)
    t_c, steps_c = draw(6)
    assert torch.equal(t_a, t_b) and torch.equal(steps_a, steps_b)
    assert not torch.equal(steps_a, steps_c) and not torch.equal(t_a, t_c)
    t_off, steps_off = draw(5, stagger=False)
    assert torch.equal(t_off, t_a)  # the starts are drawn first: stagger does not change them
    assert bool((steps_off == 0).all()) and bool((steps_a > 0).any())


def test_state_dict_round_trips_the_stagger(nasdaq):
    """A resume in the middle of the staggered first episodes ends every episode on the same steps."""
    length = 12

    def make(seed):
        return TradingEnv(nasdaq, num_envs=16, window=4, episode_length=length, costs=BORROW, seed=seed)

    env = make(1)
    env.reset()
    actions = torch.randint(0, 3, (4 * length, 16), generator=torch.Generator().manual_seed(9))
    for a in actions[:3]:
        env.step(a)
    state = env.state_dict()
    assert len(set(state["steps"].tolist())) > 4  # mid-stagger: episodes at many different phases
    tail = [env.step(a) for a in actions[3:]]
    resumed = make(77)
    resumed.reset()
    assert not torch.equal(resumed.steps, state["steps"])
    resumed.load_state_dict(state)
    assert torch.equal(resumed.steps, state["steps"])
    for a, (o, r, te, tr, info) in zip(actions[3:], tail, strict=True):
        o2, r2, te2, tr2, info2 = resumed.step(a)
        assert torch.equal(tr, tr2) and torch.equal(te, te2) and torch.equal(o, o2) and torch.equal(r, r2)
        assert torch.equal(info["equity"], info2["equity"])
    assert torch.equal(resumed.t, env.t) and torch.equal(resumed.steps, env.steps)


# ------------------------------------------------------------------------------------ action validation
@pytest.mark.parametrize("device", DEVICES)
def test_torch_env_rejects_bad_actions_without_changing_state(nasdaq, device):
    env = TradingEnv(nasdaq, num_envs=3, window=4, episode_length=20, costs=COSTS, device=device)
    env.reset(starts=[300, 400, 500])
    env.step(torch.tensor([2, 0, 1], device=device))
    before = env.state_dict()
    for bad in ([0, 3, 1], [-1, 0, 1]):
        with pytest.raises(ValueError, match=r"actions \[(3|-1)\] outside \[0, 3\).*unchanged"):
            env.step(torch.tensor(bad, device=device))
    with pytest.raises(TypeError, match="integer level indices"):
        env.step(torch.tensor([0.0, 1.0, 2.0], device=device))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        env.step(torch.tensor([0, 1], device=device))
    after = env.state_dict()
    for name in ("t", "steps", "level", "cash", "shares", "equity"):
        assert torch.equal(before[name], after[name]), name
    assert torch.equal(before["generator"], after["generator"])
    env.step(torch.tensor([2, 2, 2], device=device))  # still usable
    assert bool((env.steps == 2).all())


def test_numpy_env_rejects_bad_actions(nasdaq):
    env = NumpyTradingEnv(nasdaq, window=4, episode_length=20)
    env.reset(options={"start": 300})
    for bad in (3, -1):
        with pytest.raises(ValueError, match=rf"action {bad} outside \[0, 3\)"):
            env.step(bad)
    with pytest.raises(TypeError, match="not an integer level index"):
        env.step(1.5)
    assert env.steps == 0 and env.t == 300
    env.step(np.int64(2))
    env.step(np.array(0))
    assert env.steps == 2 and env.shares < 0


@pytest.mark.parametrize("ruin", [-0.1, 1.0, float("nan")])
def test_ruin_fraction_must_be_a_fraction(nasdaq, ruin):
    with pytest.raises(ValueError, match=r"ruin_fraction must be in \[0, 1\)"):
        TradingEnv(nasdaq, num_envs=2, window=4, episode_length=20, ruin_fraction=ruin)
    with pytest.raises(ValueError, match=r"ruin_fraction must be in \[0, 1\)"):
        NumpyTradingEnv(nasdaq, window=4, episode_length=20, ruin_fraction=ruin)


# ------------------------------------------------------------------------------------------ segment starts
SEGMENTS = ((0, 60), (150, 190), (300, 400))


def segmented_market(n: int = 420) -> MarketArrays:
    """Prices only inside :data:`SEGMENTS` (NaN elsewhere: a fill or mark there poisons equity); feature row t = t."""
    rng = np.random.default_rng(4)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = close * np.exp(rng.normal(0, 0.003, n))
    inside = np.zeros(n, dtype=bool)
    for s, e in SEGMENTS:
        inside[s:e] = True
    open_[~inside], close[~inside] = np.nan, np.nan
    return MarketArrays(open=open_, close=close, features=np.arange(n, dtype=np.float32)[:, None], first_valid=2)


def segment_sampler(window: int = 3, length: int = 16, first_valid: int = 2):
    from sentio_lab.env.splits import SegmentEpisodeSampler

    return SegmentEpisodeSampler(SEGMENTS, window, length, first_valid=first_valid)


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_episodes_never_cross_a_gap(device):
    """Staggered first episodes and every auto-reset stay in one segment: fills, marks, observations and the
    bootstrap observation (feature row t is t, so an observation names its bar)."""
    market, sampler = segmented_market(), segment_sampler()
    env = TradingEnv(market, num_envs=64, window=3, episode_length=16, costs=COSTS, seed=2, start_sampler=sampler,
                     device=device)
    assert (env.start_low, env.start_high) == (4, 383) and sampler.bounds == [(4, 43), (150, 173), (300, 383)]
    segment_of = np.full(len(market.close), -1)
    for k, (s, e) in enumerate(SEGMENTS):
        segment_of[s:e] = k
    obs = env.reset().cpu()
    assert len(set(env.steps.tolist())) > 8  # staggered
    home = segment_of[env.t.cpu().numpy()]
    gen, ends = torch.Generator().manual_seed(0), 0
    for _ in range(200):
        assert (home >= 0).all() and (segment_of[obs[:, 2].long().numpy()] == home).all()  # newest row in it
        assert bool(sampler.contains(env.t[env.steps == 0].cpu()).all())  # every episode began on a valid start
        obs, reward, _, _, info = env.step(torch.randint(0, 3, (64,), generator=gen).to(device))
        obs = obs.cpu()
        assert bool(torch.isfinite(reward).all())  # no fill or mark on a NaN bar outside the segments
        bootstrap_bar = info["final_obs"][:, 2].long().cpu().numpy()
        assert (segment_of[bootstrap_bar] == home).all()
        done = info["done"].cpu().numpy()
        ends += done.sum()
        home = np.where(done, segment_of[env.t.cpu().numpy()], home)
    assert ends > 64 * 10 and set(home.tolist()) == {0, 1, 2}


def test_segmented_starts_are_uniform_over_valid_starts():
    market, sampler = segmented_market(), segment_sampler()
    env = TradingEnv(market, num_envs=4096, window=3, episode_length=16, seed=7, start_sampler=sampler)
    draws = []
    for _ in range(10):
        env.reset()
        draws.append(env.t.clone())
    for _ in range(16):  # auto-resets draw from the sampler too
        _, _, _, _, info = env.step(torch.ones(4096, dtype=torch.long))
        draws.append(env.t[info["done"]])
    draws = torch.cat(draws).numpy()
    valid = np.concatenate([np.arange(lo, hi + 1) for lo, hi in sampler.bounds])
    values, counts = np.unique(draws, return_counts=True)
    assert np.array_equal(values, valid)  # every valid start and nothing else
    expected = len(draws) / len(valid)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = len(valid) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof)  # uniform: weighted by each segment's number of starts


def test_segmented_env_resumes_exactly():
    market, sampler = segmented_market(), segment_sampler()

    def make(seed):
        return TradingEnv(market, num_envs=8, window=3, episode_length=16, costs=COSTS, seed=seed,
                          start_sampler=sampler)

    actions = torch.randint(0, 3, (60, 8), generator=torch.Generator().manual_seed(1))
    env = make(3)
    env.reset()
    for a in actions[:5]:
        env.step(a)
    state = env.state_dict()
    tail = [env.step(a) for a in actions[5:]]
    resumed = make(42)
    resumed.reset()
    resumed.load_state_dict(state)
    for a, (o, r, te, tr, info) in zip(actions[5:], tail, strict=True):
        o2, r2, te2, tr2, info2 = resumed.step(a)
        assert torch.equal(o, o2) and torch.equal(r, r2) and torch.equal(tr, tr2) and torch.equal(te, te2)
        assert torch.equal(info["final_obs"], info2["final_obs"])
    assert torch.equal(resumed.t, env.t) and torch.equal(resumed.steps, env.steps)


def test_segmented_env_rejects_starts_outside_its_segments_and_a_mismatched_sampler():
    market, sampler = segmented_market(), segment_sampler()
    env = TradingEnv(market, num_envs=3, window=3, episode_length=16, start_sampler=sampler)
    env.reset(starts=[4, 173, 383])  # first, inner last and last valid starts
    for bad in (44, 149, 174, 299):  # inside the env's overall range, but no start of any segment
        with pytest.raises(ValueError, match=rf"starts \[{bad}\] are no valid start of the sampler's segments"):
            env.reset(starts=[4, bad, 300])
    with pytest.raises(ValueError, match=r"starts \[3\] outside the valid range \[4, 383\]"):
        env.reset(starts=[3, 150, 300])
    with pytest.raises(ValueError, match="sized for window 3, episode_length 16"):
        TradingEnv(market, num_envs=3, window=3, episode_length=8, start_sampler=sampler)
    with pytest.raises(ValueError, match=r"start_sampler starts \[4, 383\] leave the env's valid starts \[150"):
        TradingEnv(market, num_envs=3, window=3, episode_length=16, start=150, start_sampler=sampler)
    early = segment_sampler(first_valid=0)  # ignores the market's warm-up of 2 rows
    with pytest.raises(ValueError, match=r"start_sampler starts \[2, 383\] leave the env's valid starts \[4"):
        TradingEnv(market, num_envs=3, window=3, episode_length=16, start_sampler=early)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_env_on_device_matches_cpu(nasdaq, device):
    from sentio_lab.env.masks import MaskConfig

    cfg = MaskConfig(max_abs_level=0.5, risk_budget=0.015, drawdown_threshold=0.05, cooldown=3, max_trades=2,
                     period_bars=8)
    actions = torch.randint(0, 5, (80, 6), generator=torch.Generator().manual_seed(4))
    runs = []
    for dev in ("cpu", device):
        env = TradingEnv(nasdaq, num_envs=6, window=4, episode_length=25, positions=FIVE_LEVELS, costs=COSTS,
                         masks=cfg, device=dev, seed=2)
        env.reset()
        masks, rewards = [], []
        for a in actions:
            masks.append(env.action_masks().cpu())
            rewards.append(env.step(a.to(dev))[1].cpu())
        runs.append((torch.stack(masks), torch.stack(rewards), env.mask_counts))
    assert torch.equal(runs[0][0], runs[1][0]) and not runs[0][0].all()
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-12, atol=1e-12)
    assert runs[0][2] == runs[1][2]


# ------------------------------------------------------------------------------------ fills at the next close
def next_close(market: MarketArrays) -> MarketArrays:
    return dataclasses.replace(market, fill_price="next_close")


def test_fill_price_is_checked_and_picks_the_fill_column(nasdaq):
    assert nasdaq.fill_price == "next_open" and nasdaq.fill is nasdaq.open  # the default: today's fills
    assert next_close(nasdaq).fill is nasdaq.close
    with pytest.raises(ValueError, match="fill_price='next_mid'"):
        dataclasses.replace(nasdaq, fill_price="next_mid")


@pytest.mark.parametrize("costs", [COSTS, BORROW], ids=["no-borrow", "borrow"])
@pytest.mark.parametrize("positions", [DEFAULT_POSITIONS, FIVE_LEVELS, (-1.0, 0.0, 2.0)],
                         ids=["short-flat-long", "five-levels", "leveraged"])
def test_next_close_torch_env_matches_numpy_reference(nasdaq, positions, costs):
    _check_against_reference(next_close(nasdaq), positions, "cpu", steps=150, costs=costs)


@pytest.mark.parametrize("device", DEVICES)
def test_next_close_torch_env_on_device(nasdaq, device):
    _check_against_reference(next_close(nasdaq), DEFAULT_POSITIONS, device, n_envs=6, steps=130, length=50,
                             costs=BORROW)


@pytest.mark.parametrize("costs", [CostModel(0, 0), COSTS], ids=["free", "costs"])
def test_next_close_fill_earns_nothing_of_the_fill_bar(nasdaq, costs):
    """From flat, a buy decided at bar t fills at close[t+1] and is marked there: its reward is the cost alone,
    whatever bar t+1 did; the next step earns close[t+2] / close[t+1]. A fill at close[t] (same-bar) would earn
    bar t+1's move, a fill at open[t+1] the move from that open."""
    market, k = next_close(nasdaq), 4
    moved = (np.abs(np.diff(np.log(market.close))) > 3e-3) & (np.abs(np.log(market.close / market.open)) > 3e-3)[1:]
    t = 900 + int(np.argmax(moved[900:]))  # bar t + 1 moved from close[t] and from its own open
    start = t - k
    actions = [1] * k + [2, 2, 2]
    for _, rewards in (np_rollout(market, start, actions, window=5, episode_length=40, costs=costs),
                         torch_rollout(market, [start], [[a] for a in actions], window=5, episode_length=40,
                                       costs=costs)):
        rewards = rewards.ravel()
        np.testing.assert_array_equal(rewards[:k], 0.0)
        assert rewards[k] == pytest.approx(-np.log1p(costs.buy_cost_rate), abs=1e-12)
        assert rewards[k + 1] == pytest.approx(np.log(market.close[t + 2] / market.close[t + 1]), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_next_close_future_bars_move_nothing_up_to_the_fill(nasdaq, seed):
    """Bars after t+1 never move the step that fills and marks at close[t+1]; the observation at bar t does not
    see bar t+1 (its close included); changing close[t+1] alone moves the fill of step t but no earlier thing."""
    rng = np.random.default_rng(seed)
    market = next_close(nasdaq)
    cut = int(rng.integers(500, len(market.close) - 300))  # bars <= cut kept
    future = slice(cut + 1, None)
    m = len(market.close) - cut - 1
    close, features = market.close.copy(), market.features.copy()
    close[future] = close[cut] * np.exp(np.cumsum(rng.normal(0, 0.02, m)))
    features[future] = rng.normal(0, 5, (m, features.shape[1]))
    perturbed = dataclasses.replace(market, close=close, features=features, open=np.full(len(close), np.nan))
    n_envs = 6
    starts = rng.integers(cut - 60, cut, n_envs)
    steps = int(cut - starts.min() + 5)
    actions = rng.integers(0, 3, (steps, n_envs))
    kwargs = dict(window=8, episode_length=200, costs=BORROW)
    obs_a, rew_a = torch_rollout(market, starts, actions, **kwargs)
    obs_b, rew_b = torch_rollout(perturbed, starts, actions, **kwargs)  # opens all NaN: never read
    bar = starts[None, :] + np.arange(steps + 1)[:, None]
    seen, filled = bar <= cut, bar[1:] <= cut  # step s fills and marks on bar s + 1
    np.testing.assert_array_equal(obs_a[seen], obs_b[seen])
    np.testing.assert_array_equal(rew_a[filled], rew_b[filled])
    assert not np.array_equal(rew_a[~filled], rew_b[~filled])
    np_a, np_ra = np_rollout(market, int(starts[0]), actions[:, 0], **kwargs)
    np_b, np_rb = np_rollout(perturbed, int(starts[0]), actions[:, 0], **kwargs)
    np.testing.assert_array_equal(np_a[seen[:, 0]], np_b[seen[:, 0]])
    np.testing.assert_array_equal(np_ra[filled[:, 0]], np_rb[filled[:, 0]])
    assert np.isfinite(np_rb).all() and np.isfinite(rew_b).all()
    # close[cut + 1] alone: the step deciding at cut moves (its fill and mark), nothing before it does
    one = dataclasses.replace(market, close=np.r_[market.close[: cut + 1], market.close[cut + 1] * 1.02,
                                                  market.close[cut + 2 :]])
    start = cut - 10
    acts = [2, 0, 1, 2, 0, 2, 1, 0, 2, 2, 0, 1, 2]
    obs_c, rew_c = np_rollout(market, start, acts, **kwargs)
    obs_d, rew_d = np_rollout(one, start, acts, **kwargs)
    np.testing.assert_array_equal(obs_c[:11], obs_d[:11])  # observations at bars <= cut
    np.testing.assert_array_equal(rew_c[:10], rew_d[:10])  # fills and marks on bars <= cut
    assert rew_c[10] != rew_d[10]


def test_next_close_short_pays_borrow_on_the_position_held_over_the_bar(nasdaq_frame, nasdaq):
    """A short decided at t fills at close[t+1]: it was not held over bar t+1 and pays no borrow there; the
    next bar charges it (rate x |shares| x close x days / 365), and closing it pays that bar's borrow."""
    market, start = next_close(nasdaq), 1000
    index = nasdaq_frame.index
    costs = CostModel(0, 0, borrow_bps=10_000)  # 100 % a year: large enough to read
    _, rewards = np_rollout(market, start, [0, 0, 1], window=4, episode_length=10, costs=costs)
    assert rewards[0] == 0.0  # the short fills at close[start + 1], marked there: no cost, no borrow
    days = [(index[start + j] - index[start + j - 1]).days for j in (2, 3)]
    shares = -1.0 / market.close[start + 1]
    equity1 = 1.0 + shares * (market.close[start + 2] - market.close[start + 1]) \
        - days[0] / 365 * -shares * market.close[start + 2]
    assert rewards[1] == pytest.approx(np.log(equity1), abs=1e-12)
    # held over bar start + 3, covered at its close (the cover is free here), charged that bar's borrow
    equity2 = equity1 + shares * (market.close[start + 3] - market.close[start + 2]) \
        - days[1] / 365 * -shares * market.close[start + 3]
    assert rewards[2] == pytest.approx(np.log(equity2 / equity1), abs=1e-12)
