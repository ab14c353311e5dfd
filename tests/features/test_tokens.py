"""Higher-timeframe token blocks: completed bars only, normalised on training rows, nothing from after t."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data.timeframes import resample_causal
from sentio_lab.env.market import prepare_market
from sentio_lab.features import FeatureConfig
from sentio_lab.features.tokens import (
    PAD_ROW,
    block_name,
    build_token_blocks,
    timeframe_token_block,
    token_feature_names,
    token_width,
    training_rows,
)

HOUR = pd.Timedelta("1h")


def hourly(n: int, seed: int = 0, start: str = "2017-01-02 00:00") -> pd.DataFrame:
    """Valid random hourly OHLCV."""
    rng = np.random.default_rng(seed)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.r_[1.1, close[:-1]]
    high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.001, n))
    low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.001, n))
    idx = pd.date_range(start, periods=n, freq="h").as_unit("us").rename("timestamp")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close,
                         "volume": rng.uniform(1, 10, n)}, index=idx)


def gathered(block, upto: int) -> np.ndarray:
    """The tokens the env hands the policy at bars 0..upto: table[index[t]]."""
    return block.table[block.index[: upto + 1]]


def test_token_rows_are_the_last_completed_bars_with_padding_before():
    frame = hourly(24 * 40)
    train = np.arange(len(frame)) < 24 * 30
    block = timeframe_token_block(frame, "4h", 6, train, HOUR)
    view = resample_causal(frame, "4h", HOUR)
    assert block.name == block_name("4h") == "tokens:4h"
    assert block.table.shape == (1 + len(view.bars), token_width()) and block.index.shape == (len(frame), 6)
    assert not block.table[PAD_ROW].any()  # the padding row, validity flag 0
    lookback = 20  # ret_20 is the longest basic producer
    for t in (0, 3, 4, 30, 200, len(frame) - 1):
        latest = view.latest[t]
        want = [j + 1 if j >= lookback else PAD_ROW for j in range(latest - 5, latest + 1)]
        assert block.index[t].tolist() == [w if w > 0 else PAD_ROW for w in want], t
    # every real token has flag 1, every padded one flag 0
    flags = block.table[block.index][..., -1]
    np.testing.assert_array_equal(flags, block.index != PAD_ROW)


def test_forming_higher_timeframe_bar_never_appears():
    # At every bar t, the newest token equals the last bar of a view built from bars <= t alone, so the bucket
    # still forming at t (which that view cannot contain) never appears, and every token's bar closed by t.
    frame = hourly(24 * 12)
    train = np.ones(len(frame), dtype=bool)
    block = timeframe_token_block(frame, "4h", 3, train, HOUR)
    view = resample_causal(frame, "4h", HOUR)
    used = block.index[block.index != PAD_ROW] - 1
    rows = np.nonzero(block.index != PAD_ROW)[0]
    assert (view.close_row[used] <= rows).all()
    for t in range(100, len(frame)):
        if block.index[t, -1] == PAD_ROW:
            continue
        short = resample_causal(frame.iloc[: t + 1], "4h", HOUR)
        newest = block.index[t, -1] - 1
        assert newest == len(short.bars) - 1, t
        assert view.bars.index[newest] == short.bars.index[-1]
        # the bucket holding bar t, if not closed by t, is not among the tokens
        bucket_start = frame.index[t].floor("4h")
        if view.close_row[np.searchsorted(view.bars.index, bucket_start)] > t:
            assert bucket_start not in view.bars.index[block.index[t][block.index[t] > 0] - 1]


@pytest.mark.parametrize("rule", ["4h", "1D"])
def test_changing_bars_after_t_leaves_tokens_up_to_t_bit_for_bit(rule):
    frame = hourly(24 * 60)
    train = np.arange(len(frame)) < 24 * 30
    block = timeframe_token_block(frame, rule, 5, train, HOUR)
    for t in (24 * 35 + 5, 24 * 45 + 23, 24 * 59):
        future = hourly(len(frame), seed=7)
        changed = frame.copy()
        changed.iloc[t + 1 :] = future.iloc[t + 1 :].to_numpy() * 1.3
        # timestamps after t move too (a gap), as in tests/test_lookahead.py
        stamps = frame.index.to_numpy().copy()
        stamps[t + 1 :] = stamps[t + 1 :] + np.timedelta64(3, "h")
        changed.index = pd.DatetimeIndex(stamps).rename("timestamp")
        other = timeframe_token_block(changed, rule, 5, train, HOUR)
        np.testing.assert_array_equal(gathered(other, t), gathered(block, t))


def test_normaliser_uses_training_rows_only():
    frame = hourly(24 * 60)
    train = np.arange(len(frame)) < 24 * 30
    block = timeframe_token_block(frame, "4h", 4, train, HOUR)
    changed = frame.copy()
    changed.iloc[24 * 31 :, :4] *= 1.5  # a level shift outside training: the scale-free tokens there change...
    changed.iloc[24 * 31 :, 4] *= 50.0
    other = timeframe_token_block(changed, "4h", 4, train, HOUR)
    # ...but the statistics do not: every token of a bar closed inside the training rows is the same
    np.testing.assert_array_equal(gathered(other, 24 * 30), gathered(block, 24 * 30))
    # and the tokens are normalised: training tokens have median ~0 per feature
    view = resample_causal(frame, "4h", HOUR)
    fit = (view.close_row < 24 * 30) & (np.arange(len(view.bars)) >= 20)
    med = np.median(block.table[1:][fit, :-1], axis=0)
    np.testing.assert_allclose(med, 0.0, atol=1e-5)


def test_bad_inputs_are_refused():
    frame = hourly(24 * 10)
    with pytest.raises(ValueError, match="num_tokens"):
        timeframe_token_block(frame, "4h", 0, np.ones(len(frame), bool), HOUR)
    with pytest.raises(ValueError, match="one entry per frame row"):
        timeframe_token_block(frame, "4h", 2, np.ones(3, bool), HOUR)
    with pytest.raises(ValueError, match="at least 2"):
        timeframe_token_block(frame, "1D", 2, np.arange(len(frame)) < 30, HOUR)


def test_build_token_blocks_for_a_prepared_fx_market_counts_days_from_the_new_york_close():
    market = prepare_market("eurusd_1h", FeatureConfig(), end="2017-03-31")
    assert market.feature_config.session_close == "17:00 America/New_York"
    blocks = build_token_blocks(market, ("4h", "1D"), (4, 3))
    assert [b.name for b in blocks] == ["tokens:4h", "tokens:1D"]
    rows = training_rows(market.features.state, len(market.data.frame))
    assert rows.sum() > 0 and not rows[: market.features.first_valid].any()
    day = resample_causal(market.data.frame, "1D", HOUR, session_close="17:00 America/New_York")
    # a day becomes visible at the close of the 16:00 New York bar (21:00 or 20:00 UTC)
    closes = market.data.frame.index[day.close_row]
    assert set(closes.tz_localize("UTC").tz_convert("America/New_York").hour) <= {16}
    np.testing.assert_array_equal(blocks[1].index[:, -1] > 0, (day.latest >= 20))
    assert len(token_feature_names()) + 1 == blocks[0].table.shape[1]
    with pytest.raises(ValueError, match="token counts"):
        build_token_blocks(market, ("4h",), (4, 3))
