"""The ``"basic"`` bank: a handful of fast hand-written features (log returns, realised volatility, range,
close location, body, gap, volume z-score), fast enough for every PPO run and test."""

from __future__ import annotations

import numpy as np

from sentio_lab.features.arrays import _lag, _rolling, _safe_div
from sentio_lab.features.registry import Bars, register_feature

for _k in (1, 5, 20):

    def _ret(b: Bars, k: int = _k) -> dict[str, np.ndarray]:
        """Log return over k bars: log(close_t / close_{t-k})."""
        logc = np.log(b.close)
        return {f"ret_{k}": logc - _lag(logc, k)}

    register_feature(f"ret_{_k}", lookback=_k)(_ret)

for _w in (5, 20):

    def _rvol(b: Bars, w: int = _w) -> dict[str, np.ndarray]:
        """Realised volatility: std of the last w one-bar log returns."""
        r = np.diff(np.log(b.close), prepend=np.nan)
        return {f"rvol_{w}": _rolling(r, w, np.std)}

    register_feature(f"rvol_{_w}", lookback=_w)(_rvol)


@register_feature("range_hl", lookback=0)
def _range_hl(b: Bars) -> dict[str, np.ndarray]:
    """Bar range: log(high / low)."""
    return {"range_hl": np.log(b.high / b.low)}


@register_feature("close_loc", lookback=0)
def _close_loc(b: Bars) -> dict[str, np.ndarray]:
    """Close location in the bar's range, -1 at the low, +1 at the high, 0 for a bar with no range."""
    return {"close_loc": _safe_div(2.0 * b.close - b.high - b.low, b.high - b.low)}


@register_feature("body", lookback=0)
def _body(b: Bars) -> dict[str, np.ndarray]:
    """Candle body: log(close / open)."""
    return {"body": np.log(b.close / b.open)}


@register_feature("gap", lookback=1)
def _gap(b: Bars) -> dict[str, np.ndarray]:
    """Opening gap: log(open_t / close_{t-1})."""
    return {"gap": np.log(b.open) - _lag(np.log(b.close), 1)}


@register_feature("volume_z_20", lookback=19)
def _volume_z(b: Bars) -> dict[str, np.ndarray]:
    """z-score of log(1 + volume) within the last 20 bars (0 when the window's volume is constant)."""
    lv = np.log1p(b.volume)
    mean, std = _rolling(lv, 20, np.mean), _rolling(lv, 20, np.std)
    return {"volume_z_20": _safe_div(lv - mean, std)}
