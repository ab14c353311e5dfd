"""Causal multi-timeframe views: higher-timeframe OHLCV bars visible only once they are complete.

Convention
----------
* A base bar's timestamp is its **open** time and the bar covers ``[ts, ts + base_freq)``. For the
  hourly FX data that is literal; daily stock bars labelled by date are read the same way (the bar
  for 2018-03-02 covers that calendar day), so a daily bar "closes" at the next midnight.
* Each base bar belongs to the higher-timeframe (HTF) *bucket* that contains its timestamp. A bucket's
  end is known from the calendar alone (bucket start + period), so at base bar ``t`` we can decide
  without looking at ``t + 1`` whether ``t`` closes the bucket: it does when its own end
  ``ts_t + base_freq`` reaches the bucket end.
* If the data has a gap at the end of a bucket (a weekend, a holiday, a missing hour) no bar of the
  bucket reaches its end; the bucket then becomes visible at the close of the next bar that exists
  (the first bar whose end is past the bucket end). Waiting is the price of never guessing.
* A bucket that is still open at the end of the data is never shown. A bucket the data *starts* in the
  middle of (FX data opening at 22:00 inside a 20:00-24:00 bucket) is shown with the bars it has: the
  calendar cannot tell a late start from a quiet market, and it only feeds the warm-up in practice.

So at base bar ``t`` a policy sees exactly the HTF bars that are complete by ``t``'s close. Everything
here is computed from bars ``<= t``; ``tests/data/test_timeframes.py`` and ``tests/features/test_lookahead.py``
prove it by replacing the future (values *and* timestamps) and comparing bit for bit.

``base_freq`` (the duration of one base bar) must be given or inferred. Inferring it from the whole
frame would let future bars move it, so :func:`sentio_lab.features.build_observation_features`
infers it from the training range and stores it in its fitted state.

Rules are pandas offset aliases: fixed durations (``"4h"``, ``"1D"``, ``"2D"``), weeks (``"1W"`` is
pandas' ``W-SUN``, weeks Monday..Sunday; use ``"W-FRI"`` for markets closed at weekends so a week
closes with its Friday bar instead of waiting for Monday) and months (``"ME"``).

Session close
-------------
Without a session close, buckets follow the UTC calendar (naive timestamps are read as UTC): days end at
midnight UTC and fixed durations are anchored at the epoch. For FX that cuts a 2-3 hour "day" out of every
Sunday evening (the market opens at 17:00 New York = 22:00 / 21:00 UTC). With ``session_close`` (e.g.
``"17:00 America/New_York"``, see :func:`sentio_lab.data.parse_session_close`) every bucket is counted on
the *session clock* instead: the zone's wall-clock time shifted so that the close falls on midnight. A day
then runs from one 17:00 New York close to the next (22:00 or 21:00 UTC, daylight saving followed), the
Sunday evening hours open Monday's session, a ``"W-FRI"`` week ends with Friday's 17:00 close, and a
``"4h"`` bucket starts at 17:00, 21:00, 01:00, ... New York. Bucket boundaries are converted back to real
instants: a boundary that does not exist locally (spring forward) moves to the first instant after the gap,
and one that exists twice (fall back) is its first occurrence; a bucket whose bars would then not be
contiguous raises instead of guessing. The visibility rule above is unchanged: a bucket is visible at the
close of the first bar whose end reaches the bucket's (real) end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset
from pandas.tseries.offsets import MonthBegin, MonthEnd, Week

from sentio_lab.data import OHLCV_COLUMNS, SessionClose, infer_bar_freq, parse_session_close


@dataclass(frozen=True)
class TimeframeView:
    """Completed higher-timeframe bars and the base row at whose close each becomes visible."""

    rule: str
    """The pandas offset alias the view was built with."""
    bars: pd.DataFrame
    """Completed HTF bars (open high low close volume), indexed by bucket start, oldest first."""
    close_row: np.ndarray
    """int64, one per HTF bar: the base row at whose close the bar becomes visible (non-decreasing)."""
    latest: np.ndarray
    """int64, one per base row: position in ``bars`` of the latest visible HTF bar, -1 if none yet."""
    base_freq: pd.Timedelta
    """Duration of one base bar used to decide when a bucket is complete."""
    session_close: str | None = None
    """The session close the buckets were counted from (canonical text), None for the UTC calendar."""

    def align(self, values: np.ndarray) -> np.ndarray:
        """Map per-HTF-bar values ``(n_htf, ...)`` onto base rows ``(T, ...)``; NaN where none visible."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape[0] != len(self.bars):
            raise ValueError(f"align: got {values.shape[0]} rows, the {self.rule} view has {len(self.bars)}")
        out = np.full((len(self.latest),) + values.shape[1:], np.nan)
        seen = self.latest >= 0
        out[seen] = values[self.latest[seen]]
        return out

    def first_row_with(self, n_bars: int) -> int:
        """First base row at which HTF bar number ``n_bars`` (0-based) is visible; ``T`` if never."""
        if n_bars < len(self.close_row):
            return int(self.close_row[n_bars])
        return len(self.latest)


def _calendar_buckets(index: pd.DatetimeIndex, rule: str) -> tuple[pd.DatetimeIndex, pd.DatetimeIndex]:
    """Nominal start and end of the calendar bucket holding each (wall-clock) timestamp."""
    offset = to_offset(rule)
    if isinstance(offset, (Week, MonthEnd, MonthBegin)) and offset.n != 1:
        # Calendar periods of n > 1 (e.g. "2W", "2ME") would need an anchor for where each multi-period
        # bucket starts; pandas' to_period gives one-period buckets, which would then be shown n-1 periods late.
        raise ValueError(
            f"timeframe {rule!r}: weekly / monthly rules must be single periods (e.g. 'W-FRI', 'ME'); "
            f"multiples like {rule!r} are not supported"
        )
    if isinstance(offset, Week):
        periods = index.to_period(offset.freqstr)
        return pd.DatetimeIndex(periods.start_time), pd.DatetimeIndex((periods + 1).start_time)
    if isinstance(offset, (MonthEnd, MonthBegin)):
        periods = index.to_period(f"{offset.n}M")
        return pd.DatetimeIndex(periods.start_time), pd.DatetimeIndex((periods + 1).start_time)
    try:
        # Fixed durations (hours, minutes, days): floor is anchored at the epoch, e.g. 4h buckets
        # start at 00:00, 04:00, ... (UTC, or on the session clock).
        start = index.floor(offset)
    except ValueError as err:
        raise ValueError(
            f"timeframe {rule!r} is not supported: use a fixed duration ('4h', '1D'), a week ('1W', "
            f"'W-FRI') or months ('ME') ({err})"
        ) from err
    return pd.DatetimeIndex(start), pd.DatetimeIndex(start + offset)


def _session_shift(close: SessionClose) -> pd.Timedelta:
    """How far the session clock runs ahead of the zone's wall clock (the close lands on midnight)."""
    return (pd.Timedelta(days=1) - close.offset) % pd.Timedelta(days=1)


def _to_session_clock(index: pd.DatetimeIndex, close: SessionClose) -> pd.DatetimeIndex:
    """Naive session-clock times of ``index`` (naive timestamps are UTC)."""
    utc = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    return utc.tz_convert(close.tzinfo).tz_localize(None) + _session_shift(close)


def _from_session_clock(times: pd.DatetimeIndex, close: SessionClose, like: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """Real instants of session-clock times, in the time representation of ``like`` (naive = UTC)."""
    wall = times - _session_shift(close)
    # Fall back: a wall time that exists twice is taken at its first occurrence (ambiguous=True: the DST one);
    # spring forward: one that does not exist moves to the end of the gap.
    local = wall.tz_localize(close.tzinfo, ambiguous=np.ones(len(wall), dtype=bool), nonexistent="shift_forward")
    return local.tz_convert("UTC").tz_localize(None) if like.tz is None else local.tz_convert(like.tz)


def _bucket_bounds(
    index: pd.DatetimeIndex, rule: str, session_close: SessionClose | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Real start and end (int64 ns) of each timestamp's bucket, and the shortest nominal bucket length (ns)."""
    if session_close is None:
        start, end = _calendar_buckets(index, rule)
    else:
        nominal_start, nominal_end = _calendar_buckets(_to_session_clock(index, session_close), rule)
        start = _from_session_clock(nominal_start, session_close, index)
        end = _from_session_clock(nominal_end, session_close, index)
    nominal = (end - start) if session_close is None else (nominal_end - nominal_start)
    shortest = int(pd.TimedeltaIndex(nominal).as_unit("ns").asi8.min()) if len(index) else 0
    return pd.DatetimeIndex(start).as_unit("ns").asi8, pd.DatetimeIndex(end).as_unit("ns").asi8, shortest


def _buckets(
    index: pd.DatetimeIndex, rule: str, session_close: str | SessionClose | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (int64 ns) of the bucket holding each timestamp, from the calendar alone."""
    start, end, _ = _bucket_bounds(index, rule, parse_session_close(session_close))
    return start, end


def resample_causal(
    frame: pd.DataFrame,
    rule: str,
    base_freq: pd.Timedelta | str | None = None,
    *,
    session_close: str | SessionClose | None = None,
) -> TimeframeView:
    """Resample ``frame`` to ``rule`` and record when each completed HTF bar becomes visible.

    ``base_freq`` is the duration of one base bar; when omitted it is inferred from the whole frame
    (median gap), which lets bars after ``t`` influence it -- pass it explicitly for strict causality.
    ``session_close`` ("HH:MM Area/City") counts buckets on the session clock (see the module docstring);
    None uses the UTC calendar.
    """
    close = parse_session_close(session_close)
    missing = [c for c in OHLCV_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"resample_causal: frame lacks column(s) {missing}")
    index = frame.index
    if not isinstance(index, pd.DatetimeIndex) or not index.is_monotonic_increasing or not index.is_unique:
        raise ValueError("resample_causal: frame needs a sorted, unique DatetimeIndex")
    if len(frame) == 0:
        raise ValueError("resample_causal: empty frame")
    base = pd.Timedelta(base_freq) if base_freq is not None else infer_bar_freq(frame)
    if base <= pd.Timedelta(0):
        raise ValueError(f"resample_causal: base bar duration must be positive, got {base}")
    ts = index.as_unit("ns").asi8
    start, end, shortest = _bucket_bounds(index, rule, close)
    if shortest <= base.value:
        raise ValueError(f"timeframe {rule!r} is not coarser than the base bar duration {base}")
    # Bucket ends must not go back in time from one bar to the next (they cannot on the UTC calendar; on a
    # session clock they could only around a repeated local hour with sub-hour bucket boundaries).
    back = np.flatnonzero(np.diff(end) < 0)
    if len(back):
        i = int(back[0]) + 1
        raise ValueError(
            f"timeframe {rule!r} with session close {close}: bar {index[i]} falls in a bucket ending before "
            f"the bucket of the bar before it ({index[i - 1]}); a local hour repeats there (daylight saving). "
            "Use a rule whose boundaries are whole hours"
        )

    # Consecutive rows sharing a bucket start form one HTF bar (the index is sorted, so buckets are
    # contiguous runs).
    first = np.flatnonzero(np.concatenate([[True], start[1:] != start[:-1]]))
    last = np.concatenate([first[1:], [len(ts)]]) - 1
    bucket_end = end[first]
    # The bar that closes a bucket is the first one whose own end reaches the bucket end; it is either
    # the bucket's last bar or, after a gap, the first bar of a later bucket. Only bars <= it decide.
    bar_end = ts + base.value
    close_row = np.searchsorted(bar_end, bucket_end, side="left").astype(np.int64)
    complete = close_row < len(ts)
    late = complete & (last > close_row)
    if late.any():
        b = int(np.flatnonzero(late)[0])
        raise ValueError(
            f"timeframe {rule!r}: bar {index[last[b]]} falls in the bucket starting "
            f"{pd.Timestamp(start[first[b]])} although bar {index[close_row[b]]} already closed it; "
            "base bars "
            f"overlap (gaps shorter than base_freq={base}); pass the true base bar duration"
        )
    first, last, close_row = first[complete], last[complete], close_row[complete]

    values = frame[list(OHLCV_COLUMNS)].to_numpy(dtype=np.float64)
    htf = np.empty((len(first), len(OHLCV_COLUMNS)))
    if len(first):
        # Complete buckets are a prefix (bucket ends increase); cut the rows there so no reduction
        # ever touches the still-open bucket after them.
        done = values[: last[-1] + 1]
        htf[:, 0] = done[first, 0]
        htf[:, 1] = np.maximum.reduceat(done[:, 1], first)
        htf[:, 2] = np.minimum.reduceat(done[:, 2], first)
        htf[:, 3] = done[last, 3]
        htf[:, 4] = np.add.reduceat(done[:, 4], first)
    bars = pd.DataFrame(
        htf,
        index=pd.DatetimeIndex(start[first]).as_unit(index.unit).rename("timestamp"),
        columns=OHLCV_COLUMNS,
    )
    latest = np.searchsorted(close_row, np.arange(len(ts)), side="right").astype(np.int64) - 1
    return TimeframeView(rule=rule, bars=bars, close_row=close_row, latest=latest, base_freq=base,
                         session_close=None if close is None else str(close))
