"""Placebo control: training bars whose predictability is destroyed but whose volatility clustering is kept.

:func:`bootstrap_training_bars` resamples each training segment of a fold with a stationary block bootstrap
(Politis and Romano, 1994; :class:`arch.bootstrap.StationaryBootstrap`, blocks of geometric length with a
declared mean) and rebuilds OHLCV from the resampled bars:

* the first bar of a segment is kept (it anchors the price level); every later bar ``t`` of the segment takes
  a source bar ``k`` of the same segment (``k >= segment start + 1``) and ``close'_t = close'_{t-1} x
  close_k / close_{k-1}``: the close-to-close return of bar k;
* open, high and low keep the source bar's shape relative to its own close (``open'_t = close'_t x open_k /
  close_k`` ...), so the overnight gap and the intra-bar range travel with the bar and high >= max(open,
  close) >= min(open, close) >= low holds whenever it held in the source; volume (and any other column) is
  carried with its bar;
* rows outside the training segments (purge and embargo gaps, the validation slice, the test groups) are
  never touched.

Why the bootstrap and not random sign flips of blocks: a sign flip keeps every |return| in place (volatility
clustering exactly) but removes the drift of the training years, so an agent on real bars would earn the
equity premium that no placebo agent can, and real results would clear the floor for that reason alone. The
bootstrap keeps the returns' distribution (drift included) and, within blocks, the volatility clustering and
short-lag dependence, and destroys every dependence longer than a block: the regime and calendar patterns a
memorising agent fits. Keep the block mean short (a few bars): dependence within a block survives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
from arch.bootstrap import StationaryBootstrap

from sentio_lab.data import MarketData
from sentio_lab.data.validation import fingerprint

#: Placebo schemes the runner knows (``placebo`` in the experiment file).
PLACEBO_SCHEMES: tuple[str, ...] = ("stationary_bootstrap",)
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")


def bootstrap_indices(n: int, block_mean: float, seed: int) -> np.ndarray:
    """``n`` positions in ``0 .. n - 1`` drawn by one stationary-bootstrap resample (mean block ``block_mean``)."""
    if n < 1:
        raise ValueError(f"bootstrap_indices: need at least one position, got n={n}")
    if block_mean < 1:
        raise ValueError(f"placebo block mean must be >= 1 bar, got {block_mean}")
    bootstrap = StationaryBootstrap(block_mean, np.arange(n), seed=np.random.default_rng(seed))
    (positions,), _ = next(bootstrap.bootstrap(1))
    return np.asarray(positions, dtype=np.int64)


def bootstrap_training_bars(
    frame: pd.DataFrame, segments: Sequence[tuple[int, int]], *, block_mean: float, seed: int
) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """``frame`` with every training segment ``[start, stop)`` replaced by a bootstrapped path (module doc).

    Returns the new frame (same index and columns) and, per segment start, the source row of each rebuilt row
    ``start + 1 .. stop - 1`` (for audits). Deterministic in ``seed``; each segment draws from its own stream.
    """
    missing = [c for c in PRICE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"bootstrap_training_bars: the frame lacks price columns {missing}")
    # A close-only frame (a panel's stock: open, high, low absent on every row) keeps them absent: only the
    # columns that hold prices are checked and rebuilt (NaN shape x new close stays NaN).
    present = [c for c in PRICE_COLUMNS if c == "close" or frame[c].notna().any()]
    prices = frame[present].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(prices)) or np.any(prices <= 0):
        bad = int(np.flatnonzero(~(np.isfinite(prices) & (prices > 0)).all(axis=1))[0])
        raise ValueError(f"bootstrap_training_bars: row {bad} ({frame.index[bad]}) has a non-positive or missing price")
    out = frame.copy()
    close = frame["close"].to_numpy(dtype=np.float64)
    shape = {c: frame[c].to_numpy(dtype=np.float64) / close for c in ("open", "high", "low")}
    sources: dict[int, np.ndarray] = {}
    ordered = sorted((int(a), int(b)) for a, b in segments)
    for (a, b), (c, _) in zip(ordered, ordered[1:], strict=False):
        if c < b:
            raise ValueError(f"bootstrap_training_bars: training segments [{a}, {b}) and [{c}, ...) overlap")
    streams = np.random.SeedSequence(seed).spawn(len(ordered))
    for (start, stop), stream in zip(ordered, streams, strict=True):
        if not 0 <= start < stop <= len(frame):
            raise ValueError(f"bootstrap_training_bars: segment [{start}, {stop}) outside the frame's "
                             f"{len(frame)} rows")
        if stop - start < 2:
            continue  # one bar: nothing to resample (its close is the anchor)
        source = start + 1 + bootstrap_indices(stop - start - 1, block_mean, int(stream.generate_state(1)[0]))
        growth = close[source] / close[source - 1]
        new_close = close[start] * np.cumprod(growth)
        rows = np.arange(start + 1, stop)
        out.iloc[rows, out.columns.get_loc("close")] = new_close
        for column in ("open", "high", "low"):
            out.iloc[rows, out.columns.get_loc(column)] = new_close * shape[column][source]
        for column in frame.columns.difference(PRICE_COLUMNS, sort=False):
            out.iloc[rows, out.columns.get_loc(column)] = frame[column].to_numpy()[source]
        sources[start] = source
    return out, sources


def placebo_floor(in_sample_sharpe: Sequence[float] | np.ndarray, quantile: float = 0.95) -> float:
    """The memorisation floor: the ``quantile`` of the placebo runs' in-sample Sharpe ratios (NaN: none)."""
    values = np.asarray(in_sample_sharpe, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.quantile(values, quantile)) if len(values) else float("nan")


def placebo_market_data(data: MarketData, segments: Sequence[tuple[int, int]], *, block_mean: float,
                        seed: int) -> MarketData:
    """``data`` with its training ``segments`` bootstrapped (:func:`bootstrap_training_bars`), refingerprinted so
    a checkpoint trained on it is never mistaken for one trained on the real bars."""
    frame, _ = bootstrap_training_bars(data.frame, segments, block_mean=block_mean, seed=seed)
    return dataclasses.replace(data, frame=frame, fingerprint=fingerprint(frame))
