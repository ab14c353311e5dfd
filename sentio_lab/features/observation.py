"""The observation matrix: raw features normalised, pruned and joined by filtered HMM regime probabilities, fitted
on training rows only into a plain-python state that re-applies to new data (:func:`build_observation_features`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sentio_lab.data import infer_bar_freq
from sentio_lab.data.exogenous import bar_close_times
from sentio_lab.features import regime as _regime
from sentio_lab.features.config import FeatureConfig
from sentio_lab.features.exogenous import (
    EXOGENOUS_BLOCK,
    apply_zscore,
    check_fingerprints,
    exogenous_block,
    fit_zscore,
    released_fingerprints,
)
from sentio_lab.features.normalise import _apply_normaliser, _fit_normaliser, _prune
from sentio_lab.features.raw import RawFeatures, _raw_features, _validated_frame
from sentio_lab.features.registry import FEATURE_VERSION

#: Fitting needs at least this many training rows after the warm-up.
MIN_TRAIN_ROWS = 50


@dataclass
class ObservationFeatures:
    """The observation matrix handed to the environment, plus what was fitted to make it."""

    values: np.ndarray
    """float32 ``(T, F)`` aligned with the frame's rows; finite from ``first_valid`` on, 0.0 before."""
    names: list[str]
    """Column names; extra timeframes are prefixed ``"<rule>:"``, exogenous columns ``"exo:"``
    (:mod:`sentio_lab.features.exogenous`), regime columns are ``"regime:p<k>"``."""
    first_valid: int
    """First row where every feature is defined (after the longest warm-up of all blocks)."""
    blocks: dict[str, slice]
    """Column slice per block: ``"base"``, each extra timeframe, ``"exogenous"`` with exogenous series and
    ``"regime"`` when regimes > 0."""
    state: dict
    """Everything fitted on the training range, as plain python values (lists, floats, str)."""


def _check_finite(values: np.ndarray, names: list[str], first_valid: int, index: pd.Index) -> None:
    """Raise if any value from ``first_valid`` on is NaN or inf, naming the columns and first rows."""
    bad = ~np.isfinite(values[first_valid:])
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0))
        detail = ", ".join(
            f"{names[j]} (first at {index[first_valid + int(np.argmax(bad[:, j]))]})" for j in cols[:5]
        )
        more = f" and {len(cols) - 5} more" if len(cols) > 5 else ""
        raise ValueError(
            f"features are NaN/inf after the warm-up (row {first_valid}): {detail}{more}; a producer "
            "under-declares its lookback or the data breaks its assumptions"
        )


def _fit_state(raw: RawFeatures, fit: np.ndarray, config: FeatureConfig, base_freq: pd.Timedelta) -> dict:
    """Fit dropping, pruning and normalisation on the rows of ``raw`` where the boolean mask ``fit`` is True;
    the state records the first and one-past-last of them (``fit_rows``) and their runs (``fit_segments``)."""
    train = raw.values[fit]
    runs = _regime.row_runs(fit)
    columns: list[str] = []
    block_sizes: dict[str, int] = {}
    dropped_constant: list[str] = []
    dropped_correlated: list[str] = []
    for block, sl in raw.blocks.items():
        idx = np.arange(sl.start, sl.stop)
        # A column constant on the training range carries nothing to learn and cannot be scaled.
        constant = np.ptp(train[:, idx], axis=0) == 0
        dropped_constant += [raw.names[i] for i in idx[constant]]
        idx = idx[~constant]
        if config.prune_corr is not None and len(idx) > 1:
            params = _fit_normaliser(train[:, idx], config.normalise)
            normed = _apply_normaliser(train[:, idx], params, config.clip)
            keep = _prune(normed, config.prune_corr)
            dropped_correlated += [raw.names[i] for i in np.delete(idx, keep)]
            idx = idx[keep]
        if len(idx) == 0:
            raise ValueError(f"block {block!r}: every feature is constant on the training range")
        columns += [raw.names[i] for i in idx]
        block_sizes[block] = len(idx)
    exo = block_sizes.get(EXOGENOUS_BLOCK, 0) if config.normalise != "none" else 0
    selected = train[:, [raw.names.index(c) for c in columns]]
    exogenous = None
    if config.exogenous:  # the exogenous block (the last of raw) is z-scored instead of normalised by the bank's rule
        zscore = fit_zscore(selected[:, len(columns) - exo:]) if exo else None
        exogenous = {"series": list(config.exogenous), "zscore": zscore}
    return {
        "version": FEATURE_VERSION,
        "config": config.fitted_fields(),
        "base_freq_ns": int(base_freq.value),
        "fit_rows": [runs[0][0], runs[-1][1]],
        "fit_segments": [[a, b] for a, b in runs],
        "columns": columns,
        "block_sizes": block_sizes,
        "dropped_constant": dropped_constant,
        "dropped_correlated": dropped_correlated,
        "normaliser": _fit_normaliser(selected[:, : len(columns) - exo], config.normalise),
        "exogenous": exogenous,
        "regime": None,
    }


def _check_state(state: dict, config: FeatureConfig) -> None:
    """A saved state applies only to the configuration it was fitted with."""
    for key in ("version", "config", "base_freq_ns", "columns", "block_sizes", "normaliser", "regime"):
        if key not in state:
            raise ValueError(f"feature state lacks {key!r}; was it produced by build_observation_features?")
    if state["version"] != FEATURE_VERSION:
        raise ValueError(
            f"feature state has version {state['version']}, this code computes version {FEATURE_VERSION}"
        )
    # No "exogenous" key (a config without series, or a state saved before the field) means no series.
    wanted, saved = {"exogenous": [], **config.fitted_fields()}, {"exogenous": [], **state["config"]}
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"feature state was fitted with a different config (state, given): {diff}")


def _training_rows(n: int, train_stop: int | None, train_rows: np.ndarray | None) -> np.ndarray:
    """Boolean ``(n,)`` mask of the training rows given as ``train_stop`` (rows ``< train_stop``) or a mask."""
    if train_rows is None:
        if isinstance(train_stop, bool) or not isinstance(train_stop, (int, np.integer)):
            raise TypeError(f"train_stop must be an integer row position, got {train_stop!r}")
        if not 0 < int(train_stop) <= n:
            raise ValueError(f"train_stop={train_stop} is outside 1..{n} (the frame has {n} rows)")
        return np.arange(n) < int(train_stop)
    if train_stop is not None:
        raise ValueError("give train_stop or train_rows, not both")
    rows = np.asarray(train_rows)
    if rows.dtype != bool or rows.shape != (n,):
        raise ValueError(f"train_rows must be a boolean mask of shape ({n},), got {rows.dtype} {rows.shape}")
    if not rows.any():
        raise ValueError("train_rows selects no row")
    return rows.copy()


def _training_bar_freq(frame: pd.DataFrame, rows: np.ndarray) -> pd.Timedelta:
    """Median gap between consecutive rows inside the runs of training rows (no gap spans a non-training row)."""
    runs = _regime.row_runs(rows)
    if len(runs) == 1:
        return infer_bar_freq(frame.iloc[runs[0][0] : runs[0][1]])
    times = frame.index.as_unit("ns").asi8
    gaps = np.concatenate([np.diff(times[a:b]) for a, b in runs])
    return pd.Timedelta(int(np.median(gaps)), unit="ns") if len(gaps) else pd.Timedelta(0)


def _with_exogenous(raw: RawFeatures, frame: pd.DataFrame, config: FeatureConfig,
                    base_freq: pd.Timedelta) -> RawFeatures:
    """``raw`` with the ``"exogenous"`` block appended (:func:`~sentio_lab.features.exogenous.exogenous_block`)
    when ``config`` names series; ``raw`` itself otherwise."""
    if not config.exogenous:
        return raw
    block = exogenous_block(frame.index, config.exogenous, base_freq)
    width = raw.values.shape[1]
    return RawFeatures(
        values=np.column_stack([raw.values, block.values]),
        names=raw.names + block.names,
        blocks={**raw.blocks, EXOGENOUS_BLOCK: slice(width, width + len(block.names))},
        first_valid=max(raw.first_valid, block.first_valid),
        block_first_valid={**raw.block_first_valid, EXOGENOUS_BLOCK: block.first_valid},
    )


def _first_valid(raw: RawFeatures, config: FeatureConfig) -> int:
    """The first row whose observation is complete: every feature block's and the regime inputs' warm-up done."""
    return max(raw.first_valid, _regime.INPUT_LOOKBACK) if config.regimes else raw.first_valid


def warmup_rows(frame: pd.DataFrame, train_stop: int, config: FeatureConfig = FeatureConfig()) -> int:
    """The rows :func:`build_observation_features` would leave before its first valid row (``first_valid``),
    without fitting anything: for a too-short market, to say how many bars it needs. When a timeframe's
    warm-up is not over within ``frame`` it is ``len(frame)`` (a lower bound)."""
    frame = _validated_frame(frame)
    base_freq = _training_bar_freq(frame, _training_rows(len(frame), train_stop, None))
    raw = _with_exogenous(_raw_features(frame, config, base_freq), frame, config, base_freq)
    return min(_first_valid(raw, config), len(frame))


def build_observation_features(
    frame: pd.DataFrame,
    train_stop: int | None,
    config: FeatureConfig = FeatureConfig(),
    state: dict | None = None,
    *,
    train_rows: np.ndarray | None = None,
) -> ObservationFeatures:
    """Compute, normalise and assemble the observation matrix for ``frame``.

    Without ``state`` the normaliser, pruning and HMM are fitted on the training rows from ``first_valid`` on:
    rows ``< train_stop``, or (``train_stop=None``) the rows where the boolean ``(len(frame),)`` mask
    ``train_rows`` is True, e.g. several disjoint segments (:func:`sentio_lab.env.splits.fit_rows` of a fold's
    training ranges; the HMM treats each run as its own sequence). The base bar duration comes from gaps inside
    the runs of training rows. With ``state`` (from an earlier call) nothing is refit and the training rows are
    only checked. The features themselves are causal either way: row ``t`` reads bars ``<= t``.
    """
    frame = _validated_frame(frame, bank=config.bank)
    n = len(frame)
    rows = _training_rows(n, train_stop, train_rows)
    if state is not None:
        _check_state(state, config)
        base_freq = pd.Timedelta(int(state["base_freq_ns"]), unit="ns")
        if config.exogenous and (state.get("exogenous") or {}).get("fitted"):
            check_fingerprints(config.exogenous, state["exogenous"]["fitted"])
    else:
        # Inferred from the training rows only, so other bars cannot move timeframe buckets.
        base_freq = _training_bar_freq(frame, rows)
        if config.timeframes and base_freq <= pd.Timedelta(0):
            raise ValueError("cannot infer the base bar duration from fewer than 2 training rows")

    raw = _with_exogenous(_raw_features(frame, config, base_freq), frame, config, base_freq)
    first_valid = _first_valid(raw, config)
    regime_inputs = None
    if config.regimes:
        regime_inputs = _regime.regime_inputs(frame["close"].to_numpy(dtype=np.float64))
    if first_valid >= n:
        raise ValueError(
            f"too few rows: the warm-up needs {first_valid} bars (per block: {raw.block_first_valid}) "
            f"but the frame has {n}"
        )
    _check_finite(raw.values, raw.names, first_valid, frame.index)

    if state is None:
        fit = rows & (np.arange(n) >= first_valid)
        if fit.sum() < MIN_TRAIN_ROWS:
            given = f"train_stop={train_stop}" if train_rows is None else f"train_rows ({int(rows.sum())} rows)"
            raise ValueError(
                f"{given} leaves {int(fit.sum())} training rows after the "
                f"warm-up of {first_valid} bars; at least {MIN_TRAIN_ROWS} are needed"
            )
        state = _fit_state(raw, fit, config, base_freq)
        if config.exogenous:  # what the z-score was fitted on: a revised file is refused later (check_fingerprints)
            through = int(bar_close_times(frame.index[[int(np.flatnonzero(fit)[-1])]], base_freq)[0])
            state["exogenous"]["fitted"] = {"through_ns": through,
                                            "sha256": released_fingerprints(config.exogenous, through)}
        if config.regimes:
            model = _regime.fit_regime_model(
                regime_inputs,
                None,
                None,
                config.regimes,
                rows=fit,
                seed=config.seed,
                restarts=config.regime_restarts,
                index=frame.index,
            )
            state["regime"] = model.to_state()

    missing = [c for c in state["columns"] if c not in raw.names]
    if missing:
        raise ValueError(f"feature state expects column(s) the bank did not produce: {missing[:5]}")
    position = {name: i for i, name in enumerate(raw.names)}
    selected = raw.values[:, [position[c] for c in state["columns"]]]
    exo = state["block_sizes"].get(EXOGENOUS_BLOCK, 0) if (state.get("exogenous") or {}).get("zscore") else 0
    normed = _apply_normaliser(selected[:, : selected.shape[1] - exo], state["normaliser"], config.clip)
    if exo:
        normed = np.column_stack([normed, apply_zscore(selected[:, -exo:], state["exogenous"]["zscore"], config.clip)])
    names = list(state["columns"])
    blocks: dict[str, slice] = {}
    start = 0
    for block, size in state["block_sizes"].items():
        blocks[block] = slice(start, start + size)
        start += size
    if config.regimes:
        model = _regime.RegimeModel.from_state(state["regime"])
        probs = _regime.filtered_probabilities(model, regime_inputs)
        normed = np.column_stack([normed, probs])
        names += [f"regime:p{k}" for k in range(model.n_states)]
        blocks["regime"] = slice(start, start + model.n_states)

    values = normed.astype(np.float32)
    values[:first_valid] = 0.0
    _check_finite(values, names, first_valid, frame.index)
    return ObservationFeatures(
        values=values, names=names, first_valid=first_valid, blocks=blocks, state=state
    )
