"""Every metric of one strategy (:func:`summary_stats`) and of several side by side (:func:`stats_table`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from sentio_lab.evaluation.metrics.drawdowns import calmar_ratio, longest_drawdown, max_drawdown
from sentio_lab.evaluation.metrics.inputs import _weights, check_equity
from sentio_lab.evaluation.metrics.periods import PeriodsLike, periods_per_year
from sentio_lab.evaluation.metrics.returns import (
    annualized_volatility,
    cagr,
    conditional_value_at_risk,
    hit_rate,
    positive_month_share,
    sharpe_ratio,
    simple_returns,
    sortino_ratio,
    total_return,
)
from sentio_lab.evaluation.metrics.sharpe_inference import deflated_sharpe_ratio, probabilistic_sharpe_ratio
from sentio_lab.evaluation.metrics.trades import (
    average_exposure,
    costs_paid,
    number_of_trades,
    round_trip_trades,
    time_in_market,
    turnover,
)

#: Rows that only target weights determine (NaN for a curve given without weights).
WEIGHT_STATS: tuple[str, ...] = (
    "turnover_per_year", "avg_exposure", "time_in_market", "n_trades", "round_trips", "trade_win_rate",
)
#: Where :func:`stats_table` records why an entry is NaN: ``table.attrs[NOT_AVAILABLE][row][column]``.
NOT_AVAILABLE = "not_available"

#: Row order of :func:`summary_stats` / :func:`stats_table`.
STAT_NAMES: tuple[str, ...] = (
    "start",
    "end",
    "bars",
    "periods_per_year",
    "total_return",
    "cagr",
    "ann_volatility",
    "sharpe",
    "sortino",
    "max_drawdown",
    "calmar",
    "cvar_5",
    "max_dd_bars",
    "max_dd_days",
    "positive_months",
    "hit_rate",
    "psr",
    "dsr",
    "turnover_per_year",
    "avg_exposure",
    "time_in_market",
    "n_trades",
    "round_trips",
    "trade_win_rate",
    "costs_paid",
)


def summary_stats(
    equity: pd.Series,
    weights: pd.Series | np.ndarray | Sequence[float] | None = None,
    periods: PeriodsLike | None = None,
    *,
    n_trials: int | None = None,
    sr_variance: float | None = None,
    trial_sharpes: Sequence[float] | np.ndarray | None = None,
    costs: pd.Series | np.ndarray | Sequence[float] | None = None,
) -> dict[str, object]:
    """Every metric of one equity curve (and its target weights, if given) in a dict keyed by STAT_NAMES.

    ``periods`` is anything :func:`periods_per_year` accepts; ``None`` infers it from the equity's
    DatetimeIndex. Returns are the curve's simple returns. ``psr`` is PSR(0); ``dsr`` is filled only when
    the trials are described (see :func:`deflated_sharpe_ratio`); the weight-based entries
    (``turnover_per_year``, ``avg_exposure``, ``time_in_market``, ``n_trades``, ``round_trips``,
    ``trade_win_rate``) only with ``weights``; ``costs_paid`` only with ``costs`` (the costs paid in account
    currency, e.g. :func:`fill_costs`: equity and weights alone do not determine them). ``cvar_5`` is
    :func:`conditional_value_at_risk` at 5% (a return, usually negative); ``max_dd_bars`` / ``max_dd_days``
    come from :func:`longest_drawdown`; ``positive_months`` is :func:`positive_month_share` (NaN, like
    ``max_dd_days``, without a DatetimeIndex). Missing entries are NaN.
    """
    curve = check_equity(equity)
    ppy = periods_per_year(curve.index if periods is None else periods)
    rets = simple_returns(curve)
    has_trials = trial_sharpes is not None or n_trials is not None or sr_variance is not None
    index = curve.index
    dated = isinstance(index, pd.DatetimeIndex)
    longest = longest_drawdown(curve)
    out: dict[str, object] = {
        "start": index[0] if dated else None,
        "end": index[-1] if dated else None,
        "bars": len(rets),
        "periods_per_year": ppy,
        "total_return": total_return(curve),
        "cagr": cagr(curve, ppy),
        "ann_volatility": annualized_volatility(rets, ppy) if len(rets) >= 2 else np.nan,
        "sharpe": sharpe_ratio(rets, ppy) if len(rets) >= 2 else np.nan,
        "sortino": sortino_ratio(rets, ppy) if len(rets) >= 2 else np.nan,
        "max_drawdown": max_drawdown(curve),
        "calmar": calmar_ratio(curve, ppy),
        "cvar_5": conditional_value_at_risk(rets, 0.05),
        "max_dd_bars": longest[0],
        "max_dd_days": longest[1],
        "positive_months": positive_month_share(curve) if dated else np.nan,
        "hit_rate": hit_rate(rets),
        "psr": probabilistic_sharpe_ratio(rets) if len(rets) >= 3 else np.nan,
        "dsr": (
            deflated_sharpe_ratio(
                rets, n_trials=n_trials, sr_variance=sr_variance, trial_sharpes=trial_sharpes
            )
            if has_trials
            else np.nan
        ),
        "turnover_per_year": np.nan,
        "avg_exposure": np.nan,
        "time_in_market": np.nan,
        "n_trades": np.nan,
        "round_trips": np.nan,
        "trade_win_rate": np.nan,
        "costs_paid": costs_paid(costs, curve) if costs is not None else np.nan,
    }
    if weights is not None:
        w = _weights(weights)
        if len(w) != len(rets):
            raise ValueError(
                f"weights: {len(w)} decisions for an equity curve of {len(curve)} values; expected "
                f"{len(rets)} (one decision per marked bar, the curve starts before the first fill)"
            )
        out["turnover_per_year"] = turnover(w, ppy)
        out["avg_exposure"] = average_exposure(w)
        out["time_in_market"] = time_in_market(w)
        out["n_trades"] = number_of_trades(w)
        trades = round_trip_trades(curve, w)
        out["round_trips"] = len(trades)
        out["trade_win_rate"] = float(np.mean(trades["pnl"].to_numpy() > 0)) if len(trades) else np.nan
    return out


def stats_table(
    equities: Mapping[str, pd.Series],
    weights: Mapping[str, pd.Series | np.ndarray] | None = None,
    periods: PeriodsLike | None = None,
    *,
    trial_family: Collection[str] | None = None,
    n_trials: int | None = None,
    sr_variance: float | None = None,
    trial_sharpes: Sequence[float] | np.ndarray | None = None,
    costs: Mapping[str, pd.Series | np.ndarray] | None = None,
) -> pd.DataFrame:
    """:func:`summary_stats` of several strategies side by side: one column per strategy, STAT_NAMES rows.

    ``weights`` and ``costs`` (costs paid per bar or per fill in account currency, see :func:`fill_costs`)
    may cover only some strategies (buy and hold has no weights worth reporting, say); their keys must be
    strategy names.

    The deflated Sharpe ratio corrects for the search that produced a strategy, so it belongs only to the
    strategies that were tried: ``trial_family`` names those columns (the agents / seeds / configurations),
    and ``dsr`` is left NaN for every other column (baselines such as buy and hold were not searched for).
    The family is described, as in :func:`deflated_sharpe_ratio`, by ``trial_sharpes`` or ``n_trials`` and
    ``sr_variance`` when more was tried than the table shows; otherwise by the per-period Sharpe ratios of
    the family's own columns (simple returns), which needs at least two of them. A trial description
    without ``trial_family`` is refused rather than applied to every column.

    Why an entry is NaN (no trial family, a baseline's DSR, no weights, no costs recorded, no round trip) is
    recorded as ``table.attrs[NOT_AVAILABLE][row][column]`` (a sentence);
    :func:`sentio_lab.evaluation.report.write_report`
    prints it under the table instead of an empty cell.
    """
    if not equities:
        raise ValueError("stats_table: no equity curves given")
    weights, costs = dict(weights or {}), dict(costs or {})
    for what, given in (("weights", weights), ("costs", costs)):
        unknown = sorted(set(given) - set(equities))
        if unknown:
            raise ValueError(f"stats_table: {what} for unknown strategies {unknown}; known: {list(equities)}")
    described = trial_sharpes is not None or n_trials is not None or sr_variance is not None
    if trial_family is None:
        if described:
            raise ValueError(
                "stats_table: a trial description (n_trials / sr_variance / trial_sharpes) was given without "
                "trial_family; name the strategies that were tried, the DSR does not apply to baselines"
            )
        family: list[str] = []
    else:
        family = [trial_family] if isinstance(trial_family, str) else list(trial_family)
        missing = sorted(set(family) - set(equities))
        if missing or not family:
            raise ValueError(f"stats_table: trial_family {missing or family} not among the strategies {list(equities)}")
        if not described:
            trial_sharpes = [sharpe_ratio(simple_returns(equities[name])) for name in family]
            if len(trial_sharpes) < 2 or not np.isfinite(trial_sharpes).all():
                raise ValueError(
                    f"stats_table: the DSR of trial_family {family} needs at least two finite Sharpe ratios from "
                    "its curves, or pass trial_sharpes / n_trials and sr_variance"
                )
    trials = {"n_trials": n_trials, "sr_variance": sr_variance, "trial_sharpes": trial_sharpes}
    columns = {
        name: summary_stats(
            curve, weights.get(name), periods, costs=costs.get(name), **(trials if name in family else {})
        )
        for name, curve in equities.items()
    }
    table = pd.DataFrame(columns, index=list(STAT_NAMES))
    table.attrs[NOT_AVAILABLE] = _reasons(table, family, set(weights), set(costs))
    return table


def _reasons(table: pd.DataFrame, family: list[str], weighted: set[str], costed: set[str]) -> dict[str, dict[str, str]]:
    """Why each NaN entry of ``table`` is NaN, where the inputs say it: ``{row: {column: reason}}``."""
    reasons: dict[str, dict[str, str]] = {}

    def note(row: str, column: str, reason: str) -> None:
        if pd.isna(table.at[row, column]):
            reasons.setdefault(row, {})[column] = reason

    for column in table.columns:
        if not family:
            note("dsr", column, "no trial family was given: the DSR deflates the Sharpe ratio of the strategies that "
                                "were searched, stats_table(trial_family=[...]) with >= 2 trials")
        elif column not in family:
            note("dsr", column, "not in the trial family: the DSR applies to the strategies that were searched, "
                                "not to baselines")
        else:
            note("dsr", column, "undefined for this curve (too few returns or no variation)")
        if column not in costed:
            note("costs_paid", column, "costs paid were not recorded for this curve (stats_table(costs=...)); "
                                       "equity and weights alone do not determine them")
        if column not in weighted:
            for row in WEIGHT_STATS:
                note(row, column, "no target weights were given for this curve")
        else:
            note("trade_win_rate", column, "no closed round trip")
    return reasons
