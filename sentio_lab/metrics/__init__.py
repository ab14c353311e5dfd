"""Performance metrics on equity curves, per-period returns and target weights.

Conventions
-----------
* ``equity`` is an account value curve (one value per bar, e.g. :func:`sentio_lab.backtest.equity`);
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
  :func:`monthly_returns`. Statistical tests across strategies live in :mod:`sentio_lab.inference`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats as sps

if TYPE_CHECKING:
    from sentio_lab.costs import CostModel

#: Euler-Mascheroni constant, used by the expected maximum Sharpe ratio of the deflated Sharpe ratio.
EULER_GAMMA = 0.5772156649015329
#: Trading days per year: the convention for daily bars.
TRADING_DAYS = 252.0
#: Weekdays per year: the convention for round-the-clock intraday bars (FX trades 24 hours, 5 days).
WEEKDAYS = 260.0
_DAY = pd.Timedelta(days=1)

PeriodsLike = float | int | str | pd.Timedelta | pd.DatetimeIndex | pd.Series | pd.DataFrame


# ------------------------------------------------------------------------------------------ helpers
def _as_series(values: pd.Series | np.ndarray | Sequence[float], what: str) -> pd.Series:
    """A float64 Series from ``values``; raise naming ``what`` if it is not 1-D or holds NaN / inf."""
    if isinstance(values, pd.DataFrame):
        raise TypeError(f"{what}: expected a 1-D series, got a DataFrame with columns {list(values.columns)}")
    if isinstance(values, pd.Series):
        series = values.astype(np.float64)
    else:
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"{what}: expected 1-D values, got shape {array.shape}")
        series = pd.Series(array)
    bad = ~np.isfinite(series.to_numpy())
    if bad.any():
        where = series.index[bad][:5].tolist()
        raise ValueError(f"{what}: {int(bad.sum())} NaN or inf value(s) (not finite), at {where}")
    return series


def check_equity(equity: pd.Series | np.ndarray | Sequence[float], what: str = "equity") -> pd.Series:
    """Validate an equity curve: at least two finite values, all strictly positive; errors name ``what``."""
    series = _as_series(equity, what)
    if len(series) < 2:
        raise ValueError(f"{what}: need at least 2 values (a start and one marked bar), got {len(series)}")
    nonpositive = series.to_numpy() <= 0
    if nonpositive.any():
        where = series.index[nonpositive][:5].tolist()
        raise ValueError(f"{what}: must stay > 0 for returns to be defined; non-positive at {where}")
    return series


def _returns(returns: pd.Series | np.ndarray | Sequence[float], minimum: int = 2) -> np.ndarray:
    values = _as_series(returns, "returns").to_numpy()
    if len(values) < minimum:
        raise ValueError(f"returns: need at least {minimum} values, got {len(values)}")
    return values


def _positive_periods(periods: float) -> float:
    periods = float(periods)
    if not (np.isfinite(periods) and periods > 0):
        raise ValueError(f"periods_per_year must be a positive finite number, got {periods}")
    return periods


# -------------------------------------------------------------------------------- periods per year
def periods_per_year(freq_or_index: PeriodsLike) -> float:
    """How many bars make one year, used to annualise.

    * A number is returned as is (after checking it is positive).
    * A ``DatetimeIndex`` (or a Series / DataFrame carrying one) is the robust choice: the answer is the
      **median number of bars per calendar year** over the calendar years the index covers completely
      (its first bar within a week of 1 January, its last within a week of 31 December), which gives
      252 for daily US equity data and about 6,200 for hourly FX. When no calendar year is covered
      completely (a range shorter than a year, say) it falls back to the bar density,
      ``(bars - 1) / span`` in years of 365.25 days.
    * A bar spacing (``pd.Timedelta`` or a string such as ``"1D"``, ``"1h"``) can only be mapped by
      convention: one day -> 252 trading days; shorter bars -> 260 weekdays of 24 hours (FX-like);
      longer bars -> calendar time (365.25 days / spacing, 52.2 for weekly bars).
    """
    if isinstance(freq_or_index, pd.Series | pd.DataFrame):
        freq_or_index = freq_or_index.index
    if isinstance(freq_or_index, pd.Index):
        return _periods_from_index(freq_or_index)
    if isinstance(freq_or_index, str | pd.Timedelta | np.timedelta64):
        freq = pd.Timedelta(freq_or_index)
        if freq <= pd.Timedelta(0):
            raise ValueError(f"periods_per_year: bar spacing must be positive, got {freq}")
        if freq == _DAY:
            return TRADING_DAYS
        if freq < _DAY:
            return WEEKDAYS * (_DAY / freq)
        return pd.Timedelta(days=365.25) / freq
    if isinstance(freq_or_index, bool) or not isinstance(freq_or_index, int | float | np.number):
        raise TypeError(
            "periods_per_year: give a number, a bar spacing (Timedelta / str) or a DatetimeIndex, "
            f"not {type(freq_or_index).__name__}"
        )
    return _positive_periods(freq_or_index)


def _periods_from_index(index: pd.Index) -> float:
    if not isinstance(index, pd.DatetimeIndex):
        raise TypeError(
            f"periods_per_year: cannot infer from a {type(index).__name__}; give a DatetimeIndex "
            "or the number of periods per year"
        )
    if len(index) < 2:
        raise ValueError(f"periods_per_year: need at least 2 timestamps, got {len(index)}")
    if not index.is_monotonic_increasing:
        raise ValueError("periods_per_year: timestamps must be increasing")
    first, last = index[0], index[-1]
    tolerance = pd.Timedelta(days=7)
    counts = pd.Series(1, index=index).groupby(index.year).size()
    covered = [
        year
        for year in counts.index
        if first <= pd.Timestamp(year=year, month=1, day=1) + tolerance
        and last >= pd.Timestamp(year=year + 1, month=1, day=1) - tolerance
    ]
    if covered:
        return float(np.median(counts.loc[covered].to_numpy()))
    span_years = (last - first) / pd.Timedelta(days=365.25)
    if span_years <= 0:
        raise ValueError("periods_per_year: all timestamps are equal")
    return (len(index) - 1) / span_years


# ----------------------------------------------------------------------------------- return series
def simple_returns(equity: pd.Series | np.ndarray | Sequence[float]) -> pd.Series:
    """Per-period simple returns ``equity[t] / equity[t-1] - 1`` (one fewer value than ``equity``)."""
    series = check_equity(equity)
    return (series / series.shift(1) - 1.0).iloc[1:]


def log_returns(equity: pd.Series | np.ndarray | Sequence[float]) -> pd.Series:
    """Per-period log returns ``log(equity[t] / equity[t-1])`` (what the environment rewards)."""
    series = check_equity(equity)
    return np.log(series / series.shift(1)).iloc[1:]


def total_return(equity: pd.Series | np.ndarray | Sequence[float]) -> float:
    """``last / first - 1``."""
    series = check_equity(equity)
    return float(series.iloc[-1] / series.iloc[0] - 1.0)


def cagr(equity: pd.Series | np.ndarray | Sequence[float], periods: float) -> float:
    """Compound annual growth rate; the curve's ``len - 1`` periods are ``(len - 1) / periods`` years."""
    series = check_equity(equity)
    years = (len(series) - 1) / _positive_periods(periods)
    return float((series.iloc[-1] / series.iloc[0]) ** (1.0 / years) - 1.0)


def annualized_volatility(returns: pd.Series | np.ndarray | Sequence[float], periods: float) -> float:
    """Sample standard deviation of the returns times ``sqrt(periods)``."""
    values = _returns(returns)
    return float(np.std(values, ddof=1) * np.sqrt(_positive_periods(periods)))


def sharpe_ratio(returns: pd.Series | np.ndarray | Sequence[float], periods: float = 1.0) -> float:
    """``mean / std * sqrt(periods)``; ``periods=1`` gives the per-period SR used by PSR / DSR.

    NaN when the returns do not vary (the ratio is undefined).
    """
    values = _returns(returns)
    std = np.std(values, ddof=1)
    if std == 0:
        return float("nan")
    return float(np.mean(values) / std * np.sqrt(_positive_periods(periods)))


def sortino_ratio(returns: pd.Series | np.ndarray | Sequence[float], periods: float = 1.0) -> float:
    """``mean / downside deviation * sqrt(periods)``, downside deviation ``sqrt(mean(min(r, 0)^2))``.

    The downside deviation averages over *all* periods (target 0), the usual definition. NaN when no
    period lost money.
    """
    values = _returns(returns)
    downside = np.sqrt(np.mean(np.minimum(values, 0.0) ** 2))
    if downside == 0:
        return float("nan")
    return float(np.mean(values) / downside * np.sqrt(_positive_periods(periods)))


def drawdown(equity: pd.Series | np.ndarray | Sequence[float]) -> pd.Series:
    """``equity / running peak - 1``: 0 at a new high, negative below it."""
    series = check_equity(equity)
    return series / series.cummax() - 1.0


def max_drawdown(equity: pd.Series | np.ndarray | Sequence[float]) -> float:
    """Deepest drawdown, a non-positive fraction (-0.25: a 25% fall from a peak)."""
    return float(drawdown(equity).min())


def calmar_ratio(equity: pd.Series | np.ndarray | Sequence[float], periods: float) -> float:
    """``CAGR / |max drawdown|``; NaN when the curve never draws down."""
    mdd = max_drawdown(equity)
    if mdd == 0:
        return float("nan")
    return cagr(equity, periods) / abs(mdd)


def hit_rate(returns: pd.Series | np.ndarray | Sequence[float]) -> float:
    """Fraction of the periods with a nonzero return that gained; flat periods (exactly 0) are left out.

    NaN when every return is zero (never exposed).
    """
    values = _returns(returns, minimum=1)
    active = values[values != 0]
    if len(active) == 0:
        return float("nan")
    return float(np.mean(active > 0))


def _weights(weights: pd.Series | np.ndarray | Sequence[float]) -> np.ndarray:
    values = _as_series(weights, "weights").to_numpy()
    if len(values) == 0:
        raise ValueError("weights: empty")
    return values


def turnover(weights: pd.Series | np.ndarray | Sequence[float], periods: float | None = None) -> float:
    """Mean ``|w[k] - w[k-1]|`` per decision (starting flat); times ``periods`` if given (per year)."""
    values = _weights(weights)
    per_period = float(np.mean(np.abs(np.diff(values, prepend=0.0))))
    return per_period if periods is None else per_period * _positive_periods(periods)


def average_exposure(weights: pd.Series | np.ndarray | Sequence[float]) -> float:
    """Mean ``|w|``: the average fraction of equity at risk, long or short."""
    return float(np.mean(np.abs(_weights(weights))))


def number_of_trades(weights: pd.Series | np.ndarray | Sequence[float]) -> int:
    """Number of fills: decisions whose weight differs from the one held before (initially flat)."""
    values = _weights(weights)
    return int(np.count_nonzero(np.diff(values, prepend=0.0)))


# ------------------------------------------------------------------------ tail, months, drawdown spells
def conditional_value_at_risk(returns: pd.Series | np.ndarray | Sequence[float], alpha: float = 0.05) -> float:
    """Expected shortfall: the mean of the ``k = ceil(alpha T)`` lowest of the ``T`` returns (at least one).

    Reported as a *return*, like :func:`max_drawdown`: usually negative (-0.03: the worst 5% of bars lose 3% on
    average). For ``alpha = 1/q`` (0.05, 0.01) ``k`` equals empyrical's ``int((T - 1) alpha) + 1``.
    """
    values = _returns(returns, minimum=1)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = max(1, math.ceil(alpha * len(values) - 1e-9))  # the tolerance keeps 0.05 * 60 = 3.0000000000000004 at 3
    return float(np.mean(np.partition(values, k - 1)[:k]))


def _datetime_index(series: pd.Series, what: str) -> pd.DatetimeIndex:
    if not isinstance(series.index, pd.DatetimeIndex):
        raise TypeError(f"{what} needs an equity curve with a DatetimeIndex, got a {type(series.index).__name__}")
    return series.index


def monthly_returns(equity: pd.Series) -> pd.Series:
    """Calendar-month returns: last equity of a month / last equity of the previous month - 1.

    The first month is measured from the curve's first value; a first month holding nothing but that value
    (a curve starting on a month's last bar) has no return and is left out. Partial first and last months
    count as months. Indexed by the month's last timestamp in the curve. The same as compounding the simple
    returns of each calendar month, the returns dated by the bar that ends them.
    """
    series = check_equity(equity)
    index = _datetime_index(series, "monthly_returns")
    month_end = series.groupby([index.year, index.month]).tail(1)
    previous = np.r_[series.iloc[0], month_end.to_numpy()[:-1]]
    months = month_end / previous - 1.0
    return months.iloc[1:] if month_end.index[0] == index[0] else months


def positive_month_share(equity: pd.Series) -> float:
    """Share of the calendar months (see :func:`monthly_returns`) with a return above 0."""
    return float(np.mean(monthly_returns(equity).to_numpy() > 0))


def drawdown_spells(equity: pd.Series | np.ndarray | Sequence[float]) -> pd.DataFrame:
    """Every drawdown spell: from a peak (the last bar at a running high) to the first bar back at that high.

    Columns: ``peak`` and ``end`` (index labels), ``bars`` (``end - peak`` in bar positions), ``days`` (calendar
    days between the two timestamps, NaN without a DatetimeIndex), ``depth`` (the spell's deepest drawdown) and
    ``recovered``. A spell still under water ends at the last bar (``recovered`` False).
    """
    series = check_equity(equity)
    dd = drawdown(series).to_numpy()
    under = dd < 0
    starts = np.flatnonzero(under & ~np.r_[False, under[:-1]])  # first bar under water
    rows = []
    for first in starts:
        back = np.flatnonzero(~under[first:])
        end = first + int(back[0]) if len(back) else len(series) - 1
        rows.append((first - 1, end, bool(len(back)), float(dd[first:end + 1].min())))
    index = series.index
    spells = pd.DataFrame(
        {
            "peak": [index[p] for p, _, _, _ in rows],
            "end": [index[e] for _, e, _, _ in rows],
            "bars": np.array([e - p for p, e, _, _ in rows], dtype=np.int64),
            "days": [(index[e] - index[p]) / _DAY if isinstance(index, pd.DatetimeIndex) else np.nan
                     for p, e, _, _ in rows],
            "depth": [d for _, _, _, d in rows],
            "recovered": [r for _, _, r, _ in rows],
        }
    )
    return spells.astype({"days": np.float64, "depth": np.float64, "recovered": bool})


def longest_drawdown(equity: pd.Series | np.ndarray | Sequence[float]) -> tuple[int, float]:
    """``(bars, days)``: the longest drawdown spell in bars and, separately, in calendar days.

    Each is the maximum over :func:`drawdown_spells` (usually the same spell); ``(0, 0.0)`` for a curve that
    never draws down, days NaN without a DatetimeIndex.
    """
    spells = drawdown_spells(equity)
    if spells.empty:
        has_dates = isinstance(getattr(equity, "index", None), pd.DatetimeIndex)
        return 0, (0.0 if has_dates else float("nan"))
    return int(spells["bars"].max()), float(spells["days"].max())


# ---------------------------------------------------------------------------------- round-trip trades
def round_trip_trades(
    equity: pd.Series | np.ndarray | Sequence[float], weights: pd.Series | np.ndarray | Sequence[float]
) -> pd.DataFrame:
    """The round trips of a weight path: from entering a non-zero position until it is flat again or flips sign.

    Bar ``t`` is return ``t`` of ``equity`` (``equity[t+1] / equity[t] - 1``), marked while ``weights[t]`` is
    the target (decided at the close of ``equity[t]``, filled at the next open). A trade opened by decision
    ``k`` owns returns ``k .. j-1`` while its sign is held (resizing within the sign stays in the trade), and
    return ``j`` too when decision ``j`` goes flat: that bar carries the overnight move of the position and its
    exit costs, nothing else. When decision ``j`` flips the sign, bar ``j`` -- the old position's overnight
    move, both legs' costs and the new position's first session -- belongs to the *new* trade. A trade still
    open on the last bar is marked to the last equity (``closed`` False).

    Columns: ``entry`` / ``exit`` (positions of the first and last return owned), ``side`` (+1 / -1),
    ``bars``, ``pnl`` (compounded return over those bars: the trade's profit as a fraction of the equity at
    entry) and ``closed``.
    """
    curve = check_equity(equity)
    rets = (curve / curve.shift(1) - 1.0).to_numpy()[1:]
    w = _weights(weights)
    if len(w) != len(rets):
        raise ValueError(f"weights: {len(w)} decisions for {len(rets)} returns; expected one per return")
    side = np.sign(w)
    previous = np.r_[0.0, side[:-1]]
    entries = np.flatnonzero((side != 0) & (side != previous))
    rows = []
    for k in entries:
        changed = np.flatnonzero(side[k:] != side[k])
        if len(changed) == 0:
            last, closed = len(w) - 1, False
        else:
            j = k + int(changed[0])
            last, closed = (j if side[j] == 0 else j - 1), True
        rows.append((int(k), last, int(side[k]), last - int(k) + 1, float(np.prod(1.0 + rets[k:last + 1]) - 1.0),
                     closed))
    return pd.DataFrame(rows, columns=["entry", "exit", "side", "bars", "pnl", "closed"]).astype(
        {"entry": np.int64, "exit": np.int64, "side": np.int64, "bars": np.int64, "pnl": np.float64, "closed": bool}
    )


def trade_win_rate(
    equity: pd.Series | np.ndarray | Sequence[float], weights: pd.Series | np.ndarray | Sequence[float]
) -> float:
    """Share of the :func:`round_trip_trades` (the open last one included) with a P&L above 0; NaN without trades."""
    trades = round_trip_trades(equity, weights)
    return float(np.mean(trades["pnl"].to_numpy() > 0)) if len(trades) else float("nan")


def time_in_market(weights: pd.Series | np.ndarray | Sequence[float]) -> float:
    """Share of the decisions (bars) whose target weight is non-zero, long or short."""
    return float(np.mean(_weights(weights) != 0))


# -------------------------------------------------------------------------------------------- costs
def fill_costs(
    order_sizes: pd.Series | np.ndarray | Sequence[float],
    open_prices: pd.Series | np.ndarray | Sequence[float],
    costs: CostModel,
) -> pd.Series:
    """Cost of each fill in account currency: ``|delta| open (slippage + fee (1 +- slippage))`` (+ on buys).

    That is what a fill pays over trading ``delta`` shares at the open with no costs, by the formula of
    :func:`sentio_lab.costs.rebalance`. ``order_sizes`` as :func:`sentio_lab.backtest.order_sizes` returns them
    (row 0 of a replay is 0); ``open_prices`` the opens of the same rows (aligned on the index when both are
    Series with timestamps). ``costs`` is a :class:`sentio_lab.costs.CostModel` (any object with ``fee`` and
    ``slippage`` fractions). Short borrow is not a fill cost: add its charges to the series if wanted.
    """
    deltas = _as_series(order_sizes, "order_sizes")
    if isinstance(open_prices, pd.Series) and isinstance(deltas.index, pd.DatetimeIndex):
        open_prices = open_prices.reindex(deltas.index)
    opens = _as_series(open_prices, "open_prices").to_numpy()
    if len(opens) != len(deltas):
        raise ValueError(f"open_prices: {len(opens)} values for {len(deltas)} order sizes")
    d = deltas.to_numpy()
    paid = np.abs(d) * opens * (costs.slippage + costs.fee * (1.0 + np.sign(d) * costs.slippage))
    return pd.Series(paid, index=deltas.index, name="cost")


def costs_paid(
    costs: pd.Series | np.ndarray | Sequence[float], equity: pd.Series | np.ndarray | Sequence[float]
) -> float:
    """Total costs paid (account currency, e.g. :func:`fill_costs`) as a fraction of the starting equity.

    A plain sum, not compounded: 0.004 means the fills cost 0.4% of the initial capital in all.
    """
    values = _as_series(costs, "costs").to_numpy()
    if (values < 0).any():
        raise ValueError("costs: negative values; costs paid are amounts >= 0")
    return float(values.sum() / check_equity(equity).iloc[0])

# -------------------------------------------------------------------------- PSR and deflated SR
def probabilistic_sharpe_ratio(
    returns: pd.Series | np.ndarray | Sequence[float], sr_benchmark: float = 0.0
) -> float:
    """Probability that the true per-period Sharpe ratio exceeds ``sr_benchmark`` (Bailey & Lopez de Prado).

    ``PSR(SR*) = Phi((SR - SR*) sqrt(T - 1) / sqrt(1 - g3 SR + (g4 - 1) / 4 SR^2))`` with ``SR`` the
    per-period (not annualised) Sharpe ratio of the ``T`` returns, ``g3`` their skewness and ``g4`` their
    non-excess kurtosis. ``sr_benchmark`` is per period too. NaN when the returns do not vary.
    """
    values = _returns(returns, minimum=3)
    sr = sharpe_ratio(values)
    if not np.isfinite(sr):
        return float("nan")
    g3 = float(sps.skew(values, bias=True))
    g4 = float(sps.kurtosis(values, fisher=False, bias=True))
    variance_term = 1.0 - g3 * sr + (g4 - 1.0) / 4.0 * sr**2
    z = (sr - float(sr_benchmark)) * np.sqrt(len(values) - 1) / np.sqrt(variance_term)
    return float(sps.norm.cdf(z))


def expected_max_sharpe(n_trials: int, sr_variance: float) -> float:
    """``SR0``: the Sharpe ratio the best of ``n_trials`` unskilled trials is expected to reach.

    ``SR0 = sqrt(Var[SR_n]) ((1 - gamma) Phi^-1(1 - 1/N) + gamma Phi^-1(1 - 1/(N e)))`` with ``Var[SR_n]``
    the variance of the trials' per-period Sharpe ratios and ``gamma`` the Euler-Mascheroni constant.
    """
    if isinstance(n_trials, bool) or int(n_trials) != n_trials or n_trials < 2:
        raise ValueError(
            f"n_trials must be an integer >= 2, got {n_trials} (one trial has nothing to deflate: "
            "use probabilistic_sharpe_ratio)"
        )
    if not (np.isfinite(sr_variance) and sr_variance >= 0):
        raise ValueError(f"sr_variance must be a finite number >= 0, got {sr_variance}")
    n = float(n_trials)
    quantiles = (1.0 - EULER_GAMMA) * sps.norm.ppf(1.0 - 1.0 / n) + EULER_GAMMA * sps.norm.ppf(
        1.0 - 1.0 / (n * np.e)
    )
    return float(np.sqrt(sr_variance) * quantiles)


def deflated_sharpe_ratio(
    returns: pd.Series | np.ndarray | Sequence[float],
    *,
    n_trials: int | None = None,
    sr_variance: float | None = None,
    trial_sharpes: Sequence[float] | np.ndarray | None = None,
) -> float:
    """PSR against the expected maximum Sharpe ratio of ``n_trials`` trials (Bailey & Lopez de Prado, 2014).

    Give either ``trial_sharpes`` (the per-period Sharpe ratios of every trial tried, including this
    one: their count is ``N`` unless ``n_trials`` says otherwise, their sample variance is ``Var[SR_n]``)
    or both ``n_trials`` and ``sr_variance``.
    """
    if trial_sharpes is not None:
        if sr_variance is not None:
            raise ValueError("give trial_sharpes or sr_variance, not both")
        sharpes = _as_series(trial_sharpes, "trial_sharpes").to_numpy()
        if len(sharpes) < 2:
            raise ValueError(f"trial_sharpes: need at least 2 trials, got {len(sharpes)}")
        sr_variance = float(np.var(sharpes, ddof=1))
        n_trials = len(sharpes) if n_trials is None else n_trials
    if n_trials is None or sr_variance is None:
        raise ValueError("deflated_sharpe_ratio needs trial_sharpes, or n_trials and sr_variance")
    return probabilistic_sharpe_ratio(returns, expected_max_sharpe(n_trials, sr_variance))


# --------------------------------------------------------------------------------------- summaries
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
    return pd.DataFrame(columns, index=list(STAT_NAMES))
