"""Validation of what the metrics take: finite 1-D series, positive equity curves, returns, weights and periods
per year; errors name the offending input and values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _as_series(values: pd.Series | np.ndarray | Sequence[float], what: str) -> pd.Series:
    """A float64 Series from ``values``; raise naming ``what`` if it is not 1-D or holds NaN / inf."""
    if isinstance(values, pd.DataFrame):
        raise TypeError(f"{what}: expected a 1-D series, got a DataFrame with columns {list(values.columns)}")
    if isinstance(values, pd.Series):
        series = values.astype(np.float64)
    else:
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"{what}: expected 1-D values, got shape {array.shape}")
        series = pd.Series(array)
    bad = ~np.isfinite(series.to_numpy())
    if bad.any():
        where = series.index[bad][:5].tolist()
        raise ValueError(f"{what}: {int(bad.sum())} NaN or inf value(s) (not finite), at {where}")
    return series


def check_equity(equity: pd.Series | np.ndarray | Sequence[float], what: str = "equity") -> pd.Series:
    """Validate an equity curve: at least two finite values, all strictly positive; errors name ``what``."""
    series = _as_series(equity, what)
    if len(series) < 2:
        raise ValueError(f"{what}: need at least 2 values (a start and one marked bar), got {len(series)}")
    nonpositive = series.to_numpy() <= 0
    if nonpositive.any():
        where = series.index[nonpositive][:5].tolist()
        raise ValueError(f"{what}: must stay > 0 for returns to be defined; non-positive at {where}")
    return series


def _returns(returns: pd.Series | np.ndarray | Sequence[float], minimum: int = 2) -> np.ndarray:
    values = _as_series(returns, "returns").to_numpy()
    if len(values) < minimum:
        raise ValueError(f"returns: need at least {minimum} values, got {len(values)}")
    return values


def _positive_periods(periods: float) -> float:
    periods = float(periods)
    if not (np.isfinite(periods) and periods > 0):
        raise ValueError(f"periods_per_year must be a positive finite number, got {periods}")
    return periods


def _weights(weights: pd.Series | np.ndarray | Sequence[float]) -> np.ndarray:
    values = _as_series(weights, "weights").to_numpy()
    if len(values) == 0:
        raise ValueError("weights: empty")
    return values
