"""Ranges of bars: :func:`select_range` by inclusive timestamps, :func:`chronological_split` into train, validation
and test ranges (:class:`Split`)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sentio_lab.data.market_data import MarketData
from sentio_lab.data.validation import CLI_FLAGS, DataValidationError, option


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
        flag = CLI_FLAGS["start"] if _unparseable(start) or end is None else CLI_FLAGS["end"]
        raise DataValidationError(
            f"{source}: cannot select the range {_range_text(start, end)} ({err}); give dates like 2013-05-10, "
            f"2013-05 or 2013{_first_bar(frame)}",
            flag=flag,
        ) from err
    # Compared only when nothing was selected: end="2017-06" covers June, so start="2017-06-15" is not after it.
    if selected.empty and lo is not None and hi is not None and lo > hi:
        raise DataValidationError(
            f"{source}: {option('start', start)} is after {option('end', end)}; swap them",
            flag=CLI_FLAGS["start"],
        )
    return selected


def _first_bar(frame: pd.DataFrame) -> str:
    """`` (the data start 2013-05-10 00:00:00)``: shows whether the timestamps carry a time zone."""
    return f" (the data start {frame.index[0]})" if len(frame) else ""


def _unparseable(value: str | pd.Timestamp | None) -> bool:
    """True when ``value`` is given but is no timestamp."""
    if value is None:
        return False
    try:
        pd.Timestamp(value)
    except (TypeError, ValueError):
        return True
    return False


def _range_text(start: str | pd.Timestamp | None, end: str | pd.Timestamp | None) -> str:
    """``--data-start 2013 (start='2013' in Python) .. --data-end 2014 (end='2014' in Python)``, sides as given."""
    sides = [option(keyword, value) for keyword, value in (("start", start), ("end", end)) if value is not None]
    return " .. ".join(sides) if sides else "(all bars)"


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
        train_stop, val_stop = split_stops(n, train, validation)
    elif isinstance(train, float) or isinstance(validation, float):
        raise DataValidationError("give train and validation both as fractions or both as timestamps")
    else:
        train_stop = int(frame.index.searchsorted(pd.Timestamp(train)))
        val_stop = int(frame.index.searchsorted(pd.Timestamp(validation)))
    bounds = {"train": (0, train_stop), "validation": (train_stop, val_stop), "test": (val_stop, n)}
    fix = f"; change {option('train_fraction')} / {option('validation_fraction')} or load more bars"
    splits = {}
    for name, (start, stop) in bounds.items():
        if stop <= start and name != "validation":
            raise DataValidationError(f"the {name} range is empty (bars {start}..{stop} of {n}){fix}",
                                      flag=CLI_FLAGS["train_fraction"])
        if stop < start:
            raise DataValidationError(f"the {name} range ends before it starts ({start}..{stop}){fix}",
                                      flag=CLI_FLAGS["validation_fraction"])
        first = frame.index[start] if stop > start else frame.index[min(start, n - 1)]
        last = frame.index[stop - 1] if stop > start else first
        splits[name] = Split(name, start, stop, first, last)
    return splits


def split_stops(n: int, train_fraction: float, validation_fraction: float) -> tuple[int, int]:
    """Where :func:`chronological_split` ends the train and validation ranges of ``n`` bars (rounded)."""
    if not (0 < train_fraction and 0 <= validation_fraction and train_fraction + validation_fraction < 1):
        raise DataValidationError(
            f"fractions {option('train_fraction', train_fraction)}, "
            f"{option('validation_fraction', validation_fraction)} must be > 0 (validation >= 0) and sum to < 1 "
            "(the test range is the rest)", flag=CLI_FLAGS["train_fraction"],
        )
    return int(round(n * train_fraction)), int(round(n * (train_fraction + validation_fraction)))


#: Bars each evaluation range (validation, test) needs at least: one decision and the bar that fills it.
MIN_EVALUATION_BARS = 2


def bars_needed(
    *, warmup: int, window: int, episode_length: int, train_fraction: float, validation_fraction: float,
    min_train_rows: int = 0, min_rows: int = 0,
) -> int:
    """The fewest bars a market needs for training on a chronological split, and evaluating after it.

    With ``n`` bars the training range is the first ``round(n * train_fraction)`` (:func:`split_stops`); it
    must hold the features' ``warmup`` rows, then a ``window``-row observation and an episode of
    ``episode_length`` steps whose last fill lands on a training bar (``warmup + window + episode_length``
    bars, :func:`sentio_lab.env.episode_start_bounds`), and ``min_train_rows`` rows after the warm-up to fit
    the features on. The validation range (when ``validation_fraction > 0``) and the test range need
    :data:`MIN_EVALUATION_BARS` each, and the whole market ``min_rows``.
    """
    if min(warmup, window, episode_length) < 0:
        raise ValueError(f"warmup={warmup}, window={window}, episode_length={episode_length} must be >= 0")
    split_stops(1, train_fraction, validation_fraction)  # refuse impossible fractions before searching
    train_bars = max(warmup + window + episode_length, warmup + min_train_rows)

    def enough(n: int) -> bool:
        train_stop, val_stop = split_stops(n, train_fraction, validation_fraction)
        validation_ok = validation_fraction == 0 or val_stop - train_stop >= MIN_EVALUATION_BARS
        return (n >= min_rows and train_stop >= train_bars and validation_ok
                and n - val_stop >= MIN_EVALUATION_BARS)

    # round() is within 1/2 of n * fraction, so no n below this bound gives the training range enough bars.
    n = max(1, int((train_bars - 1) / train_fraction))
    while not enough(n):
        n += 1
    return n


def too_few_bars_error(
    source: str, bars: int, *, warmup: int, window: int, episode_length: int, train_fraction: float,
    validation_fraction: float, min_train_rows: int = 0, min_rows: int = 0,
) -> DataValidationError | None:
    """The one-line error for a market of ``bars`` bars that :func:`bars_needed` says is too short; None when
    it is long enough. It states the count needed and what makes it up, and, when a shorter episode would fit,
    the longest ``--episode-length`` that does (the exception's ``flag`` / ``value``)."""
    needs = dict(window=window, train_fraction=train_fraction, validation_fraction=validation_fraction,
                 min_train_rows=min_train_rows, min_rows=min_rows)
    needed = bars_needed(warmup=warmup, episode_length=episode_length, **needs)
    if bars >= needed:
        return None
    train_stop = split_stops(bars, train_fraction, validation_fraction)[0]
    longest = train_stop - warmup - window  # the longest episode the training range holds today
    fits = longest >= 1 and bars >= bars_needed(warmup=warmup, episode_length=longest, **needs)
    flags = {key: CLI_FLAGS[key] for key in ("start", "end", "train_fraction", "window", "episode_length")}
    shorter = f", or {flags['episode_length']} {longest} or less" if fits else ""
    python = "start=, end=" + (f", episode_length={longest}" if fits else "")
    fit_rows = f" and {min_train_rows} rows after the warm-up to fit the features on" if min_train_rows else ""
    return DataValidationError(
        f"{source}: {bars} bars, too few to train on: at least {needed} are needed (the training range, "
        f"{flags['train_fraction']} {train_fraction} of the bars, must hold {warmup} feature warm-up bars + a "
        f"{window}-bar {flags['window']} + {episode_length} {flags['episode_length']} steps = "
        f"{warmup + window + episode_length} bars{fit_rows}; validation and test need {MIN_EVALUATION_BARS} bars "
        f"each); use more bars ({flags['start']} / {flags['end']}, or a longer file){shorter} (Python: {python})",
        flag=CLI_FLAGS["episode_length"] if fits else CLI_FLAGS["start"],
        value=str(longest) if fits else None,
    )
