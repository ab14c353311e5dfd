"""How many bars make one year (:func:`periods_per_year`), the annualisation factor of every metric."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sentio_lab.evaluation.metrics.inputs import _positive_periods

#: Trading days per year: the convention for daily bars.
TRADING_DAYS = 252.0
#: Weekdays per year: the convention for round-the-clock intraday bars (FX trades 24 hours, 5 days).
WEEKDAYS = 260.0
_DAY = pd.Timedelta(days=1)

PeriodsLike = float | int | str | pd.Timedelta | pd.DatetimeIndex | pd.Series | pd.DataFrame


def periods_per_year(freq_or_index: PeriodsLike) -> float:
    """How many bars make one year, used to annualise.

    * A number is returned as is (after checking it is positive).
    * A ``DatetimeIndex`` (or a Series / DataFrame carrying one) is the robust choice: the answer is the
      **median number of bars per calendar year** over the calendar years the index covers completely
      (its first bar within a week of 1 January, its last within a week of 31 December), which gives
      252 for daily US equity data and about 6,200 for hourly FX. When no calendar year is covered
      completely (a range shorter than a year, say) it falls back to the bar density,
      ``(bars - 1) / span`` in years of 365.25 days.
    * A bar spacing (``pd.Timedelta`` or a string such as ``"1D"``, ``"1h"``) can only be mapped by
      convention: one day -> 252 trading days; shorter bars -> 260 weekdays of 24 hours (FX-like);
      longer bars -> calendar time (365.25 days / spacing, 52.2 for weekly bars).
    """
    if isinstance(freq_or_index, pd.Series | pd.DataFrame):
        freq_or_index = freq_or_index.index
    if isinstance(freq_or_index, pd.Index):
        return _periods_from_index(freq_or_index)
    if isinstance(freq_or_index, str | pd.Timedelta | np.timedelta64):
        freq = pd.Timedelta(freq_or_index)
        if freq <= pd.Timedelta(0):
            raise ValueError(f"periods_per_year: bar spacing must be positive, got {freq}")
        if freq == _DAY:
            return TRADING_DAYS
        if freq < _DAY:
            return WEEKDAYS * (_DAY / freq)
        return pd.Timedelta(days=365.25) / freq
    if isinstance(freq_or_index, bool) or not isinstance(freq_or_index, int | float | np.number):
        raise TypeError(
            "periods_per_year: give a number, a bar spacing (Timedelta / str) or a DatetimeIndex, "
            f"not {type(freq_or_index).__name__}"
        )
    return _positive_periods(freq_or_index)


def _periods_from_index(index: pd.Index) -> float:
    if not isinstance(index, pd.DatetimeIndex):
        raise TypeError(
            f"periods_per_year: cannot infer from a {type(index).__name__}; give a DatetimeIndex "
            "or the number of periods per year"
        )
    if len(index) < 2:
        raise ValueError(f"periods_per_year: need at least 2 timestamps, got {len(index)}")
    if not index.is_monotonic_increasing:
        raise ValueError("periods_per_year: timestamps must be increasing")
    first, last = index[0], index[-1]
    tolerance = pd.Timedelta(days=7)
    counts = pd.Series(1, index=index).groupby(index.year).size()
    covered = [
        year
        for year in counts.index
        if first <= pd.Timestamp(year=year, month=1, day=1) + tolerance
        and last >= pd.Timestamp(year=year + 1, month=1, day=1) - tolerance
    ]
    if covered:
        return float(np.median(counts.loc[covered].to_numpy()))
    span_years = (last - first) / pd.Timedelta(days=365.25)
    if span_years <= 0:
        raise ValueError("periods_per_year: all timestamps are equal")
    return (len(index) - 1) / span_years
