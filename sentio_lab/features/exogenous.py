"""The ``"exogenous"`` feature block: point-in-time alternative data joined to the bars (:func:`exogenous_block`).

Per series (:mod:`sentio_lab.data.exogenous`) two columns: ``exo:<name>`` (the level: the latest value released by
the bar's close) and ``exo:<name>:chg`` (its change from the previous period's value: log ratio or difference).
Both are missing (NaN, warm-up) until the series has released two values; nothing is back-filled. The block is
normalised by a z-score whose mean and standard deviation are fitted on the training rows only
(:func:`fit_zscore`, kept in the feature state under ``"exogenous"``), then clipped like every block.

Span: the value seen at bar ``r`` describes a period that began before ``r`` (a month's CPI is seen some six
weeks after the month began). :func:`exogenous_span` counts, over a frame, how many bars back the oldest period
read at any bar began; :func:`sentio_lab.features.spans.feature_span` adds it, so the CPCV embargo keeps a
training bar from seeing a value about a test group's bars.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sentio_lab.data import DataValidationError
from sentio_lab.data.exogenous import ExogenousSeries, bar_close_times, load_exogenous, visible_index

#: Block name in :attr:`sentio_lab.features.observation.ObservationFeatures.blocks`.
EXOGENOUS_BLOCK = "exogenous"


@dataclass
class ExogenousBlock:
    """Raw exogenous columns on a frame's bars."""

    values: np.ndarray
    """float64 ``(T, 2 * S)``: level and change per series, NaN before a series' second release."""
    names: list[str]
    first_valid: int
    """First row at which every column is defined (``T`` when never)."""
    series: list[ExogenousSeries]
    visible: np.ndarray
    """int64 ``(T, S)``: position of the latest released value of each series at each bar (-1: none yet)."""


def _series_columns(series: ExogenousSeries, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Level and change of ``series`` at bars whose latest visible position is ``visible`` (NaN where undefined)."""
    level = np.full(len(visible), np.nan)
    change = np.full(len(visible), np.nan)
    seen = visible >= 0
    level[seen] = series.values[visible[seen]]
    both = visible >= 1  # the previous period was released no later (releases follow the dates' order)
    now, before = series.values[visible[both]], series.values[visible[both] - 1]
    change[both] = np.log(now / before) if series.change == "log" else now - before
    return level, change


def _check_fresh(series: ExogenousSeries, visible: np.ndarray, bar_close: np.ndarray, index: pd.Index,
                 first_valid: int) -> None:
    """Refuse a bar (from ``first_valid`` on) whose latest value is older than ``series.max_age``."""
    released = series.released_at.as_unit("ns").asi8
    rows = np.arange(first_valid, len(visible))
    age = bar_close[rows] - released[visible[rows]]
    stale = np.flatnonzero(age > series.max_age.value)
    if len(stale):
        row = int(rows[stale[0]])
        last_fresh = str(pd.Timestamp(index[row - 1]).date()) if row > 0 else None
        raise DataValidationError(
            f"exogenous series {series.name!r}: the bar {index[row]} sees a value released "
            f"{series.released_at[visible[row]]} ({age[stale[0]] / 86400e9:.1f} days before, more than the "
            f"{series.max_age / pd.Timedelta(days=1):g} allowed); the series ends {series.dates[-1].date()} or has a "
            f"hole there: end the market by {last_fresh} (--data-end) or drop {series.name!r} from --exogenous",
            flag="--data-end", value=last_fresh)


def load_all(specs: Sequence[str]) -> list[ExogenousSeries]:
    """The series of ``specs`` (bundled names or CSV specs), refusing two with one name."""
    series = [load_exogenous(spec) for spec in specs]
    names = [s.name for s in series]
    if len(set(names)) != len(names):
        raise ValueError(f"exogenous series names repeat: {names}; rename a CSV file")
    return series


def exogenous_block(index: pd.DatetimeIndex, specs: Sequence[str], base_freq: pd.Timedelta,
                    series: Sequence[ExogenousSeries] | None = None) -> ExogenousBlock:
    """The raw exogenous columns of ``specs`` on bars ``index`` of duration ``base_freq`` (module doc). Row ``t``
    reads only bar ``t``'s close time and values released by it. ``series`` skips loading (already loaded)."""
    loaded = list(series) if series is not None else load_all(specs)
    bar_close = bar_close_times(index, base_freq)
    columns, names, visible = [], [], []
    for one in loaded:
        where = visible_index(one, bar_close, base_freq)
        level, change = _series_columns(one, where)
        columns += [level, change]
        names += [f"exo:{one.name}", f"exo:{one.name}:chg"]
        visible.append(where)
    values = np.column_stack(columns) if columns else np.empty((len(index), 0))
    defined = np.isfinite(values).all(axis=1)
    first_valid = int(np.argmax(defined)) if defined.any() else len(index)
    for one, where in zip(loaded, visible, strict=True):
        _check_fresh(one, where, bar_close, index, first_valid)
    stacked = np.column_stack(visible) if visible else np.empty((len(index), 0), dtype=np.int64)
    return ExogenousBlock(values=values, names=names, first_valid=first_valid, series=loaded, visible=stacked)


def exogenous_span(index: pd.DatetimeIndex, specs: Sequence[str], base_freq: pd.Timedelta) -> int:
    """Bars between a row and the first bar of the oldest period its exogenous columns read, at most over
    ``index`` (0 without series). The change at bar ``r`` reads the value before the latest: its period's first
    bar is the first whose close is after the period's start."""
    if not specs:
        return 0
    block = exogenous_block(index, specs, base_freq)
    bar_close = bar_close_times(index, base_freq)
    span = 0
    for j, one in enumerate(block.series):
        rows = np.flatnonzero(block.visible[:, j] >= 1)
        if not len(rows):
            continue
        oldest = one.dates.as_unit("ns").asi8[block.visible[rows, j] - 1]
        first_bar = np.searchsorted(bar_close, oldest, side="right")
        span = max(span, int(np.max(rows - first_bar)))
    return span


def fit_zscore(train: np.ndarray) -> dict:
    """Mean and standard deviation per column of the training rows ``train`` (plain lists; a zero std, a
    column constant on the training rows, is refused: the caller drops those first)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    if (std <= 0).any():
        raise ValueError("fit_zscore: a column is constant on the training rows")
    return {"mean": mean.tolist(), "std": std.tolist()}


def apply_zscore(values: np.ndarray, params: dict, clip: float) -> np.ndarray:
    """``(values - mean) / std`` with fitted ``params``, clipped to ``[-clip, clip]``."""
    return np.clip((values - np.asarray(params["mean"])) / np.asarray(params["std"]), -clip, clip)


def released_fingerprints(specs: Sequence[str], through_ns: int) -> dict[str, str]:
    """sha256 per series of every value released by ``through_ns`` (UTC nanoseconds): its dates, values and release
    instants. The feature state records it at the last training bar's close, so a later run on a revised file --
    a value the z-score was fitted on, changed -- is refused instead of silently mixing vintages; values released
    after the fit may be appended or revised freely."""
    fingerprints = {}
    for series in load_all(specs):
        keep = series.released_at.as_unit("ns").asi8 <= through_ns
        digest = hashlib.sha256()
        for part in (series.dates.as_unit("ns").asi8[keep], np.asarray(series.values, np.float64)[keep],
                     series.released_at.as_unit("ns").asi8[keep]):
            digest.update(np.ascontiguousarray(part).tobytes())
        fingerprints[series.name] = digest.hexdigest()
    return fingerprints


def check_fingerprints(specs: Sequence[str], fitted: dict) -> None:
    """Refuse, in one line, a series whose values released by the fit's last close differ from the fitted ones."""
    now = released_fingerprints(specs, int(fitted["through_ns"]))
    for name, digest in fitted["sha256"].items():
        if now.get(name) != digest:
            raise ValueError(f"exogenous series {name!r}: values released up to the model's last training bar "
                             f"({pd.Timestamp(int(fitted['through_ns']))} UTC) differ from the ones its z-score was "
                             "fitted on; restore that file (or its vintage) or retrain")


@dataclass
class SharedExogenous:
    """The exogenous block of a calendar shared by several instruments (a panel), fitted once
    (:func:`shared_exogenous`)."""

    values: np.ndarray
    """float32 ``(T, K)``: z-scored and clipped (raw with ``normalise="none"``); 0 before ``first_valid``."""
    names: list[str]
    first_valid: int
    """First row where every kept column is defined."""
    state: dict
    """``series``, ``zscore`` (None with ``normalise="none"``), ``columns``, ``dropped_constant`` and ``fitted``
    (``through_ns``: the last fit row's close, ``sha256``: :func:`released_fingerprints`), as a single market's
    ``state["exogenous"]``."""


def shared_exogenous(index: pd.DatetimeIndex, specs: Sequence[str], base_freq: pd.Timedelta, train_rows: np.ndarray,
                     *, warmup: int = 0, normalise: bool = True, clip: float = 5.0) -> SharedExogenous:
    """The exogenous columns of ``specs`` on the bars ``index`` (module doc), for every instrument of a panel at once.

    The series are market-wide, so one block serves every asset: the z-score is fitted once, on the rows where the
    boolean mask ``train_rows`` is True from ``max(warmup, block first_valid)`` on (``warmup``: the other features'
    warm-up, so the fit rows are the observation's), not per asset. A column constant on those rows is dropped (as a
    single market drops it). Row ``t`` reads only values released by bar ``t``'s close."""
    if not isinstance(index, pd.DatetimeIndex):
        raise ValueError(f"exogenous series {list(specs)} are joined by time: the bars need a DatetimeIndex, "
                         f"got {type(index).__name__}; drop --exogenous or index the panel by timestamps")
    rows = np.asarray(train_rows, dtype=bool)
    block = exogenous_block(index, specs, base_freq)
    first_valid = max(int(warmup), block.first_valid)
    fit = rows & (np.arange(len(index)) >= first_valid)
    if fit.sum() < 2:
        raise ValueError(f"exogenous series {list(specs)}: {int(fit.sum())} training rows after the warm-up of "
                         f"{first_valid} bars (the series' first two releases); start the data later or widen the "
                         "training range")
    train = block.values[fit]
    constant = np.ptp(train, axis=0) == 0
    keep = np.flatnonzero(~constant)
    if not len(keep):
        raise ValueError(f"exogenous series {list(specs)}: every column is constant on the training rows")
    raw = block.values[:, keep]
    zscore = fit_zscore(train[:, keep]) if normalise else None
    values = apply_zscore(raw, zscore, clip) if zscore is not None else raw.copy()
    values[:first_valid] = 0.0
    through = int(bar_close_times(index[[int(np.flatnonzero(fit)[-1])]], base_freq)[0])
    state = {"series": list(specs), "zscore": zscore, "columns": [block.names[i] for i in keep],
             "dropped_constant": [block.names[i] for i in np.flatnonzero(constant)],
             "fitted": {"through_ns": through, "sha256": released_fingerprints(specs, through)}}
    return SharedExogenous(values=values.astype(np.float32), names=list(state["columns"]), first_valid=first_valid,
                           state=state)
