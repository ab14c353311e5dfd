"""Validation-gated deviation: an anchored agent keeps its tilt on a fold only if it earned it on validation.

An experiment's agent table with ``gate_margin = m`` (an anchored configuration, ``--anchor``; the experiment needs
``validation_bars``) adds the strategy ``<name>_gated`` (:func:`gated_name`). Per fold and per trained cell (one
seed), after training, :func:`validation_gate` runs two greedy policies through the same anchored env, costs and
options over the fold's inner validation slice (carved from the fold's training segments: never a test bar):

* the trained agent,
* the benchmark itself: the zero tilt at every decision (:class:`ZeroTiltPolicy`; an anchored env trades exactly
  the benchmark's weight then, :mod:`sentio_lab.env.anchor`).

The cell keeps its tilt when the agent's annualised Sharpe ratio over the slice (net of costs, as in
``results.parquet``) exceeds the benchmark's by more than ``m`` (:func:`gate_keeps`; strictly: a tie, or a
difference of exactly ``m``, falls back). Otherwise the cell *falls back*: on the fold's test groups it acts as
the zero tilt, so its test-group equity is the benchmark's, bit for bit (with ``--no-trade-band`` the zero tilt
still keeps a held weight within the band: the fallback is the zero tilt through the same env, the anchored
benchmark the env defines). A Sharpe ratio that is undefined (a curve that never moves: a flat benchmark, an agent
that never holds anything) counts as 0, the Sharpe of holding cash.

Both strategies stay in the results: ``<name>`` (always the tilt) and ``<name>_gated``, which is one more trial for
the deflated Sharpe ratio and PBO (:attr:`~sentio_lab.experiment.config.ExperimentConfig.n_trials`). The decision
of every cell is written to ``gates.parquet`` (:data:`GATES_FILE`, one row per configuration x seed x fold with
both validation Sharpe ratios, the margin and the ``fallback`` flag); :func:`gate_table` gives the fallback rate
per configuration for the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation.episodes import evaluate_policies
from sentio_lab.evaluation.metrics import summary_stats

#: Name suffix of a configuration's validation-gated strategy in the results.
GATED_SUFFIX = "_gated"
#: The per-cell gate decisions of a run (``<output>/gates.parquet``).
GATES_FILE = "gates.parquet"
#: Columns of :data:`GATES_FILE`.
GATE_COLUMNS: tuple[str, ...] = ("name", "seed", "fold", "agent_sharpe", "benchmark_sharpe", "margin", "fallback")


def gated_name(agent: str) -> str:
    """The results name of configuration ``agent``'s validation-gated strategy."""
    return f"{agent}{GATED_SUFFIX}"


class ZeroTiltPolicy(nn.Module):
    """The benchmark as a policy of an anchored env: the zero-tilt action at every decision."""

    def __init__(self, zero_action: int) -> None:
        """``zero_action``: the index of the zero tilt (:attr:`sentio_lab.env.anchor.AnchorConfig.zero_action`)."""
        super().__init__()
        self.zero_action = int(zero_action)

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The zero tilt for every observation in the batch (``mask`` is accepted and ignored: anchored envs have
        none)."""
        return torch.full((obs.shape[0],), self.zero_action, dtype=torch.long, device=obs.device)


def gate_keeps(agent_sharpe: float, benchmark_sharpe: float, margin: float) -> bool:
    """True when the tilt is kept: ``agent - benchmark > margin`` (undefined Sharpe ratios count as 0)."""
    agent = agent_sharpe if math.isfinite(agent_sharpe) else 0.0
    benchmark = benchmark_sharpe if math.isfinite(benchmark_sharpe) else 0.0
    return agent - benchmark > margin


@dataclass(frozen=True)
class GateDecision:
    """One cell's gate: both validation Sharpe ratios (annualised; NaN where undefined), the margin, the verdict."""

    agent_sharpe: float
    benchmark_sharpe: float
    margin: float
    keep: bool

    @property
    def fallback(self) -> bool:
        """True when the cell acts as the benchmark on its test groups."""
        return not self.keep

    def to_dict(self) -> dict[str, Any]:
        """The decision as a JSON-ready dict (with ``fallback``)."""
        return {**asdict(self), "fallback": self.fallback}


def validation_gate(agent: nn.Module, market: PreparedMarket, *, margin: float, zero_action: int, window: int,
                    positions: tuple[float, ...], costs: Any, **evaluate_kwargs: Any) -> GateDecision:
    """Gate ``agent`` on ``market``'s ``"validation"`` range against the zero tilt (module docstring).

    ``evaluate_kwargs`` go to :func:`~sentio_lab.evaluation.episodes.evaluate_policies` (``env_options`` with the
    anchor: required, the zero tilt means nothing without it).
    """
    if "validation" not in market.splits:
        raise ValueError("validation_gate: the fold market has no validation slice; set validation_bars in the "
                         "experiment file")
    if not math.isfinite(margin):
        raise ValueError(f"validation_gate: gate_margin must be finite, got {margin}")
    if (evaluate_kwargs.get("env_options") or {}).get("anchor") is None:
        raise ValueError("validation_gate: the agent is not anchored (add --anchor to its args): the fallback is "
                         "the anchored benchmark")
    (mine,), (benchmark,) = evaluate_policies([agent, ZeroTiltPolicy(zero_action)], market, ["validation"],
                                              window=window, positions=positions, costs=costs, **evaluate_kwargs)
    sharpes = [float(summary_stats(e.equity)["sharpe"]) for e in (mine, benchmark)]
    return GateDecision(agent_sharpe=sharpes[0], benchmark_sharpe=sharpes[1], margin=float(margin),
                        keep=gate_keeps(sharpes[0], sharpes[1], margin))


def gated_policy(agent: nn.Module, decision: GateDecision, zero_action: int) -> nn.Module:
    """What the cell runs on its test groups: ``agent`` when the gate keeps its tilt, else the zero tilt."""
    return agent if decision.keep else ZeroTiltPolicy(zero_action)


def gate_rows(name: str, fold: int, gates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of :data:`GATES_FILE` from one gated evaluation's record (``gates``: decision dict by seed)."""
    return [{"name": name, "seed": int(seed), "fold": int(fold),
             **{k: decision[k] for k in ("agent_sharpe", "benchmark_sharpe", "margin", "fallback")}}
            for seed, decision in gates.items()]


def gates_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """:data:`GATES_FILE`'s table from :func:`gate_rows` (typed, in :data:`GATE_COLUMNS` order)."""
    frame = pd.DataFrame(list(rows), columns=list(GATE_COLUMNS))
    return frame.astype({"seed": "int64", "fold": "int64", "agent_sharpe": "float64", "benchmark_sharpe": "float64",
                         "margin": "float64", "fallback": "bool"})


def gate_table(gates: pd.DataFrame) -> pd.DataFrame:
    """Per gated configuration: its cells, the fallback rate (share of seed x fold cells acting as the benchmark),
    the margin, and the medians of both validation Sharpe ratios and of their difference."""
    rows = []
    for name, cells in gates.groupby("name", sort=False):
        rows.append({"name": name, "cells": len(cells), "fallback_rate": float(cells["fallback"].mean()),
                     "margin": float(cells["margin"].iloc[0]),
                     "agent_sharpe": float(cells["agent_sharpe"].median()),
                     "benchmark_sharpe": float(cells["benchmark_sharpe"].median()),
                     "difference": float((cells["agent_sharpe"].fillna(0) - cells["benchmark_sharpe"].fillna(0))
                                         .median())})
    return pd.DataFrame(rows, columns=["name", "cells", "fallback_rate", "margin", "agent_sharpe",
                                       "benchmark_sharpe", "difference"]).set_index("name")


def gate_summary(gates: pd.DataFrame) -> str:
    """One plain line per gated configuration: how often it fell back to its benchmark, at which margin."""
    return "\n".join(
        f"{gated_name(name)}: fell back to the benchmark in {row['fallback_rate']:.0%} of {int(row['cells'])} cells "
        f"(seeds x folds; kept the tilt where its validation Sharpe beat the benchmark's by more than "
        f"{row['margin']:g}; median difference {row['difference']:.2f})"
        for name, row in gate_table(gates).iterrows())
