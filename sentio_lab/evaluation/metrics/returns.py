"""Return-based metrics: return series, growth, volatility, the Sharpe and Sortino ratios, hit rate, tail risk
(CVaR) and calendar-month returns."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from sentio_lab.evaluation.metrics.inputs import _positive_periods, _returns, check_equity


def simple_returns(equity: pd.Series | np.ndarray | Sequence[float]) -> pd.Series:
    """Per-period simple returns ``equity[t] / equity[t-1] - 1`` (one fewer value than ``equity``)."""
    series = check_equity(equity)
    return (series / series.shift(1) - 1.0).iloc[1:]


def log_returns(equity: pd.Series | np.ndarray | Sequence[float]) -> pd.Series:
    """Per-period log returns ``log(equity[t] / equity[t-1])`` (what the environment rewards)."""
    series = check_equity(equity)
    return np.log(series / series.shift(1)).iloc[1:]


def total_return(equity: pd.Series | np.ndarray | Sequence[float]) -> float:
    """``last / first - 1``."""
    series = check_equity(equity)
    return float(series.iloc[-1] / series.iloc[0] - 1.0)


def cagr(equity: pd.Series | np.ndarray | Sequence[float], periods: float) -> float:
    """Compound annual growth rate; the curve's ``len - 1`` periods are ``(len - 1) / periods`` years."""
    series = check_equity(equity)
    years = (len(series) - 1) / _positive_periods(periods)
    return float((series.iloc[-1] / series.iloc[0]) ** (1.0 / years) - 1.0)


def annualized_volatility(returns: pd.Series | np.ndarray | Sequence[float], periods: float) -> float:
    """Sample standard deviation of the returns times ``sqrt(periods)``."""
    values = _returns(returns)
    return float(np.std(values, ddof=1) * np.sqrt(_positive_periods(periods)))


def sharpe_ratio(returns: pd.Series | np.ndarray | Sequence[float], periods: float = 1.0) -> float:
    """``mean / std * sqrt(periods)``; ``periods=1`` gives the per-period SR used by PSR / DSR.

    NaN when the returns do not vary (the ratio is undefined).
    """
    values = _returns(returns)
    std = np.std(values, ddof=1)
    if std == 0:
        return float("nan")
    return float(np.mean(values) / std * np.sqrt(_positive_periods(periods)))


def sortino_ratio(returns: pd.Series | np.ndarray | Sequence[float], periods: float = 1.0) -> float:
    """``mean / downside deviation * sqrt(periods)``, downside deviation ``sqrt(mean(min(r, 0)^2))``.

    The downside deviation averages over *all* periods (target 0), the usual definition. NaN when no
    period lost money.
    """
    values = _returns(returns)
    downside = np.sqrt(np.mean(np.minimum(values, 0.0) ** 2))
    if downside == 0:
        return float("nan")
    return float(np.mean(values) / downside * np.sqrt(_positive_periods(periods)))


def hit_rate(returns: pd.Series | np.ndarray | Sequence[float]) -> float:
    """Fraction of the periods with a nonzero return that gained; flat periods (exactly 0) are left out.

    NaN when every return is zero (never exposed).
    """
    values = _returns(returns, minimum=1)
    active = values[values != 0]
    if len(active) == 0:
        return float("nan")
    return float(np.mean(active > 0))


def conditional_value_at_risk(returns: pd.Series | np.ndarray | Sequence[float], alpha: float = 0.05) -> float:
    """Expected shortfall: the mean of the ``k = ceil(alpha T)`` lowest of the ``T`` returns (at least one).

    Reported as a *return*, like :func:`max_drawdown`: usually negative (-0.03: the worst 5% of bars lose 3% on
    average). For ``alpha = 1/q`` (0.05, 0.01) ``k`` equals empyrical's ``int((T - 1) alpha) + 1``.
    """
    values = _returns(returns, minimum=1)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = max(1, math.ceil(alpha * len(values) - 1e-9))  # the tolerance keeps 0.05 * 60 = 3.0000000000000004 at 3
    return float(np.mean(np.partition(values, k - 1)[:k]))


def _datetime_index(series: pd.Series, what: str) -> pd.DatetimeIndex:
    if not isinstance(series.index, pd.DatetimeIndex):
        raise TypeError(f"{what} needs an equity curve with a DatetimeIndex, got a {type(series.index).__name__}")
    return series.index


def monthly_returns(equity: pd.Series) -> pd.Series:
    """Calendar-month returns: last equity of a month / last equity of the previous month - 1.

    The first month is measured from the curve's first value; a first month holding nothing but that value
    (a curve starting on a month's last bar) has no return and is left out. Partial first and last months
    count as months. Indexed by the month's last timestamp in the curve. The same as compounding the simple
    returns of each calendar month, the returns dated by the bar that ends them.
    """
    series = check_equity(equity)
    index = _datetime_index(series, "monthly_returns")
    month_end = series.groupby([index.year, index.month]).tail(1)
    previous = np.r_[series.iloc[0], month_end.to_numpy()[:-1]]
    months = month_end / previous - 1.0
    return months.iloc[1:] if month_end.index[0] == index[0] else months


def positive_month_share(equity: pd.Series) -> float:
    """Share of the calendar months (see :func:`monthly_returns`) with a return above 0."""
    return float(np.mean(monthly_returns(equity).to_numpy() > 0))
