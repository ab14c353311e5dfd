"""Dated alternative data, point in time: each value carries the instant it became public (:class:`ExogenousSeries`).

The rule
--------
A value for period ``d`` becomes visible at the first bar whose **close** is at or after its release time
``released_at``; before that it does not exist for the agent, and before a series' first release it is missing
(the features treat those rows as warm-up). Nothing is back-filled. A bar's close is its timestamp plus one base
bar (:func:`bar_close_times`; the convention of :mod:`sentio_lab.data.timeframes`: a daily bar labelled by its
date closes at the next midnight UTC), so a bundled release time is chosen such that the value was public before
the *exchange's* close of the first bar that sees it, whatever reading of a daily bar's close one takes (the
lag table in ``docs/data.md``, section "Alternative data (point in time)").

Naive timestamps are UTC, as for bars. Release times must follow the dates' order (a later period is never
public before an earlier one), so the latest visible value is always the latest period released.

Sources
-------
* Bundled (``arch.data``, no network), by name in :data:`BUNDLED_EXOGENOUS`: ``vix``, ``wti``, ``core_cpi``,
  ``aaa``, ``baa``, ``credit_spread`` (BAA - AAA), ``ff_mkt_rf``, ``ff_smb``, ``ff_hml``, ``ff_rf``.
* A user's CSV with columns ``date, value[, released_at]`` (:func:`read_exogenous_csv`); without ``released_at``
  a publication lag is required: ``"file.csv@2D"`` releases each value two days after its date
  (:func:`load_exogenous`). Invalid files get a one-line :class:`~sentio_lab.data.DataValidationError` naming the
  line and what to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sentio_lab.data.validation import DataValidationError

#: How a series' change is measured: ``"log"`` (log ratio, positive series) or ``"diff"`` (difference).
CHANGE_KINDS: tuple[str, ...] = ("log", "diff")


@dataclass(frozen=True)
class ExogenousSeries:
    """A dated series with the instant each value became public."""

    name: str
    """Short name; feature columns are ``"exo:<name>"`` and ``"exo:<name>:chg"``."""
    dates: pd.DatetimeIndex
    """Start of each value's period (a day, or the first day of a month), naive UTC, strictly increasing."""
    values: np.ndarray
    """float64, finite, one per date."""
    released_at: pd.DatetimeIndex
    """When each value became public (naive UTC), non-decreasing, never before its date."""
    change: str = "diff"
    """How the change feature is measured (:data:`CHANGE_KINDS`)."""
    max_age: pd.Timedelta = pd.Timedelta(days=10)
    """A bar seeing a value released longer ago than this is refused (the series has ended or has a hole)."""
    period_end: pd.DatetimeIndex | None = None
    """End of each value's period (exclusive; naive UTC): the span of the features counts from its period's
    start, this is for the record. None: the next date."""
    description: str = ""
    earliest_close: bool = False
    """Compare the release instants with the earliest reading of a daily (or longer) bar's close, its label date's
    start, instead of the end of that date: set for a user's file, whose instants know nothing of the market's
    close. A US equity bar labelled D closes at 16:00 New York, hours before the end of D in UTC; a value released
    in between would otherwise reach the decision at that close. Bundled series keep the end-of-date reading:
    their release times are chosen after the 16:00 New York close (module doc)."""

    def __post_init__(self) -> None:
        """Check the point-in-time invariants (a bundled or loaded series always satisfies them)."""
        n = len(self.dates)
        if len(self.values) != n or len(self.released_at) != n or n == 0:
            raise ValueError(f"exogenous series {self.name!r}: dates, values and released_at must have one "
                             f"(and the same) length > 0, got {n}, {len(self.values)}, {len(self.released_at)}")
        if self.change not in CHANGE_KINDS:
            raise ValueError(f"exogenous series {self.name!r}: change must be one of {CHANGE_KINDS}")
        if not np.isfinite(self.values).all():
            raise ValueError(f"exogenous series {self.name!r}: values must be finite")
        if self.change == "log" and (self.values <= 0).any():
            raise ValueError(f"exogenous series {self.name!r}: log changes need positive values")
        if not self.dates.is_monotonic_increasing or self.dates.has_duplicates:
            raise ValueError(f"exogenous series {self.name!r}: dates must be strictly increasing")
        if not self.released_at.is_monotonic_increasing:
            raise ValueError(f"exogenous series {self.name!r}: released_at must follow the dates' order")
        if (self.released_at < self.dates).any():
            raise ValueError(f"exogenous series {self.name!r}: a value is released before its date")


def bar_close_times(index: pd.DatetimeIndex, base_freq: pd.Timedelta) -> np.ndarray:
    """int64 nanoseconds (UTC) at which each bar closes: its timestamp plus one base bar. Tz-aware indexes are
    converted to UTC; naive ones are UTC."""
    if base_freq <= pd.Timedelta(0):
        raise ValueError(f"base_freq must be positive, got {base_freq}")
    times = index.tz_convert("UTC").tz_localize(None) if index.tz is not None else index
    return times.as_unit("ns").asi8 + int(base_freq.value)


def visible_index(series: ExogenousSeries, bar_close: np.ndarray, base_freq: pd.Timedelta | None = None
                  ) -> np.ndarray:
    """int64 ``(T,)``: at each bar, the position in ``series`` of the latest value released by the bar's close
    (``released_at <= close``); -1 before the first release. Row ``t`` reads only bar ``t``'s close time. With
    ``series.earliest_close`` and bars of a day or longer (``base_freq``), the close is read as the bar's label
    date's start (``close - base_freq``): the earliest a market may close that day."""
    released = series.released_at.as_unit("ns").asi8
    if series.earliest_close and base_freq is not None and base_freq >= pd.Timedelta(days=1):
        bar_close = bar_close - int(base_freq.value)
    # Releases are sorted, so the number released by each close is a binary search (side="right": "at or after").
    return np.searchsorted(released, bar_close, side="right").astype(np.int64) - 1


def release_times(days: pd.DatetimeIndex, after_days: int, at: str, zone: str = "America/New_York"
                  ) -> pd.DatetimeIndex:
    """``days + after_days`` at wall-clock time ``at`` ("HH:MM") in ``zone``, as naive UTC instants."""
    hour, minute = (int(part) for part in at.split(":"))
    local = (days.normalize() + pd.Timedelta(days=after_days, hours=hour, minutes=minute)).tz_localize(
        zone, nonexistent="shift_forward", ambiguous=False)
    return local.tz_convert("UTC").tz_localize(None).as_unit("ns")


def _month_ends(dates: pd.DatetimeIndex, months_after: int = 0) -> pd.DatetimeIndex:
    """The last day of the month ``months_after`` months after each date's month."""
    return (dates.to_period("M") + months_after).to_timestamp(how="end").normalize()


@dataclass(frozen=True)
class BundledExogenous:
    """A series that ships with ``arch``: how to load it, when each value is public and why."""

    load: Callable[[], pd.Series]
    """The raw values by period date (NaN marks a day without an observation, e.g. a holiday)."""
    release: Callable[[pd.DatetimeIndex], pd.DatetimeIndex]
    """Period dates -> release instants (naive UTC)."""
    change: str
    max_age: pd.Timedelta
    monthly: bool
    description: str
    published: str
    """When the source really publishes a value."""
    chosen: str
    """The release time chosen here, and why."""


def _arch(module: str, column: str) -> Callable[[], pd.Series]:
    def load() -> pd.Series:
        import importlib

        frame = importlib.import_module(f"arch.data.{module}").load()
        return frame[column].astype(np.float64)
    return load


def _spread() -> pd.Series:
    frame = _arch("default", "BAA")()
    return frame - _arch("default", "AAA")()


def _french(column: str) -> Callable[[], pd.Series]:
    def load() -> pd.Series:
        from arch.data import frenchdata

        frame = frenchdata.load()
        # arch reads the YYYYMM labels as nanoseconds since the epoch: recover the months from the integers.
        months = frame.index.as_unit("ns").asi8 if isinstance(frame.index, pd.DatetimeIndex) else frame.index
        dates = pd.to_datetime(pd.Series(np.asarray(months, dtype=np.int64)).astype(str), format="%Y%m")
        return pd.Series(frame[column].to_numpy(np.float64), index=pd.DatetimeIndex(dates))
    return load


_DAILY_AGE = pd.Timedelta(days=10)
_MONTHLY_AGE = pd.Timedelta(days=62)


def _next_open(after_days: int) -> Callable[[pd.DatetimeIndex], pd.DatetimeIndex]:
    return lambda dates: release_times(dates, after_days, "09:30")


def _after_month_end(months: int, after_days: int, at: str) -> Callable[[pd.DatetimeIndex], pd.DatetimeIndex]:
    return lambda dates: release_times(_month_ends(dates, months), after_days, at)


_FRENCH_PUBLISHED = ("Ken French's data library, updated about monthly: a month's factors appear some weeks "
                     "after the month ends (and the whole history is rebuilt each update)")
_FRENCH_CHOSEN = "last day of the second month after, 09:30 New York: covers a late update"
_MOODY_PUBLISHED = ("monthly average of daily yields, in the Federal Reserve's H.15 (Mondays, 16:15 New York) "
                    "within about 8 days of the month's end")
_MOODY_CHOSEN = "11 days after the month's last day, 09:30 New York: after the next H.15, holidays included"

#: The bundled series by name (see the lag table in ``docs/data.md``).
BUNDLED_EXOGENOUS: dict[str, BundledExogenous] = {
    "vix": BundledExogenous(
        _arch("vix", "vix"), _next_open(1), "log", _DAILY_AGE, False,
        "CBOE VIX close, daily 2014-2018 (arch.data.vix, FRED VIXCLS)",
        "at the Cboe close, 16:15 New York on its date: after the 16:00 stock close a decision is taken at",
        "next day 09:30 New York: seen from the next bar on"),
    "wti": BundledExogenous(
        _arch("wti", "DCOILWTICO"), _next_open(2), "log", _DAILY_AGE, False,
        "WTI crude spot price, Cushing, daily 1986-2018 (arch.data.wti, FRED DCOILWTICO)",
        "assessed from the day's trading (NYMEX settles 14:30 New York); EIA publishes the series afterwards, "
        "the file gives no time of day",
        "two days later 09:30 New York: one extra day for the unknown publication time"),
    "core_cpi": BundledExogenous(
        _arch("core_cpi", "CPILFESL"), _after_month_end(1, 0, "08:30"), "log", _MONTHLY_AGE, True,
        "US CPI less food and energy, seasonally adjusted, monthly 1957-2018 (arch.data.core_cpi, FRED CPILFESL)",
        "BLS, 08:30 New York, around the middle of the following month (the 2013 shutdown pushed September's "
        "to 30 October)",
        "last day of the following month, 08:30 New York: covers late releases"),
    "aaa": BundledExogenous(
        _arch("default", "AAA"), _after_month_end(0, 11, "09:30"), "diff", _MONTHLY_AGE, True,
        "Moody's seasoned AAA corporate bond yield, monthly 1919-2018 (arch.data.default)",
        _MOODY_PUBLISHED, _MOODY_CHOSEN),
    "baa": BundledExogenous(
        _arch("default", "BAA"), _after_month_end(0, 11, "09:30"), "diff", _MONTHLY_AGE, True,
        "Moody's seasoned BAA corporate bond yield, monthly 1919-2018 (arch.data.default)",
        _MOODY_PUBLISHED, _MOODY_CHOSEN),
    "credit_spread": BundledExogenous(
        _spread, _after_month_end(0, 11, "09:30"), "diff", _MONTHLY_AGE, True,
        "BAA - AAA yield spread (default premium), monthly 1919-2018 (arch.data.default)",
        _MOODY_PUBLISHED, _MOODY_CHOSEN),
    **{f"ff_{key}": BundledExogenous(
        _french(column), _after_month_end(2, 0, "09:30"), "diff", _MONTHLY_AGE, True,
        f"Fama-French {column} factor return (%), monthly 1926-2018 (arch.data.frenchdata)",
        _FRENCH_PUBLISHED, _FRENCH_CHOSEN)
       for key, column in (("mkt_rf", "Mkt-RF"), ("smb", "SMB"), ("hml", "HML"), ("rf", "RF"))},
}


def bundled_exogenous(name: str) -> ExogenousSeries:
    """The bundled series ``name`` with its release times. Days without an observation (NaN in the source, e.g.
    holidays) are not values: they are left out, and the previous value stays the latest."""
    if name not in BUNDLED_EXOGENOUS:
        raise ValueError(f"unknown exogenous series {name!r}; bundled: {sorted(BUNDLED_EXOGENOUS)}")
    entry = BUNDLED_EXOGENOUS[name]
    raw = entry.load().dropna()
    dates = pd.DatetimeIndex(raw.index).as_unit("ns")
    period_end = (_month_ends(dates) + pd.Timedelta(days=1)) if entry.monthly else dates + pd.Timedelta(days=1)
    return ExogenousSeries(name=name, dates=dates, values=raw.to_numpy(np.float64), released_at=entry.release(dates),
                           change=entry.change, max_age=entry.max_age, period_end=period_end,
                           description=entry.description)


def _line_error(source: str, line: int, message: str) -> DataValidationError:
    return DataValidationError(f"{source} line {line}: {message}")


def _utc_naive(text: pd.Series, source: str, column: str) -> pd.DatetimeIndex:
    """Parse a text column to naive UTC instants, naming the first line that does not parse."""
    out = []
    for i, value in enumerate(text.tolist()):
        try:
            stamp = pd.Timestamp(str(value).strip())
        except (ValueError, TypeError):
            stamp = pd.NaT
        if pd.isna(stamp) or pd.isna(value) or not str(value).strip():
            raise _line_error(source, i + 2, f"{column} {value!r} is not a date; write ISO 8601 such as 2019-01-31 "
                                             "or 2019-02-14 08:30-05:00")
        out.append(stamp.tz_convert("UTC").tz_localize(None) if stamp.tz is not None else stamp)
    return pd.DatetimeIndex(out).as_unit("ns")


def read_exogenous_csv(path: str | Path, lag: pd.Timedelta | None = None, *, name: str | None = None,
                       change: str = "diff", max_age: pd.Timedelta | None = None) -> ExogenousSeries:
    """A user's series from a CSV with columns ``date, value[, released_at]`` (line 1 the header).

    ``released_at`` (ISO 8601; naive = UTC) is when each value became public; without it ``lag`` is required and
    each value is released at ``date + lag``. ``max_age`` defaults to three times the median gap between dates.
    Every problem is a one-line :class:`~sentio_lab.data.DataValidationError` naming the file line.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise DataValidationError(f"{source}: no such exogenous CSV file")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataValidationError(f"{source}: not a readable CSV ({' '.join(str(err).split())})") from err
    columns = [c.strip().lower() for c in raw.columns]
    raw.columns = columns
    if "date" not in columns or "value" not in columns or set(columns) - {"date", "value", "released_at"}:
        raise DataValidationError(f"{source}: the header must be date,value[,released_at]; found {list(columns)}")
    if raw.empty:
        raise DataValidationError(f"{source}: no data rows under the header")
    dates = _utc_naive(raw["date"], source, "date")
    values = pd.to_numeric(raw["value"].str.strip(), errors="coerce").to_numpy(np.float64)
    for i in np.flatnonzero(~np.isfinite(values))[:1]:
        raise _line_error(source, i + 2, f"value {raw['value'].iloc[i]!r} is not a finite number; fix it or delete "
                                         "the line (a period without an observation is no line)")
    if change == "log":
        for i in np.flatnonzero(values <= 0)[:1]:
            raise _line_error(source, i + 2, f"value {values[i]} is not positive, which log changes need; use "
                                             "change='diff'")
    steps = np.diff(dates.asi8)
    for i in np.flatnonzero(steps <= 0)[:1]:
        what = "repeats" if steps[i] == 0 else "is earlier than"
        raise _line_error(source, i + 3, f"date {dates[i + 1].date()} {what} the date on line {i + 2}; one line per "
                                         "date, sorted by date (nothing is reordered silently)")
    if "released_at" in columns:
        if lag is not None:
            raise DataValidationError(f"{source}: has a released_at column and a lag was given too; drop the lag "
                                      f"(write {path.name}, not {path.name}@...)")
        released = _utc_naive(raw["released_at"], source, "released_at")
    elif lag is None:
        raise DataValidationError(f"{source}: no released_at column and no publication lag; add the column (when "
                                  f"each value became public, UTC) or give a lag such as {path.name}@1D")
    else:
        if lag <= pd.Timedelta(0):
            raise DataValidationError(f"{source}: the publication lag {lag} is not positive; a value is public only "
                                      "after its date")
        released = dates + lag
    for i in np.flatnonzero(released <= dates)[:1]:
        raise _line_error(source, i + 2, f"released_at {released[i]} is not after its date {dates[i].date()}; a value "
                                         "is public only after its period begins (a lag must be positive)")
    for i in np.flatnonzero(np.diff(released.asi8) < 0)[:1]:
        raise _line_error(source, i + 3, f"released_at {released[i + 1]} is earlier than line {i + 2}'s "
                                         f"{released[i]}; releases must follow the dates' order")
    if max_age is None:
        gap = pd.Timedelta(int(np.median(steps)), unit="ns") if len(steps) else pd.Timedelta(days=1)
        max_age = max(3 * gap, pd.Timedelta(days=1))
    return ExogenousSeries(name=name or path.stem, dates=dates, values=values, released_at=released, change=change,
                           max_age=max_age, description=f"user series from {source}", earliest_close=True)


def is_csv_spec(spec: str) -> bool:
    """Whether ``spec`` names a CSV file (``"file.csv"`` or ``"file.csv@<lag>"``) rather than a bundled series."""
    return spec.split("@", 1)[0].lower().endswith(".csv")


def load_exogenous(spec: str) -> ExogenousSeries:
    """A series by spec: a bundled name (:data:`BUNDLED_EXOGENOUS`), ``"file.csv"`` (with a ``released_at``
    column) or ``"file.csv@<lag>"`` (a pandas duration such as ``1D`` or ``36h``: released at date + lag)."""
    if not is_csv_spec(spec):
        return bundled_exogenous(spec)
    path, _, lag_text = spec.partition("@")
    lag = None
    if lag_text:
        try:
            lag = pd.Timedelta(lag_text)
        except ValueError as err:
            raise DataValidationError(f"{spec}: the lag {lag_text!r} is not a duration; write e.g. {path}@1D or "
                                      f"{path}@36h") from err
    return read_exogenous_csv(path, lag)
