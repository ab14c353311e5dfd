"""Benchmark-anchored (residual) actions: the agent chooses a bounded tilt around a benchmark policy's weight.

With an :class:`AnchorConfig` the envs (:class:`~sentio_lab.env.TradingEnv`, :class:`~sentio_lab.env.NumpyTradingEnv`)
read action ``a`` as the offset ``tilts[a]`` and trade towards

    target_t = clip(b_t + tilts[a], lo, hi)

with ``b_t`` the benchmark's weight decided at bar ``t`` (a function of bars ``<= t``: a rule of
:mod:`sentio_lab.env.benchmarks`, computed once per market by :func:`sentio_lab.env.benchmarks.benchmark_weights`) and
``[lo, hi]`` the ``limits`` (default: the lowest and highest level of the env's position set). The fills, costs,
borrow and marks are the env's own, unchanged. The zero offset must be one of the tilts: an agent that always
chooses it *is* the benchmark, bit for bit (the same target weights, the same trades, the same equity), which is
what tests/env/test_anchor.py checks against the baseline run as a policy through the same env.

Options (each off at its default):

* ``no_trade_band``: a target within the band of the weight held (``|target - held| <= band``) does not trade; the
  held weight stays. Band 0 trades on any change, as the unanchored env does on a level change.
* ``excess_reward``: the reward is the agent's log return minus the benchmark's own log return over the same bar.
  The benchmark runs as a shadow account beside the agent's in every episode (same start, same fills and cost
  model, no band), so its trades pay the same costs; ``info["benchmark_equity"]`` is its equity. A shadow account
  whose mark falls to the equity floor (1e-12; leverage beyond the benchmark's own, or a short held through a
  rally, can take it below 0) is ruined: from that bar it is flat at the floor and trades nothing more, so its log
  return is finite once (a large negative one) and 0 after; the agent's own episode goes on.
* ``deviation_penalty``: ``c`` in ``reward -= c * (target_t - b_t)^2``, the L2 penalty on the tilt actually taken
  (after clipping to the limits, before the band).

Level-valued or not: the benchmark's weight is traded as it is (clipped to the limits), not rounded to a position
level, so the zero tilt reproduces the *baseline policy* of :mod:`sentio_lab.evaluation.baselines` (which rounds)
only for rules whose weights are levels (``buy_and_hold``, ``sma_crossover``, ``momentum`` on a set holding -1, 0, 1;
:func:`sentio_lab.env.benchmarks.on_levels`). For ``vol_target`` the anchored benchmark is the unrounded rule:
:func:`sentio_lab.evaluation.baselines.evaluate_anchor_benchmark` evaluates it, and the zero tilt is that, bit for bit.

The variants take all of this from the shared flags (``--anchor``, ``--tilts``, ``--excess-reward``,
``--deviation-penalty``, ``--no-trade-band``; :func:`sentio_lab.agents.training.anchor_from` builds the config for
the training and the evaluation env alike) and start as the benchmark: the actor's last layer is biased so that the
zero tilt is the greedy action for every observation (:func:`sentio_lab.agents.nets.favour_action`).

The observation gains one block, ``"benchmark"`` (:meth:`AnchorConfig.token_block`): ``b_t`` at bar ``t``, so the
agent knows where it is anchored; the position slot shows the weight held. Episodes start flat, like every episode.

Masks (:mod:`sentio_lab.env.masks`) index fixed position levels; an anchored env's weights move with ``b_t``, so the
two do not combine yet: an env built with both raises (``ppo_masked --anchor`` is refused with that one line).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sentio_lab.features.observation_layout import TokenBlock

#: Default tilts: -0.5 .. +0.5 in quarters (fractions of equity added to the benchmark weight).
DEFAULT_TILTS: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5)
#: Name of the observation block holding ``b_t``.
BENCHMARK_BLOCK = "benchmark"


def check_tilts(tilts: Sequence[float]) -> tuple[float, ...]:
    """Validate the tilt offsets: at least two, distinct, finite, and including 0 (the benchmark itself)."""
    values = tuple(float(x) for x in tilts)
    if len(values) < 2 or not np.isfinite(values).all() or len(set(values)) != len(values):
        raise ValueError(f"tilts must be at least two distinct finite offsets, got {tuple(tilts)}")
    if 0.0 not in values:
        raise ValueError(f"tilts {values} lack the zero offset: the agent must be able to be the benchmark (--tilts)")
    return values


@dataclass(frozen=True, eq=False)
class AnchorConfig:
    """What anchors an env's actions to a benchmark (module doc)."""

    benchmark: np.ndarray = field(repr=False)
    """float64 ``(T,)``: the benchmark's weight decided at each bar (finite; flat where its signal is undefined)."""
    tilts: tuple[float, ...] = DEFAULT_TILTS
    """The offsets the actions choose from (one action per offset; 0 must be one of them)."""
    limits: tuple[float, float] | None = None
    """``(lo, hi)`` bounds of the target weight; None: the env's lowest and highest position level."""
    excess_reward: bool = False
    """Reward in excess of the benchmark's own log return (its shadow account pays the same costs)."""
    deviation_penalty: float = 0.0
    """``c >= 0`` in ``reward -= c * (target - b_t)^2``."""
    no_trade_band: float = 0.0
    """A target within this distance of the weight held does not trade (``>= 0``)."""
    name: str = "benchmark"
    """The benchmark's name (a :data:`sentio_lab.env.benchmarks.BASELINES` key), for reports."""

    def __post_init__(self) -> None:
        """Check the series, the tilts, the limits and the option values once."""
        weights = np.asarray(self.benchmark)
        if weights.ndim != 1 or weights.dtype != np.float64:
            raise ValueError(f"anchor: benchmark must be a float64 (T,) array, got {weights.dtype} {weights.shape}")
        bad = ~np.isfinite(weights)
        if bad.any():
            raise ValueError(f"anchor: benchmark weight not finite at bars {np.flatnonzero(bad)[:5].tolist()}")
        object.__setattr__(self, "tilts", check_tilts(self.tilts))
        if self.limits is not None:
            lo, hi = (float(x) for x in self.limits)
            if not (np.isfinite([lo, hi]).all() and lo <= 0.0 <= hi and lo < hi):
                raise ValueError(f"anchor: limits {self.limits} must be finite with lo <= 0 <= hi, lo < hi "
                                 "(episodes start flat)")
        if not (np.isfinite(self.deviation_penalty) and self.deviation_penalty >= 0.0):
            raise ValueError(f"anchor: deviation_penalty must be >= 0, got {self.deviation_penalty}")
        if not (np.isfinite(self.no_trade_band) and self.no_trade_band >= 0.0):
            raise ValueError(f"anchor: no_trade_band must be >= 0, got {self.no_trade_band}")

    @property
    def zero_action(self) -> int:
        """Index of the zero tilt: the action that follows the benchmark."""
        return self.tilts.index(0.0)

    def bounds(self, positions: Sequence[float]) -> tuple[float, float]:
        """``(lo, hi)``: :attr:`limits`, or the lowest and highest of ``positions``."""
        if self.limits is not None:
            return float(self.limits[0]), float(self.limits[1])
        return float(min(positions)), float(max(positions))

    def token_block(self) -> TokenBlock:
        """The observation block ``"benchmark"``: row ``t`` holds ``b_t`` (bars ``<= t`` only)."""
        n = len(self.benchmark)
        return TokenBlock(BENCHMARK_BLOCK, self.benchmark.astype(np.float32)[:, None],
                          np.arange(n, dtype=np.int64)[:, None])

    def check_market(self, n_bars: int) -> None:
        """Raise unless the series has one weight per market bar."""
        if len(self.benchmark) != n_bars:
            raise ValueError(f"anchor: benchmark has {len(self.benchmark)} weights, the market {n_bars} bars")


def _xp(x: Any) -> Any:
    return torch if isinstance(x, torch.Tensor) else np


def anchored_targets(benchmark_t: Any, tilt: Any, held: Any, lo: float, hi: float, band: float
                     ) -> tuple[Any, Any, Any]:
    """``(target, trade, deviation)`` per env, numpy or torch alike.

    ``raw = clip(b_t + tilt, lo, hi)``; ``deviation = raw - b_t``; where ``|raw - held| <= band`` the held weight
    stays and nothing trades, elsewhere ``target = raw`` and ``trade`` is True (band 0: trade iff ``raw != held``).
    """
    xp = _xp(benchmark_t)
    raw = xp.clip(benchmark_t + tilt, lo, hi)
    keep = xp.abs(raw - held) <= band
    return xp.where(keep, held, raw), ~keep, raw - benchmark_t


def benchmark_targets(benchmark_t: Any, held: Any, lo: float, hi: float) -> tuple[Any, Any]:
    """The shadow benchmark account's ``(target, trade)``: ``clip(b_t, lo, hi)``, traded on any change (no band)."""
    xp = _xp(benchmark_t)
    target = xp.clip(benchmark_t, lo, hi)
    return target, target != held
