import numpy as np
import pandas as pd
import pytest
import torch
import vectorbt as vbt

from sentio_lab import backtest as bt
from sentio_lab.costs import CostModel
from sentio_lab.data import load_market
from sentio_lab.env import MarketArrays, NumpyTradingEnv, TradingEnv
from sentio_lab.metrics import number_of_trades

COSTS = CostModel(fee_bps=10, slippage_bps=5)
STEPS = 300
STARTS = [40, 1200, 2600, 4600]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_market("sp500").frame


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


@pytest.mark.parametrize("positions", [(-1.0, 0.0, 1.0), (-0.5, 0.0, 2.0)])
def test_replay_matches_the_numpy_reference_env(frame, market, positions):
    # (-0.5, 0, 2) is leveraged: the env borrows on every move to 2, the replay's loan covers it
    env = NumpyTradingEnv(market, window=8, episode_length=50, positions=positions, costs=COSTS)
    env.reset(options={"start": 3000})
    actions = np.random.default_rng(5).integers(0, 3, 50)
    equities = [env.step(a)[4]["equity"] for a in actions]
    replayed = bt.equity(bt.replay(frame, 3000, np.asarray(positions)[actions], COSTS))
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
