"""The canonical OHLCV frame: :func:`canonicalize` validates raw input or raises :class:`DataValidationError`
naming the problem, the source and the offending rows (nothing is dropped, filled or reordered);
:func:`infer_bar_freq` and :func:`fingerprint` describe a canonical frame."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

OHLCV_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
#: The columns close-only data may lack (absent, or NaN on any row): ``canonicalize(optional=CLOSE_ONLY_OPTIONAL)``.
CLOSE_ONLY_OPTIONAL: tuple[str, ...] = ("open", "high", "low", "volume")
#: How to run on close-only data, appended to the errors about a missing or NaN optional column.
CLOSE_ONLY_HINT = "close-only data loads with --fill-price next_close and --feature-bank close"
#: Fewer rows than this cannot hold a train, validation and test range worth the name.
DEFAULT_MIN_ROWS = 50
#: How many offending rows an error message lists before it says "and N more".
_MAX_ROWS_SHOWN = 5


#: The command-line flag of each data argument, by its Python keyword (``load_market`` / ``prepare_market``):
#: error messages name both, since CLI users and library callers (notebooks) read the same text.
CLI_FLAGS: dict[str, str] = {
    "source": "--dataset",
    "start": "--data-start",
    "end": "--data-end",
    "stale_opens": "--stale-opens",
    "train_fraction": "--train-fraction",
    "validation_fraction": "--validation-fraction",
    "window": "--window",
    "episode_length": "--episode-length",
}


def option(keyword: str, value: object = None) -> str:
    """A data argument in both spellings: ``--data-start 2010-09-08 (start='2010-09-08' in Python)``.

    Without ``value`` only the names: ``--data-start (start= in Python)``.
    """
    flag = CLI_FLAGS[keyword]
    if value is None:
        return f"{flag} ({keyword}= in Python)"
    shown = str(value) if isinstance(value, pd.Timestamp) else value
    return f"{flag} {shown} ({keyword}={shown!r} in Python)"


class DataValidationError(ValueError):
    """Raised when data input is unusable; a one-line message names the problem, the source, the rows and,
    where an argument fixes it, the flag to change (both spellings, see :func:`option`).

    ``flag`` (e.g. ``"--data-start"``) and ``value`` (e.g. ``"2010-09-08"``, or None when no single value
    fixes it) say the same for a command line that wants to print its own hint; both are None when the fix is
    in the file itself (a missing column, unsorted rows...).
    """

    def __init__(self, message: str, *, flag: str | None = None, value: str | None = None) -> None:
        super().__init__(message)
        self.flag = flag
        self.value = value


def _rows(index: pd.Index, mask: np.ndarray) -> str:
    """Describe offending rows: their count and the first few timestamps / labels."""
    where = np.flatnonzero(mask)
    shown = ", ".join(str(index[i]) for i in where[:_MAX_ROWS_SHOWN])
    more = f" and {len(where) - _MAX_ROWS_SHOWN} more" if len(where) > _MAX_ROWS_SHOWN else ""
    return f"{len(where)} row(s) [{shown}{more}]"


def canonicalize(raw: pd.DataFrame, *, source: str = "input", min_rows: int = DEFAULT_MIN_ROWS,
                 optional: tuple[str, ...] = ()) -> pd.DataFrame:
    """Return the canonical frame for ``raw`` or raise :class:`DataValidationError`.

    Column names match case-insensitively (surrounding spaces ignored); extra columns are ignored. Columns in
    ``optional`` (at most :data:`CLOSE_ONLY_OPTIONAL`: close-only data) may be absent -- they become all-NaN
    columns, i.e. "not known", never a made-up value -- or NaN on any row; their known values are checked as usual.
    """
    if not set(optional) <= set(CLOSE_ONLY_OPTIONAL):
        raise ValueError(f"canonicalize: optional={optional!r}; only {CLOSE_ONLY_OPTIONAL} may be optional")
    by_lower: dict[str, object] = {}
    for col in raw.columns:
        key = str(col).strip().lower()
        if key in OHLCV_COLUMNS and key in by_lower:
            raise DataValidationError(f"{source}: column {key!r} appears twice (case-insensitively)")
        by_lower[key] = col
    missing = [c for c in OHLCV_COLUMNS if c not in by_lower and c not in optional]
    if missing:
        hint = f" ({CLOSE_ONLY_HINT})" if set(missing) <= set(CLOSE_ONLY_OPTIONAL) else ""
        raise DataValidationError(
            f"{source}: missing column(s) {missing}; found {[str(c) for c in raw.columns]}{hint}"
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
            index = _parse_timestamps(index)
        except (ValueError, TypeError) as err:
            raise DataValidationError(
                f"{source}: index is not parseable as timestamps ({' '.join(str(err).split())}); write ISO 8601 "
                "times such as 2017-01-02 or 2017-01-02 17:00:00 (+01:00 offsets allowed)"
            ) from err
    if index.hasnans:
        # A missing timestamp reads NaT, which locates nothing: report 0-based row positions instead.
        positions = _rows(pd.RangeIndex(len(index)), np.asarray(index.isna()))
        raise DataValidationError(f"{source}: missing timestamp(s) in {positions} (0-based row positions)")

    frame = pd.DataFrame(index=index.rename("timestamp"))
    for col in OHLCV_COLUMNS:
        if col not in by_lower:  # an optional column the file lacks: not known on any bar
            frame[col] = np.full(len(index), np.nan)
            continue
        values = pd.to_numeric(pd.Series(raw[by_lower[col]].to_numpy(), index=index), errors="coerce")
        original = raw[by_lower[col]].to_numpy()
        not_numeric = values.isna().to_numpy() & ~pd.isna(original)
        if not_numeric.any():
            raise DataValidationError(f"{source}: non-numeric {col!r} in {_rows(index, not_numeric)}")
        frame[col] = values.to_numpy(dtype=np.float64)

    if len(frame) < min_rows:
        raise DataValidationError(
            f"{source}: too few rows ({len(frame)}); at least {min_rows} are needed (a longer file for "
            f"{CLI_FLAGS['source']})", flag=CLI_FLAGS["source"],
        )

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
        bad = np.isinf(values[:, j]) if col in optional else ~np.isfinite(values[:, j])
        if bad.any():
            hint = f" ({CLOSE_ONLY_HINT})" if col in CLOSE_ONLY_OPTIONAL and not np.isinf(values[bad, j]).any() else ""
            raise DataValidationError(f"{source}: NaN or inf in {col!r} at {_rows(index, bad)}{hint}")
    for col in PRICE_COLUMNS:
        bad = frame[col].to_numpy() <= 0
        if bad.any():
            raise DataValidationError(f"{source}: non-positive {col!r} at {_rows(index, bad)}")
    bad = frame["volume"].to_numpy() < 0
    if bad.any():
        raise DataValidationError(f"{source}: negative volume at {_rows(index, bad)}")
    o, h, lo, c = (frame[col].to_numpy() for col in PRICE_COLUMNS)
    bad = h < np.fmax(o, c)  # fmax / fmin: an unknown (NaN, optional) open leaves the close to check against
    if bad.any():
        raise DataValidationError(f"{source}: high below max(open, close) at {_rows(index, bad)}")
    bad = lo > np.fmin(o, c)
    if bad.any():
        raise DataValidationError(f"{source}: low above min(open, close) at {_rows(index, bad)}")
    return frame


def _parse_timestamps(index: pd.Index) -> pd.DatetimeIndex:
    """Text timestamps as a DatetimeIndex. Offsets that change inside the file (local time across a daylight
    saving change, "+01:00" then "+02:00") are the same instants in UTC: they are read as UTC, not refused."""
    try:
        return pd.DatetimeIndex(pd.to_datetime(index))
    except ValueError as err:
        if "mixed time zones" not in str(err).lower() and "mixed timezones" not in str(err).lower():
            raise
        return pd.DatetimeIndex(pd.to_datetime(index, utc=True))


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
