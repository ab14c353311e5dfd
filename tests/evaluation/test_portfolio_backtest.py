"""The vectorbt multi-asset replay (cash_sharing=True, one group) reproduces the portfolio env's equity to 1e-9."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.env.costs import CostModel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.evaluation.backtest import BORROW_COLUMN, LOAN_COLUMN
from sentio_lab.evaluation.portfolio_backtest import group_equity, portfolio_orders, replay_portfolio
from tests.env.test_portfolio import WINDOW, ohlcv_arrays, random_weights

START, STEPS = 120, 40
CASES = {
    "long_only_flat": ("long_only", CostModel(fee_bps=10.0, slippage_bps=5.0), "next_open", 1.0),
    "long_only_spread_sqrt": ("long_only", CostModel(spread="corwin_schultz", impact="sqrt", capital=2e7),
                              "next_open", 1.0),
    "long_short_borrow": ("long_short", CostModel(fee_bps=3.0, slippage_bps=2.0, borrow_bps=500.0), "next_open", 1.5),
    "levered_ac_next_close": ("long_short", CostModel(impact="almgren_chriss", borrow_bps=200.0, capital=2e7),
                              "next_close", 3.0),
    "participation": ("long_only", CostModel(participation=0.02, capital=5e7), "next_open", 1.0),
}


def env_curve(arrays, allocation, costs, actions, gross):
    env = PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=len(actions), allocation=allocation,
                       costs=costs, gross_limit=gross)
    env.reset(starts=[START])
    return np.array([float(env.step(torch.tensor(a[None]))[4]["equity"][0]) for a in actions])


@pytest.mark.parametrize("name", list(CASES))
def test_vectorbt_replay_equals_env(name):
    allocation, costs, fill_price, gross = CASES[name]
    arrays = dataclasses.replace(ohlcv_arrays(), fill_price=fill_price)
    rng = np.random.default_rng(7)
    actions = random_weights(rng, STEPS, arrays.num_assets, allocation, gross)
    if name == "levered_ac_next_close":
        actions[:, 0] = np.abs(actions[:, 0]) + 1.2  # net long above 1: the account borrows cash
        actions *= np.minimum(1.0, gross / np.abs(actions).sum(1, keepdims=True))
    weights = actions[:, :-1] if allocation == "long_only" else actions
    curve = env_curve(arrays, allocation, costs, actions, gross)
    index = pd.bdate_range("2020-01-01", periods=len(arrays.close))
    portfolio = replay_portfolio(arrays, START, weights, costs, index=index)
    value = group_equity(portfolio)
    assert value.iloc[0] == 1.0 and value.index[0] == index[START] and len(value) == STEPS + 1
    np.testing.assert_allclose(value.to_numpy()[1:], curve, rtol=0, atol=1e-9)
    orders = portfolio_orders(arrays, START, weights, costs)
    np.testing.assert_allclose(orders.equity, curve, rtol=0, atol=1e-12)
    columns = list(portfolio.wrapper.columns)
    if costs.borrow_bps:
        assert BORROW_COLUMN in columns
        booked = portfolio.orders.records["col"] == columns.index(BORROW_COLUMN)
        assert portfolio.orders.records["fees"][booked].sum() == pytest.approx(orders.borrow.sum(), rel=1e-12)
    if name == "levered_ac_next_close":
        assert LOAN_COLUMN in columns and (orders.cash < 0).any()
    # every asset order was filled in full: vectorbt's share deltas are the walk's
    records = portfolio.orders.records
    for a, asset in enumerate(arrays.assets):
        mine = records[records["col"] == columns.index(asset)]
        traded = orders.delta[:, a][orders.delta[:, a] != 0]
        np.testing.assert_allclose(np.abs(traded), mine["size"], rtol=1e-12)


def test_replay_checks_its_input():
    arrays = ohlcv_arrays()
    with pytest.raises(ValueError, match=r"expected \(steps, 4\) asset weights"):
        replay_portfolio(arrays, START, np.ones((3, 5)), CostModel())
    with pytest.raises(ValueError, match="non-finite"):
        replay_portfolio(arrays, START, np.full((3, 4), np.nan), CostModel())
    with pytest.raises(ValueError, match="leave the panel"):
        replay_portfolio(arrays, len(arrays.close) - 2, np.zeros((3, 4)), CostModel())
    with pytest.raises(ValueError, match="timestamps"):
        replay_portfolio(dataclasses.replace(arrays, year_fraction=None), START, np.zeros((3, 4)),
                         CostModel(borrow_bps=10.0))
