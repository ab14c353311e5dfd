"""Run a portfolio experiment: CPCV on the panel's dates x seeds x portfolio agents, plus the skfolio baselines, and
assemble its tables.

The single-asset runner's shape (:mod:`sentio_lab.experiment.runner`), for a panel, in three modules:

* **Plan** (:mod:`sentio_lab.experiment.portfolio_plan`): the panel, the CPCV folds over its dates with the purge
  and embargo of the longest reach over the assets, the cells, the accounting every agent shares; each fold's market.
* **Cells** (:mod:`sentio_lab.experiment.portfolio_cells`): each configuration x seed x fold trained on its fold's
  market and run greedily on its test groups and training segments; the seed ensembles, the placebo retrains and
  the skfolio baselines on the same test groups.
* **Run and assembly** (this module): :func:`run_portfolio_experiment` runs every unfinished cell, then
  :func:`assemble_portfolio` chains the test groups' equity curves of each backtest path
  (:func:`sentio_lab.env.splits.stitch_equity`) into ``results.parquet`` (the single-asset runner's columns, so
  :mod:`sentio_lab.experiment.summary` reads it unchanged) and ``equity.parquet``; ``paths.parquet`` adds the
  per-asset contributions and turnover and the concentration (:mod:`sentio_lab.evaluation.portfolio_report`),
  ``memorisation.parquet`` the in-sample vs test Sharpe of every cell and ``placebo.parquet`` the placebo cells'.

Every cell seeds its training and runs torch on one thread, so the tables are identical however often the run
was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sentio_lab.env import splits as splitting
from sentio_lab.evaluation.metrics import summary_stats
from sentio_lab.evaluation.metrics.table import STAT_NAMES
from sentio_lab.evaluation.portfolio_report import path_tables
from sentio_lab.experiment.assembly import EQUITY_FILE, GROUPS_FILE, RESULTS_FILE
from sentio_lab.experiment.cells import cell_done
from sentio_lab.experiment.ensemble import ENSEMBLE_SEED, ensemble_name
from sentio_lab.experiment.portfolio_cells import (
    ENSEMBLE_DIR,
    PLACEBO_DIR,
    run_portfolio_baselines,
    run_portfolio_cell,
    run_portfolio_ensemble,
    run_portfolio_placebo_cell,
)
from sentio_lab.experiment.portfolio_config import load_portfolio_config
from sentio_lab.experiment.portfolio_episodes import frame_episode
from sentio_lab.experiment.portfolio_plan import PortfolioPlan, plan_portfolio
from sentio_lab.experiment.summary import strategy_table

#: Per-path portfolio figures: contributions and turnover per asset, concentration (one row per strategy x seed x
#: path, beside ``results.parquet``).
PATHS_FILE = "paths.parquet"
#: In-sample (training segments) vs out-of-sample (test groups) Sharpe of every cell.
MEMORISATION_FILE = "memorisation.parquet"
#: Placebo cells' in-sample Sharpe (one row per configuration x replicate x fold; only with ``placebo``).
PLACEBO_FILE = "placebo.parquet"


# ================================================================================================ assembly
def _units(plan: PortfolioPlan, output: Path) -> list[tuple[dict[str, Any], dict[int, pd.DataFrame]]]:
    """(results key, fold -> test-group frames) of every agent seed and every baseline."""
    units = []
    for agent in plan.config.agents:
        for seed in plan.config.seeds:
            frames = {c.fold: pd.read_parquet(output / "cells" / c.cell_id / GROUPS_FILE) for c in plan.cells
                      if c.agent == agent.name and c.seed == seed}
            units.append(({"kind": "agent", "name": agent.name, "variant": agent.variant, "seed": seed}, frames))
        if agent.ensemble:
            name = ensemble_name(agent.name)
            frames = {f.fold: pd.read_parquet(output / ENSEMBLE_DIR / f"{name}__fold{f.fold:03d}" / GROUPS_FILE)
                      for f in plan.folds}
            units.append(({"kind": "agent", "name": name, "variant": agent.variant, "seed": ENSEMBLE_SEED}, frames))
    for name in plan.config.baselines:
        frames = {f.fold: pd.read_parquet(output / "baselines" / f"{name}__fold{f.fold:03d}" / GROUPS_FILE)
                  for f in plan.folds}
        units.append(({"kind": "baseline", "name": name, "variant": "", "seed": -1}, frames))
    return units


def assemble_portfolio(plan: PortfolioPlan, output: str | Path) -> pd.DataFrame:
    """Chain every path of every agent seed and baseline; write ``results.parquet`` (the single-asset runner's
    columns), ``equity.parquet``, ``paths.parquet`` (per-asset figures) and ``memorisation.parquet``."""
    output = Path(output)
    paths = splitting.backtest_paths(plan.folds)
    rows, curves, extras = [], [], []
    for key, frames in _units(plan, output):
        for path, members in paths.items():
            episodes, pieces = [], []
            for fold_id, j in members:
                frame = frames[fold_id]
                group = frame[frame["group"] == plan.folds[fold_id].groups[j]]
                episodes.append(frame_episode(group, plan.assets, int(group["start"].iloc[0])))
                pieces.append(pd.Series(group["equity"].to_numpy(), index=pd.DatetimeIndex(group["timestamp"])))
            equity = splitting.stitch_equity(pieces)
            stats = summary_stats(equity)
            tables = path_tables(episodes, plan.assets, float(stats["periods_per_year"]))
            turnover = sum(v for k, v in tables.items() if k.startswith("turnover:"))
            stats.update(turnover_per_year=turnover, costs_paid=tables["costs"])
            row = {"experiment": plan.config.name, **key, "selected_iterations": "[]", "path": path,
                   "n_trials": plan.config.n_trials}
            rows.append({**row, **{name: stats[name] for name in STAT_NAMES}})
            extras.append({**key, "path": path, "total_return": float(stats["total_return"]),
                           "turnover_per_year": turnover, **tables})
            curves.append(pd.DataFrame({"name": key["name"], "seed": key["seed"], "path": path,
                                        "timestamp": equity.index, "equity": equity.to_numpy()}))
    results = pd.DataFrame(rows)
    results.to_parquet(output / RESULTS_FILE)
    pd.concat(curves, ignore_index=True).to_parquet(output / EQUITY_FILE)
    pd.DataFrame(extras).to_parquet(output / PATHS_FILE)
    memo = [{"name": c.agent, "seed": c.seed, "fold": c.fold,
             **{k: cell_done(output / "cells" / c.cell_id)[k] for k in ("in_sample_sharpe", "in_sample_bars",
                                                                         "test_sharpe")}} for c in plan.cells]
    pd.DataFrame(memo).to_parquet(output / MEMORISATION_FILE)
    if plan.placebo_cells:
        placebo = [{"name": c.agent, "replicate": c.placebo, "seed": c.seed, "fold": c.fold,
                    **{k: cell_done(output / PLACEBO_DIR / c.cell_id)[k] for k in ("in_sample_sharpe",
                                                                                   "in_sample_bars")}}
                   for c in plan.placebo_cells]
        pd.DataFrame(placebo).to_parquet(output / PLACEBO_FILE)
    else:
        (output / PLACEBO_FILE).unlink(missing_ok=True)
    return results


def run_portfolio_experiment(plan: PortfolioPlan, output: str | Path) -> pd.DataFrame:
    """Train and evaluate every unfinished cell, run the baselines on every fold, then :func:`assemble_portfolio`.
    Finished work is never redone; a folder left by other arguments is refused."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for cell in plan.cells + plan.placebo_cells:
        record = cell_done(output / ("cells" if cell.placebo is None else PLACEBO_DIR) / cell.cell_id)
        if record is not None and record.get("command") != shlex.join(cell.args):
            raise ValueError(f"{output / cell.cell_id}: finished with other arguments "
                             f"({record.get('command')!r}, planned {shlex.join(cell.args)!r}); choose another "
                             "output folder or delete that one")
    record = {"experiment": plan.config.name, "n_trials": plan.config.n_trials, "n_bars": plan.n_bars,
              "first_valid": plan.first_valid, "purge": plan.gaps.purge, "embargo": plan.gaps.embargo,
              "folds": [dataclasses.asdict(f) for f in plan.folds], "cells": [c.cell_id for c in plan.cells],
              "placebo_cells": [c.cell_id for c in plan.placebo_cells],
              "accounting": {**plan.accounting, "costs": dataclasses.asdict(plan.accounting["costs"])},
              "panel": plan.panel,
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (output / "plan.json").write_text(json.dumps(record, indent=2, default=str))
    threads = torch.get_num_threads()
    try:
        for cell in plan.cells:
            run_portfolio_cell(plan, cell, output)
        for agent in plan.config.agents:
            for fold in plan.folds:
                if agent.ensemble:
                    run_portfolio_ensemble(plan, agent, fold, output)
        for cell in plan.placebo_cells:
            run_portfolio_placebo_cell(plan, cell, output)
        for fold in plan.folds:
            run_portfolio_baselines(plan, fold, output)
    finally:
        torch.set_num_threads(threads)
    return assemble_portfolio(plan, output)


def run_portfolio_file(path: str | Path, output_root: str | Path, *, seeds: tuple[int, ...] | None = None,
                       extra_args: tuple[str, ...] = (), name: str | None = None) -> Path:
    """``python -m sentio_lab.experiment --config <portfolio file>``: plan, run, print the per-strategy medians;
    returns the output folder ``<output_root>/<name>``."""
    config = load_portfolio_config(path, seeds=seeds, name=name)
    output = Path(output_root) / config.name
    plan = plan_portfolio(config, extra_args)
    print(f"{config.name}: {len(plan.folds)} CPCV folds over {plan.n_bars} dates x {len(plan.assets)} assets, "
          f"{len(plan.cells)} cells ({len(config.agents)} configurations x {len(config.seeds)} seeds x "
          f"{len(plan.folds)} folds), {len(plan.placebo_cells)} placebo cells, {config.n_trials} trials, "
          f"purge {plan.gaps.purge}, embargo {plan.gaps.embargo}")
    results = run_portfolio_experiment(plan, output)
    print(strategy_table(results, ("sharpe", "cagr", "max_drawdown")).to_string())
    print(f"results: {output / RESULTS_FILE}")
    return output
