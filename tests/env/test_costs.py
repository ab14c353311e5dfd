"""The cost model and the one rebalancing formula shared by the envs and the backtest (sentio_lab.env.costs)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.env.costs import CostModel, borrow_cost, rebalance, year_fractions

COSTS = CostModel(fee_bps=10, slippage_bps=20)  # fee 0.1 %, slippage 0.2 %
FEE, SLIP = 0.001, 0.002

# A batch of accounts covering every kind of move: open, close, flip, resize, hold, no-trade.
CASH = np.array([1000.0, 0.0, 2000.0, 0.0, 500.0, 300.0, 1000.0, 50.0])
SHARES = np.array([0.0, 10.0, -10.0, 10.0, 5.0, -2.0, 0.0, 3.0])
PRICE = np.array([100.0, 100.0, 100.0, 80.0, 120.0, 95.0, 37.5, 12.25])
WEIGHT = np.array([1.0, 0.0, 0.0, -1.0, 0.5, 1.0, -0.5, 0.75])
TRADE = np.array([True, True, True, True, True, True, True, False])


# ------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("field", ["fee_bps", "slippage_bps"])
@pytest.mark.parametrize("value", [-0.1, 10_000, 1e6, float("nan")])
def test_cost_model_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"CostModel\.{field} must be in \[0, 10000\)"):
        CostModel(**{field: value})


def test_cost_model_fractions():
    assert CostModel(0, 0).buy_cost_rate == CostModel(0, 0).sell_cost_rate == 0.0
    assert COSTS.fee == pytest.approx(FEE, rel=1e-15)
    assert COSTS.slippage == pytest.approx(SLIP, rel=1e-15)
    assert 1 + COSTS.buy_cost_rate == pytest.approx((1 + SLIP) * (1 + FEE), rel=1e-15)
    assert 1 - COSTS.sell_cost_rate == pytest.approx((1 - SLIP) * (1 - FEE), rel=1e-15)
    default = CostModel()
    assert (default.fee_bps, default.slippage_bps) == (1.0, 1.0)
    assert CostModel(9_999.0, 0).fee == pytest.approx(0.9999)


# ----------------------------------------------------------------------------------------- by hand
def test_sell_to_flat_by_hand():
    # Sell 10 shares at 100: fill 100 * (1 - 0.002) = 99.8, proceeds 998, fee 0.998.
    cash, shares, delta = rebalance(0.0, 10.0, 100.0, 0.0, True, COSTS)
    assert float(delta) == -10.0
    assert float(shares) == 0.0
    assert float(cash) == pytest.approx(998.0 - 0.998, rel=1e-14)


def test_buy_by_hand():
    # Equity 1000 at price 50, target half of post-trade equity: shares = 500 / (50 (1 + 0.5 k)) with
    # k = 1.002 * 1.001 - 1 the buy cost rate; fill at 50.1.
    cash, shares, delta = rebalance(1000.0, 0.0, 50.0, 0.5, True, COSTS)
    expected_shares = 500.0 / (50.0 * (1 + 0.5 * (1.002 * 1.001 - 1)))
    assert float(shares) == pytest.approx(expected_shares, rel=1e-14)
    assert float(delta) == pytest.approx(expected_shares, rel=1e-14)
    notional = expected_shares * 50.1
    assert float(cash) == pytest.approx(1000.0 - notional - FEE * notional, rel=1e-14)
    # The position is worth half of what the account is worth after paying for it.
    assert float(shares) * 50.0 == pytest.approx(0.5 * (float(cash) + float(shares) * 50.0), rel=1e-14)


def test_short_from_flat_by_hand():
    cash, shares, delta = rebalance(1000.0, 0.0, 100.0, -1.0, True, COSTS)
    expected = -1000.0 / (100.0 * (2 - 0.998 * 0.999))  # w = -1 of post-trade equity
    assert float(shares) == pytest.approx(expected, rel=1e-14)
    proceeds = -expected * 99.8  # sells fill below the reference price
    assert float(cash) == pytest.approx(1000.0 + proceeds - FEE * proceeds, rel=1e-14)


def test_fill_prices_and_fees_on_the_batch():
    cash, shares, delta = rebalance(CASH, SHARES, PRICE, WEIGHT, TRADE, COSTS)
    fill = np.where(delta > 0, PRICE * (1 + SLIP), PRICE * (1 - SLIP))
    # Cash pays (or receives) the fill price and always pays the fee: nothing else moves.
    fee = np.abs(delta) * fill * FEE
    np.testing.assert_allclose(cash, CASH - delta * fill - fee, rtol=1e-14, atol=1e-12)
    np.testing.assert_allclose(shares, SHARES + delta, rtol=1e-15)
    # Targets are reached where trading: the new position is WEIGHT of the equity left after costs.
    equity = CASH + SHARES * PRICE
    equity_after = cash + shares * PRICE
    np.testing.assert_allclose((shares * PRICE)[TRADE], (WEIGHT * equity_after)[TRADE], rtol=1e-13, atol=1e-12)
    assert delta[~TRADE].tolist() == [0.0]
    # Every trade loses exactly its slippage and fee relative to a mid-price mark.
    loss = equity - (cash + shares * PRICE)
    np.testing.assert_allclose(loss, np.abs(delta) * PRICE * SLIP + fee, rtol=1e-12, atol=1e-12)
    assert (loss[TRADE & (delta != 0)] > 0).all()


# -------------------------------------------------------------------------------- one formula, three types
def test_numpy_scalars_arrays_and_torch_agree():
    arrays = rebalance(CASH, SHARES, PRICE, WEIGHT, TRADE, COSTS)
    tensors = rebalance(
        *(torch.tensor(a, dtype=torch.float64) for a in (CASH, SHARES, PRICE, WEIGHT)),
        torch.tensor(TRADE),
        COSTS,
    )
    for t in tensors:
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    for got, want in zip(tensors, arrays, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    for i in range(len(CASH)):
        scalars = rebalance(
            np.float64(CASH[i]), np.float64(SHARES[i]), np.float64(PRICE[i]), np.float64(WEIGHT[i]),
            np.bool_(TRADE[i]), COSTS,
        )
        python = rebalance(float(CASH[i]), float(SHARES[i]), float(PRICE[i]), float(WEIGHT[i]),
                           bool(TRADE[i]), COSTS)
        for s, p, a in zip(scalars, python, arrays, strict=True):
            assert float(s) == a[i]
            assert float(p) == a[i]


def test_torch_scalars_keep_float64():
    cash, shares, delta = rebalance(
        torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64),
        torch.tensor(True), COSTS,
    )
    assert cash.dtype == shares.dtype == delta.dtype == torch.float64
    assert float(shares) == pytest.approx(1.0 / (3.0 * (1 + COSTS.buy_cost_rate)), rel=1e-15)


# ------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("costs", [CostModel(0, 0), CostModel(5, 3), CostModel(10, 20), CostModel(100, 250)])
@pytest.mark.parametrize("price", [0.731, 1.0, 99.99, 4123.5])
def test_flat_to_fully_long_spends_all_cash(costs, price):
    cash, shares, _ = rebalance(np.float64(1000.0), np.float64(0.0), np.float64(price), 1.0, True, costs)
    assert abs(float(cash)) < 1e-9  # exactly the cash available, costs included: no leverage, no leftover
    assert float(shares) > 0


def test_no_trade_moves_nothing():
    trade = np.zeros_like(TRADE)
    cash, shares, delta = rebalance(CASH, SHARES, PRICE, WEIGHT, trade, COSTS)
    np.testing.assert_array_equal(cash, CASH)
    np.testing.assert_array_equal(shares, SHARES)
    np.testing.assert_array_equal(delta, 0.0)
    t_cash, t_shares, _ = rebalance(
        *(torch.tensor(a) for a in (CASH, SHARES, PRICE, WEIGHT)), torch.tensor(trade), COSTS
    )
    np.testing.assert_array_equal(t_cash.numpy(), CASH)
    np.testing.assert_array_equal(t_shares.numpy(), SHARES)


@pytest.mark.parametrize("path", [(1.0, 0.0), (-1.0, 0.0), (1.0, -1.0, 0.0), (0.3, -0.7, 1.0, 0.0)])
def test_zero_cost_round_trip_at_same_price_keeps_equity(path):
    free = CostModel(0, 0)
    cash, shares, price = 1000.0, 0.0, 42.0
    for weight in path:
        cash, shares, _ = rebalance(cash, shares, price, weight, True, free)
        assert float(cash + shares * price) == pytest.approx(1000.0, rel=1e-14)
    assert float(shares) == 0.0
    assert float(cash) == pytest.approx(1000.0, rel=1e-14)


@pytest.mark.parametrize("weight", [1.0, -1.0, 0.5])
def test_costs_strictly_reduce_equity_on_a_round_trip(weight):
    costs = CostModel(5, 3)
    cash, shares, _ = rebalance(1000.0, 0.0, 42.0, weight, True, costs)
    cash, shares, _ = rebalance(cash, shares, 42.0, 0.0, True, costs)
    assert float(shares) == 0.0
    assert float(cash) < 1000.0
    s, f = costs.slippage, costs.fee
    if weight == 1.0:
        # Open and close of a full long: equity shrinks by (1 - s)(1 - f) / ((1 + s)(1 + f)).
        assert float(cash) == pytest.approx(1000.0 * (1 - s) * (1 - f) / ((1 + s) * (1 + f)), rel=1e-13)
    if weight == -1.0:
        # A full short sells 1000 / (42 (2 - (1 - s)(1 - f))) shares and buys them back at 42 (1 + s)(1 + f).
        sold = 1000.0 / (42.0 * (2 - (1 - s) * (1 - f)))
        expected = 1000.0 + sold * 42.0 * (1 - s) * (1 - f) - sold * 42.0 * (1 + s) * (1 + f)
        assert float(cash) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("costs", [CostModel(0, 0), CostModel(5, 3), CostModel(10, 20), CostModel(100, 250)])
@pytest.mark.parametrize("start_shares", [-2.0, -0.5, 0.0, 0.7])
@pytest.mark.parametrize("target", [-1.0, -0.5, 0.0, 0.5, 1.0])
def test_target_is_a_weight_of_post_trade_equity(costs, start_shares, target):
    """Whatever the starting position, after the trade shares * price == target * equity, and w <= 1 never borrows."""
    price = 2.5
    cash = 10.0 - start_shares * price  # equity 10 at this price
    new_cash, new_shares, delta = rebalance(cash, start_shares, price, target, True, costs)
    equity_after = float(new_cash + new_shares * price)
    assert float(new_shares) * price == pytest.approx(target * equity_after, rel=1e-12, abs=1e-12)
    assert equity_after <= 10.0 + 1e-12  # costs never create money
    if target >= 0:
        assert float(new_cash) >= -1e-12  # long or flat targets up to 1 never borrow cash
    if target == 1.0:
        assert float(new_cash) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("costs", [CostModel(0, 0), CostModel(5, 3), CostModel(100, 250)])
@pytest.mark.parametrize("start_shares", [-3.7, 0.3, 12345.678])
def test_a_move_to_flat_leaves_exactly_zero_shares(costs, start_shares):
    for price in (0.731, 1835.209961, 99.99):
        cash, shares, delta = rebalance(10.0, start_shares, price, 0.0, True, costs)
        assert float(shares) == 0.0 and float(delta) == -start_shares
        tensors = (torch.tensor(v, dtype=torch.float64) for v in (10.0, start_shares, price, 0.0))
        t_cash, t_shares, _ = rebalance(*tensors, torch.tensor(True), costs)
        assert float(t_shares) == 0.0 and float(t_cash) == float(cash)


# ----------------------------------------------------------------------------------------- short borrow
@pytest.mark.parametrize("value", [-1.0, 100_000, float("nan"), float("inf")])
def test_cost_model_rejects_bad_borrow_rates(value):
    with pytest.raises(ValueError, match=r"CostModel\.borrow_bps must be in \[0, 100000\) annual basis points"):
        CostModel(borrow_bps=value)


def test_borrow_rate_and_default():
    assert CostModel().borrow_bps == 0.0 and CostModel().borrow_rate == 0.0
    assert CostModel(borrow_bps=250).borrow_rate == pytest.approx(0.025, rel=1e-15)


def test_year_fractions_count_calendar_days():
    index = pd.DatetimeIndex(["2024-03-07", "2024-03-08", "2024-03-11", "2024-03-11 12:00", "2025-03-11 12:00"])
    np.testing.assert_allclose(year_fractions(index), [0.0, 1 / 365, 3 / 365, 0.5 / 365, 365 / 365], rtol=1e-15)
    # causal: entry t depends on bars t-1 and t only
    np.testing.assert_array_equal(year_fractions(index[:3]), year_fractions(index)[:3])


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        (pd.RangeIndex(3), TypeError, "DatetimeIndex"),
        (pd.DatetimeIndex(["2024-01-02", "2024-01-02"]), ValueError, r"bar 1 \(2024-01-02 00:00:00\) does not follow"),
        (pd.DatetimeIndex(["2024-01-02", "2024-01-03", "2024-01-01"]), ValueError, r"bar 2 \(2024-01-01"),
    ],
)
def test_year_fractions_reject_bad_indexes(index, error, match):
    with pytest.raises(error, match=match):
        year_fractions(index)


def test_borrow_cost_charges_shorts_only_for_every_type():
    costs = CostModel(borrow_bps=365)  # 3.65 % a year: 0.01 % a day
    shares = np.array([-10.0, -0.5, 0.0, 2.0])
    price, years = np.array([50.0, 80.0, 10.0, 10.0]), np.array([1 / 365, 3 / 365, 1 / 365, 1 / 365])
    expected = np.array([10 * 50 * 1e-4, 0.5 * 80 * 3e-4, 0.0, 0.0])
    np.testing.assert_allclose(borrow_cost(shares, price, years, costs), expected, rtol=1e-13, atol=0)
    torch_charge = borrow_cost(torch.tensor(shares), torch.tensor(price), torch.tensor(years), costs)
    np.testing.assert_array_equal(torch_charge.numpy(), borrow_cost(shares, price, years, costs))
    assert float(borrow_cost(-10.0, 50.0, 1 / 365, costs)) == pytest.approx(0.05, rel=1e-13)
    assert float(borrow_cost(-10.0, 50.0, 1 / 365, CostModel())) == 0.0  # no rate, no charge


# ============================================================== non-flat models (issue 10): spread, impact, cap
from sentio_lab.data import load_market  # noqa: E402
from sentio_lab.env.costs import (  # noqa: E402
    abdi_ranaldo,
    average_daily_volume,
    bars_per_day,
    corwin_schultz,
    cost_inputs,
    daily_volatility,
    execute,
    fill_cap,
    fill_reason,
    impact_eta,
)


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return load_market("nasdaq").frame.iloc[:800].copy()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"spread": "roll"}, r"CostModel\.spread must be one of"),
    ({"impact": "linear"}, r"CostModel\.impact must be one of"),
    ({"remainder": "keep"}, r"CostModel\.remainder"),
    ({"spread_window": 1}, r"CostModel\.spread_window must be an integer >= 2"),
    ({"impact_y": -0.1}, r"CostModel\.impact_y"),
    ({"capital": 0.0}, r"CostModel\.capital"),
    ({"adv": -5.0}, r"CostModel\.adv"),
    ({"participation": 1.5}, r"CostModel\.participation"),
    ({"impact": "sqrt", "volume": "ticks"}, r"tick volume is not traded quantity.*CostModel\.adv"),
    ({"participation": 0.1, "volume": "ticks"}, r"tick volume is not traded quantity"),
    ({"participation": 0.1, "volume": "ticks", "adv": 1e9}, r"cap_volume='forecast'"),
])
def test_nonflat_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CostModel(**kwargs)


def test_flatness_and_volume_needs():
    assert CostModel().is_flat and not CostModel().needs_volume
    assert not CostModel(spread="corwin_schultz").is_flat and not CostModel(spread="corwin_schultz").needs_volume
    assert CostModel(impact="sqrt").needs_volume and not CostModel(impact="sqrt", adv=1e9).needs_volume
    assert CostModel(participation=0.1).needs_volume
    assert CostModel(impact="sqrt", volume="ticks", adv=1e9).impact == "sqrt"  # FX: the user's ADV, no error


@pytest.mark.parametrize("t", [30, 200, 555])
def test_estimators_use_no_future_bars(bars, t):
    """Replace every bar after t: the estimates at bars <= t do not move, bit for bit."""
    rng = np.random.default_rng(t)
    future = bars.copy()
    n = len(future) - t - 1
    scale = np.exp(rng.normal(0, 0.05, n))
    for column in ("open", "high", "low", "close"):
        future.iloc[t + 1 :, future.columns.get_loc(column)] *= scale
    future.iloc[t + 1 :, future.columns.get_loc("high")] *= 1.02
    future.iloc[t + 1 :, future.columns.get_loc("volume")] *= rng.uniform(0, 3, n)
    model = CostModel(spread="corwin_schultz", impact="sqrt")
    for name, fn in [("cs", lambda f: corwin_schultz(f.high, f.low, f.close, 20)),
                     ("ar", lambda f: abdi_ranaldo(f.high, f.low, f.close, 20)),
                     ("sigma", lambda f: daily_volatility(f.close, 20)),
                     ("adv", lambda f: average_daily_volume(f.volume, f.close, 20)),
                     ("inputs", lambda f: cost_inputs(model, f.high, f.low, f.close, f.volume).half_spread)]:
        before, after = fn(bars), fn(future)
        np.testing.assert_array_equal(before[: t + 1], after[: t + 1], err_msg=name)
        assert not np.array_equal(before[t + 1 :], after[t + 1 :]), name  # the perturbation reached them


def test_spread_estimates_on_flat_tiny_and_gapping_bars(bars):
    # flat bars (high == low == close): the two-bar Corwin-Schultz estimate is negative -> clamped to 0, as the
    # paper does; Abdi-Ranaldo's averaged term is 0
    flat = np.full(30, 50.0)
    assert np.all(corwin_schultz(flat, flat, flat, 5)[1:] == 0.0)
    assert np.all(abdi_ranaldo(flat, flat, flat, 5)[1:] == 0.0)
    high, low, close = (bars[c].to_numpy() for c in ("high", "low", "close"))
    cs, ar = corwin_schultz(high, low, close), abdi_ranaldo(high, low, close)
    assert np.isnan(cs[0]) and np.isnan(ar[0]) and (cs[1:] >= 0).all() and (ar[1:] >= 0).all()
    # an index has no quoted spread: Corwin-Schultz reads its high-low noise as ~0.5 %, Abdi-Ranaldo's averaged
    # covariance is mostly negative there (-> 0)
    assert 1e-4 < np.median(cs[1:]) < 0.05 and 0 < ar[1:].max() < 0.05
    # tiny prices: log-based estimators are scale-free
    np.testing.assert_allclose(corwin_schultz(high * 1e-9, low * 1e-9, close * 1e-9), cs, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(daily_volatility(close * 1e-9), daily_volatility(close), rtol=1e-9)
    # an overnight gap: bar 2 trades wholly above close 1; the adjustment shifts it down by the gap
    h, lo, c = np.array([10.2, 10.3, 11.4]), np.array([9.9, 10.0, 11.1]), np.array([10.0, 10.1, 11.3])
    shifted = corwin_schultz(np.r_[h[:2], h[2] - 1.0], np.r_[lo[:2], lo[2] - 1.0], c, 1)
    np.testing.assert_allclose(corwin_schultz(h, lo, c, 1)[2], shifted[2], rtol=1e-12)
    assert (bars_per_day(bars.index) == 1.0).all() and bars_per_day(None, 3).tolist() == [1.0, 1.0, 1.0]
    hourly = pd.date_range("2024-01-01", periods=96, freq="h")
    assert bars_per_day(hourly).tolist() == list(range(1, 25)) + [24.0] * 72  # first date: its bars so far


# Hand-computed reference values, written from the papers' formulas in plain python (math), independently of
# sentio_lab.env.costs.estimators. Six bars: bar 2 gaps up over close 1, bar 3 gaps down under close 2 (both take the
# overnight adjustment, and both estimates stay positive so the adjustment shows), bars 4 and 5 give negative
# two-bar Corwin-Schultz estimates (-> 0) and negative Abdi-Ranaldo terms (so a window's mean is negative -> 0).
HAND_H = [10.2, 10.3, 11.4, 11.25, 11.05, 10.72]
HAND_L = [9.9, 9.95, 11.1, 10.9, 10.6, 10.35]
HAND_C = [10.0, 10.1, 11.3, 11.0, 10.7, 10.5]


def _hand_corwin_schultz_terms():
    """Two-bar Corwin-Schultz (2012) spreads S_t for t >= 1, eqs. (14), (18): beta over the pair (t - 1, t),
    gamma over their joint range, alpha, S = 2 (e^alpha - 1) / (1 + e^alpha); bar t adjusted for the overnight
    gap against close t - 1 (bar t - 1 as traded), as the module documents."""
    k = 3.0 - 2.0 * math.sqrt(2.0)
    raw = []
    for t in range(1, len(HAND_C)):
        h, lo, gap_ref = HAND_H[t], HAND_L[t], HAND_C[t - 1]
        if lo > gap_ref:  # whole bar above the previous close: shift it down by the gap
            h, lo = h - (lo - gap_ref), gap_ref
        elif h < gap_ref:  # whole bar below: shift it up by the gap
            h, lo = gap_ref, lo + (gap_ref - HAND_H[t])
        beta = math.log(HAND_H[t - 1] / HAND_L[t - 1]) ** 2 + math.log(h / lo) ** 2
        gamma = math.log(max(HAND_H[t - 1], h) / min(HAND_L[t - 1], lo)) ** 2
        alpha = (math.sqrt(2.0 * beta) - math.sqrt(beta)) / k - math.sqrt(gamma / k)
        raw.append(2.0 * (math.exp(alpha) - 1.0) / (1.0 + math.exp(alpha)))
    return raw


def _hand_abdi_ranaldo_terms():
    """Two-bar Abdi-Ranaldo (2017) terms 4 (c_{t-1} - eta_{t-1}) (c_{t-1} - eta_t), t >= 1, log prices,
    eta the log mid-range (log H + log L) / 2."""
    c = [math.log(x) for x in HAND_C]
    eta = [0.5 * (math.log(h) + math.log(lo)) for h, lo in zip(HAND_H, HAND_L, strict=True)]
    return [4.0 * (c[t - 1] - eta[t - 1]) * (c[t - 1] - eta[t]) for t in range(1, len(HAND_C))]


def _window_means(terms, window):
    """Mean of the last ``window`` terms ending at each bar t >= 1 (fewer at the start: bar 0 has none)."""
    return [sum(terms[max(0, i - window + 1) : i + 1]) / len(terms[max(0, i - window + 1) : i + 1])
            for i in range(len(terms))]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_spread_estimators_match_hand_computed_values(window):
    cs_raw, ar_raw = _hand_corwin_schultz_terms(), _hand_abdi_ranaldo_terms()
    # the fixture exercises every branch: both gap adjustments, the per-term CS clamp, a negative AR term
    assert HAND_L[2] > HAND_C[1] and HAND_H[3] < HAND_C[2]
    assert cs_raw[1] > 0 and cs_raw[2] > 0 and cs_raw[3] < 0 and cs_raw[4] < 0 and ar_raw[3] < 0 and ar_raw[4] < 0
    # Corwin-Schultz: each two-bar estimate clamped at 0, then averaged; full spread
    cs_expected = [math.nan] + _window_means([max(s, 0.0) for s in cs_raw], window)
    # Abdi-Ranaldo: terms averaged, then S = sqrt(max(mean, 0)); full spread
    ar_expected = [math.nan] + [math.sqrt(max(m, 0.0)) for m in _window_means(ar_raw, window)]
    h, lo, c = np.array(HAND_H), np.array(HAND_L), np.array(HAND_C)
    np.testing.assert_allclose(corwin_schultz(h, lo, c, window), cs_expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(abdi_ranaldo(h, lo, c, window), ar_expected, rtol=0, atol=1e-12)
    if window == 2:  # AR's window (bars 4, 5) averages to a negative number: the clamp acts on the mean
        assert (ar_raw[3] + ar_raw[4]) / 2 < 0 and ar_expected[5] == 0.0
    # a fill pays half the spread: cost_inputs hands the env half the estimator's value (CostModel wants window >= 2)
    for name in ("corwin_schultz", "abdi_ranaldo") if window >= 2 else ():
        model = CostModel(spread=name, spread_window=window)
        expected = cs_expected if name == "corwin_schultz" else ar_expected
        half = cost_inputs(model, h, lo, c, None).half_spread
        np.testing.assert_allclose(half, 0.5 * np.array(expected), rtol=0, atol=1e-12)


def test_zero_volume_adv_and_cap():
    volume, close = np.r_[np.zeros(5), np.full(5, 100.0)], np.full(10, 20.0)
    adv = average_daily_volume(volume, close, 3)
    assert adv[:5].tolist() == [0.0] * 5 and adv[-1] == 2000.0
    costs = CostModel(impact="sqrt", participation=0.1)
    eta = impact_eta(costs, np.full(10, 0.01), adv)
    assert (eta[:5] == 0).all() and (eta[5:] > 0).all()
    cap = fill_cap(costs, close, volume, adv, 1.0)
    assert (cap[:5] == 0).all()  # impact without an ADV: no fill has a price, nothing fills
    fill = execute(np.ones(10), np.zeros(10), close, np.ones(10), np.ones(10, bool), costs, np.zeros(10), eta, cap)
    assert (fill.delta[:5] == 0).all() and fill.capped[:5].all() and (fill.cash[:5] == 1.0).all()
    assert fill_reason(True, True, 0.0, 0.0, costs) == "no_adv"
    capped_only = CostModel(participation=0.1)
    assert fill_reason(True, True, 0.0, 5.0, capped_only) == "zero_volume"
    assert fill_reason(True, True, 3.0, 5.0, capped_only) == "capped"
    assert fill_reason(False, False, 3.0, 5.0, capped_only) == "hold"
    assert fill_reason(True, False, 3.0, 5.0, capped_only) == "filled"
    with pytest.raises(ValueError, match="high and low"):
        cost_inputs(CostModel(spread="abdi_ranaldo"), None, None, close, volume)
    with pytest.raises(ValueError, match="no volume column"):
        cost_inputs(CostModel(impact="sqrt"), None, None, close, None)
    assert np.isnan(cost_inputs(CostModel(spread="none", participation=None), None, None, close, None).adv).all()


ACCOUNTS = dict(cash=CASH, shares=SHARES, price=PRICE, target_weight=WEIGHT)


@pytest.mark.parametrize("impact", ["sqrt", "almgren_chriss"])
def test_impact_fills_meet_the_weight_rule_and_grow_with_size(impact):
    sigma, adv, half = np.full(8, 0.02), np.full(8, 5e6), np.full(8, 3e-4)
    rates = []
    for capital in (1e2, 4e2, 1.6e3):  # impact small against the trade: sizes barely change with capital
        costs = CostModel(fee_bps=10, slippage_bps=20, impact=impact, capital=capital)
        eta = impact_eta(costs, sigma, adv)
        fill = execute(CASH, SHARES, PRICE, WEIGHT, TRADE, costs, half, eta, np.full(8, np.inf))
        # the post-trade weight rule holds to rounding (Newton converged), and untraded rows do not move
        equity_after = fill.cash + fill.shares * PRICE
        moved = TRADE & (WEIGHT != 0)
        np.testing.assert_allclose((fill.shares * PRICE)[moved], (WEIGHT * equity_after)[moved], rtol=1e-13)
        assert fill.delta[~TRADE].tolist() == [0.0] and fill.shares[1] == 0.0  # exact move to flat
        # torch gives the same fill
        inf = torch.full((8,), float("inf"), dtype=torch.float64)
        tfill = execute(*(torch.as_tensor(a) for a in (CASH, SHARES, PRICE, WEIGHT, TRADE)), costs,
                        torch.as_tensor(half), torch.as_tensor(eta), inf)
        np.testing.assert_allclose(tfill.cash.numpy(), fill.cash, rtol=1e-15, atol=1e-15)
        rates.append(fill.rate - 0.002 - half)
    rates = np.array(rates)[:, TRADE]
    ratio = rates[1:] / rates[:-1]  # 4 x the capital: sqrt impact x2, linear (Almgren-Chriss) x4 (sizes ~ capital)
    expected = 2.0 if impact == "sqrt" else 4.0
    np.testing.assert_allclose(ratio, expected, rtol=0.02)


def test_flat_spread_model_does_not_depend_on_capital():
    half = np.full(8, 5e-4)
    fills = [execute(CASH, SHARES, PRICE, WEIGHT, TRADE, CostModel(spread="abdi_ranaldo", capital=c), half,
                     np.zeros(8), np.full(8, np.inf)) for c in (1e3, 1e9)]
    np.testing.assert_array_equal(fills[0].cash, fills[1].cash)
    # and with no spread and no impact the fill equals the closed-form rebalance
    plain = execute(CASH, SHARES, PRICE, WEIGHT, TRADE, CostModel(participation=1.0), np.zeros(8), np.zeros(8),
                    np.full(8, np.inf))
    cash, shares, _ = rebalance(CASH, SHARES, PRICE, WEIGHT, TRADE, CostModel())
    np.testing.assert_allclose(plain.cash, cash, rtol=1e-15)
    np.testing.assert_allclose(plain.shares, shares, rtol=1e-15)


@pytest.mark.parametrize("impact", ["none", "sqrt", "almgren_chriss"])
def test_scalar_fills_are_the_array_fills_bit_for_bit(impact):
    costs = CostModel(fee_bps=10, slippage_bps=20, impact=impact, capital=3e5, participation=0.5)
    half, eta, cap = np.full(8, 2e-4), np.linspace(0, 3e-3, 8), np.r_[np.full(7, np.inf), 1.0]
    arrays = execute(CASH, SHARES, PRICE, WEIGHT, TRADE, costs, half, eta, cap)
    for i in range(8):
        one = execute(float(CASH[i]), float(SHARES[i]), float(PRICE[i]), float(WEIGHT[i]), bool(TRADE[i]), costs,
                      float(half[i]), float(eta[i]), float(cap[i]))
        assert [float(x) for x in one] == [float(x[i]) for x in arrays], i


def _fill_root_by_bisection(base, impact, size, alpha):
    """The root of y (base + impact y^alpha) = size by 200 bisection steps (independent of Newton's method)."""
    lo, hi = np.zeros_like(size), 4.0 * size / base + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = mid * (base + impact * mid**alpha) > size
        lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("impact", ["sqrt", "almgren_chriss"])
def test_newton_steps_reach_the_fill_root_to_rounding_up_to_90_percent_impact(impact, monkeypatch):
    """execution.NEWTON_STEPS (6, was 12) solves the fill rule to rounding for impact up to 90 % of the price, buying
    and selling, long and short and levered targets; 4 steps would not (the bound is not loose)."""
    from sentio_lab.env.costs import execution

    alpha = 0.5 if impact == "sqrt" else 1.0
    fractions = np.array([1e-6, 1e-4, 1e-2, 0.05, 0.1, 0.3, 0.5, 0.9])
    weights = np.array([1.0, 2.0, -1.0, -0.5, 0.5])
    frac, w = (x.ravel() for x in np.meshgrid(fractions, weights))
    costs = CostModel(fee_bps=10, slippage_bps=20, impact=impact, capital=1e6)
    cash, shares, price = np.ones_like(w), np.where(w < 0, 0.2, 0.0), np.ones_like(w)
    # equity 1 (+ shares), gap = w E - shares p; eta chosen so the impact at the no-impact size is `frac`
    gap = w * (cash + shares * price) - shares * price
    eta = frac / np.abs(gap) ** alpha
    half = np.full_like(w, 1e-4)

    def solved():
        return execute(cash, shares, price, w, np.ones_like(w, bool), costs, half, eta, np.full_like(w, np.inf))

    fill = solved()
    buy = gap > 0
    fee, r0 = costs.fee, costs.slippage + half
    a = np.where(buy, (1 + fee) * (1 + r0) - 1, 1 - (1 - fee) * (1 - r0))
    b = np.where(buy, (1 + fee) * eta, (1 - fee) * eta)
    sw = np.where(buy, w, -w)
    exact = _fill_root_by_bisection(1 + sw * a, sw * b, np.abs(gap), alpha)
    np.testing.assert_allclose(fill.requested, exact, rtol=1e-13)
    monkeypatch.setattr(execution, "NEWTON_STEPS", 4)
    assert np.abs(solved().requested / exact - 1).max() > 1e-13
