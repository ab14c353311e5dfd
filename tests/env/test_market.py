import inspect

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import DataValidationError, load_market
from sentio_lab.env.market import effective_feature_config, prepare_market
from sentio_lab.features import FeatureConfig, raw_features

NY_CLOSE = "17:00 America/New_York"


def test_prepared_market_ranges_and_arrays(sp500_market):
    m = sp500_market
    assert [m.range(name) for name in ("train", "validation", "test")] == [
        (0, m.splits["train"].stop), (m.splits["train"].stop, m.splits["validation"].stop),
        (m.splits["validation"].stop, len(m.data)),
    ]
    assert m.arrays.features.dtype == np.float32 and m.arrays.features.shape[0] == len(m.data)
    assert np.isfinite(m.arrays.features[m.features.first_valid :]).all()
    np.testing.assert_array_equal(m.arrays.close, m.data.frame["close"].to_numpy())
    with pytest.raises(KeyError, match="unknown range"):
        m.range("holdout")


def test_prepare_market_keyword_names_are_fixed():
    # The PPO variants pass these by name (Args data_start / data_end / stale_opens): keep them.
    params = inspect.signature(prepare_market).parameters
    assert list(params) == ["source", "feature_config", "start", "end", "stale_opens", "train_fraction",
                            "validation_fraction", "feature_state", "window", "episode_length", "fill_price"]
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in list(params)[2:])
    assert params["stale_opens"].default == "refuse" and params["start"].default is None
    assert params["fill_price"].default == "next_open"


def test_prepare_market_forwards_the_range_to_load_market():
    m = prepare_market("nasdaq", FeatureConfig(), start="2010", end="2012-06", train_fraction=0.5,
                       validation_fraction=0.25)
    assert m.data.frame.index[0] == pd.Timestamp("2010-01-04")
    assert m.data.frame.index[-1] == pd.Timestamp("2012-06-29")
    assert m.data.quality.start == "2010" and m.data.quality.end == "2012-06"
    assert m.data.frame.equals(load_market("nasdaq", start="2010", end="2012-06").frame)
    assert m.splits["train"].stop == round(0.5 * len(m.data)) and m.features.values.shape[0] == len(m.data)


def test_prepare_market_applies_the_stale_open_policy():
    with pytest.raises(DataValidationError, match="stale opens: 2 stretch"):
        prepare_market("sp500", FeatureConfig(), start="1999")
    with pytest.warns(UserWarning, match="stale_opens='allow'"):
        m = prepare_market("sp500", FeatureConfig(), start="1999", stale_opens="allow")
    assert len(m.data) == 5031 and m.data.quality.stale_opens_policy == "allow"
    assert m.data.quality.accepted_stale_stretches
    default = prepare_market("sp500", FeatureConfig())
    assert default.data.frame.index[0] == pd.Timestamp("2013-05-10") and default.data.quality.default_start_used
    with pytest.raises(ValueError, match="stale_opens"):
        prepare_market("sp500", FeatureConfig(), stale_opens="ignore")


def test_fx_daily_features_use_the_market_session_close():
    config = FeatureConfig(timeframes=("1D",))
    m = prepare_market("eurusd_1h", config, end="2017-06")
    assert m.data.session_close == NY_CLOSE and config.session_close is None
    assert m.feature_config.session_close == NY_CLOSE
    assert m.features.state["config"]["session_close"] == NY_CLOSE
    base_freq = pd.Timedelta(m.features.state["base_freq_ns"], unit="ns")
    session = raw_features(m.data.frame, m.feature_config, base_freq)
    utc = raw_features(m.data.frame, config, base_freq)
    daily = m.features.blocks["1D"]
    assert m.features.names[daily] == session.names[session.blocks["1D"]]
    assert not np.allclose(session.values[utc.first_valid :, session.blocks["1D"]],
                           utc.values[utc.first_valid :, utc.blocks["1D"]])
    # "00:00 UTC" asks for UTC days explicitly.
    explicit = prepare_market("eurusd_1h", FeatureConfig(timeframes=("1D",), session_close="00:00 UTC"), end="2017-06")
    assert explicit.feature_config.session_close == "00:00 UTC"
    # A reloaded model keeps the session close it was trained with.
    again = prepare_market("eurusd_1h", config, end="2017-06", feature_state=explicit.features.state)
    assert again.feature_config.session_close == "00:00 UTC"
    np.testing.assert_array_equal(again.features.values, explicit.features.values)
    with pytest.raises(ValueError, match="different config"):
        prepare_market("eurusd_1h", FeatureConfig(timeframes=("1D",), session_close=NY_CLOSE), end="2017-06",
                       feature_state=explicit.features.state)


def test_effective_feature_config_order_of_precedence():
    fx = load_market("eurusd_1h", end="2017-02")
    stocks = load_market("nasdaq", end="2000")
    plain = FeatureConfig(timeframes=("1D",))
    assert effective_feature_config(plain, fx).session_close == NY_CLOSE
    assert effective_feature_config(plain, stocks) is plain
    own = FeatureConfig(timeframes=("1D",), session_close="16:00 America/New_York")
    assert effective_feature_config(own, fx) is own
    state = {"config": {"session_close": "00:00 UTC"}}
    assert effective_feature_config(plain, fx, state).session_close == "00:00 UTC"
    assert effective_feature_config(plain, fx, {"config": {}}) is plain  # a state from before session closes
