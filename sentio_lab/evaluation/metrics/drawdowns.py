"""Drawdowns of an equity curve: the drawdown series, its deepest point, the Calmar ratio and drawdown spells."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sentio_lab.evaluation.metrics.inputs import check_equity
from sentio_lab.evaluation.metrics.periods import _DAY
from sentio_lab.evaluation.metrics.returns import cagr


def drawdown(equity: pd.Series | np.ndarray | Sequence[float]) -> pd.Series:
    """``equity / running peak - 1``: 0 at a new high, negative below it."""
    series = check_equity(equity)
    return series / series.cummax() - 1.0


def max_drawdown(equity: pd.Series | np.ndarray | Sequence[float]) -> float:
    """Deepest drawdown, a non-positive fraction (-0.25: a 25% fall from a peak)."""
    return float(drawdown(equity).min())


def calmar_ratio(equity: pd.Series | np.ndarray | Sequence[float], periods: float) -> float:
    """``CAGR / |max drawdown|``; NaN when the curve never draws down."""
    mdd = max_drawdown(equity)
    if mdd == 0:
        return float("nan")
    return cagr(equity, periods) / abs(mdd)


def drawdown_spells(equity: pd.Series | np.ndarray | Sequence[float]) -> pd.DataFrame:
    """Every drawdown spell: from a peak (the last bar at a running high) to the first bar back at that high.

    Columns: ``peak`` and ``end`` (index labels), ``bars`` (``end - peak`` in bar positions), ``days`` (calendar
    days between the two timestamps, NaN without a DatetimeIndex), ``depth`` (the spell's deepest drawdown) and
    ``recovered``. A spell still under water ends at the last bar (``recovered`` False).
    """
    series = check_equity(equity)
    dd = drawdown(series).to_numpy()
    under = dd < 0
    starts = np.flatnonzero(under & ~np.r_[False, under[:-1]])  # first bar under water
    rows = []
    for first in starts:
        back = np.flatnonzero(~under[first:])
        end = first + int(back[0]) if len(back) else len(series) - 1
        rows.append((first - 1, end, bool(len(back)), float(dd[first:end + 1].min())))
    index = series.index
    spells = pd.DataFrame(
        {
            "peak": [index[p] for p, _, _, _ in rows],
            "end": [index[e] for _, e, _, _ in rows],
            "bars": np.array([e - p for p, e, _, _ in rows], dtype=np.int64),
            "days": [(index[e] - index[p]) / _DAY if isinstance(index, pd.DatetimeIndex) else np.nan
                     for p, e, _, _ in rows],
            "depth": [d for _, _, _, d in rows],
            "recovered": [r for _, _, r, _ in rows],
        }
    )
    return spells.astype({"days": np.float64, "depth": np.float64, "recovered": bool})


def longest_drawdown(equity: pd.Series | np.ndarray | Sequence[float]) -> tuple[int, float]:
    """``(bars, days)``: the longest drawdown spell in bars and, separately, in calendar days.

    Each is the maximum over :func:`drawdown_spells` (usually the same spell); ``(0, 0.0)`` for a curve that
    never draws down, days NaN without a DatetimeIndex.
    """
    spells = drawdown_spells(equity)
    if spells.empty:
        has_dates = isinstance(getattr(equity, "index", None), pd.DatetimeIndex)
        return 0, (0.0 if has_dates else float("nan"))
    return int(spells["bars"].max()), float(spells["days"].max())
