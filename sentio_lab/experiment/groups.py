"""The long table of a fold's test-group episodes (``groups.parquet``): one row per bar of every episode, with its
group, backtest path, equity, target weight and fill costs; written by the runner for every strategy and baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from sentio_lab.env import splits as splitting
from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation.backtest import fill_costs_paid, fill_prices, order_sizes
from sentio_lab.evaluation.baselines import evaluate_baseline, evaluate_random
from sentio_lab.evaluation.episodes import Evaluation
from sentio_lab.evaluation.metrics import fill_costs

# Columns a pooled book's ``groups.parquet`` carries per bar (sentio_lab.experiment.pool_runs.book_frame), from the
# instruments' own trades.
#: The book's turnover on the bar: ``sum_k E_k |dw_k| / sum_k E_k`` (pooled books only).
BOOK_TURNOVER = "book_turnover"
#: Whether any instrument fills on the bar (pooled books only).
BOOK_FILL = "book_fill"
#: How many of the instruments' round trips enter on the bar (pooled books only).
BOOK_ROUND_TRIPS = "book_round_trips"
#: How many of those round trips won (pooled books only).
BOOK_WINNING_TRIPS = "book_winning_round_trips"


def groups_frame(evaluations: Sequence[Evaluation], fold: splitting.Fold, market: PreparedMarket) -> pd.DataFrame:
    """Long table of a fold's test-group episodes: group, path, bar time, equity, weight (NaN on the last mark).

    A ruined episode stopped early: its account is carried, flat, at its floored last value to the end of the
    group, so that the backtest path still chains over every bar (a ruined account trades nothing more).
    """
    parts = []
    frame = market.data.frame
    index = frame.index
    for j, evaluation in enumerate(evaluations):
        equity = evaluation.equity
        weights = evaluation.weights.reindex(equity.index)
        if evaluation.weights.isna().any():  # the random baseline's mean over seeds: no single set of fills
            cost = pd.Series(np.nan, index=equity.index)
        elif evaluation.costs.is_flat:  # what each fill paid at the open (or close) of its bar (starting at 1.0)
            sizes = order_sizes(frame, evaluation.start, evaluation.weights.to_numpy(), evaluation.costs,
                                evaluation.fill_price)
            cost = fill_costs(sizes, fill_prices(frame, evaluation.fill_price), evaluation.costs).reindex(equity.index)
        else:  # spread / impact / cap: the fills' own concessions (sentio_lab.evaluation.backtest.fills)
            cost = fill_costs_paid(frame, evaluation.start, evaluation.weights.to_numpy(),
                                   evaluation.costs, evaluation.fill_price).reindex(equity.index)
        if evaluation.ruined:
            _, stop = market.range(f"test:{fold.groups[j]}")
            rest = index[index.get_loc(equity.index[-1]) + 1 : stop]
            equity = pd.concat([equity, pd.Series(float(equity.iloc[-1]), index=rest)])
            weights = pd.concat([weights.iloc[:-1], pd.Series(0.0, index=equity.index[len(weights) - 1 : -1]),
                                 pd.Series([np.nan], index=equity.index[-1:])])
            cost = cost.reindex(equity.index, fill_value=0.0)
        parts.append(pd.DataFrame({
            "group": fold.groups[j], "path": fold.paths[j], "timestamp": equity.index,
            "equity": equity.to_numpy(), "weight": weights.to_numpy(), "cost": cost.to_numpy(),
            "ruined": evaluation.ruined,
        }))
    return pd.concat(parts, ignore_index=True)


def baseline_frame(name: str, market: PreparedMarket, fold: splitting.Fold, random_seeds: int,
                    kwargs: dict[str, Any]) -> pd.DataFrame:
    """Baseline ``name`` on the fold's test groups of one market (the random policy: the mean over its seeds)."""
    if name == "random":
        runs = [evaluate_random(market, tuple(range(random_seeds)), range_name=f"test:{group}", **kwargs)
                for group in fold.groups]
        evaluations = [dataclasses.replace(r.evaluations[0], equity=r.mean_equity,
                                           weights=r.evaluations[0].weights * np.nan) for r in runs]
    else:
        evaluations = [evaluate_baseline(name, market, range_name=f"test:{group}", train=market.training_segments(),
                                         **kwargs) for group in fold.groups]
    return groups_frame(evaluations, fold, market).assign(seed=-1)


def book_trade_stats(pieces: Sequence[pd.DataFrame], periods_per_year: float) -> dict[str, float]:
    """A pooled book's trade statistics over a backtest path from its test groups' rows (``pieces``, in time order,
    with the :data:`BOOK_TURNOVER` ... columns): ``n_trades`` (bars on which any instrument fills),
    ``turnover_per_year`` (mean book turnover per decision x ``periods_per_year``), ``round_trips`` (the instruments'
    own, summed) and ``trade_win_rate`` (the share of those that won; NaN without any)."""
    decisions = [p.iloc[:-1] for p in pieces]  # the last mark of a group decides nothing
    turnover = np.concatenate([d[BOOK_TURNOVER].to_numpy(dtype=np.float64) for d in decisions])
    trips = float(sum(p[BOOK_ROUND_TRIPS].sum() for p in pieces))
    wins = float(sum(p[BOOK_WINNING_TRIPS].sum() for p in pieces))
    return {"n_trades": int(sum(d[BOOK_FILL].sum() for d in decisions)),
            "turnover_per_year": float(turnover.mean() * periods_per_year),
            "round_trips": int(trips), "trade_win_rate": wins / trips if trips else float("nan")}
