"""Evaluating one policy on a pooled market (:class:`~sentio_lab.env.pool.PooledMarket`): per instrument and pooled.

Per instrument, :func:`evaluate_pool` runs :func:`~sentio_lab.evaluation.episodes.evaluate_policy` on that
instrument's own market (its features, its normaliser, the pool's ranges), exactly as if it had been prepared
alone. Two pooled figures summarise the instruments:

* ``mean_sharpe``: the mean over instruments of their annualised Sharpe ratios (an instrument whose equity never
  moves has no Sharpe and counts as 0, as in checkpoint selection);
* ``pooled_sharpe``: the annualised Sharpe ratio of the **equal-weight average of the per-instrument bar
  returns**, ``r_t = (1 / K) sum_k r_{k,t}`` over the dates every instrument was evaluated on: a book that gives
  each instrument's strategy the same capital and rebalances to equal capital every bar, costs as each strategy
  paid them (the rebalancing between strategies is not charged). Diversification across instruments lifts it
  above ``mean_sharpe`` when the instruments' results are not perfectly correlated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from sentio_lab.env.costs import CostModel
from sentio_lab.env.pool import PooledMarket
from sentio_lab.evaluation.episodes import Evaluation, evaluate_policy
from sentio_lab.evaluation.metrics import periods_per_year, sharpe_ratio


@dataclass
class PooledEvaluation:
    """One policy over one range of every instrument of a pool (module doc)."""

    range_name: str
    per_instrument: dict[str, Evaluation]
    """Instrument -> its greedy episode over the range."""
    mean_sharpe: float
    """Mean over instruments of the annualised Sharpe (0 for an instrument whose equity never moves)."""
    pooled_sharpe: float
    """Annualised Sharpe of the equal-weight average of per-instrument returns (module doc)."""

    def table(self) -> pd.DataFrame:
        """One row per instrument (Sharpe, total return, max drawdown, trades) and the pooled row."""
        keys = ("sharpe", "total_return", "max_drawdown", "n_trades")
        rows = {name: {k: ev.summary.get(k, np.nan) for k in keys} for name, ev in self.per_instrument.items()}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.loc["pooled (equal-weight book)", "sharpe"] = self.pooled_sharpe
        table.loc["mean over instruments", "sharpe"] = self.mean_sharpe
        return table

    def describe(self) -> str:
        """A few lines for the end of a training run."""
        sharpes = [_sharpe_or_zero(ev) for ev in self.per_instrument.values()]
        return (f"{self.range_name} over {len(sharpes)} instrument(s): mean Sharpe {self.mean_sharpe:+.2f} "
                f"(min {min(sharpes):+.2f}, max {max(sharpes):+.2f}); Sharpe of the equal-weight book of the "
                f"per-instrument returns {self.pooled_sharpe:+.2f}")


def _sharpe_or_zero(evaluation: Evaluation) -> float:
    value = float(evaluation.summary["sharpe"])
    return 0.0 if np.isnan(value) else value


def pooled_returns(per_instrument: dict[str, Evaluation]) -> pd.Series:
    """The equal-weight average of the instruments' simple bar returns, on the dates all of them cover."""
    returns = pd.concat({name: ev.equity.pct_change().iloc[1:] for name, ev in per_instrument.items()}, axis=1)
    return returns.dropna(how="any").mean(axis=1).rename("pooled_return")


def evaluate_pool(
    agent: nn.Module,
    pool: PooledMarket,
    *,
    window: int,
    positions: tuple[float, ...],
    costs: CostModel,
    range_name: str = "validation",
    env_options: dict[str, Any] | None = None,
) -> PooledEvaluation:
    """``agent``'s greedy episode over ``range_name`` of every instrument (on its own market) and the pooled
    figures of the module doc."""
    per_instrument = {
        name: evaluate_policy(agent, member, window=window, positions=positions, costs=costs, range_name=range_name,
                              env_options=env_options)
        for name, member in pool.members.items()
    }
    book = pooled_returns(per_instrument)
    periods = periods_per_year(next(iter(per_instrument.values())).equity.index)  # as each instrument's Sharpe
    pooled = sharpe_ratio(book.to_numpy(), periods) if len(book) >= 2 else float("nan")
    mean = float(np.mean([_sharpe_or_zero(ev) for ev in per_instrument.values()]))
    return PooledEvaluation(range_name=range_name, per_instrument=per_instrument, mean_sharpe=mean,
                            pooled_sharpe=0.0 if np.isnan(pooled) else float(pooled))
