"""The flat observation's layout: feature window, position, optional token blocks, optional drawdown state.

Both environments build observations in this order (:func:`observation_layout`); networks that read parts of
the observation (e.g. a multi-timeframe encoder reading token blocks) slice it by the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenBlock:
    """Extra observation rows gathered by precomputed indices: at bar t the env appends ``table[index[t]]``.

    A producer (e.g. the last ``K`` completed bars of a higher timeframe) precomputes ``index`` so that row t
    names only table rows built from bars ``<= t``; the env gathers them on its device, no host round-trip.
    """

    name: str
    """Name of the block (its slice in :func:`observation_layout`)."""
    table: np.ndarray
    """float32 ``(R, d)``: one token per row."""
    index: np.ndarray
    """int64 ``(T, K)``: the ``K`` table rows seen at each bar, oldest first."""

    def __post_init__(self) -> None:
        """Check dtypes, shapes and that every index names a table row."""
        if self.table.ndim != 2 or not np.issubdtype(self.table.dtype, np.floating):
            raise ValueError(f"TokenBlock {self.name!r}: table must be a float (R, d) array, got {self.table.shape}")
        if self.index.ndim != 2 or not np.issubdtype(self.index.dtype, np.integer):
            raise ValueError(f"TokenBlock {self.name!r}: index must be an integer (T, K) array, got {self.index.shape}")
        if self.index.size and (self.index.min() < 0 or self.index.max() >= len(self.table)):
            raise ValueError(f"TokenBlock {self.name!r}: index values outside [0, {len(self.table)})")

    @property
    def dim(self) -> int:
        """Width of the block in the observation: ``K * d``."""
        return self.index.shape[1] * self.table.shape[1]


def observation_layout(
    num_features: int, window: int, token_blocks: Sequence[TokenBlock] = (), drawdown_obs: bool = False
) -> dict[str, slice]:
    """Slices of the flat observation: ``"window"`` (bars t-window+1..t, flattened), ``"position"``, one per token
    block (by name, each ``K * d`` wide, row-major ``(K, d)``) and ``"drawdown"`` (``D_t, M_t``) when enabled."""
    layout, at = {"window": slice(0, window * num_features)}, window * num_features
    layout["position"] = slice(at, at + 1)
    at += 1
    for block in token_blocks:
        if block.name in layout:
            raise ValueError(f"token block name {block.name!r} is used twice or is reserved")
        layout[block.name] = slice(at, at + block.dim)
        at += block.dim
    if drawdown_obs:
        layout["drawdown"] = slice(at, at + 2)
    return layout


def observation_dim(layout: dict[str, slice]) -> int:
    """Width of an observation with this :func:`observation_layout`."""
    return max(part.stop for part in layout.values())


def check_token_blocks(blocks: Sequence[TokenBlock], n_bars: int) -> tuple[TokenBlock, ...]:
    """Return ``blocks`` after checking that each has one index row per market bar."""
    for block in blocks:
        if len(block.index) != n_bars:
            raise ValueError(f"TokenBlock {block.name!r}: index has {len(block.index)} rows, the market {n_bars}")
    return tuple(blocks)
