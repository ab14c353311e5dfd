"""Loading markets: the bundled datasets (no network), user CSV / Parquet files, and :func:`load_market`, which
validates them, selects a range and applies the stale-open policy.

``load_market(..., stale_opens="refuse")`` (the default) raises :class:`~sentio_lab.data.DataValidationError` when
the selected range still holds a stale stretch (see :mod:`sentio_lab.data.quality`), naming the stretches and the
first date after the last one; ``stale_opens="allow"`` loads it, warns, and the quality report records the choice.
Bundled datasets have a default start that the rule accepts (``sp500`` starts on 2013-05-10, the first session
after its last stretch); ``start`` / ``end`` select an inclusive range before the check.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from sentio_lab.data.market_data import MarketData, to_market
from sentio_lab.data.quality import DataQuality, _day_or_time, _pct, data_quality
from sentio_lab.data.ranges import select_range
from sentio_lab.data.validation import (
    CLI_FLAGS,
    CLOSE_ONLY_OPTIONAL,
    DEFAULT_MIN_ROWS,
    OHLCV_COLUMNS,
    DataValidationError,
    canonicalize,
    infer_bar_freq,
    option,
)

#: Column names (case-insensitive, spaces stripped) that :func:`read_ohlcv_file` takes as the timestamps.
TIMESTAMP_COLUMNS: tuple[str, ...] = ("date", "datetime", "time", "timestamp", "gmt time")
StaleOpensPolicy = Literal["refuse", "allow"]
STALE_OPENS_POLICIES: tuple[str, ...] = ("refuse", "allow")
#: The note a market loaded for next-close fills carries in its quality report (:func:`fill_price_note`).
NEXT_CLOSE_NOTE = "fills at next close: stale opens do not matter (fills and marks read closes only)"


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


def load_market(
    source: str | Path = DEFAULT_DATASET,
    *,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    stale_opens: StaleOpensPolicy = "refuse",
    min_rows: int = DEFAULT_MIN_ROWS,
    fill_price: Literal["next_open", "next_close"] = "next_open",
) -> MarketData:
    """Load a bundled dataset by name (see ``BUNDLED_DATASETS``) or a user CSV / Parquet file by path.

    ``start`` / ``end`` select an inclusive range (see :func:`select_range`) before the stale-open check; a
    bundled dataset without ``start`` begins at its ``default_start``. With ``stale_opens="refuse"`` a range
    that holds a stale-open stretch raises :class:`DataValidationError`; ``"allow"`` loads it with a warning
    (same-bar fills, knowingly) and records that in ``market.quality``. With ``fill_price="next_close"`` (orders
    fill at the next bar's close, :class:`sentio_lab.env.MarketArrays`) no fill uses an open: the stale-open rule
    does not apply, nothing is refused or warned, and the quality report says so (:func:`fill_price_note`).
    """
    if stale_opens not in STALE_OPENS_POLICIES:
        raise DataValidationError(
            f"stale_opens={stale_opens!r}: choose {CLI_FLAGS['stale_opens']} {' or '.join(STALE_OPENS_POLICIES)} "
            "(stale_opens= in Python)", flag=CLI_FLAGS["stale_opens"],
        )
    notes: list[str] = fill_price_note(fill_price)
    session_close = None
    default_used = False
    if isinstance(source, str) and source in BUNDLED_DATASETS:
        entry = BUNDLED_DATASETS[source]
        name, raw, session_close = source, entry(), entry.session_close
        if start is None and entry.default_start is not None:
            if end is not None and _before(end, entry.default_start):
                raise DataValidationError(
                    f"{name}: {option('end', str(end))} is before the dataset's default start "
                    f"{entry.default_start} (the first session after its stale-open stretches); pass "
                    f"{option('start')} as well, and {option('stale_opens', 'allow')} to load the stale range "
                    "knowingly", flag=CLI_FLAGS["start"],
                )
            start, default_used = entry.default_start, True
            notes.append(f"start {start} is the default start of {name} (the first session after its last "
                         f"stale-open stretch); pass {option('start')} to choose another")
    else:
        path = Path(source)
        if not path.exists():
            raise DataFileNotFoundError(
                f"{source!s}: neither a bundled dataset ({', '.join(BUNDLED_DATASETS)}) nor an existing file; "
                f"check {CLI_FLAGS['source']} (source= in Python)", flag=CLI_FLAGS["source"],
            )
        name, raw = str(path), read_ohlcv_file(path)
    # next-close fills read closes only: close-only files (no open / high / low / volume, or NaN there) load
    full = canonicalize(raw, source=name, min_rows=min_rows,
                        optional=CLOSE_ONLY_OPTIONAL if fill_price == "next_close" else ())
    frame = select_range(full, start, end, source=name)
    if len(frame) < min_rows:
        given = " to ".join(option(k, str(v)) for k, v in (("start", start), ("end", end)) if v is not None)
        raise DataValidationError(
            f"{name}: too few rows ({len(frame)}) from {given} (the data cover {_day_or_time(full.index[0])} .. "
            f"{_day_or_time(full.index[-1])}); at least {min_rows} are needed: widen the range",
            flag=CLI_FLAGS["start"] if start is not None else CLI_FLAGS["end"],
        )
    market = to_market(frame, name=name, min_rows=min_rows, session_close=session_close,
                       optional=CLOSE_ONLY_OPTIONAL if fill_price == "next_close" else ())
    quality = market.quality
    assert quality is not None
    if quality.stale_stretches and fill_price == "next_open":
        if stale_opens == "refuse":
            raise _stale_error(name, frame, quality, default_used, min_rows)
        listed = "; ".join(s.describe() for s in quality.stale_stretches)
        message = (f"{name}: {CLI_FLAGS['stale_opens']} allow (stale_opens='allow'): loading "
                   f"{len(quality.stale_stretches)} stale-open stretch(es) ({listed}); on those bars the env "
                   "fills at the close the agent has just seen (same-bar execution)")
        warnings.warn(message, UserWarning, stacklevel=2)
        notes.append(f"{CLI_FLAGS['stale_opens']} allow (stale_opens='allow'): stale-open stretches accepted "
                     "knowingly (same-bar fills on them)")
    quality = dataclasses.replace(
        quality, start=None if start is None else str(start), end=None if end is None else str(end),
        default_start_used=default_used, stale_opens_policy=stale_opens, notes=tuple(notes),
    )
    return dataclasses.replace(market, quality=quality)


def fill_price_note(fill_price: str) -> list[str]:
    """The quality-report notes of a fill price: :data:`NEXT_CLOSE_NOTE` for next-close fills, none otherwise."""
    if fill_price not in ("next_open", "next_close"):
        raise ValueError(f"fill_price={fill_price!r}; choose from ['next_open', 'next_close'] (--fill-price)")
    return [NEXT_CLOSE_NOTE] if fill_price == "next_close" else []


def _before(end: str | pd.Timestamp, start: str) -> bool:
    """True when the range ``start .. end`` selects nothing because ``end`` ends before ``start`` begins."""
    try:
        # A partial date such as end="2013-05" covers the whole month: compare with the start's month.
        return bool(pd.Series(0, index=pd.DatetimeIndex([pd.Timestamp(start)])).loc[:end].empty)
    except (TypeError, ValueError):
        return False  # select_range reports an unparseable end


class DataFileNotFoundError(DataValidationError, FileNotFoundError):
    """A data source that is neither a bundled dataset nor an existing file (a ValueError like every data error,
    and a FileNotFoundError as before)."""


def _stale_error(
    name: str, frame: pd.DataFrame, quality: DataQuality, default_used: bool, min_rows: int
) -> DataValidationError:
    """The refusal, in one line: which stretches, why it matters, and the ways out (flags in both spellings).

    The way out is a range without stretches: from the first session after the last stretch, else (the last
    stretch reaches the end of the selected range, or too few bars follow it) up to the last bar before the last
    stretch, from the first session after the stretch before it if there is one. A range is suggested only when
    it has ``min_rows`` bars and no stretch, as the rule judges it.
    """
    stretches = quality.stale_stretches
    after = frame.index[frame.index > stretches[-1].last]
    before = frame.index[frame.index < stretches[-1].first]
    # (start, end, what they are): after the last stretch, else between the last two stretches / before the last.
    candidates = [(after[0], None, "the first session after the last stretch")] if len(after) else []
    if len(before):
        begin = None if len(stretches) == 1 else frame.index[frame.index > stretches[-2].last][0]
        candidates.append((begin, before[-1], ("" if begin is None else "the first session after the stretch "
                           "before the last and ") + "the last bar before the last stretch"))
    lead = "" if len(after) >= min_rows else (
        "the last stretch reaches the end of the selected range: " if not len(after)
        else f"only {len(after)} bars follow the last stretch in the selected range: ")
    for begin, end, why in candidates:
        chosen = frame.loc[begin:end]
        if len(chosen) >= min_rows and not data_quality(chosen, infer_bar_freq(chosen)).stale_stretches:
            sides = (("start", begin), ("end", end))
            moves = " and ".join(option(k, _day_or_time(v)) for k, v in sides if v is not None)
            fix = f"{lead}pass {moves}, {why}"
            flag, value = (CLI_FLAGS["start"], _day_or_time(begin)) if end is None else (
                CLI_FLAGS["end"], _day_or_time(end))
            break
    else:
        fix = (f"{lead}choose a range of at least {min_rows} bars without them with {option('start')} / "
               f"{option('end')}")
        flag, value = CLI_FLAGS["end"] if lead else CLI_FLAGS["start"], None
    which = " (the dataset's default start)" if default_used else ""
    listed = "; ".join(s.describe() for s in stretches)
    return DataValidationError(
        f"{name}: stale opens{which}: {len(stretches)} stretch(es) where more than {_pct(quality.stale_threshold)} "
        f"of {quality.stale_window} consecutive session opens equal the previous close ({listed}); the env fills "
        "at the next bar's open, which on those bars is the close the agent has just seen (same-bar execution). "
        f"Fix: {fix}, or pass {option('stale_opens', 'allow')} to accept same-bar fills knowingly",
        flag=flag, value=value,
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
        raise DataValidationError(f"{path}: unsupported file type {suffix!r}; give {CLI_FLAGS['source']} a .csv or "
                                  ".parquet file", flag=CLI_FLAGS["source"])
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
