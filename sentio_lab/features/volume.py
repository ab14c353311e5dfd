"""TA-Lib volume indicators on cumulative lines and volume means, and the zero-volume conventions of the bank.

Cumulative lines (OBV, A/D, PVT, WAD, NVI, PVI) are used only as windowed differences or ratios, which removes
their start level (see :mod:`sentio_lab.features.talib_bank`).

Zero volume (decided): a bar without volume is valid data (a holiday, a halt, a quiet FX hour, a feed that
carries no volume at all), so every producer that divides by volume defines its value there, causally:

* ``mfi_*``: 50 (neutral) where the window holds no money flow (TA-Lib says 0, "all selling");
* ``cmf_20``, ``obv_flow_14``, ``ad_flow_14``, ``pvt_flow_14``, ``adosc``, ``efi``: 0 (no flow, no pressure)
  where the window traded nothing;
* ``vwma_*``: the plain mean of close where the window traded nothing (equal weights);
* ``relvol_20``: after 20 bars without volume, 20 for a bar that trades (the ratio to the 20-bar mean that
  includes it, its largest value) and 1 for one that does not;
* ``marketfi`` (range per unit of volume): a bar without volume carries the latest traded bar's value, 0 before
  any; ``pvo``: 0 while the volume EMAs are both 0; ``correl_close_volume_*``, ``volume_z_20``: 0 for a constant
  window.

Window sums of volume are exact (:func:`~sentio_lab.features.arrays._window_sum`): TA-Lib's running sums leave a
residue after a zero-volume run (4e-6 instead of 0), which turned 0 / 0 into arbitrary values (ADOSC reached 1e13).
MFI, CMF, VWMA and RVOL are therefore TA-Lib's definitions computed with exact sums; they equal TA-Lib's output on
ordinary data.

The producers below are the ``volume`` group; VWMA (:mod:`~sentio_lab.features.overlap`), MFI, CMF and RVOL
(:mod:`~sentio_lab.features.momentum`), CORREL (:mod:`~sentio_lab.features.stats`) and ``volume_z_20``
(:mod:`~sentio_lab.features.basic`) keep their place in the registration order, which is the column order that
fitted states and cache keys record.
"""

from __future__ import annotations

import numpy as np
import talib

from sentio_lab.features.arrays import _carry_defined, _lag, _log_ratio, _rolling, _safe_div, _window_sum
from sentio_lab.features.registry import Bars
from sentio_lab.features.talib_bank import _ema_settle, _talib_feature, _tl

# --- volume: cumulative lines only as windowed differences / ratios (start level removed)
_FLOW = 14  # window for differences of cumulative volume lines


def _flow(cumulative: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """Change of a cumulative volume line over _FLOW bars, per unit of volume traded in those bars.

    0 where those bars traded nothing (the line cannot move without volume: no flow).
    """
    return _safe_div(cumulative - _lag(cumulative, _FLOW), _window_sum(volume, _FLOW))


@_talib_feature("OBV", lookback=_FLOW)
def _obv(b: Bars) -> dict[str, np.ndarray]:
    """On-balance volume change over 14 bars / volume of those bars (-1..1)."""
    return {"obv_flow_14": _flow(talib.OBV(b.close, b.volume), b.volume)}


@_talib_feature("AD", lookback=_FLOW)
def _ad(b: Bars) -> dict[str, np.ndarray]:
    """Chaikin A/D line change over 14 bars / volume of those bars (-1..1)."""
    return {"ad_flow_14": _flow(talib.AD(b.high, b.low, b.close, b.volume), b.volume)}


@_talib_feature("PVT", lookback=_FLOW)
def _pvt(b: Bars) -> dict[str, np.ndarray]:
    """Price-volume trend change over 14 bars / volume of those bars."""
    return {"pvt_flow_14": _flow(talib.PVT(b.close, b.volume), b.volume)}


@_talib_feature("WAD", lookback=_tl("WAD") + _FLOW)
def _wad(b: Bars) -> dict[str, np.ndarray]:
    """Williams accumulation/distribution change over 14 bars, divided by close."""
    w = talib.WAD(b.high, b.low, b.close)
    return {"wad_change_14": (w - _lag(w, _FLOW)) / b.close}


for _fn in ("NVI", "PVI"):

    def _volume_index(b: Bars, fn: str = _fn) -> dict[str, np.ndarray]:
        """Negative / positive volume index: log change over 14 bars."""
        v = getattr(talib, fn)(b.close, b.volume)
        return {f"{fn.lower()}_change_14": _log_ratio(v, _lag(v, _FLOW))}

    _talib_feature(_fn, lookback=_tl(_fn) + _FLOW)(_volume_index)


@_talib_feature("ADOSC", lookback=_tl("ADOSC", fastperiod=3, slowperiod=10), settle=_ema_settle(10))
def _adosc(b: Bars) -> dict[str, np.ndarray]:
    """Chaikin A/D oscillator (3, 10) divided by the 10-bar mean volume (0 where those bars traded nothing)."""
    # The oscillator's EMAs still decay through a zero-volume run, but with nothing traded there is no pressure
    # to measure: defined as 0. The mean volume is an exact window mean (TA-Lib's running SMA leaves a residue
    # there, which made this ratio reach 1e13).
    return {
        "adosc": _safe_div(
            talib.ADOSC(b.high, b.low, b.close, b.volume, fastperiod=3, slowperiod=10),
            _rolling(b.volume, 10, np.mean),
        )
    }


@_talib_feature("EFI", lookback=_tl("EFI", timeperiod=13), settle=_ema_settle(13))
def _efi(b: Bars) -> dict[str, np.ndarray]:
    """Elder force index (13) divided by close times the 13-bar mean volume (0 where those bars traded nothing)."""
    # As ADOSC: an exact window mean, and 0 (no force) where the 13 bars traded nothing.
    return {
        "efi": _safe_div(talib.EFI(b.close, b.volume, timeperiod=13), b.close * _rolling(b.volume, 13, np.mean))
    }


@_talib_feature("MARKETFI", lookback=_tl("MARKETFI") + 13)
def _marketfi(b: Bars) -> dict[str, np.ndarray]:
    """Market facilitation index (range / volume) made unitless: times 14-bar mean volume / close."""
    # Range per unit of volume is undefined on a bar without volume: such a bar carries the value of the latest
    # bar that traded (causal: an earlier row), and 0 before any bar has a defined value.
    traded = b.volume > 0
    mfi = talib.MARKETFI(b.high, b.low, np.where(traded, b.volume, 1.0))
    value = mfi * _rolling(b.volume, 14, np.mean) / b.close
    out = _carry_defined(value, traded & np.isfinite(value))
    out[: _tl("MARKETFI") + 13] = np.nan  # the warm-up stays undefined, as for every producer
    return {"marketfi": out}


@_talib_feature("PVO", lookback=_tl("PVO", fastperiod=12, slowperiod=26, matype=1), settle=_ema_settle(26))
def _pvo(b: Bars) -> dict[str, np.ndarray]:
    """Percentage volume oscillator (EMA 12 vs EMA 26 of volume)."""
    return {"pvo": talib.PVO(b.volume, fastperiod=12, slowperiod=26, matype=1)}
