"""Placebo control for portfolio experiments: every configuration retrained on bootstrapped training bars of the panel.

The single-asset placebo (:mod:`sentio_lab.experiment.placebo`) for a panel. :func:`bootstrap_panel` resamples each
training segment of a fold with the same stationary block bootstrap
(:func:`~sentio_lab.experiment.placebo.bootstrap_indices`, one stream per segment, as
:func:`~sentio_lab.experiment.placebo.bootstrap_training_bars` draws them) and applies **one set of source bars to
every asset**: bar ``t`` of asset i takes the close-to-close return of the same source bar ``k`` in every asset, so
the cross-section (correlations, common shocks) stays coherent while every dependence across time longer than a
block is destroyed. The first bar of a segment is kept (the price level); open, high and low keep the source bar's
shape relative to its close (NaN stays NaN in a close-only panel); volume travels with its bar. Rows outside the
training segments -- purge and embargo gaps, the test groups -- are never touched, so no placebo training input
depends on a test-group bar.

A placebo cell (:func:`placebo_cells`: per configuration and fold, ``placebo_seeds`` replicates; replicate j uses
bootstrap seed j and policy seed ``seeds[j % len(seeds)]``) trains on that panel with the fold's own features refit
on its (bootstrapped) training rows, then runs greedily on the same training segments: its in-sample Sharpe. The
95th percentile of those Sharpe ratios per configuration is the **memorisation floor**
(:func:`~sentio_lab.experiment.placebo.placebo_floor`): an in-sample Sharpe below it is what an agent reaches on bars
with nothing to learn beyond a block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from sentio_lab.data.panel import PanelData
from sentio_lab.experiment.cells import Cell
from sentio_lab.experiment.placebo import PRICE_COLUMNS, bootstrap_indices, placebo_floor

#: The quantile of the placebo runs' in-sample Sharpe ratios that is the memorisation floor.
FLOOR_QUANTILE = 0.95


def segment_sources(n_bars: int, segments: Sequence[tuple[int, int]], *, block_mean: float, seed: int
                    ) -> dict[int, np.ndarray]:
    """Per training segment start, the source bar of each rebuilt bar ``start + 1 .. stop - 1`` (module doc):
    the draws :func:`~sentio_lab.experiment.placebo.bootstrap_training_bars` makes for the same segments and seed."""
    ordered = sorted((int(a), int(b)) for a, b in segments)
    for (a, b), (c, _) in zip(ordered, ordered[1:], strict=False):
        if c < b:
            raise ValueError(f"placebo: training segments [{a}, {b}) and [{c}, ...) overlap")
    streams = np.random.SeedSequence(seed).spawn(len(ordered))
    sources: dict[int, np.ndarray] = {}
    for (start, stop), stream in zip(ordered, streams, strict=True):
        if not 0 <= start < stop <= n_bars:
            raise ValueError(f"placebo: segment [{start}, {stop}) outside the panel's {n_bars} bars")
        if stop - start >= 2:  # one bar: nothing to resample (its close is the anchor)
            draws = bootstrap_indices(stop - start - 1, block_mean, int(stream.generate_state(1)[0]))
            sources[start] = start + 1 + draws
    return sources


def bootstrap_panel(panel: PanelData, segments: Sequence[tuple[int, int]], *, block_mean: float, seed: int
                    ) -> tuple[PanelData, dict[int, np.ndarray]]:
    """``panel`` with every training segment replaced by one bootstrapped path shared by all assets (module doc);
    also the source bars per segment start. Deterministic in ``seed``."""
    sources = segment_sources(len(panel.index), segments, block_mean=block_mean, seed=seed)
    frames: dict[str, pd.DataFrame] = {}
    for asset in panel.assets:
        frame = panel.frames[asset]
        close = frame["close"].to_numpy(dtype=np.float64)
        out = frame.copy()
        column = {name: out.columns.get_loc(name) for name in frame.columns}
        for start, source in sources.items():
            rows = np.arange(start + 1, start + 1 + len(source))
            new_close = close[start] * np.cumprod(close[source] / close[source - 1])
            out.iloc[rows, column["close"]] = new_close
            for name in ("open", "high", "low"):
                if name in column:
                    out.iloc[rows, column[name]] = new_close * (frame[name].to_numpy(dtype=np.float64)[source]
                                                                / close[source])
            for name in frame.columns.difference(PRICE_COLUMNS, sort=False):
                out.iloc[rows, column[name]] = frame[name].to_numpy()[source]
        frames[asset] = out
    return dataclasses.replace(panel, frames=frames, name=f"{panel.name} (placebo seed {seed})"), sources


def placebo_cells(cells: Sequence[Cell], seeds: Sequence[int], replicates: int) -> tuple[Cell, ...]:
    """Per configuration and fold, ``replicates`` placebo cells (replicate j: bootstrap seed j, policy seed
    ``seeds[j % len(seeds)]``) with the configuration's command line on that fold."""
    firsts: dict[tuple[str, int], Cell] = {}
    for cell in cells:  # the configuration's first cell on each fold, in plan order
        firsts.setdefault((cell.agent, cell.fold), cell)
    return tuple(dataclasses.replace(cell, seed=seeds[j % len(seeds)], placebo=j)
                 for cell in firsts.values() for j in range(replicates))


def placebo_table(placebo: pd.DataFrame, memo: pd.DataFrame, quantile: float = FLOOR_QUANTILE) -> pd.DataFrame:
    """Per configuration: the placebo runs, their median in-sample Sharpe, the floor (their ``quantile``), the real
    cells' median in-sample Sharpe beside it and the share of real cells at or below the floor."""
    rows = []
    for name, runs in placebo.groupby("name", sort=False):
        floor = placebo_floor(runs["in_sample_sharpe"].to_numpy(), quantile)
        real = memo.loc[memo["name"] == name, "in_sample_sharpe"].to_numpy(dtype=np.float64)
        rows.append({"name": name, "placebo_runs": len(runs), "placebo_median": float(runs["in_sample_sharpe"]
                     .median()), "floor": floor, "in_sample_sharpe": float(np.median(real)) if len(real) else np.nan,
                     "share_at_or_below_floor": float(np.mean(real <= floor)) if len(real) else np.nan})
    columns = ["name", "placebo_runs", "placebo_median", "floor", "in_sample_sharpe", "share_at_or_below_floor"]
    return pd.DataFrame(rows, columns=columns).set_index("name")
