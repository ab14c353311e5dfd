"""Market data: load OHLCV from bundled datasets or user files, validate it, report its quality, split it.

Every loader returns a :class:`MarketData` holding one *canonical frame*: a sorted, unique
``DatetimeIndex`` and float64 columns ``open high low close volume``. Bad input raises
:class:`DataValidationError` naming the problem and the offending rows; nothing is dropped or filled.
Every market also carries a :class:`DataQuality` report (``market.quality``; print it at the start of a run).

Stale opens
-----------
The environments fill an order chosen at the close of bar t at the **open of bar t+1**. Some feeds carry no
real opening price and copy the previous close instead; on such a bar the fill happens at the very close the
agent has just seen (same-bar execution, which the timing convention forbids). :func:`load_market` finds
those feeds with this rule, exactly as implemented in :func:`data_quality`:

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

``load_market(..., stale_opens="refuse")`` (the default) raises :class:`DataValidationError` when the
selected range still holds a stale stretch, naming the stretches and the first date after the last one;
``stale_opens="allow"`` loads it, warns, and the quality report records the choice. Bundled datasets have a
default start that the rule accepts (``sp500`` starts on 2013-05-10, the first session after its last
stretch); ``start`` / ``end`` select an inclusive range before the check.

Session close
-------------
A market may say when its trading day ends (:attr:`MarketData.session_close`, "HH:MM Area/City", parsed by
:func:`parse_session_close`). ``eurusd_1h`` ends its days at 17:00 New York, the FX convention; the other
bundled datasets and user files have none (UTC days). :func:`sentio_lab.market.prepare_market` hands it to the
features, whose daily / weekly / monthly views then run from one close to the next (:mod:`sentio_lab.timeframes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd

OHLCV_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
#: Column names (case-insensitive, spaces stripped) that :func:`read_ohlcv_file` takes as the timestamps.
TIMESTAMP_COLUMNS: tuple[str, ...] = ("date", "datetime", "time", "timestamp", "gmt time")
#: Fewer rows than this cannot hold a train, validation and test range worth the name.
DEFAULT_MIN_ROWS = 50
#: How many offending rows an error message lists before it says "and N more".
_MAX_ROWS_SHOWN = 5
#: Intraday bars after a gap longer than this many bar spacings start a session.
SESSION_GAP_FACTOR = 1.5
#: Session opens per rolling window of the stale-open rule (about one quarter of trading days).
STALE_WINDOW = 63
#: A window whose share of stale session opens exceeds this is flagged (see the module docstring).
STALE_THRESHOLD = 0.10
StaleOpensPolicy = Literal["refuse", "allow"]
STALE_OPENS_POLICIES: tuple[str, ...] = ("refuse", "allow")


class DataValidationError(ValueError):
    """Raised when OHLCV input is malformed; the message names the problem, the source and the rows."""


# --------------------------------------------------------------------------------------- session close
_SESSION_CLOSE_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s+(\S+)\s*$")


@dataclass(frozen=True)
class SessionClose:
    """When a trading day ends: a wall-clock time in an IANA time zone (``str()`` gives "HH:MM Area/City").

    Daily (and weekly, monthly) higher-timeframe bars of :mod:`sentio_lab.timeframes` run from one session
    close to the next, following the zone's daylight-saving rules; e.g. FX's "17:00 America/New_York" is
    22:00 UTC in winter and 21:00 UTC in summer.
    """

    hour: int
    minute: int
    zone: str

    def __str__(self) -> str:
        """The canonical text form, e.g. ``17:00 America/New_York``."""
        return f"{self.hour:02d}:{self.minute:02d} {self.zone}"

    @property
    def tzinfo(self) -> ZoneInfo:
        """The time zone."""
        return ZoneInfo(self.zone)

    @property
    def offset(self) -> pd.Timedelta:
        """Time of day of the close, as a duration after local midnight."""
        return pd.Timedelta(hours=self.hour, minutes=self.minute)


def parse_session_close(value: str | SessionClose | None) -> SessionClose | None:
    """Parse ``"HH:MM Area/City"`` (e.g. ``"17:00 America/New_York"``, ``"00:00 UTC"``); None stays None.

    Raises :class:`ValueError` naming the value when the time or the zone is not valid.
    """
    if value is None or isinstance(value, SessionClose):
        return value
    if not isinstance(value, str):
        raise ValueError(f"session_close must be a string like '17:00 America/New_York', got {value!r}")
    match = _SESSION_CLOSE_RE.match(value)
    if match is None:
        raise ValueError(f"session_close {value!r}: expected 'HH:MM Area/City', e.g. '17:00 America/New_York'")
    hour, minute, zone = int(match.group(1)), int(match.group(2)), match.group(3)
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        raise ValueError(f"session_close {value!r}: {hour:02d}:{minute:02d} is not a time of day (00:00 .. 23:59)")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(f"session_close {value!r}: unknown time zone {zone!r} (use an IANA name such as "
                         "'America/New_York' or 'UTC')") from err
    return SessionClose(hour, minute, zone)


def canonical_session_close(value: str | SessionClose | None) -> str | None:
    """The canonical text of a session close (validated), None for None."""
    parsed = parse_session_close(value)
    return None if parsed is None else str(parsed)


# --------------------------------------------------------------------------------------------- quality
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


@dataclass(frozen=True)
class MarketData:
    """A validated market: the canonical OHLCV frame plus what a run must record about it."""

    frame: pd.DataFrame
    """Sorted unique DatetimeIndex; float64 columns open, high, low, close, volume."""
    name: str
    """Dataset name or file path the data came from."""
    bar_freq: pd.Timedelta
    """Inferred bar spacing (median gap between consecutive bars)."""
    fingerprint: str
    """Hash of index and values; two runs on the same data share it."""
    quality: DataQuality | None = None
    """Data-quality report (always set by :func:`to_market` and :func:`load_market`)."""
    session_close: str | None = None
    """When a trading day ends ("HH:MM Area/City", e.g. "17:00 America/New_York" for FX), None for UTC days.
    :func:`sentio_lab.market.prepare_market` hands it to the features (``FeatureConfig.session_close``), where
    daily / weekly / monthly views run from one session close to the next."""

    def __len__(self) -> int:
        """Number of bars."""
        return len(self.frame)


@dataclass(frozen=True)
class Split:
    """A contiguous, chronological range of bars ``[start, stop)`` given as integer positions."""

    name: str
    start: int
    stop: int
    first_timestamp: pd.Timestamp
    last_timestamp: pd.Timestamp

    def __len__(self) -> int:
        """Number of bars in the range."""
        return self.stop - self.start


# --------------------------------------------------------------------------------------------- loading
def _load_sp500() -> pd.DataFrame:
    from arch.data import sp500

    return sp500.load()


def _load_nasdaq() -> pd.DataFrame:
    from arch.data import nasdaq

    return nasdaq.load()


def _load_eurusd_1h() -> pd.DataFrame:
    from gym_anytrading.datasets import FOREX_EURUSD_1H_ASK

    raw = FOREX_EURUSD_1H_ASK.copy()
    # gym-anytrading keeps the timestamp as text, day first.
    raw.index = pd.to_datetime(raw.index, format="%d.%m.%Y %H:%M:%S.%f")
    return raw


@dataclass(frozen=True)
class BundledDataset:
    """A dataset shipped inside a PyPI package (no network), with what :func:`load_market` needs to know.

    Calling the entry returns its raw frame, as the bare loaders did.
    """

    loader: Callable[[], pd.DataFrame]
    default_start: str | None = None
    """First bar used when the caller gives no ``start`` (None: the first bar of the file)."""
    session_close: str | None = None
    """When a trading day ends ("HH:MM Area/City"); copied to :attr:`MarketData.session_close`."""
    note: str = ""

    def __call__(self) -> pd.DataFrame:
        """The raw frame, before validation and range selection."""
        return self.loader()


#: The first session after sp500's last stale-open stretch (2013-01-02 .. 2013-05-09); see the module docstring.
SP500_DEFAULT_START = "2013-05-10"

#: Real datasets shipped inside PyPI packages (no network needed). ``sp500`` is the embedded default.
BUNDLED_DATASETS: dict[str, BundledDataset] = {
    "sp500": BundledDataset(
        _load_sp500, default_start=SP500_DEFAULT_START,
        note="S&P 500 daily 1999-2018 (arch); opens copy the previous close on 95-98% of days up to 2005 and on "
             "about 25% in 2012-2013, so it starts on 2013-05-10 by default",
    ),
    "nasdaq": BundledDataset(_load_nasdaq, note="NASDAQ Composite daily 1999-2018 (arch); real opens"),
    "eurusd_1h": BundledDataset(
        _load_eurusd_1h, session_close="17:00 America/New_York",
        note="EUR/USD hourly ask 2017 (gym-anytrading), GMT timestamps; continuous market, weekly session opens",
    ),
}
DEFAULT_DATASET = "sp500"


def select_range(
    frame: pd.DataFrame, start: str | pd.Timestamp | None = None, end: str | pd.Timestamp | None = None,
    *, source: str = "input",
) -> pd.DataFrame:
    """Bars from ``start`` to ``end``, both inclusive, with pandas' label-slicing rules.

    Strings follow pandas' partial-date semantics: ``end="2017-06"`` or ``end="2017-06-30"`` keep every bar of
    that month / day, ``start="2013"`` starts with the first bar of 2013. None leaves that side open.
    """
    if start is None and end is None:
        return frame
    try:
        lo, hi = (None if v is None else pd.Timestamp(v) for v in (start, end))
        selected = frame.loc[start:end]
    except (TypeError, ValueError, KeyError) as err:
        raise DataValidationError(f"{source}: cannot select start={start!s} end={end!s} ({err})") from err
    # Compared only when nothing was selected: end="2017-06" covers June, so start="2017-06-15" is not after it.
    if selected.empty and lo is not None and hi is not None and lo > hi:
        raise DataValidationError(f"{source}: start={start!s} is after end={end!s}")
    return selected


def load_market(
    source: str | Path = DEFAULT_DATASET,
    *,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    stale_opens: StaleOpensPolicy = "refuse",
    min_rows: int = DEFAULT_MIN_ROWS,
) -> MarketData:
    """Load a bundled dataset by name (see ``BUNDLED_DATASETS``) or a user CSV / Parquet file by path.

    ``start`` / ``end`` select an inclusive range (see :func:`select_range`) before the stale-open check; a
    bundled dataset without ``start`` begins at its ``default_start``. With ``stale_opens="refuse"`` a range
    that holds a stale-open stretch raises :class:`DataValidationError`; ``"allow"`` loads it with a warning
    (same-bar fills, knowingly) and records that in ``market.quality``.
    """
    if stale_opens not in STALE_OPENS_POLICIES:
        raise ValueError(f"stale_opens={stale_opens!r}; choose from {list(STALE_OPENS_POLICIES)}")
    notes: list[str] = []
    session_close = None
    default_used = False
    if isinstance(source, str) and source in BUNDLED_DATASETS:
        entry = BUNDLED_DATASETS[source]
        name, raw, session_close = source, entry(), entry.session_close
        if start is None and entry.default_start is not None:
            if end is not None and _before(end, entry.default_start):
                raise DataValidationError(
                    f"{name}: end={end!s} is before the dataset's default start {entry.default_start} (the first "
                    f"session after its stale-open stretches); pass start=... as well, and stale_opens='allow' "
                    "to load the stale range knowingly"
                )
            start, default_used = entry.default_start, True
            notes.append(f"start {start} is the default start of {name} (the first session after its last "
                         "stale-open stretch); pass start=... to choose another")
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"{source!s}: neither a bundled dataset ({', '.join(BUNDLED_DATASETS)}) nor an existing file"
            )
        name, raw = str(path), read_ohlcv_file(path)
    full = canonicalize(raw, source=name, min_rows=min_rows)
    frame = select_range(full, start, end, source=name)
    if len(frame) < min_rows:
        raise DataValidationError(
            f"{name}: too few rows ({len(frame)}) from start={start!s} to end={end!s} (data cover "
            f"{full.index[0]} .. {full.index[-1]}); at least {min_rows} are needed"
        )
    market = to_market(frame, name=name, min_rows=min_rows, session_close=session_close)
    quality = market.quality
    assert quality is not None
    if quality.stale_stretches:
        if stale_opens == "refuse":
            raise DataValidationError(_stale_message(name, frame, quality, default_used))
        listed = "; ".join(s.describe() for s in quality.stale_stretches)
        message = (f"{name}: stale_opens='allow': loading {len(quality.stale_stretches)} stale-open stretch(es) "
                   f"({listed}); on those bars the env fills at the close the agent has just seen (same-bar "
                   "execution)")
        warnings.warn(message, UserWarning, stacklevel=2)
        notes.append("stale_opens='allow': stale-open stretches accepted knowingly (same-bar fills on them)")
    quality = dataclasses.replace(
        quality, start=None if start is None else str(start), end=None if end is None else str(end),
        default_start_used=default_used, stale_opens_policy=stale_opens, notes=tuple(notes),
    )
    return dataclasses.replace(market, quality=quality)


def _before(end: str | pd.Timestamp, start: str) -> bool:
    """True when the range ``start .. end`` selects nothing because ``end`` ends before ``start`` begins."""
    try:
        # A partial date such as end="2013-05" covers the whole month: compare with the start's month.
        return bool(pd.Series(0, index=pd.DatetimeIndex([pd.Timestamp(start)])).loc[:end].empty)
    except (TypeError, ValueError):
        return False  # select_range reports an unparseable end


def _stale_message(name: str, frame: pd.DataFrame, quality: DataQuality, default_used: bool) -> str:
    """The refusal: which stretches, why it matters, and the two ways out."""
    last = quality.stale_stretches[-1].last
    after = frame.index[frame.index > last]
    if len(after):
        fix = f"pass start='{_day_or_time(after[0])}' (the first session after the last stretch)"
    else:
        fix = "choose a range that ends before the stretches (the last one reaches the end of the data)"
    stretches = "\n".join(f"  - {s.describe()}" for s in quality.stale_stretches)
    which = " (the dataset's default start)" if default_used else ""
    return (
        f"{name}: stale opens: {len(quality.stale_stretches)} stretch(es) where more than "
        f"{_pct(quality.stale_threshold)} of {quality.stale_window} consecutive session opens equal the previous "
        f"close{which}:\n{stretches}\n"
        "The env fills at the next bar's open; on those bars that is the close the agent has just seen "
        f"(same-bar execution). Fix: {fix}, or pass stale_opens='allow' to accept same-bar fills knowingly."
    )


def read_ohlcv_file(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet file; a column named date/datetime/time/timestamp/gmt time (or else the first
    column, as pandas writes an index) holds the timestamps, unless the file has a DatetimeIndex already."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        raw = pd.read_parquet(path)
    elif suffix in (".csv", ".txt", ".gz"):
        raw = pd.read_csv(path)
    else:
        raise DataValidationError(f"{path}: unsupported file type {suffix!r}; use .csv or .parquet")
    if isinstance(raw.index, pd.DatetimeIndex):
        return raw
    lowered = {str(c).strip().lower(): c for c in raw.columns}
    for candidate in TIMESTAMP_COLUMNS:
        if candidate in lowered:
            return raw.set_index(lowered[candidate])
    first = str(raw.columns[0]).strip().lower() if len(raw.columns) else ""
    if not len(raw.columns) or first in OHLCV_COLUMNS or first.replace("_", " ") == "adj close":
        raise DataValidationError(
            f"{path}: no timestamp column: name it one of {list(TIMESTAMP_COLUMNS)} (any case), or write the "
            f"timestamps as the first column (as pandas writes an index); found columns "
            f"{[str(c) for c in raw.columns]}"
        )
    # No named time column: a CSV written by pandas keeps the index as its first column.
    return raw.set_index(raw.columns[0])


def to_market(
    raw: pd.DataFrame, *, name: str, min_rows: int = DEFAULT_MIN_ROWS, session_close: str | None = None
) -> MarketData:
    """Canonicalise and validate a raw OHLCV frame, then record its bar frequency, fingerprint and quality.

    No stale-open policy is applied here (the report lists any stretches); :func:`load_market` applies it.
    """
    frame = canonicalize(raw, source=name, min_rows=min_rows)
    bar_freq = infer_bar_freq(frame)
    return MarketData(frame=frame, name=name, bar_freq=bar_freq, fingerprint=fingerprint(frame),
                      quality=data_quality(frame, bar_freq, source=name),
                      session_close=canonical_session_close(session_close))


def _rows(index: pd.Index, mask: np.ndarray) -> str:
    """Describe offending rows: their count and the first few timestamps / labels."""
    where = np.flatnonzero(mask)
    shown = ", ".join(str(index[i]) for i in where[:_MAX_ROWS_SHOWN])
    more = f" and {len(where) - _MAX_ROWS_SHOWN} more" if len(where) > _MAX_ROWS_SHOWN else ""
    return f"{len(where)} row(s) [{shown}{more}]"


def canonicalize(raw: pd.DataFrame, *, source: str = "input", min_rows: int = DEFAULT_MIN_ROWS) -> pd.DataFrame:
    """Return the canonical frame for ``raw`` or raise :class:`DataValidationError`.

    Column names match case-insensitively (surrounding spaces ignored); extra columns are ignored.
    """
    by_lower: dict[str, object] = {}
    for col in raw.columns:
        key = str(col).strip().lower()
        if key in OHLCV_COLUMNS and key in by_lower:
            raise DataValidationError(f"{source}: column {key!r} appears twice (case-insensitively)")
        by_lower[key] = col
    missing = [c for c in OHLCV_COLUMNS if c not in by_lower]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {missing}; found {[str(c) for c in raw.columns]}"
        )

    index = raw.index
    if not isinstance(index, pd.DatetimeIndex) and pd.api.types.is_numeric_dtype(index.dtype):
        # pd.to_datetime would read integers as nanoseconds since 1970: 20200102 -> 1970-01-01 00:00:00.020.
        raise DataValidationError(
            f"{source}: index is not parseable as timestamps (numeric values such as {index[0]!r}; "
            "convert them explicitly, e.g. pd.to_datetime(..., unit='s') or format='%Y%m%d')"
        )
    if not isinstance(index, pd.DatetimeIndex):
        try:
            index = pd.DatetimeIndex(pd.to_datetime(index))
        except (ValueError, TypeError) as err:
            raise DataValidationError(f"{source}: index is not parseable as timestamps ({err})") from err
    if index.hasnans:
        # A missing timestamp reads NaT, which locates nothing: report 0-based row positions instead.
        positions = _rows(pd.RangeIndex(len(index)), np.asarray(index.isna()))
        raise DataValidationError(f"{source}: missing timestamp(s) in {positions} (0-based row positions)")

    frame = pd.DataFrame(index=index.rename("timestamp"))
    for col in OHLCV_COLUMNS:
        values = pd.to_numeric(pd.Series(raw[by_lower[col]].to_numpy(), index=index), errors="coerce")
        original = raw[by_lower[col]].to_numpy()
        not_numeric = values.isna().to_numpy() & ~pd.isna(original)
        if not_numeric.any():
            raise DataValidationError(f"{source}: non-numeric {col!r} in {_rows(index, not_numeric)}")
        frame[col] = values.to_numpy(dtype=np.float64)

    if len(frame) < min_rows:
        raise DataValidationError(f"{source}: too few rows ({len(frame)}); at least {min_rows} are needed")

    duplicated = np.asarray(index.duplicated(keep=False))
    if duplicated.any():
        raise DataValidationError(f"{source}: duplicate timestamp(s) in {_rows(index, duplicated)}")
    steps = np.diff(_nanoseconds(index))
    unsorted = np.concatenate([[False], steps < 0])
    if unsorted.any():
        raise DataValidationError(
            f"{source}: timestamps not in increasing order at {_rows(index, unsorted)} "
            "(sort the file first; nothing is reordered silently)"
        )

    values = frame.to_numpy()
    for j, col in enumerate(OHLCV_COLUMNS):
        bad = ~np.isfinite(values[:, j])
        if bad.any():
            raise DataValidationError(f"{source}: NaN or inf in {col!r} at {_rows(index, bad)}")
    for col in PRICE_COLUMNS:
        bad = frame[col].to_numpy() <= 0
        if bad.any():
            raise DataValidationError(f"{source}: non-positive {col!r} at {_rows(index, bad)}")
    bad = frame["volume"].to_numpy() < 0
    if bad.any():
        raise DataValidationError(f"{source}: negative volume at {_rows(index, bad)}")
    o, h, lo, c = (frame[col].to_numpy() for col in PRICE_COLUMNS)
    bad = h < np.maximum(o, c)
    if bad.any():
        raise DataValidationError(f"{source}: high below max(open, close) at {_rows(index, bad)}")
    bad = lo > np.minimum(o, c)
    if bad.any():
        raise DataValidationError(f"{source}: low above min(open, close) at {_rows(index, bad)}")
    return frame


def _nanoseconds(index: pd.DatetimeIndex) -> np.ndarray:
    """Timestamps as int64 nanoseconds whatever unit pandas stores (pandas 3 keeps microseconds)."""
    return index.as_unit("ns").asi8


def infer_bar_freq(frame: pd.DataFrame) -> pd.Timedelta:
    """Bar spacing as the median gap between timestamps (robust to weekends and holidays)."""
    gaps = np.diff(_nanoseconds(frame.index))
    return pd.Timedelta(int(np.median(gaps)), unit="ns") if len(gaps) else pd.Timedelta(0)


def fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 (first 16 hex digits) of the canonical frame's timestamps, column names and values."""
    digest = hashlib.sha256()
    digest.update(",".join(map(str, frame.columns)).encode())
    digest.update(np.ascontiguousarray(_nanoseconds(frame.index)).tobytes())
    digest.update(np.ascontiguousarray(frame.to_numpy(dtype=np.float64)).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- splits
def chronological_split(
    market: MarketData | pd.DataFrame,
    train: float | str | pd.Timestamp = 0.6,
    validation: float | str | pd.Timestamp = 0.2,
) -> dict[str, Split]:
    """Split bars into train / validation / test ranges, in that order.

    ``train`` and ``validation`` are either fractions of all bars (floats summing to < 1) or the
    timestamps at which the validation and test ranges begin.
    """
    frame = market.frame if isinstance(market, MarketData) else market
    n = len(frame)
    if isinstance(train, float) and isinstance(validation, float):
        if not (0 < train and 0 <= validation and train + validation < 1):
            raise ValueError(f"fractions train={train}, validation={validation} must be >0 and sum to < 1")
        train_stop = int(round(n * train))
        val_stop = int(round(n * (train + validation)))
    elif isinstance(train, float) or isinstance(validation, float):
        raise ValueError("give train and validation both as fractions or both as timestamps")
    else:
        train_stop = int(frame.index.searchsorted(pd.Timestamp(train)))
        val_stop = int(frame.index.searchsorted(pd.Timestamp(validation)))
    bounds = {"train": (0, train_stop), "validation": (train_stop, val_stop), "test": (val_stop, n)}
    splits = {}
    for name, (start, stop) in bounds.items():
        if stop <= start and name != "validation":
            raise ValueError(f"the {name} range is empty (bars {start}..{stop} of {n})")
        if stop < start:
            raise ValueError(f"the {name} range ends before it starts ({start}..{stop})")
        first = frame.index[start] if stop > start else frame.index[min(start, n - 1)]
        last = frame.index[stop - 1] if stop > start else first
        splits[name] = Split(name, start, stop, first, last)
    return splits
