"""TA-Lib candlestick patterns, one producer per pattern, scaled to -2..2."""

from __future__ import annotations

import numpy as np
import talib

from sentio_lab.features.registry import Bars
from sentio_lab.features.talib_bank import _talib_feature, _tl

# --- candlestick patterns: TA-Lib gives -200/-100/0/100/200; /100 keeps them at -2..2.
for _fn in talib.get_function_groups()["Pattern Recognition"]:

    def _pattern(b: Bars, fn: str = _fn) -> dict[str, np.ndarray]:
        """Candlestick pattern signal (-1 bearish, +1 bullish, +-2 confirmed; 0 none)."""
        out = getattr(talib, fn)(b.open, b.high, b.low, b.close).astype(np.float64) / 100.0
        lb = _tl(fn)
        out[:lb] = np.nan
        return {fn.lower(): out}

    _talib_feature(_fn, lookback=_tl(_fn))(_pattern)
