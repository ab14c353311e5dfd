"""Transaction costs and the one rebalancing formula shared by both environments and the backtest.

Accounting (vectorbt's, so that a vectorbt replay reproduces the env's equity exactly):
the account holds ``cash`` and ``shares`` (negative when short). A rebalance at price ``p`` to a target
weight ``w`` buys or sells ``delta`` shares at ``p * (1 + slippage)`` (buy) or ``p * (1 - slippage)``
(sell) and pays ``fee * |delta| * executed price`` on top. The target share count is sized so that a
trade from flat to ``w = 1`` spends exactly the cash available, costs included:
``target_shares = w * equity_at_p / (p * (1 + slippage) * (1 + fee))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor, float)

BPS = 1e-4


@dataclass(frozen=True)
class CostModel:
    """Proportional costs, in basis points of traded notional, charged on every fill."""

    fee_bps: float = 1.0
    """Commission / exchange fee per fill."""
    slippage_bps: float = 1.0
    """Price concession per fill: buys fill above, sells below the reference price."""

    def __post_init__(self) -> None:
        """Reject negative or absurd costs early, naming the field."""
        for name in ("fee_bps", "slippage_bps"):
            value = getattr(self, name)
            if not (0 <= value < 10_000):
                raise ValueError(f"CostModel.{name} must be in [0, 10000) basis points, got {value}")

    @property
    def fee(self) -> float:
        """Fee as a fraction of notional."""
        return self.fee_bps * BPS

    @property
    def slippage(self) -> float:
        """Slippage as a fraction of price."""
        return self.slippage_bps * BPS

    @property
    def sizing_factor(self) -> float:
        """Cost of one unit of notional bought: target shares are divided by this."""
        return (1.0 + self.slippage) * (1.0 + self.fee)


def _where(cond, a, b):
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return np.where(cond, a, b)


def rebalance(
    cash: ArrayT,
    shares: ArrayT,
    price: ArrayT,
    target_weight: ArrayT,
    trade: ArrayT,
    costs: CostModel,
) -> tuple[ArrayT, ArrayT, ArrayT]:
    """Trade to ``target_weight`` at ``price`` where ``trade`` is true; return (cash, shares, delta).

    Works elementwise on numpy arrays, numpy scalars and torch tensors alike, so the batched torch env,
    the numpy reference env and the backtest share one formula. Where ``trade`` is false nothing moves.
    """
    equity_at_price = cash + shares * price
    target_shares = target_weight * equity_at_price / (price * costs.sizing_factor)
    delta = _where(trade, target_shares - shares, 0.0 * shares)
    # Both branches are arrays of the price's dtype: torch.where on two python floats would build float32.
    executed = _where(delta > 0, price * (1.0 + costs.slippage), price * (1.0 - costs.slippage))
    traded_value = delta * executed
    fee_paid = abs(traded_value) * costs.fee
    return cash - traded_value - fee_paid, shares + delta, delta
