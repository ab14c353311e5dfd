import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import vectorbt as vbt

from sentio_lab.data import load_market
from sentio_lab.env import MarketArrays, NumpyTradingEnv, TradingEnv
from sentio_lab.env.costs import CostModel
from sentio_lab.evaluation import backtest as bt
from sentio_lab.evaluation.metrics import number_of_trades

COSTS = CostModel(fee_bps=10, slippage_bps=5)
STEPS = 300
STARTS = [40, 1200, 2600, 4600]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_market("nasdaq").frame


@pytest.fixture(scope="module")
def market(frame) -> MarketArrays:
    log_returns = np.log(frame["close"]).diff().fillna(0.0).to_numpy()[:, None]
    return MarketArrays.from_frame(frame, log_returns, first_valid=1)


def run_env(market, positions, seed, costs=COSTS):
    """Random actions in the batched env from fixed starts; return (weights, equities, dones), each (L, N)."""
    env = TradingEnv(
        market,
        num_envs=len(STARTS),
        window=8,
        episode_length=STEPS,
        positions=positions,
        costs=costs,
        seed=seed,
    )
    env.reset(starts=STARTS)
    gen = torch.Generator().manual_seed(seed)
    actions, equities, dones = [], [], []
    for _ in range(STEPS):
        action = torch.randint(0, len(positions), (len(STARTS),), generator=gen)
        _, _, _, _, info = env.step(action)
        actions.append(action.numpy().copy())
        equities.append(info["equity"].numpy().copy())  # pre-reset equity on the last step
        dones.append(info["done"].numpy().copy())
    weights = np.asarray(positions)[np.array(actions)]
    return weights, np.array(equities), np.array(dones)


def max_rel_error(frame, weights, equities, costs=COSTS):
    worst = 0.0
    for i, start in enumerate(STARTS):
        replayed = bt.equity(bt.replay(frame, start, weights[:, i], costs))
        assert len(replayed) == STEPS + 1
        assert replayed.index[0] == frame.index[start] and replayed.index[-1] == frame.index[start + STEPS]
        assert replayed.iloc[0] == pytest.approx(1.0, abs=1e-15)
        worst = max(worst, float(np.max(np.abs(replayed.to_numpy()[1:] / equities[:, i] - 1.0))))
    return worst


def test_replay_reproduces_the_batched_env_long_short(frame, market):
    weights, equities, dones = run_env(market, (-1.0, 0.0, 0.5, 1.0), seed=7)
    # every episode ran its full length (no ruin): the last step is the only done one
    assert not dones[:-1].any() and dones[-1].all()
    error = max_rel_error(frame, weights, equities)
    print(f"max relative equity error, env vs vectorbt (long/short): {error:.3e}")
    assert error < 1e-9
    # the random paths switch short -> full long; sized on post-trade equity, that never borrows, so the
    # replay is a plain one-asset portfolio with cash >= 0 throughout
    switches = ((weights[:-1] == -1.0) & (weights[1:] == 1.0)).any(axis=0)
    assert switches.all()
    portfolio = bt.replay(frame, STARTS[0], weights[:, 0], COSTS)
    assert list(portfolio.wrapper.columns) == [bt.ASSET_COLUMN]
    assert float(portfolio.cash().min()) >= -1e-12


def test_leverage_borrows_on_the_first_move_above_one(frame):
    weights = np.zeros(40)
    weights[10:20] = 2.0
    weights[25:] = 1.0
    start = 4000
    portfolio = bt.replay(frame, start, weights, COSTS)
    assert list(portfolio.wrapper.columns) == [bt.LOAN_COLUMN, bt.ASSET_COLUMN]
    loans = portfolio.orders.records_readable.query("Column == @bt.LOAN_COLUMN")
    # decided at row 10, filled at the open of the next bar (replay row 11): borrowed then, not before
    assert loans["Timestamp"].iloc[0] == frame.index[start + 11]


def test_replay_reproduces_the_env_long_only_without_a_loan(frame, market):
    weights, equities, _ = run_env(market, (0.0, 0.5, 1.0), seed=11)
    error = max_rel_error(frame, weights, equities)
    print(f"max relative equity error, env vs vectorbt (long only): {error:.3e}")
    assert error < 1e-9
    portfolio = bt.replay(frame, STARTS[1], weights[:, 1], COSTS)
    assert portfolio.wrapper.ndim == 1  # a plain single-asset portfolio
    orders = portfolio.orders.records_readable
    assert len(orders) == number_of_trades(weights[:, 1])
    # fills happen at the next open, costs as the env charges them
    fills = orders.set_index("Timestamp")
    opens = frame["open"].reindex(fills.index)
    buys = fills["Side"] == "Buy"
    np.testing.assert_allclose(fills["Price"][buys], opens[buys] * (1 + COSTS.slippage), rtol=1e-15)
    np.testing.assert_allclose(fills["Price"][~buys], opens[~buys] * (1 - COSTS.slippage), rtol=1e-15)
    np.testing.assert_allclose(fills["Fees"], fills["Size"] * fills["Price"] * COSTS.fee, rtol=1e-12)


@pytest.mark.parametrize("costs", [COSTS, CostModel(fee_bps=10, slippage_bps=5, borrow_bps=400)],
                         ids=["no-borrow", "borrow"])
@pytest.mark.parametrize("positions", [(-1.0, 0.0, 1.0), (-0.5, 0.0, 2.0)])
def test_replay_matches_the_numpy_reference_env(frame, market, positions, costs):
    # (-0.5, 0, 2) is leveraged: the env borrows on every move to 2, the replay's loan covers it
    env = NumpyTradingEnv(market, window=8, episode_length=50, positions=positions, costs=costs)
    env.reset(options={"start": 3000})
    actions = np.random.default_rng(5).integers(0, 3, 50)
    equities = [env.step(a)[4]["equity"] for a in actions]
    replayed = bt.equity(bt.replay(frame, 3000, np.asarray(positions)[actions], costs))
    np.testing.assert_allclose(replayed.to_numpy()[1:], equities, rtol=1e-12)


def test_buy_and_hold_matches_its_closed_form(frame):
    start, steps = 2000, 120
    curve = bt.equity(bt.buy_and_hold(frame, start, steps, COSTS))
    shares = 1.0 / (frame["open"].iloc[start + 1] * (1 + COSTS.slippage) * (1 + COSTS.fee))
    expected = shares * frame["close"].iloc[start + 1 : start + steps + 1].to_numpy()
    assert curve.iloc[0] == 1.0
    np.testing.assert_allclose(curve.to_numpy()[1:], expected, rtol=1e-12)
    free = bt.equity(bt.buy_and_hold(frame, start, steps, CostModel(0, 0)))
    assert free.iloc[-1] == pytest.approx(frame["close"].iloc[start + steps] / frame["open"].iloc[start + 1])
    assert (free.to_numpy()[1:] > curve.to_numpy()[1:]).all()  # costs only ever cost


def test_a_changed_future_bar_does_not_change_earlier_equity(frame):
    start, steps, changed = 1500, 200, 100  # bar start + 100 changes: replay row 100
    weights = np.random.default_rng(2).choice([-1.0, 0.0, 0.5, 1.0], steps)
    weights[changed - 1] = 1.0  # long on the changed bar: its equity must move
    before = bt.equity(bt.replay(frame, start, weights, COSTS)).to_numpy()
    sizes_before = bt.order_sizes(frame, start, weights, COSTS).to_numpy()
    altered = frame.copy()
    row = altered.index[start + changed]
    altered.loc[row, ["open", "high", "low", "close"]] *= np.array([1.3, 1.3, 1.3, 1.3])
    after = bt.equity(bt.replay(altered, start, weights, COSTS)).to_numpy()
    sizes_after = bt.order_sizes(altered, start, weights, COSTS).to_numpy()
    np.testing.assert_array_equal(after[:changed], before[:changed])
    np.testing.assert_array_equal(sizes_after[:changed], sizes_before[:changed])
    assert after[changed] != before[changed]


def test_order_sizes_rows_and_holds(frame):
    weights = np.array([0.0, 1.0, 1.0, 0.5, 0.5, -1.0, -1.0, 0.0])
    sizes = bt.order_sizes(frame, 100, weights, COSTS)
    assert sizes.index.equals(frame.index[100:109])
    assert sizes.iloc[0] == 0.0  # nothing before the first decision
    traded = sizes.to_numpy()[1:] != 0
    np.testing.assert_array_equal(traded, np.diff(weights, prepend=0.0) != 0)
    assert sizes.iloc[2] > 0 and sizes.iloc[4] < 0 and sizes.iloc[6] < 0 and sizes.iloc[8] > 0
    assert sizes.sum() == pytest.approx(0.0, abs=1e-15)  # flat again at the end


def test_replay_accepts_weights_on_the_decision_bars_and_a_freq(frame):
    weights = pd.Series([1.0, 0.0, 1.0], index=frame.index[10:13])
    portfolio = bt.replay(frame, 10, weights, COSTS, freq="1D")
    assert portfolio.wrapper.freq == pd.Timedelta("1D")
    assert bt.equity(portfolio).name == "equity"
    hourly = bt.replay(frame, 10, weights.to_numpy(), COSTS, freq=pd.Timedelta(hours=1))
    assert hourly.wrapper.freq == pd.Timedelta(hours=1)


@pytest.mark.parametrize(
    ("start", "weights", "error", "match"),
    [
        (5020, np.ones(20), ValueError, "outside the frame"),
        (-1, np.ones(5), ValueError, "outside the frame"),
        (10, np.array([1.0, np.nan, 0.0]), ValueError, r"NaN or inf at position\(s\) \[1\]"),
        (10, np.array([0.5, np.inf]), ValueError, "NaN or inf"),
        (10, np.ones((3, 2)), ValueError, "1-D"),
        (10, np.array([]), ValueError, "empty"),
        (10, ["long", "short"], TypeError, "not convertible"),
        (10, pd.DataFrame({"w": [1.0, 0.0]}), TypeError, "DataFrame"),
        (10.0, np.ones(3), TypeError, "integer"),
        (True, np.ones(3), TypeError, "integer"),
    ],
)
def test_replay_rejects_bad_weights_and_ranges(frame, start, weights, error, match):
    with pytest.raises(error, match=match):
        bt.replay(frame, start, weights, COSTS)


def test_replay_rejects_misaligned_series_bad_frames_and_costs(frame):
    with pytest.raises(ValueError, match="decision bars"):
        bt.replay(frame, 10, pd.Series([1.0, 0.0], index=frame.index[11:13]), COSTS)
    with pytest.raises(TypeError, match="CostModel"):
        bt.replay(frame, 10, [1.0], {"fee_bps": 1})
    with pytest.raises(ValueError, match="missing column"):
        bt.replay(frame.drop(columns="open"), 10, [1.0], COSTS)
    with pytest.raises(TypeError, match="DatetimeIndex"):
        bt.replay(frame.reset_index(drop=True), 10, [1.0], COSTS)
    with pytest.raises(TypeError, match="DataFrame"):
        bt.order_sizes(frame["close"], 10, [1.0], COSTS)
    broken = frame.copy()
    broken.iloc[12, broken.columns.get_loc("open")] = 0.0
    with pytest.raises(ValueError, match="non-positive or non-finite"):
        bt.replay(broken, 10, [1.0, 1.0, 1.0], COSTS)
    bt.replay(broken, 20, [1.0], COSTS)  # outside the replay range it does not matter


def test_buy_and_hold_and_equity_reject_bad_input(frame):
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            bt.buy_and_hold(frame, 10, steps, COSTS)
    with pytest.raises(TypeError, match="Portfolio"):
        bt.equity(frame["close"])
    two = vbt.Portfolio.from_orders(frame[["open", "close"]].iloc[:5], size=1.0, init_cash=1e4, freq="1D")
    with pytest.raises(ValueError, match="2 columns"):
        bt.equity(two)
    one = vbt.Portfolio.from_orders(frame[["close"]].iloc[:5], size=0.0, init_cash=1.0, freq="1D")
    assert (bt.equity(one) == 1.0).all()


# ----------------------------------------------------------------------------------------- short borrow
BORROW_COSTS = CostModel(fee_bps=10, slippage_bps=5, borrow_bps=400)


@pytest.mark.parametrize("positions", [(-1.0, 0.0, 0.5, 1.0), (-1.0, -0.5, 0.0, 2.0)], ids=["long-short", "leveraged"])
def test_replay_reproduces_the_batched_env_with_borrow(frame, market, positions):
    weights, equities, dones = run_env(market, positions, seed=3, costs=BORROW_COSTS)
    assert not dones[:-1].any()
    error = max_rel_error(frame, weights, equities, BORROW_COSTS)
    print(f"max relative equity error, env vs vectorbt with borrow {positions}: {error:.3e}")
    assert error < 1e-9
    # the check is sensitive to the borrow: a replay that ignored it would be off by far more
    assert max_rel_error(frame, weights, equities, COSTS) > 1e-5
    portfolio = bt.replay(frame, STARTS[0], weights[:, 0], BORROW_COSTS)
    assert list(portfolio.wrapper.columns)[-2:] == [bt.ASSET_COLUMN, bt.BORROW_COLUMN]


def test_borrow_orders_sit_on_the_short_rows_and_carry_the_charge(frame):
    start = 2000
    weights = np.r_[np.zeros(5), -np.ones(10), np.zeros(5), -0.5 * np.ones(5), np.ones(5)]
    portfolio = bt.replay(frame, start, weights, BORROW_COSTS)
    orders = portfolio.orders.records_readable
    charges = orders[orders["Column"] == bt.BORROW_COLUMN].set_index("Timestamp")
    # short from the fill after decision 5 to the fill after decision 14, and after 20 to 24: rows 6..15, 21..25
    rows = np.r_[6:16, 21:26]
    assert list(charges.index) == list(frame.index[start + rows])
    # each charge: rate * |shares| * close * years since the previous close, the shares after the row's fill
    shares = np.cumsum(bt.order_sizes(frame, start, weights, BORROW_COSTS).to_numpy())
    years = np.diff(frame.index[start : start + len(weights) + 1].to_numpy()).astype("timedelta64[s]").astype(float)
    years = np.r_[0.0, years / (365 * 86_400)]
    close = frame["close"].to_numpy()[start : start + len(weights) + 1]
    expected = BORROW_COSTS.borrow_rate * -shares[rows] * close[rows] * years[rows]
    np.testing.assert_allclose(charges["Fees"].to_numpy(), expected, rtol=1e-12)
    assert (charges["Size"] == 1.0).all() and (charges["Price"] == 1e-300).all()
    # over a weekend the charge covers three days of the same position
    gaps = np.round(years[rows] * 365).astype(int)
    assert 3 in gaps and 1 in gaps
    # cash falls by the charges on those rows and the group's value is the env's equity: nothing else moved
    free = bt.equity(bt.replay(frame, start, weights, COSTS)).to_numpy()
    paid = bt.equity(portfolio).to_numpy()
    np.testing.assert_array_equal(paid[:6], free[:6])  # identical before the first charge (row 6)
    assert (paid[6:] < free[6:]).all()


def test_long_only_paths_pay_no_borrow_and_keep_a_plain_portfolio(frame):
    weights = np.random.default_rng(8).choice([0.0, 0.5, 1.0], 200)
    portfolio = bt.replay(frame, 1000, weights, BORROW_COSTS)
    assert portfolio.wrapper.ndim == 1
    free = bt.equity(bt.replay(frame, 1000, weights, COSTS))
    pd.testing.assert_series_equal(bt.equity(portfolio), free)


def _rally(n: int = 120) -> pd.DataFrame:
    """A 10x rally after 20 flat bars, opening 0.1 % above the previous close (business days)."""
    close = 100.0 * np.exp(np.r_[np.zeros(20), np.linspace(0.0, np.log(10.0), n - 20)])
    opens = np.r_[close[0], close[:-1]] * 1.001
    return pd.DataFrame(
        {"open": opens, "close": close, "high": np.maximum(opens, close), "low": np.minimum(opens, close),
         "volume": 1.0},
        index=pd.bdate_range("2021-01-04", periods=n),
    )


def test_replay_with_borrow_through_a_loss_beyond_equity():
    """A short into a 10x rally with a 1000 %-a-year borrow: equity goes negative and the borrow needs the loan.

    The envs stop at ruin, so the expected curve is worked out by hand: one short sale at the first open
    (w = -1 of post-trade equity), then cash pays rate * |shares| * close * days / 365 at every close.
    """
    frame = _rally()
    costs = CostModel(fee_bps=10, slippage_bps=5, borrow_bps=99_999)
    start, steps = 5, len(frame) - 6
    s, f, rate = costs.slippage, costs.fee, costs.borrow_rate
    o1 = frame["open"].iloc[start + 1]
    short = 1.0 / (o1 * (2 - (1 - s) * (1 - f)))
    cash = 1.0 + short * o1 * (1 - s) * (1 - f)
    expected, cash_path = [], []
    for k in range(start + 1, start + steps + 1):
        days = (frame.index[k] - frame.index[k - 1]).days
        cash -= rate * short * frame["close"].iloc[k] * days / 365
        expected.append(cash - short * frame["close"].iloc[k])
        cash_path.append(cash)
    assert min(expected) < -1.0 and min(cash_path) < 0  # the borrow ate all the cash
    portfolio = bt.replay(frame, start, np.full(steps, -1.0), costs)
    assert list(portfolio.wrapper.columns) == [bt.LOAN_COLUMN, bt.ASSET_COLUMN, bt.BORROW_COLUMN]
    np.testing.assert_allclose(bt.equity(portfolio).to_numpy()[1:], expected, rtol=1e-10)


def test_replay_refuses_when_vectorbt_cannot_book_a_charge(monkeypatch):
    frame = _rally()
    monkeypatch.setattr(bt, "_loan_orders", lambda cash: np.zeros(len(cash)))  # no loan: cash runs out
    with pytest.raises(RuntimeError, match="booked .* of .* short borrow charges"):
        bt.replay(frame, 5, np.full(len(frame) - 6, -1.0), CostModel(0, 0, borrow_bps=99_999))


# ============================================================== non-flat cost models (issue 10)
from sentio_lab.env import fill_arrays  # noqa: E402

MODELS = {
    "corwin-schultz": CostModel(fee_bps=10, slippage_bps=5, spread="corwin_schultz"),
    "abdi-ranaldo": CostModel(fee_bps=10, slippage_bps=5, spread="abdi_ranaldo"),
    "sqrt": CostModel(fee_bps=10, slippage_bps=5, impact="sqrt", capital=1e10),
    "almgren-chriss": CostModel(fee_bps=10, slippage_bps=5, impact="almgren_chriss", capital=1e10),
    "sqrt-user-adv": CostModel(fee_bps=10, slippage_bps=5, impact="sqrt", capital=1e8, adv=2e9),
    "cap-carry": CostModel(fee_bps=10, slippage_bps=5, impact="sqrt", capital=1e10, participation=3e-4,
                           remainder="carry"),
    "cap-cancel-forecast": CostModel(fee_bps=10, slippage_bps=5, capital=1e10, participation=1e-4,
                                     cap_volume="forecast"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_replay_reproduces_the_env_under_every_cost_model(frame, market, name):
    costs = MODELS[name]
    weights, equities, _ = run_env(market, (-1.0, 0.0, 0.5, 1.0, 2.0), seed=3, costs=costs)
    error = max_rel_error(frame, weights, equities, costs)
    print(f"max relative equity error, env vs vectorbt ({name}): {error:.3e}")
    assert error < 1e-9
    flat_weights, flat_equities, _ = run_env(market, (-1.0, 0.0, 0.5, 1.0, 2.0), seed=3, costs=COSTS)
    assert np.array_equal(weights, flat_weights) and np.max(np.abs(equities / flat_equities - 1)) > 1e-4


def _numpy_fills(market, costs, actions, start=STARTS[1], positions=(0.0, 1.0)):
    env = NumpyTradingEnv(market, window=8, episode_length=len(actions) + 1, positions=positions, costs=costs,
                          ruin_fraction=0.0)
    env.reset(options={"start": start})
    records = []
    for a in actions:
        _, _, _, _, info = env.step(int(a))
        records.append({**info["fill"], "shares": env.shares, "t": env.t})
    return records


def test_participation_cap_holds_and_carried_remainders_fill_later(frame, market):
    volume = frame["volume"].to_numpy()
    capital, share = 1e10, 2e-4
    actions = [1] * 40 + [0] * 40
    carry = _numpy_fills(market, CostModel(capital=capital, participation=share, remainder="carry"), actions)
    cancel = _numpy_fills(market, CostModel(capital=capital, participation=share, remainder="cancel"), actions)
    for record in carry + cancel:  # never more than the share of the fill bar's volume
        assert abs(record["delta"]) * capital <= share * volume[record["t"]] * (1 + 1e-12)
    assert carry[0]["reason"] == cancel[0]["reason"] == "capped"
    # cancel: the remainder is dropped, holding the level sends no new order
    assert cancel[1]["reason"] == "hold" and cancel[1]["shares"] == cancel[0]["shares"]
    # carry: it keeps buying on the next bars until the target is reached, then holds
    filled = [i for i, r in enumerate(carry[:40]) if r["reason"] == "filled"]
    assert filled and all(r["reason"] == "capped" for r in carry[: filled[0]])
    assert all(r["reason"] == "hold" for r in carry[filled[0] + 1 : 40])
    assert carry[filled[0]]["shares"] > 10 * cancel[filled[0]]["shares"]
    # the same in the batched env: equal shares, and the fill record shows the cap bound
    env = TradingEnv(market, num_envs=1, window=8, episode_length=81, positions=(0.0, 1.0),
                     costs=CostModel(capital=capital, participation=share, remainder="carry"), ruin_fraction=0.0)
    env.reset(starts=[STARTS[1]])
    for i, a in enumerate(actions[:20]):
        _, _, _, _, info = env.step(torch.tensor([a]))
        assert float(env.shares[0]) == pytest.approx(carry[i]["shares"], rel=1e-12)
        assert bool(info["fill"]["capped"][0]) == (carry[i]["reason"] == "capped")
    state = env.state_dict()
    assert "pending" in state
    env.load_state_dict(state)


def test_zero_volume_bar_fills_nothing_and_says_why(frame):
    frame = frame.copy()
    frame.iloc[101, frame.columns.get_loc("volume")] = 0.0  # the fill bar of the decision at 100
    log_returns = np.log(frame["close"]).diff().fillna(0.0).to_numpy()[:, None]
    market = MarketArrays.from_frame(frame, log_returns, first_valid=1)
    records = _numpy_fills(market, CostModel(capital=1e6, participation=0.01), [1, 1], start=100)
    assert records[0]["reason"] == "zero_volume" and records[0]["delta"] == 0.0
    assert records[1]["reason"] == "hold"  # cancelled: the next bar sends nothing
    fills = bt.fills(frame, 100, [1.0, 1.0], CostModel(capital=1e6, participation=0.01, remainder="carry"))
    assert fills["reason"].tolist() == ["zero_volume", "filled"]
    assert np.isnan(fills["shortfall_arrival_bps"].iloc[0]) and fills["filled"].iloc[0] == 0.0


def test_fill_records_and_implementation_shortfall(frame):
    costs = CostModel(fee_bps=10, slippage_bps=5, impact="sqrt", capital=1e10)
    weights = np.array([1.0, 1.0, 0.0, -1.0, -1.0])
    records = bt.fills(frame, 500, weights, costs)
    assert len(records) == 3 and (records["reason"] == "filled").all()
    opens, closes = frame["open"].to_numpy(), frame["close"].to_numpy()
    first = records.iloc[0]
    assert first["decision_price"] == closes[500] and first["arrival_price"] == opens[501]
    assert first["executed_price"] == pytest.approx(opens[501] * (1 + first["rate"]), rel=1e-15)
    # against the arrival price: the concession plus the fee, in bps; against the decision: plus the overnight move
    assert first["shortfall_arrival_bps"] == pytest.approx(((1 + first["rate"]) * 1.001 - 1) * 1e4, rel=1e-9)
    overnight = (opens[501] - closes[500]) / closes[500]
    assert first["shortfall_decision_bps"] == pytest.approx(
        ((1 + overnight) * (1 + first["rate"]) * 1.001 - 1) * 1e4, rel=1e-9)
    assert (records["rate"] > 5e-4).all()  # impact on top of the 5 bps slippage
    paid = bt.fill_costs_paid(frame, 500, weights, costs)
    assert paid.sum() == pytest.approx(records["cost"].sum() / costs.capital, rel=1e-12)
    flat = bt.fills(frame, 500, weights, COSTS)
    assert len(flat) == 3 and (flat["rate"] == COSTS.slippage).all()


def test_fill_arrays_are_causal_except_the_fill_bars_own_cap(frame):
    """Half-spread and impact at decision t read bars <= t; the cap of the fill at t + 1 reads bar t + 1's volume."""
    costs = CostModel(spread="corwin_schultz", impact="sqrt", participation=0.01, capital=1e9)
    log_returns = np.log(frame["close"]).diff().fillna(0.0).to_numpy()[:, None]
    base = fill_arrays(MarketArrays.from_frame(frame, log_returns, first_valid=1), costs, 30)
    changed = frame.copy()
    t = 700
    changed.iloc[t + 1 :, :] = changed.iloc[t + 1 :, :].to_numpy() * 1.1
    after = fill_arrays(MarketArrays.from_frame(changed, log_returns, first_valid=1), costs, 30)
    for name, a, b in zip(("half", "eta"), base[:2], after[:2], strict=True):
        np.testing.assert_array_equal(a[: t + 1], b[: t + 1], err_msg=name)
    np.testing.assert_array_equal(base[2][:t], after[2][:t])
    assert base[2][t] != after[2][t]  # the environment's execution on bar t + 1, never the agent's observation
    with pytest.raises(ValueError, match="undefined at decision bar 0"):
        fill_arrays(MarketArrays.from_frame(frame, log_returns, first_valid=1), costs, 0)
    assert fill_arrays(MarketArrays.from_frame(frame, log_returns, first_valid=1), COSTS) is None


def test_tick_volume_needs_a_user_adv():
    from sentio_lab.env.market import volume_kind

    data = load_market("eurusd_1h", end="2017-03-31")
    returns = np.log(data.frame["close"]).diff().fillna(0.0).to_numpy()[:, None]
    market = MarketArrays.from_frame(data.frame, returns, first_valid=1, volume_kind=volume_kind(data))
    assert market.volume_kind == "ticks" and np.median(market.bars_per_day) == 24.0
    with pytest.raises(ValueError, match="tick volume.*CostModel.adv"):
        NumpyTradingEnv(market, window=8, episode_length=16, costs=CostModel(impact="sqrt"))
    env = NumpyTradingEnv(market, window=8, episode_length=16, costs=CostModel(impact="sqrt", adv=5e10, capital=1e9))
    env.reset(options={"start": 200})
    _, _, _, _, info = env.step(2)
    assert info["fill"]["reason"] == "filled" and info["fill"]["rate"] > CostModel().slippage
    NumpyTradingEnv(market, window=8, episode_length=16, costs=CostModel(spread="corwin_schultz"))  # no volume read


def test_market_arrays_check_the_cost_columns(market):
    with pytest.raises(ValueError, match="volume must be"):
        MarketArrays(open=market.open, close=market.close, features=market.features, volume=market.close[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nonflat_env_on_cuda_matches_cpu(market):
    costs = MODELS["cap-carry"]
    equities = []
    for device in ("cpu", "cuda"):
        env = TradingEnv(market, num_envs=len(STARTS), window=8, episode_length=STEPS, costs=costs, device=device)
        env.reset(starts=STARTS)
        gen = torch.Generator().manual_seed(0)
        curve = []
        for _ in range(50):
            _, _, _, _, info = env.step(torch.randint(0, 3, (len(STARTS),), generator=gen).to(device))
            curve.append(info["equity"].cpu().numpy())
        equities.append(np.array(curve))
    np.testing.assert_allclose(equities[1], equities[0], rtol=1e-12)


# ------------------------------------------------------------------------------------ fills at the next close
def _next_close_error(frame, market, positions, costs, seed=3):
    weights, equities, _ = run_env(dataclasses.replace(market, fill_price="next_close"), positions, seed, costs)
    worst = 0.0
    for i, start in enumerate(STARTS):
        replayed = bt.equity(bt.replay(frame, start, weights[:, i], costs, fill_price="next_close"))
        worst = max(worst, float(np.max(np.abs(replayed.to_numpy()[1:] / equities[:, i] - 1.0))))
    return worst, weights, equities


@pytest.mark.parametrize("name", ["flat", "borrow", *MODELS])
def test_next_close_replay_reproduces_the_env(frame, market, name):
    costs = {"flat": COSTS, "borrow": CostModel(fee_bps=10, slippage_bps=5, borrow_bps=400)}.get(name) or MODELS[name]
    positions = (-1.0, 0.0, 0.5, 1.0, 2.0)
    error, weights, equities = _next_close_error(frame, market, positions, costs)
    print(f"max relative equity error, next-close env vs vectorbt ({name}): {error:.3e}")
    assert error < 1e-9
    # the same weights filled at the next open make another curve: the fill price reached both
    _, open_equities, _ = run_env(market, positions, 3, costs)
    assert np.max(np.abs(open_equities / equities - 1)) > 1e-3
    opened = bt.equity(bt.replay(frame, STARTS[0], weights[:, 0], costs)).to_numpy()[1:]
    assert np.max(np.abs(opened / equities[:, 0] - 1)) > 1e-3


def test_next_close_fill_records_arrive_at_the_fill_bars_close(frame):
    costs = CostModel(fee_bps=10, slippage_bps=5, impact="sqrt", capital=1e10)
    weights = np.array([1.0, 1.0, 0.0])
    records = bt.fills(frame, 500, weights, costs, fill_price="next_close")
    closes = frame["close"].to_numpy()
    assert records["arrival_price"].tolist() == [closes[501], closes[503]]
    assert records["fill_time"].tolist() == [frame.index[501], frame.index[503]]
    first = records.iloc[0]
    move = (closes[501] - closes[500]) / closes[500]
    assert first["shortfall_decision_bps"] == pytest.approx(((1 + move) * (1 + first["rate"]) * 1.001 - 1) * 1e4,
                                                            rel=1e-9)
    sizes = bt.order_sizes(frame, 500, weights, COSTS, fill_price="next_close")
    assert sizes.iloc[1] == pytest.approx(1.0 / (closes[501] * (1 + COSTS.slippage) * (1 + COSTS.fee)), rel=1e-14)
    held = bt.equity(bt.buy_and_hold(frame, 500, 3, COSTS, fill_price="next_close"))
    assert held.iloc[1] == pytest.approx(1 / ((1 + COSTS.slippage) * (1 + COSTS.fee)), rel=1e-14)
    assert held.iloc[3] == pytest.approx(held.iloc[1] * closes[503] / closes[501], rel=1e-12)


def test_next_close_replay_needs_no_opens(frame):
    close_only = frame.assign(open=np.nan)
    weights = np.array([1.0, -1.0, 0.0, 1.0])
    with_opens = bt.equity(bt.replay(frame, 700, weights, COSTS, fill_price="next_close"))
    pd.testing.assert_series_equal(bt.equity(bt.replay(close_only, 700, weights, COSTS, fill_price="next_close")),
                                   with_opens)
    with pytest.raises(ValueError, match="non-finite open/close"):
        bt.replay(close_only, 700, weights, COSTS)
    with pytest.raises(ValueError, match="fill_price='open'"):
        bt.fill_prices(frame, "open")
