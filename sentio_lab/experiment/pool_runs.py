"""Pooled experiments: the runner's cells trained on a pool of instruments (``pool = ...`` in the experiment file).

With ``pool`` set, every cell trains one policy on all the pool's instruments at once
(:class:`~sentio_lab.env.pool.PooledMarket`): the folds (CPCV or walk-forward) are cut on the pool's common dates,
identical for every instrument, with the purge / embargo of the longest reach of any instrument
(:func:`~sentio_lab.env.pool.pool_purge_embargo`); each instrument's features and normaliser are refitted on that
fold's training segments of its own bars (:func:`~sentio_lab.env.pool.prepare_pool_fold`). Evaluation and the
baselines run per instrument on the fold's test groups, with the same code as a single-instrument run.

How the instruments become one strategy (the **book**): each instrument is traded as its own account, all of them
starting every test-group episode with an equal share ``1 / K`` of the capital and never rebalanced inside the
episode. So per bar the book's

* equity is the mean of the instruments' equities (each starts its episode at 1.0),
* costs are the mean of the instruments' fill costs (each in units of its own starting 1.0),
* weight is the book's net exposure, ``sum_k E_k w_k / sum_k E_k`` (NaN where any weight is unknown),

and the book's test-group episodes are chained into backtest paths exactly as one instrument's are: the
``results.parquet`` rows, DSR, PBO and SPA of a pooled experiment are the book's. The book's trade statistics come
from the instruments' own trades (the net exposure moves whenever the accounts' equities diverge, with no trade, so
it is never differenced): per bar the book carries its turnover ``sum_k E_k |dw_k| / sum_k E_k`` (``dw_k`` the change
of instrument k's target weight, from flat at each episode's start), whether any instrument fills, and the number of
the instruments' round trips (and winning ones) entered on the bar (columns
:data:`~sentio_lab.experiment.groups.BOOK_TURNOVER` ...); a book row's ``turnover_per_year``, ``n_trades`` (bars on
which any instrument fills), ``round_trips`` (the instruments' own, summed) and ``trade_win_rate`` (the share of
all of them that won) are read from those (:func:`~sentio_lab.experiment.groups.book_trade_stats`). The book's
``ruined`` is set where every instrument is ruined (one ruined account is the instrument's, in
``instruments.parquet``). Each instrument's own statistics are in ``instrument_results.parquet``. A book of one
instrument is that instrument's frame, unchanged (a pool of one gives the plain runner's results, bit for bit).

Per-instrument outputs: every evaluation and baseline folder also holds ``instruments.parquet`` (the instruments'
own test-group episodes, column ``instrument``), assembled by :func:`assemble_instruments` into
``instrument_results.parquet`` (one row per strategy, seed, backtest path and instrument). A pooled cell's
diagnosis (in sample, validation, test: :mod:`sentio_lab.experiment.memorisation`) records each part's statistics
as the **mean over instruments** of the per-instrument statistics (each instrument's own are kept under
``instruments`` in the record); its placebo market bootstraps every instrument's training bars with the replicate's
seed (:func:`pool_placebo_market`), so the instruments draw the same blocks of dates.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sentio_lab.data import Split
from sentio_lab.env import splits as splitting
from sentio_lab.env.market import PreparedMarket
from sentio_lab.env.pool import PooledMarket, stack_members
from sentio_lab.evaluation.episodes import evaluate_policies
from sentio_lab.evaluation.metrics import periods_per_year, round_trip_trades
from sentio_lab.experiment.assembly import GROUPS_FILE, _path_curves, _path_stats, evaluation_done, evaluation_folder
from sentio_lab.experiment.cells import Cell, write_json_atomic
from sentio_lab.experiment.ensemble import ensemble_name
from sentio_lab.experiment.groups import BOOK_FILL, BOOK_ROUND_TRIPS, BOOK_TURNOVER, BOOK_WINNING_TRIPS
from sentio_lab.experiment.memorisation import (
    PART_STATS,
    PARTS,
    RecordingPolicy,
    diagnosis_path,
    part_ranges,
    part_stats,
    placebo_market,
)

if TYPE_CHECKING:
    from sentio_lab.experiment.runner import Plan

#: Per-instrument test-group episodes beside each evaluation's ``groups.parquet`` (pooled experiments only).
INSTRUMENTS_FILE = "instruments.parquet"
#: Per-instrument backtest-path statistics of a pooled experiment.
INSTRUMENT_RESULTS_FILE = "instrument_results.parquet"
_ROW_KEYS = ("seed", "group", "path", "timestamp")


def members_of(market: PreparedMarket) -> dict[str | None, PreparedMarket]:
    """The markets a fold is evaluated on: each instrument of a pool by name, or ``{None: market}`` for one market."""
    if isinstance(market, PooledMarket):
        return dict(market.members)
    return {None: market}


def book_frame(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The book's test-group episodes (module doc) from each instrument's (the runner's groups frame with a ``seed``
    column); the frames must hold the same rows (seed, group, path, timestamp) in the same order."""
    names = list(frames)
    if not names:
        raise ValueError("book_frame: no instrument")
    head = frames[names[0]]
    if len(names) == 1:  # one account holding all the capital: the instrument itself
        return head.copy()
    for name in names[1:]:
        other = frames[name]
        if len(other) != len(head) or not all(np.array_equal(other[k].to_numpy(), head[k].to_numpy())
                                              for k in _ROW_KEYS):
            raise ValueError(f"book_frame: instrument {name!r} has other episode rows than {names[0]!r}")
    equity = np.stack([frames[n]["equity"].to_numpy(dtype=np.float64) for n in names])
    weight = np.stack([frames[n]["weight"].to_numpy(dtype=np.float64) for n in names])
    cost = np.stack([frames[n]["cost"].to_numpy(dtype=np.float64) for n in names])
    book = head.copy()
    book["equity"] = equity.mean(axis=0)
    book["weight"] = (equity * weight).sum(axis=0) / equity.sum(axis=0)  # NaN where any weight is NaN
    book["cost"] = cost.mean(axis=0)
    book["ruined"] = np.stack([frames[n]["ruined"].to_numpy(dtype=bool) for n in names]).all(axis=0)
    episodes = head.groupby(["seed", "group"], sort=False).indices.values()
    for column, values in _book_trades(equity, weight, episodes).items():
        book[column] = values
    return book


def _book_trades(equity: np.ndarray, weight: np.ndarray, episodes: Any) -> dict[str, np.ndarray]:
    """Per bar, from the instruments' own trades (``(K, n)`` equities and target weights; ``episodes``: the row
    positions of each test-group episode): the book's turnover ``sum_k E_k |dw_k| / sum_k E_k`` (``dw_k``: the change
    of instrument k's target, from flat at the episode's start), whether any instrument fills, and how many of the
    instruments' round trips (and winning ones) enter on the bar. NaN (or False) on each episode's last mark and
    wherever a weight is unknown."""
    n = equity.shape[1]
    turnover, trips, wins = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    fill = np.zeros(n, dtype=bool)
    for rows in episodes:
        e, w = equity[:, rows], weight[:, rows[:-1]]
        if np.isnan(w).any():  # the random baseline's mean over seeds: no single set of trades
            continue
        moves = np.abs(np.diff(w, axis=1, prepend=0.0))
        turnover[rows[:-1]] = (e[:, :-1] * moves).sum(axis=0) / e[:, :-1].sum(axis=0)
        fill[rows[:-1]] = (moves > 0).any(axis=0)
        trips[rows], wins[rows] = 0.0, 0.0
        for k in range(len(equity)):
            trades = round_trip_trades(e[k], w[k])
            np.add.at(trips, rows[trades["entry"].to_numpy(dtype=int)], 1.0)
            np.add.at(wins, rows[trades["entry"].to_numpy(dtype=int)], (trades["pnl"].to_numpy() > 0).astype(float))
    return {BOOK_TURNOVER: turnover, BOOK_FILL: fill, BOOK_ROUND_TRIPS: trips, BOOK_WINNING_TRIPS: wins}


def write_groups(folder: Path, frames: Mapping[str | None, pd.DataFrame]) -> pd.DataFrame:
    """Write the evaluation's ``groups.parquet`` (the book of :func:`book_frame`, or the one market's frame) and,
    for a pool, ``instruments.parquet``; returns the groups frame written."""
    if list(frames) == [None]:
        groups = frames[None]
    else:
        groups = book_frame(frames)
        pd.concat([f.assign(instrument=name) for name, f in frames.items()],
                  ignore_index=True).to_parquet(folder / INSTRUMENTS_FILE)
    groups.to_parquet(folder / GROUPS_FILE)
    return groups


def pool_placebo_market(market: PreparedMarket, config: Any, replicate: int) -> PreparedMarket:
    """:func:`~sentio_lab.experiment.memorisation.placebo_market` of a fold market, per instrument for a pool
    (every instrument bootstrapped with seed ``replicate``; features refitted on its own placebo bars), restacked."""
    if not isinstance(market, PooledMarket):
        return placebo_market(market, config, replicate)
    members = {name: placebo_market(member, config, replicate) for name, member in market.members.items()}
    return stack_members(members, calendar_note=market.calendar_note)


def _instrument_view(pool: PooledMarket, names: Sequence[str]) -> PooledMarket:
    """The stacked pool with range ``"<name>@<k>"`` for each range ``name`` of ``names`` and instrument number ``k``
    (on that instrument's stacked rows): one batched run evaluates a range on every instrument at once."""
    index = pool.data.frame.index
    splits = dict(pool.splits)
    for k, (offset, member) in enumerate(zip(pool.offsets, pool.members.values(), strict=True)):
        for name in names:
            start, stop = member.range(name)
            splits[f"{name}@{k}"] = Split(f"{name}@{k}", offset + start, offset + stop, index[offset + start],
                                          index[offset + stop - 1])
    return dataclasses.replace(pool, splits=splits)


def diagnose_pool(agent: nn.Module, pool: PooledMarket, accounting: dict[str, Any], *, mask_kwargs: dict[str, Any],
                  env_options: dict[str, Any]) -> dict[str, Any]:
    """``{"parts": ..., "instruments": ...}``: per instrument, what
    :func:`~sentio_lab.experiment.memorisation.diagnose_agent` records on its own market, and per part and statistic
    the mean over instruments (NaN where no instrument has a value). ``env_options``: the stacked pool's (its
    anchor is every instrument's own benchmark, stacked).

    Each range runs on every instrument in one batched episode set (the instruments share the calendar, so their
    copies of a range have one length); the recorded entropies and greedy probabilities are split by instrument."""
    names = list(pool.members)
    first = next(iter(pool.members.values()))
    ranges = part_ranges(first)[1]  # the same range names and bars for every instrument (one calendar)
    with_parts = dataclasses.replace(pool, members={name: part_ranges(m)[0] for name, m in pool.members.items()})
    view = _instrument_view(with_parts, [r for part in PARTS for r in ranges[part]])
    ppy = periods_per_year(first.data.frame.index)
    per: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    for part in PARTS:
        evaluations: list[list[Any]] = [[] for _ in names]
        entropy: list[list[np.ndarray]] = [[] for _ in names]
        probability: list[list[np.ndarray]] = [[] for _ in names]
        for range_name in ranges[part]:
            recorder = RecordingPolicy(agent)
            results, = evaluate_policies([recorder], view, [f"{range_name}@{k}" for k in range(len(names))],
                                         window=accounting["window"], positions=accounting["positions"],
                                         costs=accounting["costs"], env_options=env_options, **mask_kwargs)
            if any(len(e) != len(names) for e in recorder.entropy):
                raise RuntimeError("diagnose_pool: the instruments' copies of a range did not run as one batch")
            for k, result in enumerate(results):
                evaluations[k].append(result)
                if recorder.entropy:
                    entropy[k].append(torch.stack(recorder.entropy)[:, k].numpy())
                    probability[k].append(torch.stack(recorder.greedy_probability)[:, k].numpy())
        for k, name in enumerate(names):
            per[name][part] = part_stats(evaluations[k],
                                         np.concatenate(entropy[k]) if entropy[k] else np.empty(0),
                                         np.concatenate(probability[k]) if probability[k] else np.empty(0), ppy)
    parts = {part: {stat: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
                    for stat in PART_STATS
                    for values in [np.array([per[name][part][stat] for name in names], dtype=np.float64)]}
             for part in PARTS}
    return {"parts": parts, "instruments": per}


def write_pool_diagnosis(output: Path, cell: Cell, diagnosis: dict[str, Any]) -> None:
    """Write ``cell``'s diagnosis record (the format of :func:`~sentio_lab.experiment.memorisation.write_diagnosis`,
    plus ``instruments`` for a pool)."""
    path = diagnosis_path(output, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"cell": dataclasses.asdict(cell), "command": shlex.join(cell.args), **diagnosis})


def _strategy_folders(plan: Plan, output: Path) -> list[tuple[str, str, list[Path]]]:
    """(kind, name, one folder per fold) of every evaluated strategy and baseline."""
    out = []
    for agent in plan.config.agents:
        for name in (agent.name, *([ensemble_name(agent.name)] if agent.ensemble else [])):
            out.append(("agent", name, [evaluation_folder(output, name, f.fold) for f in plan.folds]))
    for name in plan.config.baselines:
        out.append(("baseline", name, [output / "baselines" / f"{name}__fold{f.fold:03d}" for f in plan.folds]))
    return out


def assemble_instruments(plan: Plan, output: str | Path) -> pd.DataFrame:
    """``instrument_results.parquet`` of a pooled experiment: per strategy, seed, backtest path and instrument, the
    statistics ``results.parquet`` has for the book (the same path stitching and trade counting)."""
    output = Path(output)
    paths = splitting.backtest_paths(plan.folds)
    rows = []
    for kind, name, folders in _strategy_folders(plan, output):
        frames = []
        for fold, folder in zip(plan.folds, folders, strict=True):
            if evaluation_done(folder) is None or not (folder / INSTRUMENTS_FILE).exists():
                raise FileNotFoundError(f"{folder / INSTRUMENTS_FILE}: evaluation not finished; run the experiment")
            frames.append(pd.read_parquet(folder / INSTRUMENTS_FILE).assign(fold=fold.fold))
        table = pd.concat(frames, ignore_index=True)
        for (instrument, seed), groups in table.groupby(["instrument", "seed"], sort=True):
            for path, members in paths.items():
                equity, weights, pieces = _path_curves(groups, members, plan)
                stats = _path_stats(equity, None if weights.isna().any() else weights, pieces)
                rows.append({"experiment": plan.config.name, "kind": kind, "name": name, "seed": int(seed),
                             "path": path, "instrument": instrument, **stats})
    results = pd.DataFrame(rows)
    results.to_parquet(output / INSTRUMENT_RESULTS_FILE)
    return results


def instrument_table(results: pd.DataFrame, stats: Sequence[str] = ("sharpe", "max_drawdown")) -> pd.DataFrame:
    """Per strategy and instrument (rows): the median of each of ``stats`` over seeds and backtest paths."""
    return results.groupby(["name", "instrument"])[list(stats)].median()
