"""The data-quality report of a canonical frame (:class:`DataQuality`) and the stale-open rule it implements.

Stale opens
-----------
The environments fill an order chosen at the close of bar t at the **open of bar t+1**. Some feeds carry no
real opening price and copy the previous close instead; on such a bar the fill happens at the very close the
agent has just seen (same-bar execution, which the timing convention forbids). :func:`sentio_lab.data.load_market`
finds those feeds with this rule, exactly as implemented in :func:`data_quality`:

* A bar *has a previous bar* unless it is the first bar of the (selected) frame; only such bars are compared.
* A *session open* is a bar that starts a trading session. When the bar spacing (median gap between bars,
  ``bar_freq``) is one day or longer, every bar is a session open. For intraday bars, a session open is a bar
  that follows a gap longer than ``SESSION_GAP_FACTOR`` (1.5) times ``bar_freq`` (overnight, weekend or
  holiday). Inside a continuous session (FX hours, crypto) an open equal to the previous close is normal and
  never counts; a market without gaps has no session opens and cannot fail the rule.
* A session open is *stale* when its open equals the previous bar's close exactly (float equality, no
  tolerance: the artifact is a copied value, and a tolerance would also catch genuine one-tick moves).
* Windows of ``STALE_WINDOW`` (63, about a quarter of daily sessions) consecutive session opens slide one
  session open at a time; a window is *flagged* when its share of stale session opens exceeds
  ``STALE_THRESHOLD`` (10 %, i.e. at least 7 of 63). With fewer than 63 session opens the single window is
  all of them. Measured on the bundled data (the largest share in any 63-session window): nasdaq 1999-2018
  3.2 %, sp500 2008-2010 4.8 %, sp500 2014-2018 1.6 %, eurusd_1h weekly opens 0 %, while the artifact
  reaches 95-100 % (sp500 1999-2006) and 46-91 % (sp500 2012-2013). 10 % is twice the largest real value
  and a fifth of the smallest artifact peak; for a clean market with a 2 % rate, 7 or more of 63 has odds
  below 1e-3.
* A *stale stretch* is a maximal run of session opens covered by flagged windows, trimmed to its first and
  last stale session open. It is reported as (first timestamp, last timestamp, share of stale session opens
  between them). Starting the data at any session after a stretch's last timestamp removes it: every window
  that could flag the rest of the data lies inside the rest, so it would belong to a later stretch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sentio_lab.data.validation import OHLCV_COLUMNS, _nanoseconds, infer_bar_freq

#: Intraday bars after a gap longer than this many bar spacings start a session.
SESSION_GAP_FACTOR = 1.5
#: Session opens per rolling window of the stale-open rule (about one quarter of trading days).
STALE_WINDOW = 63
#: A window whose share of stale session opens exceeds this is flagged (see the module docstring).
STALE_THRESHOLD = 0.10


def _iso(stamp: pd.Timestamp | None) -> str | None:
    """A timestamp as ISO text (JSON-safe), None kept."""
    return None if stamp is None else pd.Timestamp(stamp).isoformat()


def _pct(share: float) -> str:
    """A share as a percentage with one decimal ("n/a" when undefined)."""
    return "n/a" if np.isnan(share) else f"{100 * share:.1f}%"


def _share(count: int, total: int) -> float:
    """count / total, NaN when total is 0."""
    return count / total if total else float("nan")


@dataclass(frozen=True)
class StaleStretch:
    """A stretch of stale session opens (see the module docstring): first and last stale session open."""

    first: pd.Timestamp
    last: pd.Timestamp
    session_opens: int
    """Session opens from ``first`` to ``last`` inclusive."""
    stale: int
    """Stale session opens among them."""

    @property
    def share(self) -> float:
        """Share of stale session opens from ``first`` to ``last``."""
        return self.stale / self.session_opens

    def describe(self) -> str:
        """``2013-01-02 .. 2013-05-09 (66 of 88 session opens stale, 75.0%)``."""
        return (f"{_day_or_time(self.first)} .. {_day_or_time(self.last)} "
                f"({self.stale} of {self.session_opens} session opens stale, {_pct(self.share)})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields."""
        return {"first": _iso(self.first), "last": _iso(self.last), "session_opens": self.session_opens,
                "stale": self.stale, "share": float(self.share)}


def _day_or_time(stamp: pd.Timestamp) -> str:
    """``2013-05-09`` for midnight stamps, the full timestamp otherwise."""
    stamp = pd.Timestamp(stamp)
    return stamp.date().isoformat() if stamp == stamp.normalize() else str(stamp)


@dataclass(frozen=True)
class YearQuality:
    """Per-calendar-year figures of a :class:`DataQuality` report."""

    year: int
    bars: int
    compared: int
    """Bars with a previous bar in the frame."""
    open_eq_prev_close: int
    session_opens: int
    stale_session_opens: int

    @property
    def open_eq_prev_close_share(self) -> float:
        """Share of compared bars whose open equals the previous close."""
        return _share(self.open_eq_prev_close, self.compared)

    @property
    def stale_share(self) -> float:
        """Share of session opens that are stale."""
        return _share(self.stale_session_opens, self.session_opens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields, shares included (None where undefined)."""
        out = dataclasses.asdict(self)
        out["open_eq_prev_close_share"] = _json_float(self.open_eq_prev_close_share)
        out["stale_share"] = _json_float(self.stale_share)
        return out


def _json_float(value: float) -> float | None:
    """A python float, or None for NaN (JSON has no NaN)."""
    return None if np.isnan(value) else float(value)


@dataclass(frozen=True)
class DataQuality:
    """What a run must know about its data before trusting fills at the next open (see the module docstring).

    Counts are over the frame as loaded (after any ``start`` / ``end`` selection). A bar is *compared* when it
    has a previous bar in the frame. A *run of unchanged closes* is a maximal block of consecutive bars with the
    same close (a bar whose close differs from both neighbours is a run of 1).
    """

    bars: int
    first_timestamp: pd.Timestamp | None
    last_timestamp: pd.Timestamp | None
    bar_freq: pd.Timedelta
    session_rule: str
    """How session opens were identified for this bar spacing."""
    compared: int
    open_eq_prev_close: int
    """Compared bars whose open equals the previous close (any bar, session open or not)."""
    session_opens: int
    stale_session_opens: int
    zero_volume_bars: int
    flat_bars: int
    """Bars with high == low."""
    longest_unchanged_close_run: int
    unchanged_close_runs_3plus: int
    """Runs of unchanged closes at least 3 bars long."""
    stale_stretches: tuple[StaleStretch, ...]
    per_year: tuple[YearQuality, ...]
    stale_window: int = STALE_WINDOW
    stale_threshold: float = STALE_THRESHOLD
    source: str = ""
    start: str | None = None
    """Start of the selected range as requested (or the dataset's default start), None for all."""
    end: str | None = None
    default_start_used: bool = False
    """True when ``start`` is a bundled dataset's default, not the caller's choice."""
    stale_opens_policy: str | None = None
    """"refuse" or "allow" when loaded by :func:`load_market`; None when not checked."""
    notes: tuple[str, ...] = ()

    @property
    def open_eq_prev_close_share(self) -> float:
        """Share of compared bars whose open equals the previous close."""
        return _share(self.open_eq_prev_close, self.compared)

    @property
    def stale_share(self) -> float:
        """Share of session opens that are stale."""
        return _share(self.stale_session_opens, self.session_opens)

    @property
    def accepted_stale_stretches(self) -> bool:
        """True when stale stretches were loaded knowingly (``stale_opens="allow"``)."""
        return bool(self.stale_stretches) and self.stale_opens_policy == "allow"

    def to_dict(self) -> dict[str, Any]:
        """Plain python types only (str, int, float, bool, None, list, dict): JSON and ``weights_only`` safe."""
        return {
            "source": self.source,
            "bars": self.bars,
            "first_timestamp": _iso(self.first_timestamp),
            "last_timestamp": _iso(self.last_timestamp),
            "bar_freq": str(self.bar_freq),
            "session_rule": self.session_rule,
            "compared": self.compared,
            "open_eq_prev_close": self.open_eq_prev_close,
            "open_eq_prev_close_share": _json_float(self.open_eq_prev_close_share),
            "session_opens": self.session_opens,
            "stale_session_opens": self.stale_session_opens,
            "stale_share": _json_float(self.stale_share),
            "zero_volume_bars": self.zero_volume_bars,
            "flat_bars": self.flat_bars,
            "longest_unchanged_close_run": self.longest_unchanged_close_run,
            "unchanged_close_runs_3plus": self.unchanged_close_runs_3plus,
            "stale_window": self.stale_window,
            "stale_threshold": float(self.stale_threshold),
            "stale_stretches": [s.to_dict() for s in self.stale_stretches],
            "per_year": [y.to_dict() for y in self.per_year],
            "start": self.start,
            "end": self.end,
            "default_start_used": self.default_start_used,
            "stale_opens_policy": self.stale_opens_policy,
            "notes": list(self.notes),
        }

    def _range_text(self) -> str:
        if self.first_timestamp is None:
            return "no bars"
        return f"{self.bars:,} bars {_day_or_time(self.first_timestamp)} .. {_day_or_time(self.last_timestamp)}"

    def _stretch_text(self) -> str:
        rule = f"share > {_pct(self.stale_threshold)} of {self.stale_window} session opens"
        if not self.stale_stretches:
            return f"stale-open stretches ({rule}): none"
        listed = "; ".join(s.describe() for s in self.stale_stretches)
        return f"stale-open stretches ({rule}): {len(self.stale_stretches)}: {listed}"

    def __str__(self) -> str:
        """A few lines to print at the start of a run."""
        lines = [f"data quality{' of ' + self.source if self.source else ''}: {self._range_text()} "
                 f"(bar {self.bar_freq})"]
        lines += [f"  {note}" for note in self.notes]
        lines.append(
            f"  open == previous close: {self.open_eq_prev_close:,} of {self.compared:,} bars "
            f"({_pct(self.open_eq_prev_close_share)}); stale session opens: {self.stale_session_opens:,} of "
            f"{self.session_opens:,} ({_pct(self.stale_share)}; session opens: {self.session_rule})"
        )
        lines.append(f"  {self._stretch_text()}")
        lines.append(
            f"  zero-volume bars {self.zero_volume_bars:,}; flat bars (high == low) {self.flat_bars:,}; "
            f"unchanged-close runs >= 3 bars {self.unchanged_close_runs_3plus:,} "
            f"(longest {self.longest_unchanged_close_run})"
        )
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The report as markdown: a figures table, the stale stretches and a per-year table."""
        rows = [
            ("source", self.source or "-"),
            ("range", self._range_text()),
            ("bar spacing", str(self.bar_freq)),
            ("start", (self.start or "-") + (" (dataset default)" if self.default_start_used else "")),
            ("end", self.end or "-"),
            ("open == previous close", f"{self.open_eq_prev_close:,} of {self.compared:,} "
                                       f"({_pct(self.open_eq_prev_close_share)})"),
            ("session opens", f"{self.session_opens:,} ({self.session_rule})"),
            ("stale session opens", f"{self.stale_session_opens:,} ({_pct(self.stale_share)})"),
            ("stale-open stretches", str(len(self.stale_stretches))),
            ("stale_opens policy", self.stale_opens_policy or "not checked"),
            ("zero-volume bars", f"{self.zero_volume_bars:,}"),
            ("flat bars (high == low)", f"{self.flat_bars:,}"),
            ("unchanged-close runs >= 3 bars", f"{self.unchanged_close_runs_3plus:,}"),
            ("longest unchanged-close run", f"{self.longest_unchanged_close_run} bars"),
        ]
        out = ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
        if self.notes:
            out += [""] + [f"- {note}" for note in self.notes]
        out += ["", f"Stale-open stretches (window {self.stale_window} session opens, share > "
                    f"{_pct(self.stale_threshold)}):", ""]
        if self.stale_stretches:
            out += ["| first | last | session opens | stale | share |", "|---|---|---:|---:|---:|"]
            out += [f"| {_day_or_time(s.first)} | {_day_or_time(s.last)} | {s.session_opens:,} | {s.stale:,} | "
                    f"{_pct(s.share)} |" for s in self.stale_stretches]
        else:
            out.append("none")
        out += ["", "| year | bars | open == prev close | session opens | stale session opens |",
                "|---:|---:|---:|---:|---:|"]
        out += [f"| {y.year} | {y.bars:,} | {_pct(y.open_eq_prev_close_share)} | {y.session_opens:,} | "
                f"{_pct(y.stale_share)} |" for y in self.per_year]
        return "\n".join(out)


def session_open_mask(index: pd.DatetimeIndex, bar_freq: pd.Timedelta) -> tuple[np.ndarray, str]:
    """Which bars are session opens (see the module docstring), and the rule used, in words.

    The first bar is never a session open here: it has no previous bar to compare with.
    """
    n = len(index)
    mask = np.zeros(n, dtype=bool)
    if n < 2 or bar_freq <= pd.Timedelta(0):
        return mask, "none (fewer than two bars)"
    if bar_freq >= pd.Timedelta(days=1):
        mask[1:] = True
        return mask, "every bar (bars of one day or longer)"
    gaps = np.diff(_nanoseconds(index))
    mask[1:] = gaps > SESSION_GAP_FACTOR * bar_freq.value
    return mask, f"first bar after a gap > {SESSION_GAP_FACTOR} x {bar_freq}"


def _runs_of_equal(values: np.ndarray) -> np.ndarray:
    """Lengths of the maximal blocks of consecutive equal values."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.flatnonzero(values[1:] != values[:-1]) + 1
    edges = np.r_[0, breaks, len(values)]
    return np.diff(edges)


def find_stale_stretches(
    index: pd.DatetimeIndex, stale: np.ndarray, session_open: np.ndarray, *,
    window: int = STALE_WINDOW, threshold: float = STALE_THRESHOLD,
) -> tuple[StaleStretch, ...]:
    """Stale stretches from per-bar flags (see the module docstring); ``stale`` implies ``session_open``."""
    if window < 1 or not 0 <= threshold < 1:
        raise ValueError(f"window={window} must be >= 1 and threshold={threshold} in [0, 1)")
    where = np.flatnonzero(session_open)
    m = len(where)
    if m == 0:
        return ()
    x = stale[where].astype(np.int64)
    w = min(window, m)
    counts = np.convolve(x, np.ones(w, dtype=np.int64), mode="valid")  # counts[k]: window x[k : k + w]
    flagged = counts / w > threshold
    # covered[i]: session open i lies in a flagged window (difference array over the windows' spans).
    delta = np.zeros(m + 1, dtype=np.int64)
    starts = np.flatnonzero(flagged)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + w, -1)
    covered = np.cumsum(delta[:-1]) > 0
    stretches = []
    edges = np.flatnonzero(np.diff(np.r_[0, covered.astype(np.int8), 0]))
    for lo, hi in zip(edges[::2], edges[1::2], strict=True):  # covered[lo:hi] is one block
        stale_pos = lo + np.flatnonzero(x[lo:hi])
        first, last = int(stale_pos[0]), int(stale_pos[-1])
        stretches.append(StaleStretch(first=index[where[first]], last=index[where[last]],
                                      session_opens=last - first + 1, stale=int(x[first : last + 1].sum())))
    return tuple(stretches)


def data_quality(
    frame: pd.DataFrame, bar_freq: pd.Timedelta | None = None, *, source: str = "",
    window: int = STALE_WINDOW, threshold: float = STALE_THRESHOLD,
) -> DataQuality:
    """The :class:`DataQuality` report of a canonical frame (``bar_freq`` inferred when not given)."""
    bar_freq = infer_bar_freq(frame) if bar_freq is None else pd.Timedelta(bar_freq)
    index = frame.index
    n = len(frame)
    open_, high, low, close, volume = (frame[c].to_numpy() for c in OHLCV_COLUMNS)
    eq_prev = np.zeros(n, dtype=bool)
    eq_prev[1:] = open_[1:] == close[:-1]
    session_open, session_rule = session_open_mask(index, bar_freq)
    stale = eq_prev & session_open
    compared = np.zeros(n, dtype=bool)
    compared[1:] = True
    runs = _runs_of_equal(close)
    years = np.asarray(index.year)
    per_year = []
    for year in np.unique(years):
        sel = years == year
        per_year.append(YearQuality(
            year=int(year), bars=int(sel.sum()), compared=int(compared[sel].sum()),
            open_eq_prev_close=int(eq_prev[sel].sum()), session_opens=int(session_open[sel].sum()),
            stale_session_opens=int(stale[sel].sum()),
        ))
    return DataQuality(
        bars=n,
        first_timestamp=index[0] if n else None,
        last_timestamp=index[-1] if n else None,
        bar_freq=bar_freq,
        session_rule=session_rule,
        compared=max(n - 1, 0),
        open_eq_prev_close=int(eq_prev.sum()),
        session_opens=int(session_open.sum()),
        stale_session_opens=int(stale.sum()),
        zero_volume_bars=int((volume == 0).sum()),
        flat_bars=int((high == low).sum()),
        longest_unchanged_close_run=int(runs.max()) if len(runs) else 0,
        unchanged_close_runs_3plus=int((runs >= 3).sum()),
        stale_stretches=find_stale_stretches(index, stale, session_open, window=window, threshold=threshold),
        per_year=tuple(per_year),
        stale_window=window,
        stale_threshold=threshold,
        source=source,
    )
