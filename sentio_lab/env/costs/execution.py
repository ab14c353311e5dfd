"""Fills under a non-flat cost model: half-spread, size-dependent impact and a participation cap.

The accounting is :func:`sentio_lab.env.costs.rebalance`'s (module doc of :mod:`sentio_lab.env.costs.model`): a fill of
``delta`` shares at reference price ``p`` executes at ``p (1 + rate)`` (buy) or ``p (1 - rate)`` (sell) and
pays ``fee`` on the executed notional, and the target ``w`` is a weight of the equity after the trade's own
costs. Here ``rate`` depends on the traded notional ``y = |delta| p`` (in units of the starting equity, whose
1.0 is ``capital`` in currency)::

    rate(y) = slippage + half_spread[t] + eta[t] * phi(y)
    sqrt:            eta = Y sigma_daily[t] sqrt(capital / ADV[t]),                   phi(y) = sqrt(y)
    almgren_chriss:  eta = sigma_daily[t] (permanent / 2 + temporary) capital / ADV[t],  phi(y) = y

i.e. ``dP/P = Y sigma sqrt(Q / ADV)`` with ``Q = capital y`` the trade in currency. The post-trade-weight rule
``y (1 + s w c(y)) = |gap|`` (``s`` = +1 buying, -1 selling; ``c`` the cost per unit notional with the fee) has
no closed form with impact, so it is solved by Newton's method from the no-impact solution: ``F`` is convex
(long targets) or concave (short targets) and increasing, so the iterates move monotonically to the one root;
a fixed number of steps (:data:`NEWTON_STEPS`; no data-dependent branch: the torch env never syncs) reaches it to
rounding for any impact up to 90 % of the price (measured: :data:`NEWTON_STEPS`).

Participation cap: at most ``cap`` notional fills (``participation x volume[t+1] x p / capital`` on the fill bar's
volume, or ``participation x ADV[t] / bars_per_day / capital`` as a causal forecast). Where the cap binds the
trade stops there (``capped``); a zero cap (a zero-volume bar; or impact with an ADV of 0) fills nothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from sentio_lab.env.costs.model import ArrayT, CostModel, _where

#: Newton steps of the fill solve (square-root impact in x = sqrt(y), linear impact in y). From the no-impact start
#: the iterates converge quadratically; tests/env/test_costs.py checks 6 steps against a 200-step bisection root to
#: 1e-13 relative for impact up to 90 % of the price (buying and selling, long, short and levered targets, both
#: models), and that 4 steps are not enough there. Was 12 steps in y with a square root in each.
NEWTON_STEPS = 6


class Fill(NamedTuple):
    """One fill per element: the account after it, and what it cost."""

    cash: ArrayT
    shares: ArrayT
    delta: ArrayT
    """Shares traded (buy > 0)."""
    rate: ArrayT
    """Price concession of the fill as a fraction of the reference price (slippage + half-spread + impact)."""
    capped: ArrayT
    """Where the participation cap stopped the fill short of the target (bool)."""
    requested: ArrayT
    """Notional the target needed (units of the starting equity), before the cap."""


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else np.sqrt(x)


def _minimum(a, b):
    return torch.minimum(a, b) if isinstance(a, torch.Tensor) else np.minimum(a, b)


def _clamp0(x):
    return x.clamp_min(0.0) if isinstance(x, torch.Tensor) else np.maximum(x, 0.0)


def impact_eta(costs: CostModel, sigma: ArrayT, adv: ArrayT) -> ArrayT:
    """Impact coefficient ``eta`` of ``rate(y) = ... + eta phi(y)`` (module doc); 0 where the ADV is not positive
    (those fills are stopped by :func:`fill_cap`)."""
    safe_adv = _where(adv > 0, adv, 0.0 * adv + 1.0)
    if costs.impact == "sqrt":
        eta = costs.impact_y * sigma * _sqrt(costs.capital / safe_adv)
    elif costs.impact == "almgren_chriss":
        eta = sigma * (0.5 * costs.ac_permanent + costs.ac_temporary) * (costs.capital / safe_adv)
    else:
        return torch.zeros_like(sigma) if isinstance(sigma, torch.Tensor) else np.zeros_like(sigma, dtype=np.float64)
    return _where(adv > 0, eta, 0.0 * adv)


def fill_cap(costs: CostModel, price: ArrayT, bar_volume: ArrayT, adv: ArrayT, per_day: float | ArrayT) -> ArrayT:
    """Most notional (units of the starting equity) a fill may trade: inf without a cap; 0 where the capping
    volume is 0, and where impact meets an ADV of 0 (a fill there has no price)."""
    inf = 0.0 * price + np.inf
    if costs.participation is None:
        cap = inf
    elif costs.cap_volume == "bar":
        cap = costs.participation * bar_volume * price / costs.capital
    else:
        cap = costs.participation * _clamp0(adv) / per_day / costs.capital
    if costs.impact != "none":
        cap = _where(adv > 0, cap, 0.0 * price)
    return cap


def execute(
    cash: ArrayT,
    shares: ArrayT,
    price: ArrayT,
    target_weight: ArrayT,
    trade: ArrayT,
    costs: CostModel,
    half_spread: ArrayT,
    eta: ArrayT,
    cap: ArrayT,
) -> Fill:
    """Trade towards ``target_weight`` at ``price`` where ``trade``; elementwise over numpy or torch (module doc).

    ``half_spread`` and ``eta`` are the decision bar's (:func:`impact_eta`), ``cap`` the fill's (:func:`fill_cap`).
    """
    if not any(isinstance(x, np.ndarray | torch.Tensor) for x in (cash, shares, price, target_weight, half_spread,
                                                                    eta, cap)):
        return _execute_scalar(float(cash), float(shares), float(price), float(target_weight), bool(trade), costs,
                               float(half_spread), float(eta), float(cap))
    alpha = 0.5 if costs.impact == "sqrt" else 1.0
    fee = costs.fee
    r0 = costs.slippage + half_spread
    equity_at_price = cash + shares * price
    gap = target_weight * equity_at_price - shares * price
    buy = gap > 0
    size = abs(gap)
    # cost per unit notional c(y) = A + B phi(y), and the sign s w of the rule y (1 + s w c(y)) = |gap|
    a = _where(buy, (1.0 + fee) * (1.0 + r0) - 1.0, 1.0 - (1.0 - fee) * (1.0 - r0))
    b = _where(buy, (1.0 + fee) * eta, (1.0 - fee) * eta)
    sw = _where(buy, target_weight + 0.0 * gap, -target_weight + 0.0 * gap)
    y = size / (1.0 + sw * a)
    if costs.impact != "none":
        # F(y) = y (base + impact phi(y)) - |gap|, F' = base + (1 + alpha) impact phi(y): the coefficients hoisted
        # out of the loop (every op is a kernel launch on the torch env's small tensors: this loop dominated a step)
        base, impact = 1.0 + sw * a, sw * b
        if alpha == 0.5:
            # in x = sqrt(y): G(x) = x^2 (base + impact x) - |gap|, G' = x (2 base + 3 impact x). No square root
            # inside the loop: torch's sqrt goes through a threaded math library whose every call can wait a
            # scheduler slice on a loaded machine (profiled: 12 ms per call on 256 values, ~2 us single-threaded)
            x = _sqrt(y)
            base2, impact3 = 2.0 * base, 3.0 * impact
            if isinstance(x, torch.Tensor):
                x = _newton_sqrt_torch(x, base, impact, base2, impact3, size)
            else:
                for _ in range(NEWTON_STEPS):
                    slope = x * (base2 + impact3 * x)
                    value = x * x * (base + impact * x) - size
                    x = _clamp0(x - value / _where(slope > 0, slope, 0.0 * slope + 1.0))
            y = x * x
        else:
            impact_slope = 2.0 * impact
            for _ in range(NEWTON_STEPS):
                value = y * (base + impact * y) - size
                y = _clamp0(y - value / (base + impact_slope * y))
    capped = trade & (y > cap)
    filled = _minimum(y, cap)
    sign = _where(buy, 1.0 + 0.0 * gap, -1.0 + 0.0 * gap)
    # A complete move to flat sells exactly the shares held (no rounding residue), as rebalance does.
    sized = _where((target_weight == 0) & ~capped, -shares + 0.0 * gap, sign * filled / price)
    delta = _where(trade, sized, 0.0 * shares)
    traded = abs(delta) * price
    rate = r0 + eta * (_sqrt(traded) if alpha == 0.5 else traded)
    executed = _where(delta > 0, price * (1.0 + rate), price * (1.0 - rate))
    traded_value = delta * executed
    fee_paid = abs(traded_value) * fee
    return Fill(cash - traded_value - fee_paid, shares + delta, delta, rate, capped, _where(trade, y, 0.0 * y))


def _newton_sqrt_torch(x: torch.Tensor, base: torch.Tensor, impact: torch.Tensor, base2: torch.Tensor,
                       impact3: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """:func:`execute`'s Newton steps in ``x = sqrt(y)`` on torch tensors: the numpy branch's operations, in the same
    order on the same operands (the same bits), written in place into three buffers. Why: on the env's small
    tensors every op is a kernel launch plus an allocation; this removes the allocations and the per-step
    ``0 * slope + 1`` (profiled: the loop was most of a square-root-impact step)."""
    x = x.clone()
    one = torch.ones_like(x)
    slope, value, square = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    for _ in range(NEWTON_STEPS):
        torch.mul(impact3, x, out=slope).add_(base2).mul_(x)  # x (base2 + impact3 x), as (base2 + impact3 x) x
        torch.mul(impact, x, out=value).add_(base)  # base + impact x
        torch.mul(x, x, out=square)
        value.mul_(square).sub_(size)  # x x (base + impact x) - size, as ((base + impact x)(x x)) - size
        x.sub_(value.div_(torch.where(slope > 0, slope, one))).clamp_min_(0.0)
    return x


def _execute_scalar(cash: float, shares: float, price: float, w: float, trade: bool, costs: CostModel,
                    half_spread: float, eta: float, cap: float) -> Fill:
    """:func:`execute` on python floats (the numpy env's one account): the same operations in the same order, so
    the same bits, without numpy's per-call overhead on 0-d values (~20x faster)."""
    sqrt = costs.impact == "sqrt"
    fee = costs.fee
    r0 = costs.slippage + half_spread
    gap = w * (cash + shares * price) - shares * price
    buy = gap > 0
    size = abs(gap)
    a = (1.0 + fee) * (1.0 + r0) - 1.0 if buy else 1.0 - (1.0 - fee) * (1.0 - r0)
    b = (1.0 + fee) * eta if buy else (1.0 - fee) * eta
    sw = w if buy else -w
    y = size / (1.0 + sw * a)
    if costs.impact != "none":
        base, impact = 1.0 + sw * a, sw * b
        if sqrt:
            x = math.sqrt(y)
            base2, impact3 = 2.0 * base, 3.0 * impact
            for _ in range(NEWTON_STEPS):
                slope = x * (base2 + impact3 * x)
                value = x * x * (base + impact * x) - size
                x = max(x - value / (slope if slope > 0 else 1.0), 0.0)
            y = x * x
        else:
            impact_slope = 2.0 * impact
            for _ in range(NEWTON_STEPS):
                value = y * (base + impact * y) - size
                y = max(y - value / (base + impact_slope * y), 0.0)
    capped = trade and y > cap
    filled = min(y, cap)
    if not trade:
        delta = 0.0
    elif w == 0 and not capped:
        delta = -shares
    else:
        delta = (1.0 if buy else -1.0) * filled / price
    traded = abs(delta) * price
    rate = r0 + eta * (math.sqrt(traded) if sqrt else traded)
    executed = price * (1.0 + rate) if delta > 0 else price * (1.0 - rate)
    traded_value = delta * executed
    return Fill(cash - traded_value - abs(traded_value) * fee, shares + delta, delta, rate, capped,
                y if trade else 0.0)


FILL_REASONS = ("hold", "filled", "capped", "zero_volume", "no_adv")


def fill_reason(trade: bool, capped: bool, cap: float, adv: float, costs: CostModel) -> str:
    """Why a fill came out as it did: ``hold`` (no order), ``filled``, ``capped`` (part filled under the cap),
    ``zero_volume`` (the capping volume was 0: nothing filled), ``no_adv`` (impact without a positive ADV)."""
    if not trade:
        return "hold"
    if costs.impact != "none" and not adv > 0:
        return "no_adv"
    if capped and cap == 0:
        return "zero_volume"
    return "capped" if capped else "filled"
