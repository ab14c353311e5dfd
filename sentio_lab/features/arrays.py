"""Causal array helpers shared by the producers: lags, trailing windows, exact window sums, defined division.

Row ``t`` of every result reads rows ``<= t`` of its inputs only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _lag(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` shifted k bars into the past (NaN for the first k rows)."""
    out = np.full_like(x, np.nan)
    if k < len(x):
        out[k:] = x[: len(x) - k]
    return out


def _rolling(x: np.ndarray, window: int, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """Trailing-window reduction ending at each row (row t uses x[t-window+1 .. t]); NaN before."""
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        out[window - 1 :] = reduce(np.lib.stride_tricks.sliding_window_view(x, window), axis=-1)
    return out


def _window_sum(x: np.ndarray, window: int) -> np.ndarray:
    """Exact trailing sums over ``window`` rows (row t sums x[t-window+1 .. t]); NaN before.

    Used for volume denominators instead of TA-Lib's running sums, which add and subtract and so leave a
    residue (e.g. 4e-6 instead of 0 after a run of zero-volume bars) that turns 0 / 0 into arbitrary numbers.
    """
    return _rolling(x, window, np.sum)


def _carry_defined(values: np.ndarray, defined: np.ndarray, before: float = 0.0) -> np.ndarray:
    """At each row the value of the latest row ``<= t`` where ``defined`` holds; ``before`` until the first."""
    last = np.maximum.accumulate(np.where(defined, np.arange(len(values)), -1))
    return np.where(last >= 0, values[np.maximum(last, 0)], before)


def _safe_div(num: np.ndarray, den: np.ndarray, undefined: float = 0.0) -> np.ndarray:
    """``num / den`` with the value defined as ``undefined`` where ``den == 0`` (a definition, not a fill:
    e.g. close location in a bar with high == low is neutral). NaN inputs stay NaN."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.where(np.isnan(num) | np.isnan(den), np.nan, undefined)
    ok = (den != 0) & ~np.isnan(den) & ~np.isnan(num)
    np.divide(num, den, out=out, where=ok)
    return out


def _log_ratio(level: np.ndarray, close: np.ndarray) -> np.ndarray:
    """Scale-free version of a price-level output: log(level / close). Non-positive levels give NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(level / close)
