"""TA-Lib overlap studies and price transforms: moving averages, bands and channels, SAR, SuperTrend,
Heikin-Ashi and the typical prices, as log ratios (or relative distances) to the close."""

from __future__ import annotations

import numpy as np
import talib

from sentio_lab.features.arrays import _log_ratio, _rolling, _safe_div, _window_sum
from sentio_lab.features.registry import Bars
from sentio_lab.features.talib_bank import _HT_SETTLE, _ema_settle, _ma_feature, _talib_feature, _tl

# --- moving averages (overlap studies): log ratio to close
_ma_feature("SMA", (5, 14, 30, 60))
_ma_feature("WMA", (5, 14, 30))
_ma_feature("TRIMA", (14, 30))
_ma_feature("EMA", (5, 14, 30), settle=_ema_settle)
_ma_feature("DEMA", (5, 14), settle=_ema_settle)
_ma_feature("TEMA", (5, 14), settle=_ema_settle)
_ma_feature("KAMA", (14, 30), settle=_ema_settle)
_ma_feature("RMA", (14, 30), settle=_ema_settle)
_ma_feature("HMA", (14, 30))
_ma_feature("ZLEMA", (14, 30), settle=_ema_settle)
_ma_feature("T3", (5, 10), settle=_ema_settle)
_ma_feature("MIDPOINT", (14, 30))
_ma_feature("LINEARREG", (14, 30))
_ma_feature("LINEARREG_INTERCEPT", (14, 30))
_ma_feature("TSF", (14, 30))


@_talib_feature("MIDPRICE", lookback=_tl("MIDPRICE", timeperiod=30))
def _midprice(b: Bars) -> dict[str, np.ndarray]:
    """Midpoint of the high/low range over 14 and 30 bars, log ratio to close."""
    return {
        f"midprice_{p}": _log_ratio(talib.MIDPRICE(b.high, b.low, timeperiod=p), b.close) for p in (14, 30)
    }


@_talib_feature("VWMA", lookback=_tl("VWMA", timeperiod=30))
def _vwma(b: Bars) -> dict[str, np.ndarray]:
    """Volume-weighted moving average over 14 and 30 bars, log ratio to close (plain mean without volume)."""
    # TA-Lib's VWMA, sum(close * volume) / sum(volume), with exact window sums (see _window_sum). Zero volume:
    # where the window traded nothing the weights are all equal (0), so the level is the plain mean of close.
    out = {}
    for p in (14, 30):
        volume = _window_sum(b.volume, p)
        traded = volume > 0
        weighted = _window_sum(b.close * b.volume, p) / np.where(traded, volume, 1.0)
        out[f"vwma_{p}"] = _log_ratio(np.where(traded, weighted, _rolling(b.close, p, np.mean)), b.close)
    return out


@_talib_feature("PERCENTILE", lookback=_tl("PERCENTILE", timeperiod=30))
def _percentile(b: Bars) -> dict[str, np.ndarray]:
    """25th / 50th / 75th percentile of close over 30 bars, log ratio to close."""
    return {
        f"percentile_30_{q}": _log_ratio(
            talib.PERCENTILE(b.close, timeperiod=30, percentile=float(q)), b.close
        )
        for q in (25, 50, 75)
    }


@_talib_feature("MAMA", lookback=_tl("MAMA"), settle=_HT_SETTLE)
def _mama(b: Bars) -> dict[str, np.ndarray]:
    """MESA adaptive moving average and its follower (FAMA), log ratio to close."""
    # On raw close, not log close: MAMA's phase-driven alpha is exactly scale-equivariant but not exactly
    # shift-equivariant, and both lines are positive averages, so the log ratio is always defined. During a halt
    # (unchanged prices) the phase is atan(Q / I) of two rounding residues: for a while after one, the lines
    # depend on the rounding of the price digits (finite and causal; see tests/features/test_messy_features.py).
    mama, fama = talib.MAMA(b.close, fastlimit=0.5, slowlimit=0.05)
    return {"mama": _log_ratio(mama, b.close), "fama": _log_ratio(fama, b.close)}


@_talib_feature("HT_TRENDLINE", lookback=_tl("HT_TRENDLINE"), settle=_HT_SETTLE)
def _ht_trendline(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert-transform instantaneous trendline, log ratio to close (a positive average: always defined)."""
    return {"ht_trendline": _log_ratio(talib.HT_TRENDLINE(b.close), b.close)}


# The period input (HT_DCPERIOD) starts after its own warm-up; MAVP's window then adds maxperiod - 1.
@_talib_feature("MAVP", lookback=_tl("HT_DCPERIOD") + _tl("MAVP", maxperiod=30), settle=_HT_SETTLE)
def _mavp(b: Bars) -> dict[str, np.ndarray]:
    """Moving average (period = Hilbert dominant cycle, 2..30) of log close, minus log close."""
    periods = talib.HT_DCPERIOD(b.close)
    # The dominant-cycle period is NaN in its own warm-up; TA-Lib then starts MAVP where both exist.
    logc = np.log(b.close)
    return {"mavp_dc": talib.MAVP(logc, periods, minperiod=2, maxperiod=30) - logc}


def _band_features(
    prefix: str, upper: np.ndarray, middle: np.ndarray, lower: np.ndarray, close: np.ndarray
) -> dict:
    """Scale-free band description: position of close in the band (-1..1 inside) and band width."""
    return {
        f"{prefix}_pos": _safe_div(2.0 * close - upper - lower, upper - lower),
        f"{prefix}_width": _safe_div(upper - lower, middle),
    }


@_talib_feature("BBANDS", lookback=_tl("BBANDS", timeperiod=20))
def _bbands(b: Bars) -> dict[str, np.ndarray]:
    """Bollinger bands (20, 2 sd): position of close in the band and band width / middle."""
    return _band_features(
        "bbands_20", *talib.BBANDS(b.close, timeperiod=20, nbdevup=2.0, nbdevdn=2.0), b.close
    )


@_talib_feature("ACCBANDS", lookback=_tl("ACCBANDS", timeperiod=20))
def _accbands(b: Bars) -> dict[str, np.ndarray]:
    """Acceleration bands (20): position of close in the band and band width / middle."""
    return _band_features("accbands_20", *talib.ACCBANDS(b.high, b.low, b.close, timeperiod=20), b.close)


@_talib_feature("DONCHIAN", lookback=_tl("DONCHIAN", timeperiod=20))
def _donchian(b: Bars) -> dict[str, np.ndarray]:
    """Donchian channel (20): position of close in the channel and channel width / middle."""
    return _band_features("donchian_20", *talib.DONCHIAN(b.high, b.low, timeperiod=20), b.close)


@_talib_feature("KC", lookback=_tl("KC", timeperiod=20, atrperiod=10), settle=_ema_settle(10))
def _kc(b: Bars) -> dict[str, np.ndarray]:
    """Keltner channel (20, ATR 10, 2): position of close in the channel and width / middle."""
    return _band_features(
        "kc_20", *talib.KC(b.high, b.low, b.close, timeperiod=20, atrperiod=10, nbdev=2.0), b.close
    )


@_talib_feature("SAR", lookback=_tl("SAR"), settle=30)
def _sar(b: Bars) -> dict[str, np.ndarray]:
    """Parabolic SAR (0.02, 0.2), log ratio to close (path-dependent; forgets its start at each reversal)."""
    return {"sar": _log_ratio(talib.SAR(b.high, b.low, acceleration=0.02, maximum=0.2), b.close)}


@_talib_feature("SAREXT", lookback=_tl("SAREXT"), settle=30)
def _sarext(b: Bars) -> dict[str, np.ndarray]:
    """Extended SAR with slow (0.01/0.1) acceleration: trend side (+1 long / -1 short) and log distance."""
    s = talib.SAREXT(
        b.high,
        b.low,
        accelerationinitlong=0.01,
        accelerationlong=0.01,
        accelerationmaxlong=0.1,
        accelerationinitshort=0.01,
        accelerationshort=0.01,
        accelerationmaxshort=0.1,
    )
    # TA-Lib encodes a short position as a negative SAR value.
    return {"sarext_side": np.sign(s), "sarext_dist": _log_ratio(np.abs(s), b.close)}


@_talib_feature("SUPERTREND", lookback=_tl("SUPERTREND", timeperiod=10), settle=_ema_settle(10))
def _supertrend(b: Bars) -> dict[str, np.ndarray]:
    """SuperTrend (10, 3): log ratio of the trend line to close and the trend direction."""
    line, trend = talib.SUPERTREND(b.high, b.low, b.close, timeperiod=10, multiplier=3.0)
    # Relative distance, not a log ratio: the lower band (hl2 - 3 ATR) can be negative after a crash.
    return {"supertrend": line / b.close - 1.0, "supertrend_dir": trend}


@_talib_feature("HA", lookback=_tl("HA"), settle=10)
def _ha(b: Bars) -> dict[str, np.ndarray]:
    """Heikin-Ashi candle: open, high, low and close as log ratios to close."""
    return {
        f"ha_{k}": _log_ratio(v, b.close)
        for k, v in zip(
            ("open", "high", "low", "close"), talib.HA(b.open, b.high, b.low, b.close), strict=True
        )
    }


for _fn in ("AVGPRICE", "MEDPRICE", "TYPPRICE", "WCLPRICE"):

    def _price_transform(b: Bars, fn: str = _fn) -> dict[str, np.ndarray]:
        """Price transform as log ratio to close."""
        ta = getattr(talib, fn)
        args = (
            (b.open, b.high, b.low, b.close)
            if fn == "AVGPRICE"
            else ((b.high, b.low) if fn == "MEDPRICE" else (b.high, b.low, b.close))
        )
        return {fn.lower(): _log_ratio(ta(*args), b.close)}

    _talib_feature(_fn, lookback=_tl(_fn))(_price_transform)
