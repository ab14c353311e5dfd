"""Market data: load OHLCV from bundled datasets or user files, validate it, fingerprint it, split it.

Every loader returns a :class:`MarketData` holding one *canonical frame*: a sorted, unique
``DatetimeIndex`` and float64 columns ``open high low close volume``. Bad input raises
:class:`DataValidationError` naming the problem and the offending rows; nothing is dropped or filled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

OHLCV_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
#: Fewer rows than this cannot hold a train, validation and test range worth the name.
DEFAULT_MIN_ROWS = 50
#: How many offending rows an error message lists before it says "and N more".
_MAX_ROWS_SHOWN = 5


class DataValidationError(ValueError):
    """Raised when OHLCV input is malformed; the message names the problem, the source and the rows."""


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


#: Real datasets shipped inside PyPI packages (no network needed). ``sp500`` is the embedded default.
BUNDLED_DATASETS: dict[str, Callable[[], pd.DataFrame]] = {
    "sp500": _load_sp500,
    "nasdaq": _load_nasdaq,
    "eurusd_1h": _load_eurusd_1h,
}
DEFAULT_DATASET = "sp500"


def load_market(source: str | Path = DEFAULT_DATASET, *, min_rows: int = DEFAULT_MIN_ROWS) -> MarketData:
    """Load a bundled dataset by name (see ``BUNDLED_DATASETS``) or a user CSV / Parquet file by path."""
    if isinstance(source, str) and source in BUNDLED_DATASETS:
        raw = BUNDLED_DATASETS[source]()
        return to_market(raw, name=source, min_rows=min_rows)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{source!s}: neither a bundled dataset ({', '.join(BUNDLED_DATASETS)}) nor an existing file"
        )
    return to_market(read_ohlcv_file(path), name=str(path), min_rows=min_rows)


def read_ohlcv_file(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet file; the first column (or a column named date/time/timestamp) is the index."""
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
    for candidate in ("date", "datetime", "time", "timestamp", "gmt time"):
        if candidate in lowered:
            return raw.set_index(lowered[candidate])
    # No named time column: a CSV written by pandas keeps the index as its first column.
    return raw.set_index(raw.columns[0])


def to_market(raw: pd.DataFrame, *, name: str, min_rows: int = DEFAULT_MIN_ROWS) -> MarketData:
    """Canonicalise and validate a raw OHLCV frame, then record its bar frequency and fingerprint."""
    frame = canonicalize(raw, source=name, min_rows=min_rows)
    return MarketData(frame=frame, name=name, bar_freq=infer_bar_freq(frame), fingerprint=fingerprint(frame))


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
