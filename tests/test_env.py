"""The batched torch env against the numpy reference env; timing, costs, episode ends (sentio_lab.env)."""

from __future__ import annotations

import gymnasium.utils.env_checker
import numpy as np
import pandas as pd
import pytest
import torch
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from sentio_lab.costs import CostModel
from sentio_lab.data import load_market, to_market
from sentio_lab.env import DEFAULT_POSITIONS, MarketArrays, NumpyTradingEnv, TradingEnv, episode_start_bounds

COSTS = CostModel(5, 3)
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
def sp500_frame() -> pd.DataFrame:
    return load_market("sp500").frame


@pytest.fixture(scope="module")
def sp500(sp500_frame) -> MarketArrays:
    return arrays_from_frame(sp500_frame)


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
def test_market_arrays_from_frame(sp500_frame, sp500):
    assert sp500.open.dtype == sp500.close.dtype == np.float64
    assert sp500.features.dtype == np.float32 and sp500.features.flags["C_CONTIGUOUS"]
    assert sp500.features.shape == (len(sp500_frame), 3)
    np.testing.assert_array_equal(sp500.open, sp500_frame["open"].to_numpy())
    np.testing.assert_array_equal(sp500.close, sp500_frame["close"].to_numpy())
    assert np.isnan(sp500.features[0, [0, 2]]).all()  # warm-up row: allowed before first_valid


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
def _check_against_reference(market, positions, device, n_envs=16, steps=300, length=120, window=10, seed=0):
    env = TradingEnv(market, num_envs=n_envs, window=window, episode_length=length, positions=positions,
                     costs=COSTS, device=device, seed=seed)
    refs = [NumpyTradingEnv(market, window=window, episode_length=length, positions=positions, costs=COSTS)
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
def test_torch_env_matches_numpy_reference(sp500, positions):
    _check_against_reference(sp500, positions, "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_env_on_device(sp500, device):
    _check_against_reference(sp500, DEFAULT_POSITIONS, device, n_envs=6, steps=130, length=50)


def test_observation_layout(sp500):
    window = 6
    env = TradingEnv(sp500, num_envs=3, window=window, positions=FIVE_LEVELS, episode_length=20)
    starts = [env.start_low, 1000, env.start_high]
    obs = env.reset(starts=starts).numpy()
    for i, t in enumerate(starts):
        np.testing.assert_array_equal(obs[i, :-1].reshape(window, 3), sp500.features[t - window + 1 : t + 1])
        assert obs[i, -1] == 0.0  # flat
    obs, *_ = env.step(torch.tensor([0, 3, 4]))
    np.testing.assert_array_equal(obs[:, -1].numpy(), np.float32([-1.0, 0.5, 1.0]))
    np.testing.assert_array_equal(obs[1, :-1].reshape(window, 3), sp500.features[1001 - window + 1 : 1002])


# ------------------------------------------------------------------------------------------- look-ahead
def test_no_fill_at_a_seen_price(sp500_frame):
    """Bar t+1 moves the reward of step t (fill at its open, mark at its close), not the observation at t."""
    start, k, window = 800, 7, 5  # step k is taken at bar t = start + k
    t = start + k
    changed = sp500_frame.copy()
    o, c = changed["open"].iloc[t + 1] * 1.03, changed["close"].iloc[t + 1] * 0.98
    changed.iloc[t + 1, changed.columns.get_indexer(["open", "close"])] = [o, c]
    changed.iloc[t + 1, changed.columns.get_loc("high")] = max(changed["high"].iloc[t + 1], o, c)
    changed.iloc[t + 1, changed.columns.get_loc("low")] = min(changed["low"].iloc[t + 1], o, c)
    changed = to_market(changed, name="changed").frame  # still valid OHLC
    base, moved = arrays_from_frame(sp500_frame), arrays_from_frame(changed)

    actions = [1] * k + [2, 2, 0]  # flat until step k, buy at step k (filled at the open of bar t+1)
    kwargs = dict(window=window, episode_length=50, costs=COSTS)
    for obs_a, rew_a, obs_b, rew_b in [
        (*np_rollout(base, start, actions, **kwargs), *np_rollout(moved, start, actions, **kwargs)),
        (*torch_rollout(base, [start], [[a] for a in actions], **kwargs),
         *torch_rollout(moved, [start], [[a] for a in actions], **kwargs)),
    ]:
        obs_a, obs_b = obs_a.reshape(len(obs_a), -1), obs_b.reshape(len(obs_b), -1)
        rew_a, rew_b = rew_a.ravel(), rew_b.ravel()
        np.testing.assert_array_equal(obs_a[: k + 1], obs_b[: k + 1])  # observations at bars <= t
        np.testing.assert_array_equal(rew_a[:k], rew_b[:k])
        assert rew_a[k] != rew_b[k]
        assert not np.array_equal(obs_a[k + 1], obs_b[k + 1])
        # Buying with all equity from flat: r_t = log(close[t+1] / (open[t+1] (1 + s)(1 + f))).
        for market, rewards in ((base, rew_a), (moved, rew_b)):
            expected = np.log(market.close[t + 1] / (market.open[t + 1] * (1 + COSTS.buy_cost_rate)))
            assert rewards[k] == pytest.approx(expected, abs=1e-12)
            assert rewards[k] != pytest.approx(np.log(market.close[t + 1] / market.close[t]), abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_future_rows_do_not_leak_into_observations(sp500, seed):
    rng = np.random.default_rng(seed)
    window, n_envs, length = 8, 8, 200
    cut = int(rng.integers(500, len(sp500.close) - 300))  # bars <= cut are kept, bars > cut replaced
    future = slice(cut + 1, None)
    m = len(sp500.close) - cut - 1
    open_, close, features = sp500.open.copy(), sp500.close.copy(), sp500.features.copy()
    # A different but plausible future: a fresh random walk from the last kept close.
    close[future] = close[cut] * np.exp(np.cumsum(rng.normal(0, 0.02, m)))
    open_[future] = close[future] * np.exp(rng.normal(0, 0.01, m))
    features[future] = rng.normal(0, 5, (m, features.shape[1]))
    perturbed = MarketArrays(open=open_, close=close, features=features, first_valid=1)

    starts = rng.integers(cut - 60, cut, n_envs)
    steps = int(cut - starts.min() + 5)
    actions = rng.integers(0, 3, (steps, n_envs))
    kwargs = dict(window=window, episode_length=length, costs=COSTS)
    obs_a, rew_a = torch_rollout(sp500, starts, actions, **kwargs)
    obs_b, rew_b = torch_rollout(perturbed, starts, actions, **kwargs)
    bar = starts[None, :] + np.arange(steps + 1)[:, None]  # the bar each observation stands at
    seen = bar <= cut
    np.testing.assert_array_equal(obs_a[seen], obs_b[seen])
    filled = bar[1:] <= cut  # step s fills and marks on bar s+1
    np.testing.assert_array_equal(rew_a[filled], rew_b[filled])
    assert not np.array_equal(obs_a[~seen], obs_b[~seen])  # the perturbation did reach the env
    assert not np.array_equal(rew_a[~filled], rew_b[~filled])
    # The numpy reference env agrees (one episode).
    np_a, np_ra = np_rollout(sp500, int(starts[0]), actions[:, 0], **kwargs)
    np_b, np_rb = np_rollout(perturbed, int(starts[0]), actions[:, 0], **kwargs)
    np.testing.assert_array_equal(np_a[seen[:, 0]], np_b[seen[:, 0]])
    np.testing.assert_array_equal(np_ra[filled[:, 0]], np_rb[filled[:, 0]])


# ---------------------------------------------------------------------------------- truncation vs ruin
def test_truncation_and_auto_reset(sp500):
    length, window = 20, 5
    env = TradingEnv(sp500, num_envs=4, window=window, episode_length=length, costs=COSTS, seed=11)
    starts = [300, 1200, 2500, 4000]
    refs = [NumpyTradingEnv(sp500, window=window, episode_length=length, costs=COSTS) for _ in starts]
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


def test_truncation_final_obs_and_equity_match_reference(sp500):
    length, window = 15, 4
    env = TradingEnv(sp500, num_envs=3, window=window, episode_length=length, costs=COSTS)
    starts, actions = [100, 2000, 3000], [2, 0, 1]
    env.reset(starts=starts)
    for _ in range(length):
        obs, reward, terminated, truncated, info = env.step(torch.tensor(actions))
    for i, (s, a) in enumerate(zip(starts, actions, strict=True)):
        ref = NumpyTradingEnv(sp500, window=window, episode_length=length, costs=COSTS)
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
def test_holding_a_level_trades_nothing(sp500):
    env = TradingEnv(sp500, num_envs=3, window=4, episode_length=60, costs=COSTS)
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
        expected = cash + shares * sp500.close[start + k]
        torch.testing.assert_close(info["equity"], expected, rtol=0, atol=0)
        torch.testing.assert_close(reward, torch.log(expected / equity), rtol=1e-12, atol=1e-15)
        equity = expected
    assert float(info["equity"][2]) == 1.0 and float(reward[2]) == 0.0


@pytest.mark.parametrize(("first", "ratio_of"), [(2, "long"), (0, "short")])
def test_round_trip_pays_the_expected_cost(sp500, first, ratio_of):
    start = 2222
    o1, o2 = sp500.open[start + 1], sp500.open[start + 2]
    s, f = COSTS.slippage, COSTS.fee
    keep = (1 - s) * (1 - f) / ((1 + s) * (1 + f))  # fraction of a full position kept over open + close
    results = {}
    for name, costs in (("free", CostModel(0, 0)), ("costly", COSTS)):
        env = TradingEnv(sp500, num_envs=1, window=4, episode_length=10, costs=costs)
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


def test_level_change_between_positions_charges_fees(sp500):
    start = 3333
    equity = {}
    for name, costs in (("free", CostModel(0, 0)), ("costly", COSTS)):
        env = TradingEnv(sp500, num_envs=2, window=4, episode_length=10, costs=costs)
        env.reset(starts=[start, start])
        env.step(torch.tensor([2, 2]))
        _, _, _, _, info = env.step(torch.tensor([2, 0]))  # env 1 flips long -> short, env 0 holds
        equity[name] = info["equity"].numpy()
    hold_cost = equity["costly"][0] / equity["free"][0]
    flip_cost = equity["costly"][1] / equity["free"][1]
    assert hold_cost == pytest.approx(1 / (1 + COSTS.buy_cost_rate), rel=1e-12)  # only the initial buy
    assert flip_cost < hold_cost  # the flip paid again


# ------------------------------------------------------------------------------------ state and seeding
def test_reset_does_not_overwrite_returned_equity(sp500):
    env = TradingEnv(sp500, num_envs=2, window=4, episode_length=30)
    env.reset(starts=[500, 600])
    _, _, _, _, info = env.step(torch.tensor([2, 0]))
    equity = info["equity"]
    before = equity.clone()
    assert not bool((before == 1.0).any())
    env.reset(starts=[500, 600])
    assert torch.equal(equity, before)


def test_auto_reset_does_not_touch_caller_tensors(sp500):
    env = TradingEnv(sp500, num_envs=2, window=4, episode_length=3)
    env.reset(starts=[500, 600])
    actions = torch.tensor([2, 0])
    for _ in range(3):
        obs, _, _, truncated, info = env.step(actions)
    assert bool(truncated.all())
    assert actions.tolist() == [2, 0]
    assert not bool((info["equity"] == 1.0).any())
    assert info["final_obs"][:, -1].tolist() == [1.0, -1.0]


def test_same_seed_same_starts(sp500):
    def run(seed):
        env = TradingEnv(sp500, num_envs=16, window=4, episode_length=5, seed=seed)
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


def test_numpy_env_seeded_starts(sp500):
    env = NumpyTradingEnv(sp500, window=4, episode_length=20)
    first = env.reset(seed=5)[0]
    t_first = env.t
    assert np.array_equal(env.reset(seed=5)[0], first) and env.t == t_first
    starts = set()
    for seed in range(10):
        env.reset(seed=seed)
        starts.add(env.t)
        assert env.start_low <= env.t <= env.start_high
    assert len(starts) > 1


def test_state_dict_resumes_exactly(sp500):
    def make():
        return TradingEnv(sp500, num_envs=4, window=4, episode_length=7, costs=COSTS, seed=1)

    actions = torch.randint(0, 3, (30, 4), generator=torch.Generator().manual_seed(0))
    env = make()
    env.reset()
    for a in actions[:10]:
        env.step(a)
    state = env.state_dict()
    tail = [env.step(a) for a in actions[10:]]
    resumed = TradingEnv(sp500, num_envs=4, window=4, episode_length=7, costs=COSTS, seed=99)
    resumed.reset()
    obs = resumed.load_state_dict(state)
    assert obs.shape == (4, resumed.obs_dim)
    for a, (o, r, te, tr, info) in zip(actions[10:], tail, strict=True):
        o2, r2, te2, tr2, info2 = resumed.step(a)
        assert torch.equal(o, o2) and torch.equal(r, r2) and torch.equal(te, te2) and torch.equal(tr, tr2)
        assert torch.equal(info["final_obs"], info2["final_obs"])
    with pytest.raises(ValueError, match="env state holds 4 episodes, this env runs 2"):
        TradingEnv(sp500, num_envs=2, window=4, episode_length=7).load_state_dict(state)


# --------------------------------------------------------------------------------------- API checks
@pytest.mark.filterwarnings("ignore:.*A Box observation space:UserWarning")
@pytest.mark.filterwarnings("ignore:.*alternative render modes:UserWarning")
def test_numpy_env_passes_env_checkers(sp500):
    sb3_check_env(NumpyTradingEnv(sp500, window=8, episode_length=50, costs=COSTS), warn=True)
    gymnasium.utils.env_checker.check_env(NumpyTradingEnv(sp500, window=8, episode_length=50))


def test_bad_starts_raise(sp500):
    env = NumpyTradingEnv(sp500, window=8, episode_length=50)
    for bad in (env.start_low - 1, env.start_high + 1):
        message = rf"reset: start {bad} outside \[{env.start_low}, {env.start_high}\]"
        with pytest.raises(ValueError, match=message):
            env.reset(options={"start": bad})
    batched = TradingEnv(sp500, num_envs=3, window=8, episode_length=50)
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


def test_large_banks_gather_windows_instead_of_precomputing(monkeypatch, sp500):
    import sentio_lab.env as env_module

    precomputed = TradingEnv(sp500, num_envs=6, window=5, episode_length=40, seed=4)
    monkeypatch.setattr(env_module, "WINDOW_MATRIX_MAX_BYTES", 0)
    gathered = TradingEnv(sp500, num_envs=6, window=5, episode_length=40, seed=4)
    assert precomputed._window_matrix is not None and gathered._window_matrix is None
    obs_a, obs_b = precomputed.reset(), gathered.reset()
    actions = torch.Generator().manual_seed(0)
    for _ in range(60):
        assert torch.equal(obs_a, obs_b)
        act = torch.randint(0, 3, (6,), generator=actions)
        obs_a, *_ = precomputed.step(act)
        obs_b, *_ = gathered.step(act)
