"""The portfolio report's figures (sentio_lab.evaluation.portfolio_report) by hand on a 3-asset toy: per-asset
contributions add up (with the costs) to the portfolio's return, step by step and over chained episodes; turnover
per asset adds up to the env's; the effective number of assets is 1 / sum w^2 of the invested weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sentio_lab.data.panel import load_panel
from sentio_lab.env.costs import CostModel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_arrays import build_portfolio_arrays
from sentio_lab.evaluation import portfolio_report
from sentio_lab.evaluation.portfolio_report import (
    borrow_paid,
    effective_number_of_assets,
    episode_contributions,
    path_tables,
    record_episode,
    step_contributions,
)
from sentio_lab.features import FeatureConfig
from tests.data.test_panel import synthetic_frames

WINDOW, START, STEPS = 4, 60, 25


def toy_arrays(fill_price: str = "next_open"):
    panel = load_panel(synthetic_frames(3, seed=4))
    arrays = build_portfolio_arrays(panel, FeatureConfig(bank="close"), train_stop=200)[0]
    return dataclasses.replace(arrays, fill_price=fill_price)


def path_of_weights(seed: int = 0, steps: int = STEPS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(4, 0.8), size=steps)
    weights[3] = [0.0, 0.0, 0.0, 1.0]  # an all-cash step: a sale of everything
    return weights


def replay(weights: np.ndarray, hold_every: int = 0):
    def decide(k, t, obs):
        return weights[k], bool(hold_every) and k % hold_every != 0
    return decide


def make_env(arrays, costs, episode_length=STEPS):
    return PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=episode_length, start=START,
                        allocation="long_only", costs=costs)


@pytest.mark.parametrize("fill_price", ["next_open", "next_close"])
def test_contributions_and_costs_add_up_to_the_return(fill_price):
    arrays = toy_arrays(fill_price)
    costs = CostModel(fee_bps=10.0, slippage_bps=5.0)
    episode = record_episode(make_env(arrays, costs), replay(path_of_weights()), START, STEPS)
    step_sum = episode.contribution.sum(axis=1) - episode.cost
    np.testing.assert_allclose(step_sum, episode.returns, rtol=0, atol=1e-13)
    assert (episode.cost > 0).all() and np.abs(episode.contribution).max() > 1e-3  # the check is not vacuous
    parts, paid = episode_contributions(episode)
    assert parts.sum() - paid == pytest.approx(episode.equity[-1] - 1.0, abs=1e-13)
    # the same env's own figures: its equity, its costs, its turnover
    env = make_env(arrays, costs)
    env.reset(starts=[START])
    for k, w in enumerate(path_of_weights()):
        equity_before = float(env.equity[0])
        *_, info = env.step(np.asarray(w)[None, :])
        assert float(info["equity"][0]) == episode.equity[k + 1]
        assert float(info["cost"][0]) / equity_before == pytest.approx(episode.cost[k], rel=1e-15)
        assert float(info["turnover"][0]) == pytest.approx(episode.turnover[k].sum(), rel=1e-12)


def test_contribution_by_hand_without_costs_is_weight_times_asset_return():
    """Rebalanced to w at every close with no costs, asset i contributes w_i x its close-to-close return."""
    arrays = toy_arrays("next_close")
    weights = np.tile([0.5, 0.3, 0.2, 0.0], (STEPS, 1))
    episode = record_episode(make_env(arrays, CostModel()), replay(weights), START, STEPS)
    close = arrays.close
    for k in range(1, STEPS):  # step 0 buys at bar START + 1's close: nothing held over a move yet
        t = START + k
        by_hand = [w * (close[t + 1, i] / close[t, i] - 1.0) for i, w in enumerate([0.5, 0.3, 0.2])]
        np.testing.assert_allclose(episode.contribution[k], by_hand, rtol=1e-12, atol=1e-16)
    np.testing.assert_array_equal(episode.contribution[0], 0.0)
    np.testing.assert_allclose(episode.weights[1:, :3], np.tile([0.5, 0.3, 0.2], (STEPS - 1, 1)), rtol=1e-12)


def test_step_contribution_formula_by_hand():
    # 2 shares of A bought at 10 -> 11 (fill) -> 12 (mark), B sold 3 -> 1 shares at fill 20, marked at 19
    out = step_contributions(np.array([0.0, 3.0]), np.array([2.0, 1.0]), np.array([9.0, 21.0]),
                             np.array([11.0, 20.0]), np.array([12.0, 19.0]), np.array(100.0))
    np.testing.assert_allclose(out, [(0 * 2 + 2 * 1) / 100, (3 * -1 + 1 * -1) / 100])


def test_last_step_shares_match_a_longer_episode():
    """The env resets the account after its last step; the recorder rebuilds those shares from the targets: the
    same figures as an episode that goes on (and holds on steps between rebalances)."""
    arrays = toy_arrays("next_open")
    costs = CostModel(fee_bps=10.0, slippage_bps=5.0)
    weights = path_of_weights(1, STEPS + 1)
    for hold_every in (0, 5):
        short = record_episode(make_env(arrays, costs), replay(weights, hold_every), START, STEPS)
        longer = record_episode(make_env(arrays, costs, STEPS + 1), replay(weights, hold_every), START, STEPS)
        for field in ("equity", "contribution", "cost", "turnover", "weights"):
            np.testing.assert_allclose(getattr(short, field), getattr(longer, field), rtol=1e-12, atol=1e-15)


def test_effective_number_of_assets_by_hand():
    weights = np.array([[1 / 3, 1 / 3, 1 / 3, 0.0],     # equal: 3
                        [1.0, 0.0, 0.0, 0.0],           # one asset: 1
                        [0.5, 0.25, 0.25, 0.0],         # 1 / (0.25 + 0.0625 + 0.0625)
                        [0.25, 0.125, 0.125, 0.5],      # the same invested part, half cash
                        [0.0, 0.0, 0.0, 1.0]])          # nothing invested: undefined
    out = effective_number_of_assets(weights)
    np.testing.assert_allclose(out[:4], [3.0, 1.0, 1 / 0.375, 1 / 0.375], rtol=1e-14)
    assert np.isnan(out[4])


def test_path_tables_chain_episodes_like_the_stitched_equity():
    arrays = toy_arrays("next_open")
    costs = CostModel(fee_bps=10.0, slippage_bps=5.0)
    first = record_episode(make_env(arrays, costs), replay(path_of_weights(2)), START, STEPS)
    second = record_episode(make_env(arrays, costs), replay(path_of_weights(3)), START + STEPS, STEPS)
    tables = path_tables([first, second], ("A", "B", "C"), 252.0)
    total = first.equity[-1] * second.equity[-1] - 1.0
    contributions = sum(tables[f"contrib:{a}"] for a in "ABC")
    assert contributions - tables["costs"] == pytest.approx(total, abs=1e-13)
    assert tables["total_return_check"] == pytest.approx(total, abs=1e-15)
    turnover = np.concatenate([first.turnover, second.turnover]).mean(axis=0) * 252.0
    assert [tables[f"turnover:{a}"] for a in "ABC"] == pytest.approx(list(turnover), rel=1e-14)
    weights = np.concatenate([first.weights, second.weights])
    assert tables["effective_assets"] == pytest.approx(np.nanmean(effective_number_of_assets(weights)), rel=1e-14)
    assert tables["cash_weight"] == pytest.approx(weights[:, 3].mean(), rel=1e-14)


def test_recorder_refuses_what_it_cannot_record():
    arrays = toy_arrays()
    batched = PortfolioEnv(arrays, num_envs=2, window=WINDOW, episode_length=STEPS, start=START)
    with pytest.raises(ValueError, match="num_envs=1"):
        record_episode(batched, replay(path_of_weights()), START, STEPS)
    with pytest.raises(ValueError, match="exceeds"):
        record_episode(make_env(arrays, CostModel(), 5), replay(path_of_weights()), START, STEPS)


@pytest.mark.parametrize("fill_price", ["next_open", "next_close"])
def test_long_short_book_counts_its_borrow_as_cost(fill_price):
    """A long-short book (gross 1.5) with borrow on its shorts: contributions minus costs are each step's return;
    the recorded cost is the env's fees plus a non-negative borrow (material over the episode), and exactly the env's
    fees without borrow."""
    arrays = toy_arrays(fill_price)
    rng = np.random.default_rng(5)
    legs = rng.dirichlet(np.full(7, 0.7), size=STEPS)
    signed = 1.5 * (legs[:, :3] - legs[:, 3:6])
    for borrow in (0.0, 2000.0):
        env = PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=STEPS, start=START,
                           allocation="long_short", gross_limit=1.5,
                           costs=CostModel(fee_bps=10.0, slippage_bps=5.0, borrow_bps=borrow))
        fees, step = [], env.step

        def recording(actions, hold=None, step=step, fees=fees):
            out = step(actions, hold)
            fees.append(float(out[4]["cost"][0]))
            return out
        env.step = recording
        episode = record_episode(env, replay(signed), START, STEPS)
        np.testing.assert_allclose(episode.contribution.sum(axis=1) - episode.cost, episode.returns, atol=1e-13)
        paid = episode.cost * episode.equity[:-1] - np.array(fees)
        if borrow:
            assert (paid > -1e-15).all() and paid.sum() > 1e-3  # borrow is never a credit, and it is material
        else:
            np.testing.assert_allclose(paid, 0.0, atol=1e-15)
        assert (episode.weights[:, :3] < 0).any()


@pytest.mark.parametrize("fill_price", ["next_open", "next_close"])
def test_borrow_of_a_hand_built_short_is_the_hand_value(fill_price):
    """Borrow over the step decided at bar t: rate x year fraction of bar t+1 x close_{t+1} x the short shares held
    over bar t+1 -- those after the open's fill, or (next-close fills) those held before the close's fill."""
    arrays = dataclasses.replace(toy_arrays(fill_price), year_fraction=np.full(len(toy_arrays().close), 0.01))
    env = PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=STEPS, start=START,
                       allocation="long_short", gross_limit=1.5, costs=CostModel(borrow_bps=2000.0))
    before, after, t = np.array([-2.0, 0.0, 1.0]), np.array([0.0, -3.0, 1.0]), START + 3
    close = arrays.close[t + 1]
    hand = 0.2 * 0.01 * (3.0 * close[1] if fill_price == "next_open" else 2.0 * close[0])
    assert borrow_paid(env, before, after, t) == pytest.approx(hand, rel=1e-14)
    long_only = PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=STEPS, start=START,
                             costs=CostModel(borrow_bps=2000.0))
    assert borrow_paid(make_env(arrays, CostModel()), before, after, t) == 0.0
    assert borrow_paid(long_only, before, after, t) >= 0.0


def test_a_wrong_contribution_breaks_the_identity_and_names_the_step(monkeypatch):
    """The recorder checks E_{t+1} = E_t + sum PnL - fees - borrow every step: a contribution formula that drops the
    overnight leg (or a borrow left out) is refused at the first step it matters, not absorbed into the costs."""
    arrays = toy_arrays()
    rng = np.random.default_rng(5)
    legs = rng.dirichlet(np.full(7, 0.7), size=STEPS)
    signed = 1.5 * (legs[:, :3] - legs[:, 3:6])

    def env():
        return PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=STEPS, start=START,
                            allocation="long_short", gross_limit=1.5,
                            costs=CostModel(fee_bps=10.0, borrow_bps=2000.0))
    record_episode(env(), replay(signed), START, STEPS)  # the real formulas pass
    monkeypatch.setattr(portfolio_report, "step_contributions",
                        lambda before, after, c0, fill, c1, e: after * (c1 - fill) / np.asarray(e)[..., None])
    with pytest.raises(ValueError, match=r"step 1 \(decision bar .*P&L identity"):
        record_episode(env(), replay(signed), START, STEPS)  # step 0 starts flat: no overnight leg yet
    monkeypatch.undo()
    monkeypatch.setattr(portfolio_report, "borrow_paid", lambda *args: 0.0)
    with pytest.raises(ValueError, match="P&L identity"):
        record_episode(env(), replay(signed), START, STEPS)
