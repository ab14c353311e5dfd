"""The evaluation summary of one finished training run: the greedy agent against the baselines, out of sample.

:func:`evaluate_run` runs the trained agent (:func:`sentio_lab.evaluation.episodes.evaluate_policy`, greedy, net of the
run's own costs, under its masks and observation extensions) and every deterministic baseline
(:func:`sentio_lab.evaluation.baselines.evaluate_baseline`, the same env, fills and costs) over the market's
``validation`` and ``test`` ranges, and tabulates each range with :func:`sentio_lab.evaluation.metrics.stats_table`.
:meth:`RunSummary.flat` is the summary W&B shows (``validation/sharpe``, ``validation/buy_and_hold/sharpe``, ...:
the figures of those tables, unchanged); :func:`write_run_report` writes one report per range
(:func:`sentio_lab.evaluation.report.write_report`) and ``summary.json`` with the same flat figures.

The variant and the accounting come from the run's own arguments (``cost_model_from``, ``action_masking``,
``env_options``), so no variant module is imported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sentio_lab.agents.tracking import Tracker, run_id
from sentio_lab.agents.training import cost_model_from
from sentio_lab.agents.variants import action_masking, env_options
from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation.baselines import BASELINES, evaluate_baseline
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.evaluation.metrics import stats_table
from sentio_lab.evaluation.report import write_report

#: Ranges a training run is summarised on, when the market has them.
SUMMARY_RANGES: tuple[str, ...] = ("validation", "test")
#: Column of the trained agent in every table (baselines keep their :data:`sentio_lab.evaluation.baselines.BASELINES`
#: names).
AGENT = "agent"
#: Rows of the statistics tables that enter the flat (W&B) summary.
SUMMARY_STATS: tuple[str, ...] = (
    "sharpe", "sortino", "psr", "total_return", "cagr", "ann_volatility", "max_drawdown", "calmar",
    "turnover_per_year", "avg_exposure", "time_in_market", "n_trades", "bars",
)
#: A range needs this many decisions for a Sharpe ratio and a PSR.
MIN_DECISIONS = 3


@dataclass
class RunSummary:
    """Per range: the equity and weights of the agent and each baseline, and their statistics table."""

    stats: dict[str, pd.DataFrame] = field(default_factory=dict)
    """range name -> :func:`~sentio_lab.evaluation.metrics.stats_table` (columns: ``agent``, then the baselines)"""
    equities: dict[str, dict[str, pd.Series]] = field(default_factory=dict)
    weights: dict[str, dict[str, pd.Series]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """``"<range>"`` or ``"<range>/<baseline>"`` -> why it is not in the tables"""

    def flat(self) -> dict[str, Any]:
        """``<range>/<stat>`` (the agent) and ``<range>/<baseline>/<stat>`` for :data:`SUMMARY_STATS`, plus the
        reasons anything was skipped (``skipped/...``); numbers exactly as in :attr:`stats` (NaN stays NaN)."""
        out: dict[str, Any] = {}
        for range_name, table in self.stats.items():
            for column in table.columns:
                prefix = range_name if column == AGENT else f"{range_name}/{column}"
                for stat in SUMMARY_STATS:
                    out[f"{prefix}/{stat}"] = _number(table.at[stat, column])
            out[f"{range_name}/start"] = str(self.equities[range_name][AGENT].index[0])
            out[f"{range_name}/end"] = str(self.equities[range_name][AGENT].index[-1])
        out.update({f"skipped/{key}": reason for key, reason in self.skipped.items()})
        return out


def _number(value: Any) -> float | int:
    """A table entry as a Python number (counts stay integers)."""
    if isinstance(value, int | bool) or (hasattr(value, "dtype") and value.dtype.kind in "iub"):
        return int(value)
    return float(value)


def evaluate_run(agent: Any, args: Any, market: PreparedMarket, *,
                 ranges: tuple[str, ...] = SUMMARY_RANGES) -> RunSummary:
    """Evaluate ``agent`` (trained with ``args``) and the baselines over each of ``ranges`` the market has.

    A range the market lacks, or with fewer than :data:`MIN_DECISIONS` decisions, is skipped and said so in
    :attr:`RunSummary.skipped`, as is a baseline whose exposure the position set cannot take (e.g. momentum's
    short side on a long-only set).
    """
    training = getattr(agent, "training", False)
    if training:
        agent.eval()  # greedy and deterministic, as a checkpoint is evaluated (dropout off)
    try:
        return _evaluate_run(agent, args, market, ranges)
    finally:
        if training:
            agent.train()


def _evaluate_run(agent: Any, args: Any, market: PreparedMarket, ranges: tuple[str, ...]) -> RunSummary:
    costs = cost_model_from(args)
    positions = tuple(args.env.positions)
    summary = RunSummary()
    for range_name in ranges:
        if range_name not in market.splits:
            summary.skipped[range_name] = f"the market has no {range_name} range"
            continue
        start, stop = market.range(range_name)
        decisions = stop - 1 - max(start, market.arrays.first_valid + args.features.window - 1)
        if decisions < MIN_DECISIONS:
            summary.skipped[range_name] = f"{max(decisions, 0)} decisions (< {MIN_DECISIONS}) in the range"
            continue
        evaluation = evaluate_policy(agent, market, window=args.features.window, positions=positions, costs=costs,
                                     range_name=range_name, **action_masking(args),
                                     env_options=env_options(args, market))
        equities, weights = {AGENT: evaluation.equity}, {AGENT: evaluation.weights}
        for name in BASELINES:
            try:
                baseline = evaluate_baseline(name, market, window=args.features.window, positions=positions,
                                             costs=costs, range_name=range_name, train=market.training_segments())
            except ValueError as err:  # the position set cannot express this baseline
                summary.skipped[f"{range_name}/{name}"] = str(err)
                continue
            equities[name], weights[name] = baseline.equity, baseline.weights
        summary.stats[range_name] = stats_table(equities, weights)
        summary.equities[range_name], summary.weights[range_name] = equities, weights
    return summary


def write_run_report(summary: RunSummary, folder: str | Path, *, title: str,
                     meta: dict[str, Any] | None = None) -> dict[str, dict[str, Path]]:
    """Write ``<folder>/<range>/`` (a :func:`~sentio_lab.evaluation.report.write_report` report per range) and
    ``<folder>/summary.json`` (:meth:`RunSummary.flat`); returns the report paths by range."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for range_name, table in summary.stats.items():
        curve = summary.equities[range_name][AGENT]
        label = (f"{range_name} range {curve.index[0]:%Y-%m-%d} .. {curve.index[-1]:%Y-%m-%d}: greedy policy of one "
                 "trained agent against the baselines, same env, fills and costs; the agent trained on the train "
                 "range only")
        paths[range_name] = write_report(
            folder / range_name, summary.equities[range_name], summary.weights[range_name], table,
            f"{title} ({range_name})", {"label": label, "range": range_name, **(meta or {}),
                                          "skipped": {k: v for k, v in summary.skipped.items()
                                                      if k.startswith(f"{range_name}/")}},
        )
    flat = {key: (None if isinstance(value, float) and math.isnan(value) else value)
            for key, value in summary.flat().items()}
    (folder / "summary.json").write_text(json.dumps(flat, indent=2) + "\n", encoding="utf-8")
    return paths


def log_run_outcome(tracker: Tracker, agent: Any, args: Any, market: Any, checkpoint: Path | str | None
                    ) -> dict[str, Any]:
        """End of training: evaluation summary, report and checkpoint into ``tracker``'s run; returns the summary
        logged.

        Evaluates the greedy ``agent`` on ``market``'s validation and test ranges against the baselines
        (:func:`evaluate_run`), writes the report next to the checkpoint
        (``<checkpoint folder>/report/``), and logs the summary, the report's figures and the checkpoint and the
        report as artifacts. Nothing happens when tracking is off, inside a shared run (the orchestrator logs its
        own record) or without a market or a checkpoint (an env passed in directly).
        """
        if not tracker.logs_outcome or market is None or checkpoint is None:
            return {}
        checkpoint = Path(checkpoint)
        summary = evaluate_run(agent, args, market)
        report = checkpoint.parent / "report"
        paths = write_run_report(summary, report, title=f"{args.run.run_name}: out of sample, net of costs",
                                 meta={"run_name": args.run.run_name, "checkpoint": str(checkpoint)})
        values = summary.flat()
        tracker.log_summary(values)
        tracker.log_images({f"{range_name}/{kind}": paths[range_name][f"{kind}_png"]
                         for range_name in summary.stats for kind in ("equity", "drawdown")})
        stem = run_id(args.run.run_name)
        tracker.log_artifact(checkpoint, name=f"{stem}-checkpoint", type="model",
                          metadata={"variant": type(args).__module__.rsplit(".", 1)[-1]})
        tracker.log_artifact(report, name=f"{stem}-report", type="report")
        return values
