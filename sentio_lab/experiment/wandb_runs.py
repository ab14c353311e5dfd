"""An experiment's W&B runs: one group per experiment, a run per training cell and per evaluation, the tables.

With tracking on (``python -m sentio_lab.experiment --track``, the default; ``run_experiment(track=...)``):

* every cell is a ``job_type="train"`` run named ``<experiment>__<cell id>``: the variant's training scalars
  (its own tracker joins the run, :func:`sentio_lab.agents.tracking.shared_run`), the cell's record (``cell.json``) in
  the summary and the chosen checkpoint as a ``model`` artifact;
* every (configuration, fold) evaluation is a ``job_type="evaluate"`` run ``<experiment>__<agent>__fold<k>``:
  its mask-rule counts and selected iterations in the summary and one row per seed and test group in a table;
* the assembled experiment is a ``job_type="evaluate"`` run ``<experiment>__results``: ``results.parquet`` and the
  per-strategy table as ``wandb.Table``\\ s, the result files as a ``results`` artifact.

All of them are in the W&B group ``<experiment>`` and write under ``<output>/wandb/``. Only work done in this
invocation is logged (a resumed experiment does not log its finished cells again); the numbers are the files'.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sentio_lab.agents.tracking import Tracker, shared_run
from sentio_lab.evaluation.metrics import summary_stats


@dataclass(frozen=True)
class ExperimentTracking:
    """Where an experiment's runs go: W&B group ``group`` (the experiment's name), files under ``run_dir``."""

    group: str
    run_dir: str
    project: str = "sentio-lab"
    mode: str = "offline"

    @contextmanager
    def run(self, name: str, job_type: str, config: dict[str, Any]) -> Iterator[Tracker]:
        """One run ``<group>__<name>`` of ``job_type``, shared with the trackers created inside it."""
        with shared_run(True, project=self.project, run_name=f"{self.group}__{name}", config=config,
                        run_dir=self.run_dir, mode=self.mode, group=self.group, job_type=job_type) as tracker:
            yield tracker


def log_cell(tracker: Tracker, record: dict[str, Any], folder: Path) -> None:
    """A trained cell's record (``cell.json``) into its run's summary and its chosen checkpoint as an artifact."""
    tracker.log_summary({key: value for key, value in record.items()
                         if key in ("global_step", "checkpoint", "selected_iteration", "validation_sharpe")})
    if record.get("selection_history"):
        tracker.log_table("selection_history", pd.DataFrame(record["selection_history"]))
    tracker.log_artifact(folder / record["checkpoint"], name=f"{tracker.run.id}-checkpoint", type="model",
                         metadata={"cell": record["cell"]})


def group_table(groups: pd.DataFrame) -> pd.DataFrame:
    """One row per seed and test group of an evaluation's ``groups.parquet``: its span and statistics."""
    rows = []
    for (seed, group), rows_ in groups.groupby(["seed", "group"], sort=True):
        equity = pd.Series(rows_["equity"].to_numpy(), index=pd.DatetimeIndex(rows_["timestamp"]))
        stats = summary_stats(equity)
        rows.append({"seed": int(seed), "group": int(group), "start": str(equity.index[0]),
                     "end": str(equity.index[-1]), "bars": stats["bars"], "total_return": stats["total_return"],
                     "sharpe": stats["sharpe"], "max_drawdown": stats["max_drawdown"],
                     "ruined": bool(rows_["ruined"].any())})
    return pd.DataFrame(rows)


def log_evaluation(tracking: ExperimentTracking, agent: str, fold: int, record: dict[str, Any],
                   groups: pd.DataFrame) -> None:
    """An evaluation's record and per-(seed, group) table as a ``job_type="evaluate"`` run."""
    with tracking.run(f"{agent}__fold{fold:03d}", "evaluate", {"agent": agent, "fold": fold}) as tracker:
        tracker.log_summary({"rule_counts": record.get("rule_counts", {}),
                             "selected_iterations": record.get("selected_iterations", {})})
        tracker.log_table("test_groups", group_table(groups))


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its index as columns and multi-level column names joined by ``/`` (W&B tables are flat)."""
    out = table.reset_index()
    out.columns = ["/".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c) for c in out.columns]
    return out


def log_results(tracking: ExperimentTracking, results: pd.DataFrame, strategies: pd.DataFrame,
                files: list[Path], plan_record: dict[str, Any]) -> None:
    """The assembled experiment: result tables as ``wandb.Table`` and the result files as an artifact."""
    with tracking.run("results", "evaluate", {"plan": json.loads(json.dumps(plan_record, default=str))}) as tracker:
        tracker.log_table("results", results)
        tracker.log_table("strategies", flat_columns(strategies))
        tracker.log_summary({"rows": len(results), "strategies": len(strategies)})
        tracker.log_artifact(files, name=f"{tracker.run.id}-files", type="results")


def cell_config(cell: Any, args: Any) -> dict[str, Any]:
    """A cell's run config: its identity and the variant's arguments."""
    return {"cell": dataclasses.asdict(cell), **args.config()}
