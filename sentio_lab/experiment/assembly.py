"""The experiment's tables from its files: per backtest path, the chained test-group equity and its statistics
(:func:`assemble`), and where each evaluation lives (:func:`evaluation_folder`, :func:`evaluation_done`).
:mod:`sentio_lab.experiment.runner` writes the files; this module only reads them, so a run killed at any point
assembles the same table once its cells are done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sentio_lab.env import splits as splitting
from sentio_lab.evaluation.metrics import number_of_trades, round_trip_trades, summary_stats
from sentio_lab.experiment.cells import cell_done
from sentio_lab.experiment.ensemble import ENSEMBLE_SEED, ensemble_name
from sentio_lab.experiment.gate import GATES_FILE, gate_rows, gated_name, gates_frame
from sentio_lab.experiment.groups import BOOK_TURNOVER, book_trade_stats

if TYPE_CHECKING:
    from sentio_lab.experiment.runner import Plan

RESULTS_FILE = "results.parquet"
EQUITY_FILE = "equity.parquet"
GROUPS_FILE = "groups.parquet"
RULES_FILE = "mask_rules.parquet"
#: Version of the evaluation files (``groups.parquet``); evaluations written by another version are redone
#: (cheap: training cells are kept), so a resumed run never mixes old and new columns (3: a pooled book's trade
#: columns, :data:`~sentio_lab.experiment.groups.BOOK_TURNOVER`).
GROUPS_FORMAT = 3
def evaluation_done(folder: Path) -> dict[str, Any] | None:
    """The record of a finished evaluation or baseline folder of the current format, else None."""
    record = cell_done(folder)
    return record if record is not None and record.get("format") == GROUPS_FORMAT else None


def evaluation_folder(output: Path, agent: str, fold: int) -> Path:
    """Where the test-group episodes of every seed of configuration ``agent`` on ``fold`` are written."""
    return output / "evaluations" / f"{agent}__fold{fold:03d}"


def _piece_rows(groups: pd.DataFrame, members: list[tuple[int, int]], plan: Plan) -> list[pd.DataFrame]:
    """The rows of each test group of a backtest path, in time order."""
    return [groups[(groups["fold"] == fold_id) & (groups["group"] == plan.folds[fold_id].groups[j])]
            for fold_id, j in members]


def _path_curves(
    groups: pd.DataFrame, members: list[tuple[int, int]], plan: Plan
) -> tuple[pd.Series, pd.Series, list[tuple[pd.Series, pd.Series]]]:
    """A backtest path's stitched equity, the target weights decided on its bars (one per return), and the
    (equity, weights, fill costs) piece of each test group in time order."""
    pieces = []
    for rows in _piece_rows(groups, members, plan):
        index = pd.DatetimeIndex(rows["timestamp"])
        pieces.append((pd.Series(rows["equity"].to_numpy(), index=index),
                       pd.Series(rows["weight"].to_numpy()[:-1], index=index[:-1]),  # the last mark decides nothing
                       pd.Series(rows["cost"].to_numpy(), index=index)))
    equity = splitting.stitch_equity([e for e, _, _ in pieces])
    return equity, pd.concat([w for _, w, _ in pieces]).rename("weight"), pieces


def _path_stats(equity: pd.Series, weights: pd.Series | None, pieces: list[tuple[pd.Series, ...]]) -> dict:
    """:func:`summary_stats` of a stitched path, with the trade statistics counted per test group.

    Every test group's episode starts flat, so the env enters (and pays for it) at each group boundary even when
    the concatenated weights show no change there: fills, turnover and round trips are counted within each piece
    (from flat) and added up, and a trade never spans two groups. Costs paid: each group's fill costs (in units
    of its own starting equity, 1.0) scaled by the path's equity where the group starts, over the path's start.
    """
    stats = summary_stats(equity, weights)
    if weights is None:
        return stats
    ppy = float(stats["periods_per_year"])
    moves = np.concatenate([np.abs(np.diff(w.to_numpy(), prepend=0.0)) for _, w, _ in pieces])
    trades = pd.concat([round_trip_trades(e, w) for e, w, _ in pieces], ignore_index=True)
    paid = sum(float(c.sum()) * float(equity.loc[e.index[0]]) for e, _, c in pieces)
    stats["costs_paid"] = paid / float(equity.iloc[0])
    stats["n_trades"] = sum(number_of_trades(w) for _, w, _ in pieces)
    stats["turnover_per_year"] = float(moves.mean() * ppy)
    stats["round_trips"] = len(trades)
    stats["trade_win_rate"] = float(np.mean(trades["pnl"].to_numpy() > 0)) if len(trades) else float("nan")
    return stats


def _ensemble_unit(agent: Any, plan: Plan, output: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """The results key and test-group episodes of configuration ``agent``'s seed ensemble over every fold."""
    name, frames, members = ensemble_name(agent.name), [], []
    for fold in plan.folds:
        folder = evaluation_folder(output, name, fold.fold)
        record = evaluation_done(folder)
        if record is None:
            raise FileNotFoundError(f"{folder}: evaluation not finished; run the experiment first")
        frames.append(pd.read_parquet(folder / GROUPS_FILE).assign(fold=fold.fold))
        members.append(record["selected_iterations"][str(ENSEMBLE_SEED)])
    return ({"kind": "agent", "name": name, "variant": agent.variant, "seed": ENSEMBLE_SEED,
             "selected_iterations": json.dumps(members)}, pd.concat(frames, ignore_index=True))


def assemble(plan: Plan, output: str | Path) -> pd.DataFrame:
    """Read every finished cell and baseline, stitch backtest paths, write ``results.parquet``, ``equity.parquet``
    and ``mask_rules.parquet`` (per configuration and fold: decisions and how often each mask rule bound); with
    gated configurations also ``gates.parquet`` (:mod:`sentio_lab.experiment.gate`: every cell's gate decision)."""
    output = Path(output)
    paths = splitting.backtest_paths(plan.folds)
    rows, curves, rules = [], [], []
    units: list[tuple[dict[str, Any], pd.DataFrame]] = []
    gates: list[dict[str, Any]] = []
    strategies = [(a, name) for a in plan.config.agents
                  for name in (a.name, *([gated_name(a.name)] if a.gate_margin is not None else []))]
    for agent, name in strategies:  # a gated strategy: one more agent row per seed (its own name)
        frames, selected = [], {}
        for fold in plan.folds:
            folder = evaluation_folder(output, name, fold.fold)
            record = evaluation_done(folder)
            if record is None:
                raise FileNotFoundError(f"{folder}: evaluation not finished; run the experiment first")
            frames.append(pd.read_parquet(folder / GROUPS_FILE).assign(fold=fold.fold))
            for seed, iteration in record["selected_iterations"].items():
                selected.setdefault(int(seed), []).append(iteration)
            rules.append({"name": name, "fold": fold.fold, **record.get("rule_counts", {})})
            gates += gate_rows(agent.name, fold.fold, record.get("gates", {}))
        groups = pd.concat(frames, ignore_index=True)
        for seed in plan.config.seeds:
            units.append(({"kind": "agent", "name": name, "variant": agent.variant, "seed": seed,
                           "selected_iterations": json.dumps(selected[seed])}, groups[groups["seed"] == seed]))
        if agent.ensemble and name == agent.name:  # its seed ensemble (sentio_lab.experiment.ensemble)
            units.append(_ensemble_unit(agent, plan, output))
    for name in plan.config.baselines:
        frames = [pd.read_parquet(output / "baselines" / f"{name}__fold{f.fold:03d}" / GROUPS_FILE).assign(fold=f.fold)
                  for f in plan.folds]
        units.append(({"kind": "baseline", "name": name, "variant": "", "seed": -1, "selected_iterations": "[]"},
                      pd.concat(frames, ignore_index=True)))
    for key, groups in units:
        for path, members in paths.items():
            equity, weights, pieces = _path_curves(groups, members, plan)
            known = None if weights.isna().any() else weights  # the random baseline reports a mean over seeds
            stats = _path_stats(equity, known, pieces)
            if known is not None and BOOK_TURNOVER in groups.columns:  # a pooled book: its instruments' own trades
                stats.update(book_trade_stats(_piece_rows(groups, members, plan), float(stats["periods_per_year"])))
            rows.append({"experiment": plan.config.name, **key, "path": path, "n_trials": plan.config.n_trials,
                         **{k: v for k, v in stats.items()}})
            curves.append(pd.DataFrame({"name": key["name"], "seed": key["seed"], "path": path,
                                        "timestamp": equity.index, "equity": equity.to_numpy()}))
    results = pd.DataFrame(rows)
    results.to_parquet(output / RESULTS_FILE)
    pd.concat(curves, ignore_index=True).to_parquet(output / EQUITY_FILE)
    pd.DataFrame(rules).to_parquet(output / RULES_FILE)  # mask rules: how often each fired, per fold
    if gates:
        gates_frame(gates).to_parquet(output / GATES_FILE)
    return results

