"""Broker adapters: where a paper trader sends its targets and gets its fills.

:class:`Broker` is the interface (a ``typing.Protocol``) a real broker's paper endpoint would implement later;
:class:`PaperBroker` is the built-in simulated one, the default and the only one tested here. It fills as the
environment does (:mod:`sentio_lab.env.trading`), with the same code: the order decided at bar t's close trades to
its target weight at bar t+1's fill price (its open, or its close for ``fill_price="next_close"`` markets) through
:func:`sentio_lab.env.costs.rebalance` (fee + slippage) or :func:`sentio_lab.env.costs.execute` (half-spread, impact,
participation cap, carried remainders, with the per-bar estimates of :func:`sentio_lab.env.arrays.fill_arrays`),
and a short held over bar t+1 pays borrow at its close. Holding the same level trades nothing, as in the env.

Orders are idempotent by ``(account, order.bar)`` (a client order id): a trader restarted after a crash resubmits
the last order it recorded, and the broker treats it as the same order, never a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from sentio_lab.deploy.ledger import FillRecord, Mark, Order
from sentio_lab.env.arrays import MarketArrays, fill_arrays
from sentio_lab.env.costs import CostModel, execute, rebalance


@dataclass(frozen=True)
class Execution:
    """What a broker reports for one bar: the fill of the open order and the account after it (borrow charged)."""

    fill: FillRecord
    cash: float
    """Cash after the fill and the borrow charge, in units of the starting capital."""
    shares: float
    """Shares held after the fill."""
    borrow: float
    """Borrow charged at this bar's close (0 without shorts or borrow costs)."""
    pending: bool
    """A capped order's remainder keeps trading on the next bar (``CostModel.remainder == "carry"``)."""


@runtime_checkable
class Broker(Protocol):
    """A broker adapter: accepts one target per decision bar and reports its fill on the next bar."""

    def submit(self, account: str, order: Order, held: Mark) -> None:
        """Ask that ``account`` hold ``order``'s target from the next bar on; ``held`` is the account marked at
        the decision bar. Resubmitting the same ``(account, order.bar)`` is the same order (idempotent)."""
        ...

    def execution(self, account: str, bar: int, market: MarketArrays, time: str) -> Execution:
        """The fill of ``account``'s open order on ``bar`` (the bar after its decision) and the account after it.
        ``market`` holds the bars up to and including ``bar``."""
        ...


class PaperBroker:
    """The simulated broker (module doc): fills with the env's cost code at the next bar's fill price."""

    def __init__(self, positions: tuple[float, ...], costs: CostModel, *, anchored: bool = False) -> None:
        """``positions``: the model's position levels (an order's ``level`` indexes them); ``costs``: its cost model.
        ``anchored``: orders carry their own target weight (an anchored model's ``clip(b_t + tilt)``, which moves
        with the benchmark): the order trades to ``order.target_weight`` wherever it differs from the weight held,
        as :class:`~sentio_lab.env.TradingEnv` trades an anchored target
        (:func:`sentio_lab.env.anchor.anchored_targets`: inside the no-trade band the target *is* the weight held)."""
        self.levels = np.asarray(positions, dtype=np.float64)
        self.costs = costs
        self.anchored = anchored
        self._open: dict[str, tuple[Order, Mark]] = {}

    def submit(self, account: str, order: Order, held: Mark) -> None:
        """Record ``order`` as ``account``'s open order (replacing nothing but a resubmission of itself)."""
        if held.bar != order.bar:
            raise ValueError(f"order of bar {order.bar} submitted with the account marked at bar {held.bar}")
        current = self._open.get(account)
        if current is not None and current[0].bar > order.bar:
            raise ValueError(f"account {account!r}: order of bar {order.bar} is older than the open order of bar "
                             f"{current[0].bar}")
        self._open[account] = (order, held)

    def execution(self, account: str, bar: int, market: MarketArrays, time: str) -> Execution:
        """Fill the open order of ``account`` on ``bar`` exactly as :class:`~sentio_lab.env.TradingEnv` fills it."""
        if account not in self._open:
            raise ValueError(f"account {account!r} has no open order to fill on bar {bar}")
        order, held = self._open[account]
        t = order.bar
        if bar != t + 1:
            raise ValueError(f"account {account!r}: the order of bar {t} fills on bar {t + 1}, not on bar {bar}")
        if len(market.close) <= bar:
            raise ValueError(f"bar {bar} is not in the market ({len(market.close)} bars)")
        costs = self.costs
        # one-element float64 arrays: the same elementwise formulas the batched torch env evaluates
        cash, shares = np.array([held.cash]), np.array([held.shares])
        price = market.fill[bar : bar + 1]
        if self.anchored:
            weight = np.array([order.target_weight], dtype=np.float64)
            trade = np.array([order.target_weight != held.weight])
        else:
            weight = self.levels[order.level : order.level + 1]
            trade = np.array([order.level != held.level])
        arrays = fill_arrays(market, costs, t, bar)
        if arrays is None:
            new_cash, new_shares, delta = rebalance(cash, shares, price, weight, trade, costs)
            executed = np.where(delta > 0, price * (1.0 + costs.slippage), price * (1.0 - costs.slippage))
            capped = np.array([False])
        else:
            half, eta, cap = (a[t : t + 1] for a in arrays)
            fill = execute(cash, shares, price, weight, trade | held.pending, costs, half, eta, cap)
            new_cash, new_shares, delta, capped = fill.cash, fill.shares, fill.delta, fill.capped
            executed = np.where(delta > 0, price * (1.0 + fill.rate), price * (1.0 - fill.rate))
        fee = float(np.abs(delta * executed)[0] * costs.fee)
        borrow = 0.0
        if costs.borrow_rate != 0.0:  # on the shares held over bar t + 1: after the fill, or before it (next close)
            years = market.year_fraction
            if years is None:
                raise ValueError("borrow costs need bar timestamps (MarketArrays.year_fraction); build the market "
                                 "with MarketArrays.from_frame")
            per_share = costs.borrow_rate * years[bar] * market.close[bar]
            before_mark = shares if market.fill_price == "next_close" else new_shares
            charge = np.maximum(-before_mark, 0.0) * per_share
            new_cash, borrow = new_cash - charge, float(charge[0])
        record = FillRecord(bar=bar, time=time, order_bar=t, shares=float(delta[0]), price=float(price[0]),
                            executed_price=float(executed[0]), fee=fee, capped=bool(capped[0]))
        pending = bool(capped[0]) and costs.remainder == "carry" and costs.participation is not None
        return Execution(fill=record, cash=float(new_cash[0]), shares=float(new_shares[0]), borrow=borrow,
                         pending=pending)


__all__ = ["Broker", "Execution", "PaperBroker"]
