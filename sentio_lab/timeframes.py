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
here is computed from bars ``<= t``; ``tests/test_timeframes.py`` and ``tests/test_lookahead.py``
prove it by replacing the future (values *and* timestamps) and comparing bit for bit.

``base_freq`` (the duration of one base bar) must be given or inferred. Inferring it from the whole
frame would let future bars move it, so :func:`sentio_lab.features.build_observation_features`
infers it from the training range and stores it in its fitted state.

Rules are pandas offset aliases: fixed durations (``"4h"``, ``"1D"``, ``"2D"``), weeks (``"1W"`` is
pandas' ``W-SUN``, weeks Monday..Sunday; use ``"W-FRI"`` for markets closed at weekends so a week
closes with its Friday bar instead of waiting for Monday) and months (``"ME"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset
from pandas.tseries.offsets import MonthBegin, MonthEnd, Week

from sentio_lab.data import OHLCV_COLUMNS, infer_bar_freq


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


def _buckets(index: pd.DatetimeIndex, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (int64 ns) of the bucket holding each timestamp, from the calendar alone."""
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
        start, end = periods.start_time, (periods + 1).start_time
    elif isinstance(offset, (MonthEnd, MonthBegin)):
        periods = index.to_period(f"{offset.n}M")
        start, end = periods.start_time, (periods + 1).start_time
    else:
        try:
            # Fixed durations (hours, minutes, days): floor is anchored at the epoch, e.g. 4h buckets
            # start at 00:00, 04:00, ... UTC.
            start = index.floor(offset)
        except ValueError as err:
            raise ValueError(
                f"timeframe {rule!r} is not supported: use a fixed duration ('4h', '1D'), a week ('1W', "
                f"'W-FRI') or months ('ME') ({err})"
            ) from err
        end = start + offset
    return pd.DatetimeIndex(start).as_unit("ns").asi8, pd.DatetimeIndex(end).as_unit("ns").asi8


def resample_causal(
    frame: pd.DataFrame, rule: str, base_freq: pd.Timedelta | str | None = None
) -> TimeframeView:
    """Resample ``frame`` to ``rule`` and record when each completed HTF bar becomes visible.

    ``base_freq`` is the duration of one base bar; when omitted it is inferred from the whole frame
    (median gap), which lets bars after ``t`` influence it -- pass it explicitly for strict causality.
    """
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
    start, end = _buckets(index, rule)
    if np.min(end - start) <= base.value:
        raise ValueError(f"timeframe {rule!r} is not coarser than the base bar duration {base}")

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
    return TimeframeView(rule=rule, bars=bars, close_row=close_row, latest=latest, base_freq=base)
