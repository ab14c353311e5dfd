"""An independent ledger against both environments: plain floats, loops, and its own fill sizing.

The vectorbt replay (tests/test_backtest.py) and the numpy reference env both take their share amounts
from ``sentio_lab.env.costs.rebalance``, so their agreement with the torch env cannot catch a sizing error
in that one formula. The ledger here shares no code with it: it never imports ``rebalance`` or
``borrow_cost``, reads fee, slippage and borrow rate from the basis points it is given, counts borrow days
from the timestamps itself, and finds each fill quantity by *bisection* on the documented rule
(``sentio_lab.env.costs`` module doc) rather than by its closed form:

    after the trade, position value == w * equity, both at the reference price p, where
    a buy of q > 0 shares pays q * p * (1 + slippage) plus fee on that amount,
    a sell of q < 0 shares receives |q| * p * (1 - slippage) minus fee on that amount;
    a short held over bar t+1 pays rate * |shares| * close[t+1] * (days from close[t] to close[t+1]) / 365.

A deliberately mis-sized ledger, and envs running a deliberately mis-sized ``rebalance``, must disagree
with it: the second case also shows the replay cannot tell (it agrees with the broken env).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import sentio_lab.env.reference as reference_module
import sentio_lab.env.trading as trading_module
import sentio_lab.evaluation.backtest as bt
from sentio_lab.data import load_market
from sentio_lab.env import MarketArrays, NumpyTradingEnv, TradingEnv
from sentio_lab.env.costs import CostModel

FEE_BPS, SLIPPAGE_BPS, BORROW_BPS = 10.0, 20.0, 500.0
COSTS = CostModel(fee_bps=FEE_BPS, slippage_bps=SLIPPAGE_BPS, borrow_bps=BORROW_BPS)
STEPS = 250
STARTS = [60, 1400, 2900, 4500]
POSITION_SETS = {
    "short-flat-long": (-1.0, 0.0, 1.0),
    "long-only": (0.0, 1.0),
    "five-levels": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "leveraged": (0.0, 2.0),
    "short-and-leveraged": (-1.0, 0.0, 2.0),
}
TOLERANCE = 1e-10


# --------------------------------------------------------------------------------------------- ledger
def fill_quantity(cash: float, shares: float, price: float, w: float, fee: float, slippage: float) -> float:
    """Shares to trade (buy > 0) so that after the trade ``(shares + q) * price == w * equity_after``.

    ``equity_after(q) = cash - paid(q) - fee * |paid(q)| + (shares + q) * price`` with ``paid`` the signed
    cash of the fill at ``price * (1 +- slippage)``. ``h(q) = (shares + q) * price - w * equity_after(q)``
    is continuous and strictly increasing in ``q`` (slope ``price * (1 + w k)`` with ``|w k|`` far below 1
    for any sane cost), so bisection on a bracket finds its one root, to the last bit.
    """

    def equity_after(q: float) -> float:
        fill = price * (1.0 + slippage) if q > 0 else price * (1.0 - slippage)
        paid = q * fill
        return cash - paid - fee * abs(paid) + (shares + q) * price

    def h(q: float) -> float:
        return (shares + q) * price - w * equity_after(q)

    equity = cash + shares * price
    bound = 4.0 * abs(equity) * (abs(w) + 1.0) / price + 2.0 * abs(shares) + 1.0
    lo, hi = -bound, bound
    assert h(lo) < 0.0 < h(hi), "bracket does not hold the root"
    for _ in range(5_000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if h(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return lo if abs(h(lo)) <= abs(h(hi)) else hi


def pre_trade_sized_quantity(cash: float, shares: float, price: float, w: float, fee: float, slippage: float) -> float:
    """A plausible *wrong* rule: size the target on the equity before the trade's own costs."""
    return w * (cash + shares * price) / price - shares


def ledger_equity(
    frame: pd.DataFrame,
    start: int,
    positions: tuple[float, ...],
    actions: list[int],
    *,
    fee_bps: float = FEE_BPS,
    slippage_bps: float = SLIPPAGE_BPS,
    borrow_bps: float = BORROW_BPS,
    sizing=fill_quantity,
    calendar_days: bool = True,
    fill_at: str = "open",
    borrow_on_filled: bool = False,
) -> list[float]:
    """Equity after each action: fill at the next open (``fill_at="close"``: the next close), borrow and mark at that
    bar's close (python floats). The borrow is on the shares held over the bar: those after an open fill, those
    before a close fill (``borrow_on_filled``: a deliberately wrong rule, those after it)."""
    fee, slippage, rate = fee_bps / 10_000.0, slippage_bps / 10_000.0, borrow_bps / 10_000.0
    opens = [float(x) for x in frame[fill_at]]
    closes = [float(x) for x in frame["close"]]
    times = list(frame.index)
    cash, shares, level = 1.0, 0.0, positions.index(0.0)
    equities = []
    t = start
    for action in actions:
        price = opens[t + 1]
        held = shares  # over bar t + 1, when the fill is at its close
        if action != level:
            w = positions[action]
            q = sizing(cash, shares, price, w, fee, slippage)
            fill = price * (1.0 + slippage) if q > 0 else price * (1.0 - slippage)
            paid = q * fill
            cash = cash - paid - fee * abs(paid)
            shares = shares + q
            level = action
        t += 1
        held = held if fill_at == "close" and not borrow_on_filled else shares
        if held < 0:
            days = (times[t] - times[t - 1]).total_seconds() / 86_400.0 if calendar_days else 1.0
            cash -= rate * -held * closes[t] * days / 365.0
        equities.append(cash + shares * closes[t])
    return equities


# ------------------------------------------------------------------------------------------- the envs
@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_market("nasdaq").frame  # real opens 1999-2018


@pytest.fixture(scope="module")
def market(frame) -> MarketArrays:
    returns = np.log(frame["close"]).diff().fillna(0.0).to_numpy()[:, None]
    return MarketArrays.from_frame(frame, returns, first_valid=1)


def random_actions(n_levels: int, seed: int) -> np.ndarray:
    """(STEPS, len(STARTS)) level indices that change often (a trade on most steps)."""
    return np.random.default_rng(seed).integers(0, n_levels, (STEPS, len(STARTS)))


def torch_equity(market, positions, actions, costs=COSTS) -> np.ndarray:
    env = TradingEnv(market, num_envs=len(STARTS), window=4, episode_length=STEPS + 1, positions=positions,
                     costs=costs, ruin_fraction=0.0)
    env.reset(starts=STARTS)
    out = []
    for a in actions:
        _, _, terminated, truncated, info = env.step(torch.as_tensor(a))
        assert not bool((terminated | truncated).any())
        out.append(info["equity"].numpy().copy())
    return np.array(out)


def numpy_equity(market, positions, actions, costs=COSTS) -> np.ndarray:
    out = []
    for i, start in enumerate(STARTS):
        env = NumpyTradingEnv(market, window=4, episode_length=STEPS + 1, positions=positions, costs=costs,
                              ruin_fraction=0.0)
        env.reset(options={"start": start})
        column = []
        for a in actions[:, i]:
            _, _, terminated, truncated, info = env.step(int(a))
            assert not (terminated or truncated)
            column.append(info["equity"])
        out.append(column)
    return np.array(out).T


def ledger(frame, positions, actions, **kwargs) -> np.ndarray:
    return np.array([ledger_equity(frame, s, positions, actions[:, i].tolist(), **kwargs)
                     for i, s in enumerate(STARTS)]).T


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a / b - 1.0)))


# ------------------------------------------------------------------------------------------------ tests
def test_fill_quantity_meets_the_rule_by_hand():
    # from flat, w = 1: spends all the cash, costs included
    q = fill_quantity(1000.0, 0.0, 50.0, 1.0, 0.001, 0.002)
    assert q == pytest.approx(1000.0 / (50.0 * 1.002 * 1.001), rel=1e-15)
    # from long 10 to short: position value is -0.5 of the equity after the trade
    cash, shares, price, w = 200.0, 10.0, 80.0, -0.5
    q = fill_quantity(cash, shares, price, w, 0.001, 0.002)
    fill = price * (1 - 0.002)
    after = cash - q * fill - 0.001 * abs(q * fill) + (shares + q) * price
    assert q < -shares and (shares + q) * price == pytest.approx(w * after, rel=1e-14)
    assert fill_quantity(5.0, -3.0, 7.0, 0.0, 0.001, 0.002) == pytest.approx(3.0, rel=1e-15)


@pytest.mark.parametrize("positions", list(POSITION_SETS.values()), ids=list(POSITION_SETS))
def test_ledger_matches_both_envs(frame, market, positions):
    actions = random_actions(len(positions), seed=len(positions))
    expected = ledger(frame, positions, actions)
    torch_eq = torch_equity(market, positions, actions)
    numpy_eq = numpy_equity(market, positions, actions)
    error = max(max_rel(torch_eq, expected), max_rel(numpy_eq, expected))
    print(f"max relative equity error, envs vs independent ledger {positions}: {error:.2e}")
    assert error < TOLERANCE
    # the paths are not trivial: most steps trade, and the equity moved well away from 1
    assert np.mean(np.diff(actions, axis=0) != 0) > 0.3
    assert np.max(np.abs(expected - 1.0)) > 0.05
    if min(positions) < 0:  # shorts were held over weekends: the borrow is in these numbers
        no_borrow = ledger(frame, positions, actions, borrow_bps=0.0)
        assert max_rel(no_borrow, expected) > 1e-4
        one_day = ledger(frame, positions, actions, calendar_days=False)
        assert max_rel(one_day, torch_eq) > 100 * TOLERANCE  # weekends count three days, not one


@pytest.mark.parametrize("positions", [(-1.0, 0.0, 1.0), (0.0, 2.0)], ids=["short-flat-long", "leveraged"])
def test_a_mis_sized_ledger_disagrees_with_the_envs(frame, market, positions):
    actions = random_actions(len(positions), seed=11)
    wrong = ledger(frame, positions, actions, sizing=pre_trade_sized_quantity)
    right = ledger(frame, positions, actions)
    torch_eq = torch_equity(market, positions, actions)
    assert max_rel(right, torch_eq) < TOLERANCE
    assert max_rel(wrong, torch_eq) > 1e4 * TOLERANCE


def _mis_sized_rebalance(cash, shares, price, target_weight, trade, costs):
    """``costs.rebalance`` with the classic bug: the target sized on the pre-trade equity."""
    where = torch.where if isinstance(cash, torch.Tensor) else np.where
    delta = where(trade, (target_weight * (cash + shares * price) - shares * price) / price, 0.0 * shares)
    executed = where(delta > 0, price * (1.0 + costs.slippage), price * (1.0 - costs.slippage))
    traded = delta * executed
    return cash - traded - abs(traded) * costs.fee, shares + delta, delta


def test_ledger_catches_a_sizing_error_the_replay_cannot(frame, market, monkeypatch):
    positions = (-1.0, 0.0, 1.0)
    actions = random_actions(len(positions), seed=5)
    right = ledger(frame, positions, actions)
    monkeypatch.setattr(trading_module, "rebalance", _mis_sized_rebalance)
    monkeypatch.setattr(reference_module, "rebalance", _mis_sized_rebalance)
    monkeypatch.setattr(bt, "rebalance", _mis_sized_rebalance)
    broken_torch = torch_equity(market, positions, actions)
    broken_numpy = numpy_equity(market, positions, actions)
    # the broken env still agrees with its numpy twin and with the vectorbt replay: they share the formula
    assert max_rel(broken_torch, broken_numpy) < 1e-9
    replayed = bt.equity(bt.replay(frame, STARTS[0], np.asarray(positions)[actions[:, 0]], COSTS)).to_numpy()[1:]
    assert max_rel(replayed, broken_torch[:, 0]) < 1e-9
    # the independent ledger does not
    assert max_rel(broken_torch, right) > 1e4 * TOLERANCE


def test_ledger_matches_the_vectorbt_replay(frame):
    positions = (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    actions = random_actions(len(positions), seed=21)
    expected = ledger(frame, positions, actions)
    for i, start in enumerate(STARTS):
        replayed = bt.equity(bt.replay(frame, start, np.asarray(positions)[actions[:, i]], COSTS)).to_numpy()[1:]
        assert max_rel(replayed, expected[:, i]) < TOLERANCE


# ================================================================ non-flat cost models (spread, impact, cap)
# The ledger below prices them from the documented rules with its own plain-Python estimators (loops over
# the window, statistics.stdev), its own impact formula and the same bisection as fill_quantity; it never
# calls sentio_lab.env.costs.
import functools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402

WINDOW = 20
NONFLAT = {
    "sqrt-impact": dict(impact="sqrt", impact_y=0.7, capital=1e10),
    "almgren-chriss": dict(impact="almgren_chriss", ac_permanent=0.4, ac_temporary=0.5, capital=3e10),
    "corwin-schultz": dict(spread="corwin_schultz"),
    "abdi-ranaldo+sqrt": dict(spread="abdi_ranaldo", impact="sqrt", impact_y=1.0, capital=1e9),
    "cap-cancel": dict(impact="sqrt", participation=2e-4, capital=1e10, remainder="cancel"),
    "cap-carry": dict(impact="sqrt", participation=2e-4, capital=1e10, remainder="carry"),
    "cap-forecast-carry": dict(participation=1e-4, capital=1e10, remainder="carry", cap_volume="forecast"),
}


def ledger_sigma(closes: list[float], t: int) -> float:
    """Sample std of the last WINDOW log returns ending at bar t (fewer at the start; at least two)."""
    returns = [math.log(closes[k] / closes[k - 1]) for k in range(max(1, t - WINDOW + 1), t + 1)]
    return statistics.stdev(returns)


def ledger_adv(closes: list[float], volumes: list[float], t: int) -> float:
    days = range(max(0, t - WINDOW + 1), t + 1)
    return sum(volumes[k] * closes[k] for k in days) / len(days)


def ledger_cs_spread(highs, lows, closes, t: int) -> float:
    """Corwin-Schultz: mean of max(0, two-day estimate) over the window, each after the overnight adjustment."""
    estimates = []
    for k in range(max(1, t - WINDOW + 1), t + 1):
        h1, l1 = highs[k - 1], lows[k - 1]
        h2, l2 = highs[k], lows[k]
        gap_up, gap_down = l2 - closes[k - 1], closes[k - 1] - h2
        if gap_up > 0:
            h2, l2 = h2 - gap_up, l2 - gap_up
        elif gap_down > 0:
            h2, l2 = h2 + gap_down, l2 + gap_down
        beta = math.log(h1 / l1) ** 2 + math.log(h2 / l2) ** 2
        gamma = math.log(max(h1, h2) / min(l1, l2)) ** 2
        k3 = 3 - 2 * math.sqrt(2)
        alpha = (math.sqrt(2 * beta) - math.sqrt(beta)) / k3 - math.sqrt(gamma / k3)
        estimates.append(max(0.0, 2 * (math.exp(alpha) - 1) / (1 + math.exp(alpha))))
    return sum(estimates) / len(estimates)


def ledger_ar_spread(highs, lows, closes, t: int) -> float:
    terms = []
    for k in range(max(1, t - WINDOW + 1), t + 1):
        mid_prev = (math.log(highs[k - 1]) + math.log(lows[k - 1])) / 2
        mid = (math.log(highs[k]) + math.log(lows[k])) / 2
        c = math.log(closes[k - 1])
        terms.append(4 * (c - mid_prev) * (c - mid))
    return math.sqrt(max(0.0, sum(terms) / len(terms)))


def ledger_rate(q: float, price: float, base: float, sigma: float, adv: float, capital: float, impact: str,
                impact_y: float, ac_permanent: float, ac_temporary: float) -> float:
    """Price concession of a fill of q shares: slippage + half-spread (``base``) + impact of its currency size."""
    share_of_adv = capital * abs(q) * price / adv
    if impact == "sqrt":
        return base + impact_y * sigma * math.sqrt(share_of_adv)
    if impact == "almgren_chriss":
        return base + sigma * (ac_permanent / 2 + ac_temporary) * share_of_adv
    return base


def bisect_fill(cash: float, shares: float, price: float, w: float, fee: float, rate) -> float:
    """Shares to trade so that ``(shares + q) p == w * equity_after(q)`` with a size-dependent ``rate(q)``."""

    def equity_after(q: float) -> float:
        fill = price * (1.0 + rate(q)) if q > 0 else price * (1.0 - rate(q))
        return cash - q * fill - fee * abs(q * fill) + (shares + q) * price

    def h(q: float) -> float:
        return (shares + q) * price - w * equity_after(q)

    # The root lies between 0 and twice the cost-free trade (costs below 50 % of notional): a tight bracket, since
    # with impact h stops increasing for absurd sizes (a rate above 100 %) far outside it.
    gap = (w * (cash + shares * price) - shares * price) / price
    lo, hi = sorted((0.0, 2.0 * gap))
    assert h(lo) <= 0.0 <= h(hi), "bracket does not hold the root"
    for _ in range(5_000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if h(mid) < 0.0 else (lo, mid)
    return lo if abs(h(lo)) <= abs(h(hi)) else hi


def nonflat_ledger_equity(frame, start, positions, actions, fee_bps=FEE_BPS, slippage_bps=SLIPPAGE_BPS,
                          impact="none", impact_y=0.7, ac_permanent=0.4, ac_temporary=0.5, capital=1e6,
                          spread="none", participation=None, remainder="cancel", cap_volume="bar", fill_at="open"):
    """(equity after each action, reason of each order) under spread / impact / cap; daily bars, no borrow; fills
    at the next open (``fill_at="close"``: the next close)."""
    fee, slippage = fee_bps / 10_000.0, slippage_bps / 10_000.0
    opens, highs, lows, closes, volumes = ([float(x) for x in frame[c]] for c in
                                           (fill_at, "high", "low", "close", "volume"))
    cash, shares, level, pending = 1.0, 0.0, positions.index(0.0), False
    equities, reasons = [], []
    t = start
    for action in actions:
        price = opens[t + 1]
        half = 0.0
        if spread == "corwin_schultz":
            half = ledger_cs_spread(highs, lows, closes, t) / 2
        elif spread == "abdi_ranaldo":
            half = ledger_ar_spread(highs, lows, closes, t) / 2
        sigma, adv = ledger_sigma(closes, t), ledger_adv(closes, volumes, t)
        rate = functools.partial(ledger_rate, price=price, base=slippage + half, sigma=sigma, adv=adv,
                                 capital=capital, impact=impact, impact_y=impact_y, ac_permanent=ac_permanent,
                                 ac_temporary=ac_temporary)
        if action != level or pending:
            w = positions[action]
            q = -shares if w == 0 else bisect_fill(cash, shares, price, w, fee, rate)
            capped = False
            if participation is not None:
                if cap_volume == "bar":
                    max_shares = participation * volumes[t + 1] / capital
                else:
                    max_shares = participation * adv / capital / price
                if abs(q) > max_shares:
                    q, capped = math.copysign(max_shares, q), True
            fill = price * (1.0 + rate(q)) if q > 0 else price * (1.0 - rate(q))
            cash = cash - q * fill - fee * abs(q * fill)
            shares += q
            level = action
            pending = capped and remainder == "carry"
            reasons.append("zero_volume" if capped and q == 0 else "capped" if capped else "filled")
        t += 1
        equities.append(cash + shares * closes[t])
    return equities, reasons


def nonflat_ledger(frame, positions, actions, params) -> np.ndarray:
    return np.array([nonflat_ledger_equity(frame, s, positions, actions[:, i].tolist(), **params)[0]
                     for i, s in enumerate(STARTS)]).T


def nonflat_costs(params) -> CostModel:
    return CostModel(fee_bps=FEE_BPS, slippage_bps=SLIPPAGE_BPS, spread_window=WINDOW, vol_window=WINDOW,
                     adv_window=WINDOW, **params)


@pytest.mark.parametrize("name", list(NONFLAT))
def test_nonflat_ledger_matches_the_vectorbt_replay(frame, name):
    params = NONFLAT[name]
    positions = (-1.0, 0.0, 0.5, 1.0, 2.0)
    actions = random_actions(len(positions), seed=31)
    expected = nonflat_ledger(frame, positions, actions, params)
    costs = nonflat_costs(params)
    flat = ledger(frame, positions, actions, borrow_bps=0.0)
    for i, start in enumerate(STARTS):
        replayed = bt.equity(bt.replay(frame, start, np.asarray(positions)[actions[:, i]], costs)).to_numpy()[1:]
        assert max_rel(replayed, expected[:, i]) < TOLERANCE
    # the model costs something the flat one does not
    assert max_rel(expected, flat) > 1e-4


@pytest.mark.parametrize("name", list(NONFLAT))
def test_nonflat_ledger_matches_both_envs(frame, market, name):
    params = NONFLAT[name]
    positions = (-1.0, 0.0, 0.5, 1.0, 2.0)
    actions = random_actions(len(positions), seed=41)
    expected = nonflat_ledger(frame, positions, actions, params)
    costs = nonflat_costs(params)
    torch_eq = torch_equity(market, positions, actions, costs)
    numpy_eq = numpy_equity(market, positions, actions, costs)
    error = max(max_rel(torch_eq, expected), max_rel(numpy_eq, expected))
    print(f"max relative equity error, envs vs independent ledger ({name}): {error:.2e}")
    assert error < TOLERANCE
    if params.get("participation"):  # the cap bound on some orders, and the env's fill record says so
        reasons = nonflat_ledger_equity(frame, STARTS[0], positions, actions[:, 0].tolist(), **params)[1]
        assert "capped" in reasons


# ================================================================================= fills at the next close
@pytest.fixture(scope="module")
def close_market(market) -> MarketArrays:
    return dataclasses.replace(market, fill_price="next_close")


@pytest.mark.parametrize("positions", [(-1.0, 0.0, 1.0), (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)],
                         ids=["short-flat-long", "six-levels"])
def test_next_close_ledger_matches_both_envs_and_the_replay(frame, close_market, market, positions):
    actions = random_actions(len(positions), seed=51)
    expected = ledger(frame, positions, actions, fill_at="close")
    torch_eq = torch_equity(close_market, positions, actions)
    numpy_eq = numpy_equity(close_market, positions, actions)
    error = max(max_rel(torch_eq, expected), max_rel(numpy_eq, expected))
    for i, start in enumerate(STARTS):
        replayed = bt.equity(bt.replay(frame, start, np.asarray(positions)[actions[:, i]], COSTS,
                                       fill_price="next_close")).to_numpy()[1:]
        error = max(error, max_rel(replayed, expected[:, i]))
    print(f"max relative equity error, next-close envs and replay vs independent ledger {positions}: {error:.2e}")
    assert error < TOLERANCE
    # the ledger tells the fill prices apart, and the borrow on the shares held over the bar from the filled ones
    assert max_rel(ledger(frame, positions, actions), expected) > 1e-3
    assert max_rel(torch_equity(market, positions, actions), expected) > 1e-3
    assert max_rel(ledger(frame, positions, actions, fill_at="close", borrow_on_filled=True), torch_eq) > 1e-4
    assert max_rel(ledger(frame, positions, actions, fill_at="close", borrow_bps=0.0), torch_eq) > 1e-4


def _same_bar_close_market(market: MarketArrays) -> MarketArrays:
    """A deliberately wrong market: "next_close" fills that read close[t], the price the agent has just seen."""
    return dataclasses.replace(market, open=np.r_[market.close[0], market.close[:-1]])


def test_next_close_ledger_catches_a_same_bar_fill(frame, market):
    positions = (-1.0, 0.0, 1.0)
    actions = random_actions(len(positions), seed=52)
    expected = ledger(frame, positions, actions, fill_at="close", borrow_bps=0.0)
    same_bar = torch_equity(_same_bar_close_market(market), positions, actions, CostModel(FEE_BPS, SLIPPAGE_BPS))
    assert max_rel(same_bar, expected) > 1e-2


@pytest.mark.parametrize("name", ["sqrt-impact", "abdi-ranaldo+sqrt", "cap-carry", "cap-forecast-carry"])
def test_next_close_nonflat_ledger_matches_both_envs_and_the_replay(frame, close_market, name):
    params = NONFLAT[name]
    positions = (-1.0, 0.0, 0.5, 1.0, 2.0)
    actions = random_actions(len(positions), seed=61)
    expected = np.array([nonflat_ledger_equity(frame, s, positions, actions[:, i].tolist(), fill_at="close",
                                               **params)[0] for i, s in enumerate(STARTS)]).T
    costs = nonflat_costs(params)
    error = max(max_rel(torch_equity(close_market, positions, actions, costs), expected),
                max_rel(numpy_equity(close_market, positions, actions, costs), expected))
    for i, start in enumerate(STARTS):
        replayed = bt.equity(bt.replay(frame, start, np.asarray(positions)[actions[:, i]], costs,
                                       fill_price="next_close")).to_numpy()[1:]
        error = max(error, max_rel(replayed, expected[:, i]))
    print(f"max relative equity error, next-close envs and replay vs independent ledger ({name}): {error:.2e}")
    assert error < TOLERANCE
    assert max_rel(nonflat_ledger(frame, positions, actions, params), expected) > 1e-3  # the open fills differ
