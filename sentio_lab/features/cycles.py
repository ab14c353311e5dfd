"""TA-Lib cycle indicators: the Hilbert-transform dominant cycle, phase, phasor, sine wave and trend mode."""

from __future__ import annotations

import numpy as np
import talib

from sentio_lab.features.registry import Bars
from sentio_lab.features.talib_bank import _HT_SETTLE, _talib_feature, _tl


# --- cycle indicators
@_talib_feature("HT_DCPERIOD", lookback=_tl("HT_DCPERIOD"), settle=_HT_SETTLE)
def _ht_dcperiod(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert dominant cycle period (bars)."""
    return {"ht_dcperiod": talib.HT_DCPERIOD(b.close)}


@_talib_feature("HT_DCPHASE", lookback=_tl("HT_DCPHASE"), settle=_HT_SETTLE)
def _ht_dcphase(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert dominant cycle phase as sin / cos (an angle in degrees wraps around; sin/cos do not)."""
    phase = np.deg2rad(talib.HT_DCPHASE(b.close))
    return {"ht_dcphase_sin": np.sin(phase), "ht_dcphase_cos": np.cos(phase)}


@_talib_feature("HT_PHASOR", lookback=_tl("HT_PHASOR"), settle=_HT_SETTLE)
def _ht_phasor(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert phasor components (in-phase, quadrature) divided by close."""
    inphase, quadrature = talib.HT_PHASOR(b.close)
    return {"ht_phasor_inphase": inphase / b.close, "ht_phasor_quadrature": quadrature / b.close}


@_talib_feature("HT_SINE", lookback=_tl("HT_SINE"), settle=_HT_SETTLE)
def _ht_sine(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert sine wave and lead sine."""
    sine, lead = talib.HT_SINE(b.close)
    return {"ht_sine": sine, "ht_leadsine": lead}


@_talib_feature("HT_TRENDMODE", lookback=_tl("HT_TRENDMODE"), settle=_HT_SETTLE)
def _ht_trendmode(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert trend-vs-cycle mode (1 = trend)."""
    return {"ht_trendmode": talib.HT_TRENDMODE(b.close).astype(np.float64)}
