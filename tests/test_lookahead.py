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

from sentio_lab import regime as R
from sentio_lab.data import load_market
from sentio_lab.features import (
    Bars,
    FeatureConfig,
    build_observation_features,
    raw_features,
    registered_producers,
)

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
