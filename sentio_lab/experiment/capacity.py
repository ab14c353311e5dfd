"""Capacity: the same trained agents and the baselines, re-evaluated out of sample under size-dependent costs.

A capacity file (``experiments/configs/*_capacity.toml``) names an experiment file and a grid::

    name = "sp500_capacity"
    experiment = "experiments/configs/sp500_cpcv.toml"   # its cells are trained (or resumed) by the runner
    output_root = "runs/experiments"                     # where that experiment's cells live
    capitals = [1e5, 1e6, 1e7, 1e8, 1e9, 1e10]           # starting capital in currency
    impact_y = [0.5, 0.7, 1.0]                            # Y of dP/P = Y sigma_daily sqrt(Q / ADV)
    adv = 2.5e10                                          # optional user-given ADV in currency (else the data's)

:func:`run_capacity` first runs the experiment through :func:`sentio_lab.experiment.runner.run_experiment` (every
finished cell is kept: nothing retrains), then, fold by fold, evaluates every seed's trained agent and every
baseline greedily on the fold's test groups (out of sample: the CPCV test groups, purged and embargoed from
the training segments) once per cost model of the grid -- the experiment's own fee and slippage plus
square-root impact at that capital and Y -- and once under the experiment's own costs (``capital`` NaN: the
reference the experiment reported). The agents were trained under the experiment's (flat) costs; they are not
retrained per capital, so the curve says what happens when a strategy found at small size is scaled up.
Backtest paths are stitched and scored by the runner's own functions, so a cell of the grid is a row of the
same table the experiment reports (Sharpe, costs paid, turnover, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import tyro

from sentio_lab.agents.variants import action_masking, env_options, load_variant
from sentio_lab.env import splits as splitting
from sentio_lab.env.costs import CostModel
from sentio_lab.evaluation.baselines import evaluate_baseline, evaluate_random
from sentio_lab.evaluation.episodes import evaluate_policies
from sentio_lab.experiment.assembly import _path_curves, _path_stats
from sentio_lab.experiment.cells import cell_done, parse_variant_args
from sentio_lab.experiment.config import load_config
from sentio_lab.experiment.runner import (
    Plan,
    _groups_frame,
    agent_argv,
    fold_market,
    load_cell_agent,
    plan_experiment,
    run_experiment,
)

RESULTS_FILE = "capacity.parquet"
#: Statistics kept per (cost model, strategy, seed, path).
STATS = ("sharpe", "cagr", "max_drawdown", "costs_paid", "turnover_per_year", "n_trades", "total_return")


@dataclass(frozen=True)
class CapacityConfig:
    """A parsed capacity file (module doc)."""

    name: str
    experiment: str
    """the experiment TOML whose trained cells are evaluated"""
    output_root: str = "runs/experiments"
    """the experiment's cells are under ``<output_root>/<experiment name>/``; the grid under ``.../<name>/``"""
    capitals: tuple[float, ...] = (1e5, 1e6, 1e7, 1e8, 1e9, 1e10)
    """starting capitals in currency"""
    impact_y: tuple[float, ...] = (0.5, 0.7, 1.0)
    """Y values of the square-root law"""
    impact: str = "sqrt"
    """impact model of the grid ("sqrt" or "almgren_chriss")"""
    adv: float | None = None
    """user-given ADV in currency per day; None = the data's (volume x close, causal)"""
    participation: float | None = None
    """participation cap of every grid model (None = none)"""

    def cost_models(self, base: CostModel) -> list[tuple[float, float, CostModel]]:
        """``(capital, Y, model)`` per grid cell, on the experiment's ``base`` costs; first the base itself (NaN)."""
        models = [(math.nan, math.nan, base)]
        for capital in self.capitals:
            for y in self.impact_y:
                models.append((float(capital), float(y), dataclasses.replace(
                    base, impact=self.impact, impact_y=float(y), capital=float(capital), adv=self.adv,
                    participation=self.participation)))
        return models


def load_capacity_config(path: str | Path) -> CapacityConfig:
    """Read a capacity TOML file (unknown keys are an error naming the known ones)."""
    path = Path(path)
    raw = tomllib.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(CapacityConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    for key in ("capitals", "impact_y"):
        if key in raw:
            raw[key] = tuple(float(x) for x in raw[key])
    raw.setdefault("name", path.stem)
    return CapacityConfig(**raw)


def _fold_file(folder: Path, fold: int) -> Path:
    return folder / "folds" / f"fold{fold:03d}.parquet"


def evaluate_fold_capacity(plan: Plan, capacity: CapacityConfig, fold: splitting.Fold, cells_root: Path,
                           folder: Path) -> Path:
    """Every seed of every agent and every baseline on ``fold``'s test groups under each cost model (resumable)."""
    target = _fold_file(folder, fold.fold)
    if target.exists():
        return target
    torch.set_num_threads(1)
    config, acc = plan.config, plan.accounting
    ranges = [f"test:{group}" for group in fold.groups]
    parts = []
    for capital, y, costs in capacity.cost_models(acc["costs"]):
        tag = {"capital": capital, "impact_y": y}
        for agent in config.agents:
            cells = [c for c in plan.cells if c.agent == agent.name and c.fold == fold.fold]
            args = parse_variant_args(agent.variant, cells[0].args)
            market = fold_market(plan, fold, load_variant(agent.variant).feature_config(args))
            agents = [load_cell_agent(cells_root / "cells" / c.cell_id / cell_done(cells_root / "cells" / c.cell_id)
                                      ["checkpoint"], market) for c in cells]
            results = evaluate_policies(agents, market, ranges, window=acc["window"], positions=acc["positions"],
                                        costs=costs, **action_masking(args), env_options=env_options(args, market))
            for c, per_agent in zip(cells, results, strict=True):
                parts.append(_groups_frame(per_agent, fold, market).assign(
                    kind="agent", name=agent.name, seed=c.seed, **tag))
        agent = config.agents[0]
        args = parse_variant_args(agent.variant, agent_argv(config, agent.args))
        market = fold_market(plan, fold, load_variant(agent.variant).feature_config(args))
        kwargs = {"window": acc["window"], "positions": acc["positions"], "costs": costs}
        for name in config.baselines:
            if name == "random":
                runs = [evaluate_random(market, tuple(range(config.random_seeds)), range_name=r, **kwargs)
                        for r in ranges]
                evaluations = [dataclasses.replace(r.evaluations[0], equity=r.mean_equity,
                                                   weights=r.evaluations[0].weights * np.nan) for r in runs]
            else:
                evaluations = [evaluate_baseline(name, market, range_name=r, train=market.training_segments(),
                                                 **kwargs) for r in ranges]
            parts.append(_groups_frame(evaluations, fold, market).assign(kind="baseline", name=name, seed=-1, **tag))
    target.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.concat(parts, ignore_index=True).assign(fold=fold.fold)
    frame.to_parquet(target.with_suffix(".tmp"))
    target.with_suffix(".tmp").rename(target)  # atomic: a killed run redoes this fold only
    return target


def assemble_capacity(plan: Plan, folder: Path) -> pd.DataFrame:
    """Stitch every backtest path of every (cost model, strategy, seed) and score it with the runner's statistics."""
    groups = pd.concat([pd.read_parquet(_fold_file(folder, f.fold)) for f in plan.folds], ignore_index=True)
    paths = splitting.backtest_paths(plan.folds)
    rows = []
    keys = ["capital", "impact_y", "kind", "name", "seed"]
    for key, unit in groups.groupby(keys, dropna=False, sort=False):
        for path, members in paths.items():
            equity, weights, pieces = _path_curves(unit, members, plan)
            stats = _path_stats(equity, None if weights.isna().any() else weights, pieces)
            rows.append({**dict(zip(keys, key, strict=True)), "path": path,
                         **{k: stats.get(k, np.nan) for k in STATS}})
    results = pd.DataFrame(rows)
    results["sample"] = "out of sample (CPCV test groups)"
    results.to_parquet(folder / RESULTS_FILE)
    return results


def run_capacity(capacity: CapacityConfig, *, workers: int = 1, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) the experiment, evaluate the grid fold by fold in ``workers`` processes, assemble."""
    config = load_config(capacity.experiment)
    plan = plan_experiment(config)
    cells_root = Path(capacity.output_root) / config.name
    run_experiment(plan, cells_root, workers=workers, progress=progress)
    folder = Path(capacity.output_root) / capacity.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "capacity.json").write_text(json.dumps(dataclasses.asdict(capacity), indent=2))
    if workers <= 1:
        for fold in plan.folds:
            evaluate_fold_capacity(plan, capacity, fold, cells_root, folder)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(evaluate_fold_capacity, plan, capacity, fold, cells_root, folder)
                       for fold in plan.folds]
            for future in futures:
                future.result()
    return assemble_capacity(plan, folder)


def capacity_table(results: pd.DataFrame) -> pd.DataFrame:
    """Median over seeds x paths of Sharpe and costs paid per (strategy, capital, Y); the base costs first."""
    table = (results.groupby(["kind", "name", "capital", "impact_y"], dropna=False)
             .agg(sharpe_median=("sharpe", "median"), sharpe_q25=("sharpe", lambda s: s.quantile(0.25)),
                  sharpe_q75=("sharpe", lambda s: s.quantile(0.75)), costs_paid_median=("costs_paid", "median"),
                  runs=("sharpe", "size"))
             .reset_index())
    return table


def capacity_figure(results: pd.DataFrame, path: str | Path | None = None):
    """Median Sharpe and costs paid against capital, one line per strategy and Y (Y=0.5 dotted, 0.7 solid, 1 dashed).

    The Sharpe axis is clipped at -4 (a strategy below it, e.g. the random baseline at large capital, leaves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = capacity_table(results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {0.5: ":", 0.7: "-", 1.0: "--"}
    names = list(dict.fromkeys(table["name"]))
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for (name, y), rows in table[table["capital"].notna()].groupby(["name", "impact_y"]):
        rows = rows.sort_values("capital")
        label = f"{name} (Y={y:g})"
        axes[0].plot(rows["capital"], rows["sharpe_median"], styles.get(y, "-"), color=colours[name], label=label)
        axes[1].plot(rows["capital"], rows["costs_paid_median"], styles.get(y, "-"), color=colours[name], label=label)
    for ax, what in zip(axes, ("median annualised Sharpe", "median costs paid (fraction of start equity)"),
                        strict=True):
        ax.set(xscale="log", xlabel="starting capital (currency)", ylabel=what)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    low = float(table["sharpe_median"].min())
    axes[0].set_ylim(max(low, -4.0) - 0.2, float(table["sharpe_median"].max()) + 0.2)
    axes[0].set_title("out of sample (CPCV test paths), net of costs", fontsize=10)
    axes[1].set_title("same agents and baselines; impact dP/P = Y sigma sqrt(Q / ADV)", fontsize=10)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


@dataclass
class Args:
    """Command-line arguments of ``python -m sentio_lab.experiment.capacity``."""

    config: str
    """capacity TOML file, e.g. experiments/configs/sp500_capacity.toml"""
    workers: int = 1
    """worker processes (one fold each)"""
    report: str | None = None
    """write capacity.csv, capacity_table.csv and capacity.png here (e.g. reports/sp500_capacity)"""


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the capacity grid; print the median table; write the report files when asked."""
    args = tyro.cli(Args, args=argv)
    results = run_capacity(load_capacity_config(args.config), workers=args.workers)
    table = capacity_table(results)
    print(table.to_string())
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        results.to_csv(out / "capacity.csv", index=False)
        table.to_csv(out / "capacity_table.csv", index=False)
        capacity_figure(results, out / "capacity.png")
    return results


if __name__ == "__main__":
    main()
