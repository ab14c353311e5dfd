"""TA-Lib math operators over windows, statistic functions and volatility indicators: window extremes and
where they occurred, up-close share, beta, correlation, regression slope and angle, variance, true range."""

from __future__ import annotations

import numpy as np
import talib

from sentio_lab.features.arrays import _lag, _log_ratio, _safe_div
from sentio_lab.features.registry import Bars
from sentio_lab.features.talib_bank import _ema_settle, _talib_feature, _tl


# --- math operators over windows
@_talib_feature("MAX", lookback=_tl("MAX", timeperiod=30))
def _max(b: Bars) -> dict[str, np.ndarray]:
    """Highest high over 14 / 30 bars, log ratio to close."""
    return {f"max_high_{p}": _log_ratio(talib.MAX(b.high, timeperiod=p), b.close) for p in (14, 30)}


@_talib_feature("MIN", lookback=_tl("MIN", timeperiod=30))
def _min(b: Bars) -> dict[str, np.ndarray]:
    """Lowest low over 14 / 30 bars, log ratio to close."""
    return {f"min_low_{p}": _log_ratio(talib.MIN(b.low, timeperiod=p), b.close) for p in (14, 30)}


def _bars_since(index: np.ndarray, period: int) -> np.ndarray:
    """Bars elapsed since a window extreme given by its absolute index, scaled to 0..1 by the window."""
    t = np.arange(len(index), dtype=np.float64)
    return (t - index.astype(np.float64)) / (period - 1)


def _index_output(idx: np.ndarray, lookback: int) -> np.ndarray:
    """TA-Lib index outputs are integers (0 in the warm-up); mark the warm-up rows NaN explicitly."""
    out = idx.astype(np.float64)
    out[:lookback] = np.nan
    return out


@_talib_feature("MAXINDEX", lookback=_tl("MAXINDEX", timeperiod=30))
def _maxindex(b: Bars) -> dict[str, np.ndarray]:
    """Bars since the highest high of the last 14 / 30 bars (0..1 of the window)."""
    return {
        f"since_max_{p}": _bars_since(_index_output(talib.MAXINDEX(b.high, timeperiod=p), p - 1), p)
        for p in (14, 30)
    }


@_talib_feature("MININDEX", lookback=_tl("MININDEX", timeperiod=30))
def _minindex(b: Bars) -> dict[str, np.ndarray]:
    """Bars since the lowest low of the last 14 / 30 bars (0..1 of the window)."""
    return {
        f"since_min_{p}": _bars_since(_index_output(talib.MININDEX(b.low, timeperiod=p), p - 1), p)
        for p in (14, 30)
    }


@_talib_feature("MINMAX", lookback=_tl("MINMAX", timeperiod=60))
def _minmax(b: Bars) -> dict[str, np.ndarray]:
    """Position of close between the lowest and highest close of 60 bars (-1..1)."""
    lo, hi = talib.MINMAX(b.close, timeperiod=60)
    return {"minmax_close_60_pos": _safe_div(2.0 * b.close - hi - lo, hi - lo)}


@_talib_feature("MINMAXINDEX", lookback=_tl("MINMAXINDEX", timeperiod=60))
def _minmaxindex(b: Bars) -> dict[str, np.ndarray]:
    """Which came last in 60 bars, the highest or lowest close: (max index - min index) / 59 (-1..1)."""
    lo, hi = talib.MINMAXINDEX(b.close, timeperiod=60)
    return {"minmaxindex_close_60": (_index_output(hi, 59) - _index_output(lo, 59)) / 59.0}


@_talib_feature("SUM", lookback=_tl("SUM", timeperiod=14) + 1)
def _sum(b: Bars) -> dict[str, np.ndarray]:
    """Fraction of up-closes among the last 14 bars."""
    up = (b.close > _lag(b.close, 1)).astype(np.float64)
    up[0] = np.nan
    return {"up_fraction_14": talib.SUM(up, timeperiod=14) / 14.0}


# --- statistic functions
@_talib_feature("BETA", lookback=_tl("BETA", timeperiod=14))
def _beta(b: Bars) -> dict[str, np.ndarray]:
    """Beta of the high's returns on the low's returns over 14 bars (range expansion vs. drift)."""
    return {"beta_high_low_14": talib.BETA(b.high, b.low, timeperiod=14)}


@_talib_feature("CORREL", lookback=_tl("CORREL", timeperiod=30))
def _correl(b: Bars) -> dict[str, np.ndarray]:
    """Correlation of close with volume over 14 / 30 bars (0 when either is constant in the window)."""
    out = {}
    for p in (14, 30):
        c = talib.CORREL(b.close, b.volume, timeperiod=p)
        # TA-Lib divides by the product of the two variances; a constant window gives inf/NaN there.
        # Correlation with a constant is undefined; we define it as 0 (no linear relation).
        warm = np.arange(len(c)) < p - 1
        out[f"correl_close_volume_{p}"] = np.where(warm, np.nan, np.where(np.isfinite(c), c, 0.0))
    return out


@_talib_feature("LINEARREG_ANGLE", lookback=_tl("LINEARREG_ANGLE", timeperiod=30))
def _linreg_angle(b: Bars) -> dict[str, np.ndarray]:
    """Angle (degrees) of the regression line of 100 * log(close) over 14 / 30 bars: slope in %/bar."""
    # TA-Lib's angle depends on the price unit; on 100 * log price it is the same for every market.
    logc = 100.0 * np.log(b.close)
    return {f"linreg_angle_{p}": talib.LINEARREG_ANGLE(logc, timeperiod=p) for p in (14, 30)}


@_talib_feature("LINEARREG_SLOPE", lookback=_tl("LINEARREG_SLOPE", timeperiod=30))
def _linreg_slope(b: Bars) -> dict[str, np.ndarray]:
    """Slope of the regression line of log close over 14 / 30 bars (log return per bar)."""
    logc = np.log(b.close)
    return {f"linearreg_slope_{p}": talib.LINEARREG_SLOPE(logc, timeperiod=p) for p in (14, 30)}


@_talib_feature("VAR", lookback=_tl("VAR", timeperiod=30) + 1)
def _var(b: Bars) -> dict[str, np.ndarray]:
    """Variance of 1-bar percentage log returns over 30 bars."""
    r = 100.0 * np.diff(np.log(b.close), prepend=np.nan)
    return {"var_ret_30": talib.VAR(r, timeperiod=30)}


# --- volatility
@_talib_feature("TRANGE", lookback=_tl("TRANGE"))
def _trange(b: Bars) -> dict[str, np.ndarray]:
    """True range divided by close."""
    return {"trange": talib.TRANGE(b.high, b.low, b.close) / b.close}


@_talib_feature("CVI", lookback=_tl("CVI", timeperiod=10, rocperiod=10), settle=_ema_settle(10))
def _cvi(b: Bars) -> dict[str, np.ndarray]:
    """Chaikin volatility (10, 10)."""
    return {"cvi": talib.CVI(b.high, b.low, timeperiod=10, rocperiod=10)}


@_talib_feature("MASSI", lookback=_tl("MASSI", fastperiod=9, slowperiod=25), settle=_ema_settle(9))
def _massi(b: Bars) -> dict[str, np.ndarray]:
    """Mass index (9, 25)."""
    return {"massi": talib.MASSI(b.high, b.low, fastperiod=9, slowperiod=25)}


@_talib_feature("RVI", lookback=_tl("RVI", timeperiod=14, stddevperiod=10), settle=_ema_settle(14))
def _rvi(b: Bars) -> dict[str, np.ndarray]:
    """Relative volatility index (14, 10)."""
    return {"rvi": talib.RVI(b.close, timeperiod=14, stddevperiod=10)}
