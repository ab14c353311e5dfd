"""The look-ahead proof: replacing every bar after t never changes a value at or before t.

The tests iterate the producer registry, so a newly registered feature is covered automatically. The
same perturbation is applied to the HMM filter, to the multi-timeframe views (where the future's
*timestamps* change too) and to ``build_observation_features`` as a whole with a fixed fitted state.
Comparisons are bit for bit (``np.array_equal``), not approximate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.data import load_market
from sentio_lab.env import MarketArrays, TradingEnv
from sentio_lab.env.mask_inputs import MaskInputs, ewma_volatility, fit_garch, garch_volatility
from sentio_lab.env.masks import MaskConfig
from sentio_lab.features import (
    Bars,
    FeatureConfig,
    build_observation_features,
    raw_features,
    registered_producers,
)
from sentio_lab.features import regime as R

N_BARS = 520


def random_ohlcv(n: int, seed: int, *, index=None, price: float = 100.0, vol: float = 0.01) -> pd.DataFrame:
    """Valid synthetic OHLCV (random walk with volatility clusters) on ``index`` (business days if None)."""
    rng = np.random.default_rng(seed)
    sigma = vol * np.exp(np.cumsum(rng.normal(0, 0.05, n)).clip(-1.5, 1.5))
    close = price * np.exp(np.cumsum(rng.normal(0, 1, n) * sigma))
    open_ = np.r_[price, close[:-1]] * np.exp(rng.normal(0, 0.002, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.004, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.004, n)))
    volume = rng.lognormal(15, 0.5, n)
    if index is None:
        index = pd.bdate_range("2010-01-04", periods=n)
    index = pd.DatetimeIndex(index).as_unit("us").rename("timestamp")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index)


def replace_future(frame: pd.DataFrame, t: int, seed: int, *, new_times: bool = False) -> pd.DataFrame:
    """``frame`` with every bar after row t replaced by different valid OHLCV.

    The replacement starts from a price 30% away, with twice the volatility and other volume; with
    ``new_times`` the future's timestamps change too (a gap, then a different spacing).
    """
    n = len(frame) - t - 1
    if n <= 0:
        return frame.copy()
    index = frame.index[t + 1 :]
    if new_times:
        rng = np.random.default_rng(seed)
        step = frame.index[-1] - frame.index[-2]
        start = frame.index[t] + step * int(rng.integers(1, 40))
        index = start + step * np.arange(n) * int(rng.integers(1, 3))
    future = random_ohlcv(n, seed, index=index, price=float(frame["close"].iloc[t]) * 1.3, vol=0.02)
    return pd.concat([frame.iloc[: t + 1], future])


def cut_points(rng: np.random.Generator, n: int, lookback: int) -> list[int]:
    """Cut points inside the warm-up, right at its end, and random later bars."""
    later = rng.integers(lookback + 1, n - 2, size=3).tolist()
    return sorted({max(lookback - 3, 0), lookback, *later})


#: Zero-volume run and halted bars of the ``messy_nasdaq`` fixture (conftest); cuts at their edges and inside.
ZERO_RUN = (360, 405)
HALT = (420, 430)
MESSY_CUTS = [ZERO_RUN[0] - 1, ZERO_RUN[0], 380, ZERO_RUN[1] - 1, ZERO_RUN[1], HALT[0], HALT[1] - 1]


@pytest.fixture(scope="module")
def frames(messy_nasdaq) -> dict[str, pd.DataFrame]:
    assert (messy_nasdaq.zero_run, messy_nasdaq.halt) == (ZERO_RUN, HALT) and len(messy_nasdaq.frame) == N_BARS
    return {
        "synthetic": random_ohlcv(N_BARS, 11),
        "nasdaq": load_market("nasdaq").frame.iloc[2300:2300 + N_BARS],  # includes the 2008 crash
        "messy": messy_nasdaq.frame,
    }


@pytest.mark.parametrize("producer", registered_producers(), ids=lambda p: p.name)
def test_every_registered_producer_is_causal(producer, frames):
    rng = np.random.default_rng(sum(map(ord, producer.name)))  # str hash() is salted per process
    future_moved = False
    for label, frame in frames.items():
        reference = producer(Bars.from_frame(frame))
        cuts = cut_points(rng, len(frame), producer.lookback) + (MESSY_CUTS if label == "messy" else [])
        for t in cuts:
            changed = producer(Bars.from_frame(replace_future(frame, t, seed=t)))
            for name, col in reference.items():
                assert np.array_equal(col[: t + 1], changed[name][: t + 1], equal_nan=True), (
                    f"{producer.name}/{name} on {label}: a value at or before t={t} changed with the future"
                )
                future_moved |= not np.array_equal(col[t + 1 :], changed[name][t + 1 :], equal_nan=True)
    # The perturbation is real: somewhere after a cut the producer's values did change.
    assert future_moved or producer.name.startswith("CDL"), f"{producer.name} never reacted to the future"


def test_regime_filter_is_causal(frames):
    frame = frames["nasdaq"]
    inputs = R.regime_inputs(frame["close"].to_numpy())
    model = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 400, 3, seed=0, restarts=2)
    reference = R.filtered_probabilities(model, inputs)
    for t in (5, R.INPUT_LOOKBACK, 150, 333, 480):
        changed = replace_future(frame, t, seed=t)
        probs = R.filtered_probabilities(model, R.regime_inputs(changed["close"].to_numpy()))
        assert np.array_equal(reference[: t + 1], probs[: t + 1], equal_nan=True)
        assert not np.allclose(reference[t + 30 :], probs[t + 30 :], equal_nan=True)


@pytest.fixture(scope="module")
def hourly() -> pd.DataFrame:
    return load_market("eurusd_1h").frame.iloc[:1500]


@pytest.mark.parametrize("session_close", [None, "17:00 America/New_York"], ids=["utc-days", "fx-session-days"])
def test_multi_timeframe_features_are_causal(hourly, session_close):
    cfg = FeatureConfig(bank="talib", timeframes=("4h", "1D"), session_close=session_close)
    hour = pd.Timedelta("1h")
    reference = raw_features(hourly, cfg, hour)
    assert reference.block_first_valid["4h"] > reference.block_first_valid["base"]
    rng = np.random.default_rng(5)
    for t in [*rng.integers(30, 1490, size=5).tolist(), reference.block_first_valid["4h"]]:
        for new_times in (False, True):
            changed = raw_features(replace_future(hourly, t, seed=t, new_times=new_times), cfg, hour)
            assert changed.names == reference.names
            assert np.array_equal(reference.values[: t + 1], changed.values[: t + 1], equal_nan=True), (
                f"t={t}, new_times={new_times}"
            )


@pytest.mark.parametrize(
    "config",
    [
        FeatureConfig(),
        FeatureConfig(bank="talib", timeframes=("4h",), regimes=2, regime_restarts=1, prune_corr=0.95),
        FeatureConfig(timeframes=("4h", "1D"), regimes=3, regime_restarts=1, normalise="rank"),
        FeatureConfig(timeframes=("4h", "1D"), session_close="17:00 America/New_York"),
    ],
    ids=["default", "talib-4h-regimes-pruned", "basic-4h-1D-regimes-rank", "basic-fx-session-4h-1D"],
)
def test_observation_features_with_a_fixed_state_are_causal(config, hourly):
    fitted = build_observation_features(hourly, 1100, config)
    rng = np.random.default_rng(17)
    cuts = [fitted.first_valid - 1, fitted.first_valid, *rng.integers(fitted.first_valid, 1495, size=4).tolist()]
    for t in cuts:
        for new_times in (False, True):
            changed = replace_future(hourly, t, seed=t + 1, new_times=new_times)
            again = build_observation_features(changed, 1100, config, state=fitted.state)
            assert again.names == fitted.names and again.first_valid == fitted.first_valid
            assert np.array_equal(fitted.values[: t + 1], again.values[: t + 1]), f"t={t} new_times={new_times}"


def test_fitting_uses_nothing_after_train_stop(hourly):
    """Without a saved state, a cut at or after train_stop still leaves every earlier value unchanged."""
    config = FeatureConfig(bank="talib", timeframes=("4h",), regimes=2, regime_restarts=1, prune_corr=0.9)
    train_stop = 1100
    fitted = build_observation_features(hourly, train_stop, config)
    for t in (train_stop - 1, train_stop + 50, 1400):
        refit = build_observation_features(replace_future(hourly, t, seed=t, new_times=True), train_stop, config)
        assert refit.state == fitted.state
        assert np.array_equal(fitted.values[: t + 1], refit.values[: t + 1])


# ------------------------------------------------------------------------------------------------ masks
MASK_TRAIN_STOP = 300


def test_volatility_forecasts_are_causal(frames):
    frame = frames["nasdaq"]
    close = frame["close"].to_numpy()
    params = fit_garch(close, (0, MASK_TRAIN_STOP))
    reference = {"ewma": ewma_volatility(close, 0.94), "garch": garch_volatility(close, params)}
    for t in (0, 1, 2, 150, MASK_TRAIN_STOP - 1, MASK_TRAIN_STOP, 480):
        moved = replace_future(frame, t, seed=t)["close"].to_numpy()
        changed = {"ewma": ewma_volatility(moved, 0.94), "garch": garch_volatility(moved, params)}
        for name, vol in reference.items():
            assert np.array_equal(vol[: t + 1], changed[name][: t + 1]), f"{name} at t={t}"
            assert t >= len(close) - 2 or not np.array_equal(vol[t + 1 :], changed[name][t + 1 :]), name
        if t >= MASK_TRAIN_STOP - 1:  # refitting after the training range finds the same parameters
            assert fit_garch(moved, (0, MASK_TRAIN_STOP)) == params


def _mask_market(frame: pd.DataFrame, state: dict | None):
    """Arrays with basic features and a 2-state regime block fitted on bars < MASK_TRAIN_STOP (or ``state``)."""
    cfg = FeatureConfig(regimes=2, regime_restarts=1)
    features = build_observation_features(frame, MASK_TRAIN_STOP, cfg, state=state)
    return MarketArrays.from_frame(frame, features.values, features.first_valid), features


def test_masks_at_or_before_t_ignore_the_future():
    frame = random_ohlcv(N_BARS, 23)
    arrays, fitted = _mask_market(frame, None)
    column = fitted.blocks["regime"].stop - 1  # states ordered by volatility: last = most volatile
    params = fit_garch(arrays.close, (0, MASK_TRAIN_STOP))
    start, length, positions = 260, 200, (-1.0, -0.5, 0.0, 0.5, 1.0)
    actions = torch.randint(0, 5, (length, 1), generator=torch.Generator().manual_seed(3))

    def masks_of(arrays: MarketArrays, vol_model: str) -> torch.Tensor:
        cfg = MaskConfig(risk_budget=0.012, vol_model=vol_model, drawdown_threshold=0.03, recover_threshold=0.01,
                         regime_threshold=0.6, regime_column=column, cooldown=2, max_trades=4, period_bars=10)
        vol = (ewma_volatility(arrays.close, cfg.ewma_lambda) if vol_model == "ewma"
               else garch_volatility(arrays.close, params))
        inputs = MaskInputs(vol=vol, regime_prob=arrays.features[:, column].astype(np.float64))
        env = TradingEnv(arrays, num_envs=1, window=4, episode_length=length, positions=positions, masks=cfg,
                         mask_inputs=inputs, stagger_starts=False)
        env.reset(starts=[start])
        out = []
        for a in actions[:-1]:
            out.append(env.action_masks()[0])
            env.step(a)
        return torch.stack(out)  # row i: the decision at bar start + i

    for vol_model in ("ewma", "garch"):
        reference = masks_of(arrays, vol_model)
        assert not reference.all(), "the rules never fired: the test would prove nothing"
        moved_any = False
        for t in (start, start + 1, 330, 400):
            moved, _ = _mask_market(replace_future(frame, t, seed=t), fitted.state)
            changed = masks_of(moved, vol_model)
            upto = t - start + 1
            assert torch.equal(reference[:upto], changed[:upto]), f"{vol_model}: a mask at or before t={t} moved"
            moved_any |= not torch.equal(reference[upto:], changed[upto:])
        assert moved_any, f"{vol_model}: the future never changed a later mask"
