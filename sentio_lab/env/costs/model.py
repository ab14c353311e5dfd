"""The cost model and the closed-form rebalancing formula of the flat (fee + slippage) model.

Accounting (vectorbt's, so that a vectorbt replay reproduces the env's equity exactly):
the account holds ``cash`` and ``shares`` (negative when short). A rebalance at price ``p`` to a target
weight ``w`` buys or sells ``delta`` shares at ``p * (1 + slippage)`` (buy) or ``p * (1 - slippage)``
(sell) and pays ``fee * |delta| * executed price`` on top. ``w`` is a weight of the equity *after* the
trade's own costs: ``(shares + delta) * p == w * (equity_at_p - cost(delta))``. Solved for ``delta``:

    delta = (w * equity_at_p - shares * p) / (p * (1 + w * k)),
    k = (1 + slippage) * (1 + fee) - 1          when buying,
    k = (1 - slippage) * (1 - fee) - 1          when selling (negative),

so any move to ``w = 1`` (from flat, long or short) spends exactly the cash available and never borrows;
only levels above 1 borrow cash (leverage), by design. A move to ``w = 0`` trades exactly ``-shares``
(the closed form's value, without its rounding residue).

Short borrow (``CostModel.borrow_bps``, an annual rate, 0 by default). The position held over bar
``t+1`` -- the shares after the fill at its open, which are also the shares at its close -- pays, at the
mark of bar ``t+1``::

    borrow = borrow_rate * max(0, -shares) * close[t+1] * years[t+1]

deducted from cash, where ``years[t+1]`` is the calendar time from bar t's close to bar t+1's close in
years of 365 days (:func:`year_fractions`). A short held from Friday's close over Monday's close pays
3 days. Only shorts pay: cash borrowed for leverage above 1 is not charged interest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor, float)

BPS = 1e-4
#: Length of the year that annual rates (``borrow_bps``) are quoted over.
YEAR = pd.Timedelta(days=365)


SPREAD_MODELS = ("none", "corwin_schultz", "abdi_ranaldo")
IMPACT_MODELS = ("none", "sqrt", "almgren_chriss")
REMAINDERS = ("cancel", "carry")
CAP_VOLUMES = ("bar", "forecast")
VOLUME_KINDS = ("quantity", "ticks")


@dataclass(frozen=True)
class CostModel:
    """Costs charged on every fill: proportional fee and slippage, and optionally an estimated half-spread,
    size-dependent market impact and a participation cap (:mod:`sentio_lab.env.costs.execution`).

    The default (fee and slippage only) is the flat model every env and the backtest price with
    :func:`rebalance`; any other setting goes through :func:`sentio_lab.env.costs.execution.execute`.
    """

    fee_bps: float = 1.0
    """Commission / exchange fee per fill."""
    slippage_bps: float = 1.0
    """Price concession per fill: buys fill above, sells below the reference price."""
    borrow_bps: float = 0.0
    """Annual borrow / financing rate of a short, in basis points of its market value (module doc)."""
    spread: str = "none"
    """Half-spread paid on top of slippage, estimated from OHLC bars <= t: "none", "corwin_schultz" (2012) or
    "abdi_ranaldo" (2017); see :mod:`sentio_lab.env.costs.estimators`."""
    spread_window: int = 20
    """Bars averaged by the spread estimator."""
    impact: str = "none"
    """Market impact: "none", "sqrt" (``Y sigma_daily sqrt(Q / ADV)``) or "almgren_chriss" (linear permanent
    plus temporary, ``sigma_daily (permanent / 2 + temporary) Q / ADV``)."""
    impact_y: float = 0.7
    """Y of the square-root law."""
    ac_permanent: float = 0.4
    """Almgren-Chriss permanent impact coefficient (price move in daily sigmas per ADV traded); the trade pays half
    of it (its average fill is half-way along the move). Later marks are not moved: the price path is exogenous."""
    ac_temporary: float = 0.5
    """Almgren-Chriss temporary impact coefficient (daily sigmas per ADV traded), paid by the trade only."""
    vol_window: int = 20
    """Days of close-to-close log returns in the causal sigma_daily estimate."""
    adv_window: int = 20
    """Days of volume in the causal average daily volume (currency: volume x close)."""
    capital: float = 1e6
    """Starting capital in account currency: the env's equity 1.0 is this much, so impact and caps depend on it."""
    adv: float | None = None
    """User-given average daily volume in currency (replaces the estimate from the bars' volume); required for
    impact where the volume column is not traded quantity (``volume="ticks"``, e.g. FX tick volume)."""
    volume: str = "quantity"
    """What the volume column counts: "quantity" (units of the instrument) or "ticks" (FX tick volume)."""
    participation: float | None = None
    """Participation cap: at most this share of the volume (see ``cap_volume``) fills per bar; None = no cap."""
    cap_volume: str = "bar"
    """Volume the cap applies to: "bar" (the fill bar's own volume, as a percent-of-volume execution over that bar
    would see; the environment's execution reads it, the agent never does) or "forecast" (ADV from bars <= t over
    the bars per day: known at the decision)."""
    remainder: str = "cancel"
    """What a capped order's unfilled part does: "cancel" (dropped) or "carry" (keeps trading to the target weight
    on the next bars until it is reached or the agent changes level)."""

    def __post_init__(self) -> None:
        """Reject negative or absurd costs early, naming the field."""
        for name in ("fee_bps", "slippage_bps"):
            value = getattr(self, name)
            if not (0 <= value < 10_000):
                raise ValueError(f"CostModel.{name} must be in [0, 10000) basis points, got {value}")
        if not (math.isfinite(self.borrow_bps) and 0 <= self.borrow_bps < 100_000):
            raise ValueError(
                f"CostModel.borrow_bps must be in [0, 100000) annual basis points, got {self.borrow_bps}"
            )
        for name, options in (("spread", SPREAD_MODELS), ("impact", IMPACT_MODELS), ("remainder", REMAINDERS),
                              ("cap_volume", CAP_VOLUMES), ("volume", VOLUME_KINDS)):
            if getattr(self, name) not in options:
                raise ValueError(f"CostModel.{name} must be one of {options}, got {getattr(self, name)!r}")
        for name in ("spread_window", "vol_window", "adv_window"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 2:
                raise ValueError(f"CostModel.{name} must be an integer >= 2, got {getattr(self, name)}")
        for name in ("impact_y", "ac_permanent", "ac_temporary"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"CostModel.{name} must be finite and >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.capital) and self.capital > 0):
            raise ValueError(f"CostModel.capital must be a positive amount of currency, got {self.capital}")
        if self.adv is not None and not (math.isfinite(self.adv) and self.adv > 0):
            raise ValueError(f"CostModel.adv must be a positive currency amount per day or None, got {self.adv}")
        if self.participation is not None and not (0 < self.participation <= 1):
            raise ValueError(f"CostModel.participation must be in (0, 1] or None, got {self.participation}")
        if self.volume == "ticks" and self.adv is None:
            if self.impact != "none":
                raise ValueError(
                    f"CostModel.impact={self.impact!r} with volume='ticks': tick volume is not traded quantity, so "
                    "the ADV cannot come from it; give the average daily volume in currency (CostModel.adv, --adv)"
                )
            if self.participation is not None:
                raise ValueError(
                    "CostModel.participation with volume='ticks': tick volume is not traded quantity, so no share "
                    "of it can be filled; give CostModel.adv (currency per day) and cap_volume='forecast'"
                )
        if self.volume == "ticks" and self.participation is not None and self.cap_volume == "bar":
            raise ValueError("CostModel.participation with volume='ticks' needs cap_volume='forecast' (the cap is "
                             "then a share of the user-given ADV per bar): a bar's tick count is not a quantity")

    @property
    def is_flat(self) -> bool:
        """True for fee and slippage only: the closed-form :func:`rebalance` prices it (bit-identical to before)."""
        return self.spread == "none" and self.impact == "none" and self.participation is None

    @property
    def needs_volume(self) -> bool:
        """Whether fills read the bars' volume (impact without a user ADV, or a participation cap on bar volume)."""
        return (self.impact != "none" and self.adv is None) or (
            self.participation is not None and (self.cap_volume == "bar" or self.adv is None))

    @property
    def fee(self) -> float:
        """Fee as a fraction of notional."""
        return self.fee_bps * BPS

    @property
    def slippage(self) -> float:
        """Slippage as a fraction of price."""
        return self.slippage_bps * BPS

    @property
    def buy_cost_rate(self) -> float:
        """Cost of buying one unit of notional, as a fraction: ``(1 + slippage)(1 + fee) - 1``."""
        return (1.0 + self.slippage) * (1.0 + self.fee) - 1.0

    @property
    def sell_cost_rate(self) -> float:
        """Proceeds lost selling one unit of notional: ``1 - (1 - slippage)(1 - fee)``."""
        return 1.0 - (1.0 - self.slippage) * (1.0 - self.fee)

    @property
    def borrow_rate(self) -> float:
        """Annual borrow rate of a short as a fraction of its market value."""
        return self.borrow_bps * BPS


def year_fractions(index: pd.DatetimeIndex) -> np.ndarray:
    """float64 (T,): entry t is the calendar time from bar t-1 to bar t in years of 365 days; entry 0 is 0.

    Entry t depends on the timestamps of bars t-1 and t only (causal). Raises if the index is not a
    strictly increasing DatetimeIndex, naming the first offending timestamp.
    """
    if not isinstance(index, pd.DatetimeIndex):
        raise TypeError(f"year_fractions: expected a DatetimeIndex, got {type(index).__name__}")
    gaps = np.asarray((index[1:] - index[:-1]) / YEAR, dtype=np.float64)
    bad = ~(gaps > 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0]) + 1
        raise ValueError(
            f"year_fractions: timestamps must strictly increase; bar {first} ({index[first]}) does not "
            f"follow bar {first - 1} ({index[first - 1]})"
        )
    return np.r_[0.0, gaps]


def borrow_cost(shares: ArrayT, price: ArrayT, years: ArrayT, costs: CostModel) -> ArrayT:
    """Borrow charged at a mark: ``max(0, -shares) * (borrow_rate * years * price)``, elementwise.

    ``price`` is the close the position is marked at and ``years`` the time since the previous close
    (:func:`year_fractions`); numpy, python floats and torch tensors alike.
    """
    per_share = costs.borrow_rate * years * price
    if isinstance(shares, torch.Tensor):
        return shares.neg().clamp_min(0.0) * per_share
    return np.maximum(-shares, 0.0) * per_share


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
    gap = target_weight * equity_at_price - shares * price  # notional to trade before costs
    # k > 0 when buying (costs add to what is paid), k < 0 when selling (costs cut the proceeds)
    k = _where(gap > 0, 0.0 * gap + costs.buy_cost_rate, 0.0 * gap - costs.sell_cost_rate)
    # A move to flat sells exactly the shares held: gap / price would leave a rounding residue (1e-20 shares)
    # that a later borrow charge or an exact flatness check would see.
    sized = _where(target_weight == 0, -shares + 0.0 * gap, gap / (price * (1.0 + target_weight * k)))
    delta = _where(trade, sized, 0.0 * shares)
    # Both branches are arrays of the price's dtype: torch.where on two python floats would build float32.
    executed = _where(delta > 0, price * (1.0 + costs.slippage), price * (1.0 - costs.slippage))
    traded_value = delta * executed
    fee_paid = abs(traded_value) * costs.fee
    return cash - traded_value - fee_paid, shares + delta, delta
