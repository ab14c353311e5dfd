"""Replay an agent's target weights as a vectorbt portfolio with the environment's fills and costs.

Timing (ARCHITECTURE.md), reproduced exactly: an episode starts at bar ``start`` with equity 1.0, all
cash. For ``k = 0 .. L-1`` the weight ``w[k]`` is decided at the close of bar ``start + k``; when it
differs from the weight held (initially 0) the account rebalances at the **open** of bar
``start + k + 1`` by :func:`sentio_lab.env.costs.rebalance`; equity is marked at that bar's close. The
portfolio spans bars ``start .. start + L`` (``L + 1`` rows, no order on row 0), so ``value()`` on row
``k + 1`` equals the environment's equity after step ``k``.

Fills at the next close (``fill_price="next_close"``, :class:`sentio_lab.env.MarketArrays`): every "open" above
reads "close" -- the order decided at bar ``start + k``'s close fills at bar ``start + k + 1``'s close, the price
that bar is marked at, and a short pays borrow over that bar on the shares held before the fill.

Share counts depend on the equity at each open, hence on the path: :func:`order_sizes` walks the
weights through ``rebalance`` in numpy, and vectorbt then applies those share deltas
(``size_type="amount"``) at the opens with the same fee and slippage, which are exactly the env's fills.

Borrowed cash. ``rebalance`` sizes a target as a weight of the post-trade equity, so levels in
[-1, 1] never borrow (a move to 1 spends exactly the cash on hand); a level above 1 is leverage and
leaves the account with negative cash, a loan the environment allows. vectorbt never lets cash go below
zero (it would fill only part of the order). When a path needs it, :func:`replay` therefore adds a
first column, ``cash_loan``: a constant-price-1 instrument with no costs, in one cash-sharing group with
the asset, sold short on the row whose fill first needs the cash (and topped up on any later row that
needs more). Selling it raises cash by exactly the debt it books, so the group's value -- and every
return, drawdown or Sharpe ratio vectorbt computes from it -- equals the environment's equity, and rows
before the loan are untouched. The loan shows up in ``portfolio.orders`` and in vectorbt's own trade
counts and benchmark; use :mod:`sentio_lab.evaluation.metrics` on :func:`equity` for reported numbers.

Short borrow (``costs.borrow_bps > 0``, see :mod:`sentio_lab.env.costs`). The env deducts
``borrow_cost(shares, close, years)`` from cash at the close of every bar a short is held over.
vectorbt's ``from_orders`` has no per-row cash flow (no deposits or withdrawals), and its only charge
that does not scale with the traded notional is ``fixed_fees``. :func:`replay` therefore adds a last
column, ``short_borrow``: a fee-only instrument priced at 1e-300 (so the units it accumulates are worth
nothing, below the last bit of any equity value), on which it buys one unit with ``fixed_fees`` equal to
that row's borrow charge, on every row that has one. vectorbt books the charge as a fee, so the cash of
the group falls by exactly the charge and ``value()`` still equals the env's equity to rounding; the
charges show in ``portfolio.orders`` on that column, their ``Fees`` sum is the borrow paid. The amounts
come from :func:`sentio_lab.env.costs.borrow_cost` (what vectorbt checks is the accounting, not the rate);
a replay whose borrow order is rejected raises instead of returning a wrong curve.

Non-flat cost models (half-spread, impact, participation cap: :mod:`sentio_lab.env.costs.execution`). The walk
fills through :func:`sentio_lab.env.costs.execute` on the same causal estimates as the envs
(:func:`frame_cost_inputs`, computed on the whole frame as the env computes them on the whole market), and
vectorbt receives each row's own price concession as a per-order ``slippage`` array: the fill price is then
``open (1 +- rate)`` and the fee is charged on it, exactly the env's fill. :func:`fills` lists every order with
its reason, cost and implementation shortfall.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import vectorbt as vbt

from sentio_lab.data import infer_bar_freq
from sentio_lab.env import FILL_PRICES, FillPrice
from sentio_lab.env.costs import (
    CostInputs,
    CostModel,
    bars_per_day,
    borrow_cost,
    cost_inputs,
    execute,
    fill_cap,
    fill_reason,
    impact_eta,
    rebalance,
    year_fractions,
)

#: Column name of the traded instrument in the portfolio.
ASSET_COLUMN = "asset"
#: Column name of the zero-cost loan instrument added when a path borrows cash (see the module doc).
LOAN_COLUMN = "cash_loan"
#: Column name of the fee-only instrument that carries short borrow charges (see the module doc).
BORROW_COLUMN = "short_borrow"
#: Price of the fee-only borrow instrument: positive (vectorbt refuses 0) and worthless next to any equity.
_FEE_ONLY_PRICE = 1e-300
#: Cash below this (on a starting equity of 1) counts as borrowing; above it is rounding noise that
#: vectorbt rounds to zero itself (its absolute tolerance is 1e-12).
_BORROW_TOLERANCE = 1e-12
#: Extra loan on top of twice the deepest negative cash, so that vectorbt never rounds the cash left
#: after a fill to zero (its relative tolerance is 1e-9).
_LOAN_MARGIN = 1e-6


def _check_frame(frame: pd.DataFrame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"frame: expected the canonical OHLCV DataFrame, got {type(frame).__name__}")
    missing = [c for c in ("open", "close") if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing column(s) {missing}; found {list(frame.columns)}")
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise TypeError(f"frame: index must be a DatetimeIndex, got {type(frame.index).__name__}")


def fill_prices(frame: pd.DataFrame, fill_price: FillPrice = "next_open") -> pd.Series:
    """The column a fill on each bar happens at: ``frame["open"]`` (``"next_open"``) or ``frame["close"]``."""
    if fill_price not in FILL_PRICES:
        raise ValueError(f"fill_price={fill_price!r}; choose from {list(FILL_PRICES)}")
    return frame["close" if fill_price == "next_close" else "open"]


def _check_range(frame: pd.DataFrame, start: int, steps: int, fill_price: FillPrice = "next_open") -> None:
    if isinstance(start, bool) or not isinstance(start, int | np.integer):
        raise TypeError(f"start: expected an integer bar position, got {type(start).__name__}")
    last = int(start) + steps
    if start < 0 or last >= len(frame):
        raise ValueError(
            f"bars {start}..{last} (start {start} plus {steps} decisions, each filled on the next bar) "
            f"outside the frame's {len(frame)} bars [0, {len(frame) - 1}]"
        )
    columns = ["close"] if fill_price == "next_close" else ["open", "close"]
    prices = frame[columns].iloc[int(start) : last + 1].to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(prices) & (prices > 0)).all(axis=1)
    if bad.any():
        raise ValueError(
            f"frame: non-positive or non-finite {'/'.join(columns)} in the replay range at "
            f"{frame.index[int(start) : last + 1][bad][:5].tolist()}"
        )


def _weights(
    frame: pd.DataFrame, start: int, target_weights: pd.Series | np.ndarray | Sequence[float],
    fill_price: FillPrice = "next_open",
) -> np.ndarray:
    """Validate the weights: 1-D, finite, and (for a Series with timestamps) on the decision bars."""
    if isinstance(target_weights, pd.DataFrame):
        raise TypeError("target_weights: expected one weight per decision (1-D), got a DataFrame")
    try:
        w = np.asarray(target_weights, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"target_weights: not convertible to numbers ({err})") from err
    if w.ndim != 1:
        raise ValueError(f"target_weights: expected a 1-D sequence, got shape {w.shape}")
    if len(w) == 0:
        raise ValueError("target_weights: empty; need at least one decision")
    bad = ~np.isfinite(w)
    if bad.any():
        raise ValueError(f"target_weights: NaN or inf at position(s) {np.flatnonzero(bad)[:5].tolist()}")
    _check_range(frame, start, len(w), fill_price)
    if isinstance(target_weights, pd.Series) and isinstance(target_weights.index, pd.DatetimeIndex):
        expected = frame.index[int(start) : int(start) + len(w)]
        if not target_weights.index.equals(expected):
            raise ValueError(
                "target_weights: its timestamps must be the decision bars "
                f"{expected[0]} .. {expected[-1]} (frame rows {start}..{int(start) + len(w) - 1}); "
                f"got {target_weights.index[0]} .. {target_weights.index[-1]}"
            )
    return w


def frame_cost_inputs(frame: pd.DataFrame, costs: CostModel) -> CostInputs | None:
    """The causal estimates a non-flat ``costs`` fills with, from the frame's OHLCV columns (None when flat)."""
    if costs.is_flat:
        return None
    high, low, close, volume = (frame[c].to_numpy(dtype=np.float64) if c in frame.columns else None
                                for c in ("high", "low", "close", "volume"))
    return cost_inputs(costs, high, low, close, volume, bars_per_day(frame.index, len(frame)))


def _walk(
    frame: pd.DataFrame, start: int, w: np.ndarray, costs: CostModel, fill_price: FillPrice = "next_open"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Iterate the env's step over the path: the fill at the open (or close), short borrow at the close.

    Returns (share deltas, cash, shares, borrow charges, fill rates, fill records), the arrays ``len(w) + 1``
    rows; cash is after the charge; the rate is each row's price concession (``costs.slippage`` when flat).
    """
    rows = slice(start, start + len(w) + 1)
    opens = fill_prices(frame, fill_price).to_numpy(dtype=np.float64)[rows][1:]
    closes = frame["close"].to_numpy(dtype=np.float64)[rows][1:]
    years = year_fractions(frame.index[rows])[1:] if costs.borrow_rate > 0 else np.zeros(len(w))
    inputs = frame_cost_inputs(frame, costs)
    deltas = np.zeros(len(w) + 1)
    cash = np.ones(len(w) + 1)
    shares = np.zeros(len(w) + 1)
    charges = np.zeros(len(w) + 1)
    rates = np.full(len(w) + 1, costs.slippage)
    records: list[dict] = []
    held, pending = 0.0, False
    for k, (weight, price) in enumerate(zip(w, opens, strict=True)):
        trade = bool(weight != held) or pending
        if inputs is None:
            new_cash, new_shares, delta = rebalance(cash[k], shares[k], price, weight, weight != held, costs)
        else:
            t = start + k  # decision bar: estimates from bars <= t; the fill bar is t + 1
            eta = impact_eta(costs, inputs.sigma[t], inputs.adv[t])
            cap = fill_cap(costs, price, inputs.volume[t + 1], inputs.adv[t], inputs.per_day[t])
            fill = execute(cash[k], shares[k], price, weight, trade, costs, inputs.half_spread[t], eta, cap)
            new_cash, new_shares, delta = fill.cash, fill.shares, fill.delta
            rates[k + 1] = fill.rate
            pending = costs.remainder == "carry" and bool(fill.capped)
            if trade:
                records.append({"row": k + 1, "target_weight": float(weight), "requested": float(fill.requested),
                                "rate": float(fill.rate), "half_spread": float(inputs.half_spread[t]),
                                "reason": fill_reason(trade, bool(fill.capped), float(cap), float(inputs.adv[t]),
                                                      costs)})
        held_over_bar = shares[k] if fill_price == "next_close" else new_shares  # bar t + 1's position
        charge = float(borrow_cost(held_over_bar, closes[k], years[k], costs)) if costs.borrow_rate > 0 else 0.0
        cash[k + 1], shares[k + 1], deltas[k + 1], charges[k + 1] = new_cash - charge, new_shares, delta, charge
        held = weight
    return deltas, cash, shares, charges, rates, records


def order_sizes(
    frame: pd.DataFrame,
    start: int,
    target_weights: pd.Series | np.ndarray | Sequence[float],
    costs: CostModel,
    fill_price: FillPrice = "next_open",
) -> pd.Series:
    """Share deltas the environment trades, on the replay's rows (bars ``start .. start + L``).

    Row 0 (bar ``start``) is 0: nothing is filled before the first decision. Row ``k + 1`` holds the
    shares bought (> 0) or sold (< 0) at the open (``fill_price``: or close) of bar ``start + k + 1``; 0 where
    the weight is held.
    """
    _check_frame(frame)
    w = _weights(frame, start, target_weights, fill_price)
    deltas = _walk(frame, int(start), w, costs, fill_price)[0]
    return pd.Series(deltas, index=frame.index[int(start) : int(start) + len(w) + 1], name="order_size")


def fills(
    frame: pd.DataFrame,
    start: int,
    target_weights: pd.Series | np.ndarray | Sequence[float],
    costs: CostModel,
    fill_price: FillPrice = "next_open",
) -> pd.DataFrame:
    """One row per order the env sends (a level change, or a carried remainder), with its execution quality.

    Columns: ``decision_time`` (bar t, whose close the agent saw), ``fill_time`` (bar t + 1, filled at its open),
    ``target_weight``, ``reason`` (:func:`sentio_lab.env.costs.fill_reason`; ``filled`` for every flat-model order),
    ``delta`` (shares per unit of starting equity), ``requested`` and ``filled`` (notional in currency:
    ``capital x``), ``rate`` (price concession: slippage + half-spread + impact), ``half_spread``,
    ``decision_price``, ``arrival_price`` (the open), ``executed_price``, ``cost`` (currency: concession and fee),
    and the implementation shortfall in basis points, fee included, of the filled part against the decision
    price (``shortfall_decision_bps``: overnight move plus costs) and the arrival price
    (``shortfall_arrival_bps``: costs alone). The unfilled part of a capped order is not in the shortfall.
    With ``fill_price="next_close"`` the arrival price is bar t + 1's close.
    """
    _check_frame(frame)
    w = _weights(frame, start, target_weights, fill_price)
    start_pos = int(start)
    deltas, _, _, _, rates, records = _walk(frame, start_pos, w, costs, fill_price)
    if costs.is_flat:
        held = np.r_[0.0, w[:-1]]
        records = [{"row": k + 1, "target_weight": float(w[k]), "requested": np.nan, "rate": costs.slippage,
                    "half_spread": 0.0, "reason": "filled"} for k in np.flatnonzero(w != held)]
    opens = fill_prices(frame, fill_price).to_numpy(dtype=np.float64)
    closes = frame["close"].to_numpy(dtype=np.float64)
    rows = []
    for record in records:
        k = record["row"]
        t = start_pos + k - 1
        delta, arrival, decision = deltas[k], opens[t + 1], closes[t]
        side = 1.0 if delta > 0 else -1.0
        executed = arrival * (1.0 + side * record["rate"])
        effective = executed * (1.0 + side * costs.fee)
        filled = abs(delta) * arrival * costs.capital
        rows.append({
            "decision_time": frame.index[t], "fill_time": frame.index[t + 1],
            "target_weight": record["target_weight"], "reason": record["reason"], "delta": delta,
            "requested": record["requested"] * costs.capital if not costs.is_flat else filled, "filled": filled,
            "rate": record["rate"], "half_spread": record["half_spread"], "decision_price": decision,
            "arrival_price": arrival, "executed_price": executed,
            "cost": abs(delta) * (abs(executed - arrival) + executed * costs.fee) * costs.capital,
            "shortfall_decision_bps": side * (effective - decision) / decision / 1e-4 if delta else np.nan,
            "shortfall_arrival_bps": side * (effective - arrival) / arrival / 1e-4 if delta else np.nan,
        })
    columns = ["decision_time", "fill_time", "target_weight", "reason", "delta", "requested", "filled", "rate",
               "half_spread", "decision_price", "arrival_price", "executed_price", "cost",
               "shortfall_decision_bps", "shortfall_arrival_bps"]
    return pd.DataFrame(rows, columns=columns)


def fill_costs_paid(
    frame: pd.DataFrame,
    start: int,
    target_weights: pd.Series | np.ndarray | Sequence[float],
    costs: CostModel,
    fill_price: FillPrice = "next_open",
) -> pd.Series:
    """What each replay row's fill paid, in units of the starting equity (concession and fee; :func:`fills`'s
    ``cost`` over the capital), on bars ``start .. start + L``: the non-flat twin of
    :func:`sentio_lab.evaluation.metrics.fill_costs`."""
    records = fills(frame, start, target_weights, costs, fill_price)
    index = frame.index[int(start) : int(start) + len(np.asarray(target_weights)) + 1]
    paid = records.groupby("fill_time")["cost"].sum() / costs.capital
    return paid.reindex(index, fill_value=0.0).rename("cost")


def replay(
    frame: pd.DataFrame,
    start: int,
    target_weights: pd.Series | np.ndarray | Sequence[float],
    costs: CostModel,
    freq: str | pd.Timedelta | None = None,
    fill_price: FillPrice = "next_open",
) -> vbt.Portfolio:
    """vectorbt portfolio of the weights decided at bars ``start .. start + L - 1`` (see the module doc).

    ``freq`` is the bar spacing vectorbt annualises with; by default the frame's median bar gap. The
    portfolio's ``value()`` (see :func:`equity`) reproduces the environment's equity curve; ``fill_price`` must
    be the env's (``MarketArrays.fill_price``).
    """
    _check_frame(frame)
    if not isinstance(costs, CostModel):
        raise TypeError(f"costs: expected a CostModel, got {type(costs).__name__}")
    w = _weights(frame, start, target_weights, fill_price)
    start_pos = int(start)
    deltas, cash, _, charges, rates, _ = _walk(frame, start_pos, w, costs, fill_price)
    rows = slice(start_pos, start_pos + len(w) + 1)
    close = frame["close"].iloc[rows].astype(np.float64)
    opens = fill_prices(frame, fill_price).to_numpy(dtype=np.float64)[rows]
    freq = infer_bar_freq(frame) if freq is None else pd.Timedelta(freq)
    common = {"size_type": "amount", "init_cash": 1.0, "direction": "both", "freq": freq}

    loan_orders = _loan_orders(cash)
    charged = charges > 0
    if not loan_orders.any() and not charged.any():
        return vbt.Portfolio.from_orders(
            close.rename(ASSET_COLUMN),
            size=deltas,
            price=opens,
            fees=costs.fee,
            slippage=costs.slippage if costs.is_flat else rates,
            **common,
        )
    # Columns: (loan), asset, (borrow). Within a row vectorbt executes a group's orders in column order, so
    # the cash is borrowed before the asset order that needs it and the borrow charge comes after the fill.
    # Each column is (close, size, price, fees, slippage, fixed_fees).
    columns: dict[str, tuple] = {}
    ones, zeros = np.ones(len(opens)), np.zeros(len(opens))
    if loan_orders.any():
        columns[LOAN_COLUMN] = (ones, loan_orders, ones, 0.0, zeros, zeros)
    columns[ASSET_COLUMN] = (close.to_numpy(), deltas, opens, costs.fee, rates, zeros)
    if charged.any():
        fee_only = np.full(len(opens), _FEE_ONLY_PRICE)
        columns[BORROW_COLUMN] = (fee_only, charged.astype(np.float64), fee_only, 0.0, zeros, charges)
    closes, sizes, prices, fees, slippages, fixed_fees = zip(*columns.values(), strict=True)
    portfolio = vbt.Portfolio.from_orders(
        pd.DataFrame(dict(zip(columns, closes, strict=True)), index=close.index),
        size=np.column_stack(sizes),
        price=np.column_stack(prices),
        fees=np.array([fees]),
        slippage=np.column_stack(slippages),
        fixed_fees=np.column_stack(fixed_fees),
        group_by=True,
        cash_sharing=True,
        call_seq="default",
        **common,
    )
    if charged.any():
        records = portfolio.orders.records
        booked = int(np.count_nonzero(records["col"] == list(columns).index(BORROW_COLUMN)))
        if booked != int(charged.sum()):
            raise RuntimeError(
                f"replay: vectorbt booked {booked} of {int(charged.sum())} short borrow charges (cash could not "
                "cover one); the replayed equity would not be the env's"
            )
    return portfolio


def _loan_orders(cash: np.ndarray) -> np.ndarray:
    """Units of the loan instrument to sell on each row so that vectorbt's cash never goes below zero.

    Causal: the loan grows on the row where the env's cash first needs it (twice the shortfall plus a
    margin, so vectorbt's rounding never bites), never earlier, so an earlier row does not depend on a
    later bar.
    """
    orders = np.zeros(len(cash))
    borrowed = 0.0
    for k, balance in enumerate(cash):
        if balance < -_BORROW_TOLERANCE and balance + borrowed < _LOAN_MARGIN:
            extra = 2.0 * -balance + _LOAN_MARGIN - borrowed
            orders[k] = -extra
            borrowed += extra
    return orders


def buy_and_hold(frame: pd.DataFrame, start: int, steps: int, costs: CostModel,
                 fill_price: FillPrice = "next_open") -> vbt.Portfolio:
    """The benchmark on the same bars: ``w = 1`` decided at ``start``, bought at the next open (or close), same
    costs."""
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    return replay(frame, start, np.ones(int(steps)), costs, fill_price=fill_price)


def equity(portfolio: vbt.Portfolio) -> pd.Series:
    """The account value on every replay row (the first is the starting 1.0), as a Series named equity.

    For a portfolio with the ``cash_loan`` column this is the group's value: asset, cash and loan netted.
    """
    if not isinstance(portfolio, vbt.Portfolio):
        raise TypeError(f"equity: expected a vectorbt Portfolio, got {type(portfolio).__name__}")
    value = portfolio.value()
    if isinstance(value, pd.DataFrame):
        if value.shape[1] != 1:
            raise ValueError(f"equity: the portfolio has {value.shape[1]} columns/groups; select one first")
        value = value.iloc[:, 0]
    return value.rename("equity")
