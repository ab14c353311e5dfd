"""Ranges of bars: :func:`select_range` by inclusive timestamps, :func:`chronological_split` into train, validation
and test ranges (:class:`Split`)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sentio_lab.data.market_data import MarketData
from sentio_lab.data.validation import DataValidationError


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
