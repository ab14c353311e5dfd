"""The zero-intelligence order book (sentio_lab.env.orderbook): invariants, order walking, impact and its fit."""

from __future__ import annotations

import numpy as np
import pytest

from sentio_lab.env.orderbook import ParentExecution, ZIBooks, ZIParams, execute_parent, fit_impact


def test_params_are_checked():
    with pytest.raises(ValueError, match="positive"):
        ZIParams(cancel_rate=0.0)
    with pytest.raises(ValueError, match="4 \\* width"):
        ZIParams(width=40, levels=100)
    with pytest.raises(ValueError, match="streams"):
        ZIBooks(4, streams=5)


def test_books_keep_bid_below_ask_and_depth_non_negative():
    books = ZIBooks(32, seed=3)
    for _ in range(400):
        books.step()
        assert (books.best_bid() < books.best_ask()).all()
        assert (books.bids >= -1e-12).all() and (books.asks >= -1e-12).all()
    assert books.volume.sum() > 0  # market orders traded
    # fixed seeds: identical books
    again = ZIBooks(32, seed=3)
    for _ in range(400):
        again.step()
    np.testing.assert_array_equal(books.bids, again.bids)


def test_market_buy_walks_the_asks_by_hand():
    books = ZIBooks(2, ZIParams(width=2, levels=16, tick=1.0))
    books.asks[:] = 0.0
    books.asks[:, 9] = 2.0
    books.asks[:, 10] = 3.0
    paid = books.market_buy(np.array([1.5, 4.0]))
    np.testing.assert_allclose(paid, [1.5 * 9, 2 * 9 + 2 * 10])
    np.testing.assert_allclose(books.asks[:, 9:11], [[0.5, 3.0], [0.0, 1.0]])
    assert books.best_ask().tolist() == [9, 10]
    books.bids[:] = 0.0
    books.bids[:, 5] = 1.0
    books.bids[:, 4] = 5.0
    got = books.market_sell(np.array([2.0, 0.5]))
    np.testing.assert_allclose(got, [5 + 4, 0.5 * 5])
    assert books.best_bid().tolist() == [4, 5]
    assert books.mid().tolist() == [6.5, 7.5]


def test_common_random_numbers_share_the_flow():
    books = ZIBooks(6, seed=1, streams=3)  # books b and b + 3 see the same events
    for _ in range(200):
        books.step()
    np.testing.assert_array_equal(books.bids[:3], books.bids[3:])


def test_impact_grows_with_size_concavely_and_fits_y():
    paths = 16
    levels = np.array([0, 8, 32, 128])
    result = execute_parent(np.repeat(levels, paths), seed=5, streams=paths)
    base = result.mid_move[result.size == 0]
    impact = [np.mean(result.mid_move[result.size == q] - base) for q in levels[1:]]
    assert impact[0] > 0 and impact[0] < impact[1] < impact[2]  # a buy pushes the price up, more for more
    assert impact[2] / impact[1] < 4.0  # 4 x the size moved the price by less than 4 x: concave
    fit = fit_impact(result)
    assert 0.3 < fit["delta"] < 1.0 and 0.1 < fit["Y"] < 5.0
    assert all(np.mean(result.shortfall[result.size == q]) > 0 for q in levels[1:])  # buyers pay above the mid
    with pytest.raises(ValueError, match="control"):
        fit_impact(ParentExecution(size=np.ones(3), mid_move=np.ones(3), shortfall=np.ones(3),
                                   start_mid=np.ones(3), market_volume=np.ones(3)))
    # without common flows the fit falls back to differences of means
    unpaired = ParentExecution(size=np.r_[0, 0, 0, 8, 8, 32], mid_move=np.r_[0, 0.1, -0.1, 0.2, 0.3, 0.6],
                               shortfall=np.zeros(6), start_mid=np.ones(6), market_volume=np.full(6, 10.0))
    assert fit_impact(unpaired)["delta"] == pytest.approx(np.log(0.6 / 0.25) / np.log(4))
