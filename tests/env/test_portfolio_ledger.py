"""An independent plain-Python ledger of the portfolio (its own sizing: bisection on the post-cost equity, its own
per-asset cost formulas and impact inputs, python floats and loops) = the torch env to 1e-9 on 5 weight paths with
costs (flat, borrow, spread + square-root impact, Almgren-Chriss at the next close, a participation cap)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.env.costs import CostModel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_arrays import asset_fill_arrays
from tests.env.test_portfolio import WINDOW, ohlcv_arrays, random_weights

START, STEPS = 120, 40


def ledger_inputs(arrays, costs):
    """Per decision bar t and asset: half-spread, impact eta and the fill cap, the ledger's own way (pandas rolling
    windows; the spread estimate is read from the env's estimator, tested on its own in test_costs)."""
    t_len, a = arrays.close.shape
    half = np.zeros((t_len, a))
    if costs.spread != "none":
        half = asset_fill_arrays(arrays, dataclasses.replace(costs, impact="none", participation=None), 30,
                                 t_len - 1)[0]
    eta = np.zeros((t_len, a))
    if costs.impact != "none":
        close = pd.DataFrame(arrays.close)
        sigma = np.log(close).diff().rolling(costs.vol_window, min_periods=2).std().to_numpy()
        adv = (close * arrays.volume).rolling(costs.adv_window, min_periods=1).mean().to_numpy()
        if costs.impact == "sqrt":
            eta = costs.impact_y * sigma * np.sqrt(costs.capital / adv)
        else:
            eta = sigma * (costs.ac_permanent / 2 + costs.ac_temporary) * costs.capital / adv
    cap = np.full((t_len, a), math.inf)
    if costs.participation is not None:  # on the fill bar's own volume and price
        cap[:-1] = costs.participation * arrays.volume[1:] * arrays.fill[1:] / costs.capital
    return half, eta, cap


def ledger(arrays, costs, weights, start):
    """Equity after each step of one account, every step solved to convergence with python floats."""
    fee, slip = costs.fee, costs.slippage
    half, eta, cap = ledger_inputs(arrays, costs)
    n_assets = arrays.close.shape[1]
    cash, shares = 1.0, [0.0] * n_assets
    curve = []
    for k, w in enumerate(weights):
        t = start + k
        price = [float(p) for p in arrays.fill[t + 1]]

        def order(asset, target_equity, w=w, price=price, t=t):
            gap = w[asset] * target_equity - shares[asset] * price[asset]
            size = min(abs(gap), cap[t, asset])
            impact = eta[t, asset] * (math.sqrt(size) if costs.impact == "sqrt" else size)
            rate = slip + half[t, asset] + impact
            unit = (1 + fee) * (1 + rate) - 1 if gap > 0 else 1 - (1 - fee) * (1 - rate)
            return gap, size, size * unit

        at_price = cash + sum(s * p for s, p in zip(shares, price, strict=True))
        lo, hi = 0.5 * at_price, 1.5 * at_price  # E + costs(E) - V is increasing in E: bisect its root
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid + sum(order(i, mid)[2] for i in range(n_assets)) > at_price:
                hi = mid
            else:
                lo = mid
        target = 0.5 * (lo + hi)
        before = list(shares)
        for i in range(n_assets):
            gap, size, _ = order(i, target)
            if w[i] == 0 and size == abs(gap):
                delta = -shares[i]
            else:
                delta = math.copysign(size, gap) / price[i]
            traded = abs(delta) * price[i]
            impact = eta[t, i] * (math.sqrt(traded) if costs.impact == "sqrt" else traded)
            executed = price[i] * (1 + (slip + half[t, i] + impact) * (1 if delta > 0 else -1))
            cash -= delta * executed + fee * abs(delta * executed)
            shares[i] += delta
        if costs.borrow_bps:
            held = before if arrays.fill_price == "next_close" else shares
            days = (arrays.year_fraction[t + 1])
            cash -= sum(max(0.0, -s) * costs.borrow_rate * days * c for s, c in zip(held, arrays.close[t + 1],
                                                                                   strict=True))
        curve.append(cash + sum(s * c for s, c in zip(shares, arrays.close[t + 1], strict=True)))
    return np.array(curve)


PATHS = {
    "long_only_flat": ("long_only", CostModel(fee_bps=10.0, slippage_bps=5.0), "next_open"),
    "long_short_borrow": ("long_short", CostModel(fee_bps=3.0, slippage_bps=2.0, borrow_bps=500.0), "next_open"),
    "long_only_spread_sqrt": ("long_only", CostModel(spread="corwin_schultz", impact="sqrt", capital=2e7), "next_open"),
    "long_short_ac_next_close": ("long_short", CostModel(impact="almgren_chriss", borrow_bps=200.0, capital=2e7),
                                 "next_close"),
    "long_only_participation": ("long_only", CostModel(participation=0.02, capital=5e7), "next_open"),
}
#: Costs up to ~11 % of the traded notional: Newton's steps matter here (test_sizing_steps_are_needed).
STEEP = ("long_short", CostModel(impact="almgren_chriss", capital=2e8), "next_open")


def env_and_ledger(allocation, costs, fill_price, seed):
    arrays = dataclasses.replace(ohlcv_arrays(), fill_price=fill_price)
    rng = np.random.default_rng(seed)
    actions = random_weights(rng, STEPS, arrays.num_assets, allocation, gross=1.5)
    weights = actions[:, :-1] if allocation == "long_only" else actions
    env = PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=STEPS, allocation=allocation, costs=costs,
                       gross_limit=1.5 if allocation == "long_short" else 1.0)
    env.reset(starts=[START])
    curve, capped = [], 0
    for k in range(STEPS):
        *_, info = env.step(torch.tensor(actions[k:k + 1]))
        curve.append(float(info["equity"][0]))
        capped += int(info.get("capped", torch.zeros(1)).sum())
    return arrays, weights, np.array(curve), ledger(arrays, costs, weights, START), capped


@pytest.mark.parametrize("name", [*PATHS, "steep"])
def test_independent_ledger_equals_env(name):
    allocation, costs, fill_price = STEEP if name == "steep" else PATHS[name]
    arrays, weights, curve, expected, capped = env_and_ledger(allocation, costs, fill_price, len(name))
    np.testing.assert_allclose(curve, expected, rtol=0, atol=1e-9)
    free = ledger(arrays, CostModel(fee_bps=0.0, slippage_bps=0.0), weights, START)
    assert (free - expected).max() > 1e-4  # the costs are material on this path, so the comparison tests them
    if costs.participation is not None:
        assert capped > 0


def test_sizing_steps_are_needed(monkeypatch):
    """Two Newton steps leave the steep case off the ledger by more than 1e-9: the step count is not decoration."""
    import sentio_lab.env.portfolio_arrays as portfolio_arrays

    monkeypatch.setattr(portfolio_arrays, "SIZING_STEPS", 2)
    _, _, curve, expected, _ = env_and_ledger(*STEEP, len("steep"))
    assert np.abs(curve - expected).max() > 1e-9
