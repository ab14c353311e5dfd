"""The placebo bootstrap: blocks, training rows only, determinism, valid OHLC, vol clustering kept, signal gone."""

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import load_market
from sentio_lab.experiment.placebo import (
    bootstrap_indices,
    bootstrap_training_bars,
    placebo_floor,
    placebo_market_data,
)


def _market(n: int = 3000, seed: int = 0, drift_period: int = 0) -> pd.DataFrame:
    """GARCH(1,1)-like returns (volatility clustering); with ``drift_period`` a slow planted regime drift."""
    rng = np.random.default_rng(seed)
    var, rets = 1e-4, np.empty(n)
    for t in range(n):
        rets[t] = np.sqrt(var) * rng.standard_normal()
        var = 1e-6 + 0.15 * rets[t] ** 2 + 0.8 * var
    if drift_period:
        rets += 0.006 * np.where((np.arange(n) // drift_period) % 2 == 0, 1.0, -1.0)
    close = 100 * np.exp(np.cumsum(rets))
    open_ = close * np.exp(rng.normal(0, 0.002, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.003, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.003, n)))
    index = pd.date_range("2000-01-03", periods=n, freq="B")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close,
                         "volume": rng.integers(1, 10**6, n).astype(float)}, index=index)


def _acf(x: np.ndarray, lag: int) -> float:
    return float(np.corrcoef(x[:-lag], x[lag:])[0, 1])


def test_bootstrap_indices_are_geometric_blocks_with_the_declared_mean():
    positions = bootstrap_indices(20000, 8.0, seed=3)
    assert positions.min() >= 0 and positions.max() < 20000
    # a new block starts where the next position is not the previous one + 1 (mod n): mean block length ~ 8
    breaks = np.flatnonzero(np.diff(positions) % 20000 != 1)
    assert np.mean(np.diff(breaks)) == pytest.approx(8.0, rel=0.1)
    assert np.mean(np.diff(bootstrap_indices(20000, 2.0, seed=3)) % 20000 != 1) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="block mean"):
        bootstrap_indices(10, 0.5, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_indices(0, 5.0, seed=0)


def test_only_training_rows_change_and_each_rebuilt_bar_is_a_source_bar_of_its_segment():
    frame = _market(600)
    segments = [(50, 250), (350, 480)]
    out, sources = bootstrap_training_bars(frame, segments, block_mean=5, seed=1)
    inside = np.zeros(len(frame), bool)
    for a, b in segments:
        inside[a + 1 : b] = True
        assert out.iloc[a].equals(frame.iloc[a])  # the anchor bar
        source = sources[a]
        assert source.min() >= a + 1 and source.max() < b  # drawn from its own segment only
        np.testing.assert_allclose(np.diff(np.log(out["close"].to_numpy()[a : b])),
                                   np.log(frame["close"].to_numpy()[source] / frame["close"].to_numpy()[source - 1]))
        for col in ("open", "high", "low"):  # intra-bar shape relative to the bar's own close
            np.testing.assert_allclose(out[col].to_numpy()[a + 1 : b] / out["close"].to_numpy()[a + 1 : b],
                                       frame[col].to_numpy()[source] / frame["close"].to_numpy()[source])
        np.testing.assert_array_equal(out["volume"].to_numpy()[a + 1 : b], frame["volume"].to_numpy()[source])
    pd.testing.assert_frame_equal(out[~inside], frame[~inside])  # gaps, validation, test: untouched
    assert (out[inside]["close"] != frame[inside]["close"]).mean() > 0.9
    assert list(out.columns) == list(frame.columns) and out.index.equals(frame.index)


def test_rebuilt_bars_are_valid_ohlc():
    out, _ = bootstrap_training_bars(_market(800), [(0, 800)], block_mean=4, seed=2)
    assert (out["high"] >= out[["open", "close"]].max(axis=1) * (1 - 1e-12)).all()
    assert (out["low"] <= out[["open", "close"]].min(axis=1) * (1 + 1e-12)).all()
    assert (out[["open", "high", "low", "close"]] > 0).all().all()


def test_deterministic_in_the_seed():
    frame = _market(500)
    a, _ = bootstrap_training_bars(frame, [(10, 400)], block_mean=5, seed=7)
    b, _ = bootstrap_training_bars(frame, [(10, 400)], block_mean=5, seed=7)
    c, _ = bootstrap_training_bars(frame, [(10, 400)], block_mean=5, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_volatility_clustering_kept_and_a_planted_slow_signal_destroyed():
    frame = _market(6000, seed=4, drift_period=100)
    out, _ = bootstrap_training_bars(frame, [(0, len(frame))], block_mean=5, seed=0)

    def clustering_and_signal(f: pd.DataFrame) -> tuple[float, float]:
        r = np.diff(np.log(f["close"].to_numpy()))
        demeaned = np.abs(r - np.convolve(r, np.ones(100) / 100, "same"))  # |r| without the drift's own level
        # the slow signal: the drift of bars t-49 .. t-10 (beyond a few blocks: within a block dependence is kept)
        trailing = pd.Series(r).rolling(40).mean().shift(10).to_numpy()
        ok = ~np.isnan(trailing[:-1])
        return _acf(demeaned, 1), float(np.corrcoef(trailing[:-1][ok], r[1:][ok])[0, 1])

    real_vol, real_signal = clustering_and_signal(frame)
    boot_vol, boot_signal = clustering_and_signal(out)
    assert real_vol > 0.1 and boot_vol > 0.5 * real_vol  # volatility clustering kept (within blocks)
    assert real_signal > 0.3  # the planted drift is predictable from the trailing mean on real bars ...
    assert boot_signal < 0.25 * real_signal  # ... and not on the placebo bars
    # the returns' distribution (drift included) is kept: the same mean return, the same volatility
    r_real, r_boot = (np.diff(np.log(f["close"].to_numpy())) for f in (frame, out))
    assert np.std(r_boot) == pytest.approx(np.std(r_real), rel=0.1)


def test_refuses_bad_input_naming_the_row():
    frame = _market(100)
    broken = frame.copy()
    broken.iloc[7, broken.columns.get_loc("low")] = 0.0
    with pytest.raises(ValueError, match="row 7"):
        bootstrap_training_bars(broken, [(0, 50)], block_mean=5, seed=0)
    with pytest.raises(ValueError, match="outside"):
        bootstrap_training_bars(frame, [(50, 101)], block_mean=5, seed=0)
    with pytest.raises(ValueError, match="overlap"):
        bootstrap_training_bars(frame, [(0, 50), (40, 60)], block_mean=5, seed=0)
    with pytest.raises(ValueError, match="price columns"):
        bootstrap_training_bars(frame.drop(columns="high"), [(0, 50)], block_mean=5, seed=0)


def test_placebo_market_data_refingerprints_and_floor_is_the_quantile():
    data = load_market("sp500")
    placebo = placebo_market_data(data, [(100, 400)], block_mean=5, seed=0)
    assert placebo.fingerprint != data.fingerprint and placebo.name == data.name
    pd.testing.assert_frame_equal(placebo.frame.iloc[400:], data.frame.iloc[400:])
    assert placebo_floor([1.0, 2.0, 3.0, 4.0, np.nan], 0.5) == pytest.approx(2.5)
    assert np.isnan(placebo_floor([np.nan]))


def test_a_one_bar_segment_is_left_as_it_is():
    frame = _market(50)
    out, sources = bootstrap_training_bars(frame, [(10, 11), (20, 40)], block_mean=3, seed=0)
    assert 10 not in sources and 20 in sources
    pd.testing.assert_frame_equal(out.iloc[:21], frame.iloc[:21])
