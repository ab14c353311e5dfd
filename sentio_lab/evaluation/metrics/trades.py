"""Metrics of the target weights: turnover, exposure, fills, round-trip trades and their win rate, time in market,
and the costs the fills paid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sentio_lab.evaluation.metrics.inputs import _as_series, _positive_periods, _weights, check_equity

if TYPE_CHECKING:
    from sentio_lab.env.costs import CostModel


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


def fill_costs(
    order_sizes: pd.Series | np.ndarray | Sequence[float],
    open_prices: pd.Series | np.ndarray | Sequence[float],
    costs: CostModel,
) -> pd.Series:
    """Cost of each fill in account currency: ``|delta| open (slippage + fee (1 +- slippage))`` (+ on buys).

    That is what a fill pays over trading ``delta`` shares at the open with no costs, by the formula of
    :func:`sentio_lab.env.costs.rebalance`. ``order_sizes`` as :func:`sentio_lab.evaluation.backtest.order_sizes`
    returns them
    (row 0 of a replay is 0); ``open_prices`` the opens of the same rows (aligned on the index when both are
    Series with timestamps). ``costs`` is a :class:`sentio_lab.env.costs.CostModel` (any object with ``fee`` and
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
