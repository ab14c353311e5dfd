"""Replay a portfolio's target weights as one vectorbt portfolio (``cash_sharing=True``, all assets one group).

Timing as the portfolio env (:mod:`sentio_lab.env.portfolio`): an episode starts at bar ``start`` all in cash with
equity 1.0; the weights ``w[k]`` (``(L, A)``, weights of the post-cost equity) are decided at the close of bar
``start + k`` and filled at bar ``start + k + 1``'s open (or close, ``arrays.fill_price``); equity is marked at that
bar's close. The vectorbt portfolio spans bars ``start .. start + L`` (row 0 holds no order), so its group
``value()`` on row ``k + 1`` is the env's equity after step ``k``.

Share counts depend on the equity at each fill, hence on the path: :func:`portfolio_orders` walks the weights
through :func:`sentio_lab.env.portfolio_arrays.portfolio_fill` in numpy, and vectorbt applies those share deltas
(``size_type="amount"``) at the fill prices with the fee and each order's own price concession as its
``slippage`` (half-spread and impact included), sells before buys within a row (``call_seq="auto"``). What vectorbt
checks is the accounting (cash shared across assets, fees, marks), not the sizing.

Borrowed cash and short borrow are carried as in :mod:`sentio_lab.evaluation.backtest`: a zero-cost ``cash_loan``
column sold on the row whose fills first need more cash than the account holds, and a fee-only ``short_borrow``
column whose ``fixed_fees`` are the rows' borrow charges.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import vectorbt as vbt

from sentio_lab.env.costs import CostModel, borrow_cost
from sentio_lab.env.portfolio_arrays import PortfolioArrays, asset_fill_arrays, portfolio_fill
from sentio_lab.evaluation.backtest import _FEE_ONLY_PRICE, BORROW_COLUMN, LOAN_COLUMN, _loan_orders


class PortfolioOrders(NamedTuple):
    """The orders of a weight path, one row per step ``k`` (filled on bar ``start + k + 1``)."""

    delta: np.ndarray
    """float64 (L, A) shares traded."""
    rate: np.ndarray
    """float64 (L, A) price concession of each order (slippage + half-spread + impact)."""
    cash: np.ndarray
    """float64 (L,) cash right after each row's fills (before borrow)."""
    borrow: np.ndarray
    """float64 (L,) short borrow charged at each row's close."""
    equity: np.ndarray
    """float64 (L,) equity marked at each row's close (the env's)."""


def _check(arrays: PortfolioArrays, start: int, weights: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != arrays.num_assets or len(weights) < 1:
        raise ValueError(f"weights: expected (steps, {arrays.num_assets}) asset weights, got {weights.shape}")
    if not np.isfinite(weights).all():
        raise ValueError("weights: non-finite entries")
    if not 0 <= start or start + len(weights) >= len(arrays.close):
        raise ValueError(f"start {start} + {len(weights)} steps leave the panel's {len(arrays.close)} bars")
    return weights


def portfolio_orders(arrays: PortfolioArrays, start: int, weights: np.ndarray, costs: CostModel) -> PortfolioOrders:
    """Walk ``weights`` ``(L, A)`` from all cash at bar ``start`` (module doc): every order and the equity path."""
    weights = _check(arrays, start, weights)
    steps, a = weights.shape
    per_asset = asset_fill_arrays(arrays, costs, start, start + steps)
    cash, shares = np.float64(1.0), np.zeros(a)
    out = PortfolioOrders(*(np.zeros((steps, a)) for _ in range(2)), *(np.zeros(steps) for _ in range(3)))
    next_close = arrays.fill_price == "next_close"
    for k in range(steps):
        t = start + k
        if per_asset is None:
            half, eta, cap = np.zeros(a), np.zeros(a), np.full(a, np.inf)
        else:
            half, eta, cap = (x[t] for x in per_asset)
        fill = portfolio_fill(cash, shares, arrays.fill[t + 1], weights[k], costs, half, eta, cap)
        charge = 0.0
        if costs.borrow_rate > 0:
            held = shares if next_close else fill.shares
            charge = float(borrow_cost(held, arrays.close[t + 1], arrays.year_fraction[t + 1], costs).sum())
        out.delta[k], out.rate[k], out.cash[k], out.borrow[k] = fill.delta, fill.rate, fill.cash, charge
        cash, shares = fill.cash - charge, fill.shares
        out.equity[k] = cash + (shares * arrays.close[t + 1]).sum()
    return out


def replay_portfolio(arrays: PortfolioArrays, start: int, weights: np.ndarray, costs: CostModel,
                     index: pd.DatetimeIndex | None = None, freq: str | pd.Timedelta = "1D") -> vbt.Portfolio:
    """vectorbt portfolio (one cash-sharing group) of the weights decided at bars ``start .. start + L - 1``.

    ``index`` labels the rows (the panel's calendar; default 0 .. T-1); :func:`group_equity` reads its value.
    """
    weights = _check(arrays, start, weights)
    if costs.borrow_rate > 0 and arrays.year_fraction is None:
        raise ValueError("short borrow needs the panel's timestamps (arrays.year_fraction)")
    orders = portfolio_orders(arrays, start, weights, costs)
    steps = len(weights)
    rows = slice(start, start + steps + 1)
    labels = (pd.RangeIndex(len(arrays.close)) if index is None else index)[rows]
    columns = {asset: (arrays.close[rows, a], np.r_[0.0, orders.delta[:, a]], arrays.fill[rows, a],
                       np.r_[0.0, orders.rate[:, a]], np.zeros(steps + 1))
               for a, asset in enumerate(arrays.assets)}
    # the loan is sold where a row's fills leave the account's cash below zero (cash the env lends itself)
    loan = np.r_[0.0, _loan_orders(orders.cash - orders.borrow)]
    ones = np.ones(steps + 1)
    if loan.any():
        columns = {LOAN_COLUMN: (ones, loan, ones, np.zeros(steps + 1), np.zeros(steps + 1)), **columns}
    charged = np.r_[0.0, orders.borrow] > 0
    if charged.any():
        fee_only = np.full(steps + 1, _FEE_ONLY_PRICE)
        columns[BORROW_COLUMN] = (fee_only, charged.astype(np.float64), fee_only, np.zeros(steps + 1),
                                  np.r_[0.0, orders.borrow])
    closes, sizes, prices, slippages, fixed = (np.column_stack(x) for x in zip(*columns.values(), strict=True))
    fees = np.array([[0.0 if name in (LOAN_COLUMN, BORROW_COLUMN) else costs.fee for name in columns]])
    return vbt.Portfolio.from_orders(
        pd.DataFrame(closes, index=labels, columns=list(columns)),
        size=sizes, price=prices, fees=fees, slippage=slippages, fixed_fees=fixed, size_type="amount",
        direction="both", init_cash=1.0, group_by=True, cash_sharing=True, call_seq="auto",
        freq=pd.Timedelta(freq),
    )


def group_equity(portfolio: vbt.Portfolio) -> pd.Series:
    """The group's value on every row of a :func:`replay_portfolio` (row 0: the starting 1.0): assets, cash and any
    loan netted (one cash-sharing group: vectorbt returns one Series)."""
    return portfolio.value().rename("equity")
