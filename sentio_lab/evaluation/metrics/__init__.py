"""Performance metrics on equity curves, per-period returns and target weights.

Conventions
-----------
* ``equity`` is an account value curve (one value per bar, e.g. :func:`sentio_lab.evaluation.backtest.equity`);
  ``returns`` are per-period *simple* returns unless a function says otherwise. The moment-based ratios
  (Sharpe, Sortino, PSR, DSR) are plain functions of the series they are given, so log returns work too.
* Standard deviations are sample ones (``ddof=1``); skewness and kurtosis are the moment estimators of
  ``scipy.stats`` (``bias=True``), kurtosis *non-excess* (normal = 3), as the PSR formula wants. With
  those estimators ``kurtosis >= skew**2 + 1`` holds exactly, so the PSR denominator is never negative.
* Annualisation multiplies by ``periods_per_year`` (see :func:`periods_per_year`); a risk-free rate, if
  any, must already be subtracted from the returns.
* Drawdowns are non-positive fractions: ``max_drawdown`` of -0.25 means the curve fell 25% from a peak.
* ``weights`` are *target* weights, one per decision bar, as the environment chooses them; the position
  before the first decision is flat (0). Turnover and exposure describe those targets (drift between
  rebalances is not counted). ``weights[t]`` is the target while return ``t`` of the equity is marked.
* Tail risk (CVaR) is reported as a return (negative = a loss), like drawdowns. Round-trip trades, drawdown
  spells and calendar months are defined in :func:`round_trip_trades`, :func:`drawdown_spells` and
  :func:`monthly_returns`. Statistical tests across strategies live in :mod:`sentio_lab.evaluation.inference`.

Modules: :mod:`~sentio_lab.evaluation.metrics.inputs` (validated inputs), :mod:`~sentio_lab.evaluation.metrics.periods`
(periods per
year), :mod:`~sentio_lab.evaluation.metrics.returns` (return series, ratios, tail risk, calendar months),
:mod:`~sentio_lab.evaluation.metrics.drawdowns` (drawdowns and their spells),
:mod:`~sentio_lab.evaluation.metrics.trades` (weights,
round trips, time in market, fill costs), :mod:`~sentio_lab.evaluation.metrics.sharpe_inference` (PSR and DSR) and
:mod:`~sentio_lab.evaluation.metrics.table` (:func:`summary_stats`, :func:`stats_table`).
"""

from __future__ import annotations

from sentio_lab.evaluation.metrics.drawdowns import (
    calmar_ratio,
    drawdown,
    drawdown_spells,
    longest_drawdown,
    max_drawdown,
)

# ``x as x`` imports keep the private helpers sentio_lab.evaluation.inference reads on the package reachable.
from sentio_lab.evaluation.metrics.inputs import _as_series as _as_series
from sentio_lab.evaluation.metrics.inputs import _positive_periods as _positive_periods
from sentio_lab.evaluation.metrics.inputs import check_equity
from sentio_lab.evaluation.metrics.periods import TRADING_DAYS, WEEKDAYS, PeriodsLike, periods_per_year
from sentio_lab.evaluation.metrics.returns import (
    annualized_volatility,
    cagr,
    conditional_value_at_risk,
    hit_rate,
    log_returns,
    monthly_returns,
    positive_month_share,
    sharpe_ratio,
    simple_returns,
    sortino_ratio,
    total_return,
)
from sentio_lab.evaluation.metrics.sharpe_inference import (
    EULER_GAMMA,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    probabilistic_sharpe_ratio,
)
from sentio_lab.evaluation.metrics.table import NOT_AVAILABLE, STAT_NAMES, WEIGHT_STATS, stats_table, summary_stats
from sentio_lab.evaluation.metrics.trades import (
    average_exposure,
    costs_paid,
    fill_costs,
    number_of_trades,
    round_trip_trades,
    time_in_market,
    trade_win_rate,
    turnover,
)

__all__ = [
    "EULER_GAMMA",
    "NOT_AVAILABLE",
    "STAT_NAMES",
    "WEIGHT_STATS",
    "TRADING_DAYS",
    "WEEKDAYS",
    "PeriodsLike",
    "annualized_volatility",
    "average_exposure",
    "cagr",
    "calmar_ratio",
    "check_equity",
    "conditional_value_at_risk",
    "costs_paid",
    "deflated_sharpe_ratio",
    "drawdown",
    "drawdown_spells",
    "expected_max_sharpe",
    "fill_costs",
    "hit_rate",
    "log_returns",
    "longest_drawdown",
    "max_drawdown",
    "monthly_returns",
    "number_of_trades",
    "periods_per_year",
    "positive_month_share",
    "probabilistic_sharpe_ratio",
    "round_trip_trades",
    "sharpe_ratio",
    "simple_returns",
    "sortino_ratio",
    "stats_table",
    "summary_stats",
    "time_in_market",
    "total_return",
    "trade_win_rate",
    "turnover",
]
