"""The "slow" bank (issue 19 s3): six regime-normalised, multi-horizon features from closes only.

Causality is proved for every registered producer, these included, by tests/features/test_lookahead.py (it
iterates the registry); finiteness after the declared lookback by tests/features/test_features.py. Here: the
formulas by hand, the regime normalisation (scale-free in volatility), flat markets, the bank's membership and a
close-only market built with it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab.env.market import prepare_market
from sentio_lab.features import Bars, FeatureConfig, registered_producers
from sentio_lab.features.slow import VOL_WINDOW

SLOW_COLUMNS = ["slow_ret_5", "slow_ret_20", "slow_ret_60", "slow_dist_sma_50", "slow_dist_sma_200",
                "slow_vol_ratio"]


def closes(n: int, seed: int, vol: float = 0.01) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100.0 * np.exp(np.cumsum(rng.normal(0.0002, vol, n)))


def bars_of(close: np.ndarray) -> Bars:
    nan = np.full(len(close), np.nan)
    return Bars(open=nan, high=nan, low=nan, close=close, volume=nan)  # closes are all the bank reads


def slow_features(close: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for producer in registered_producers("slow"):
        out.update(producer(bars_of(close)))
    return out


def test_the_bank_is_its_own_six_producers_and_no_other_bank_holds_them():
    names = [p.name for p in registered_producers("slow")]
    assert names == SLOW_COLUMNS
    assert len(names) == 6 and all(p.bank == "slow" for p in registered_producers("slow"))
    for other in ("basic", "talib", "close"):
        assert not set(names) & {p.name for p in registered_producers(other)}


def test_values_match_the_formulas_by_hand():
    close = closes(400, 1)
    features = slow_features(close)
    logc = np.log(close)
    r = np.diff(logc, prepend=np.nan)
    for t in (250, 333, 399):
        sigma = np.std(r[t - VOL_WINDOW + 1 : t + 1])
        for k in (5, 20, 60):
            assert features[f"slow_ret_{k}"][t] == pytest.approx((logc[t] - logc[t - k]) / (sigma * np.sqrt(k)),
                                                                 rel=1e-12)
        for n in (50, 200):
            sma = close[t - n + 1 : t + 1].mean()
            assert features[f"slow_dist_sma_{n}"][t] == pytest.approx(np.log(close[t] / sma) / (sigma * np.sqrt(n)),
                                                                      rel=1e-12)
        ratio = np.std(r[t - 19 : t + 1]) / np.std(r[t - 99 : t + 1])
        assert features["slow_vol_ratio"][t] == pytest.approx(ratio, rel=1e-12)
    # the declared lookbacks are tight: one bar earlier the value is not defined yet
    for producer in registered_producers("slow"):
        (column,) = producer(bars_of(close)).values()
        assert np.isnan(column[producer.lookback - 1]) and np.isfinite(column[producer.lookback])


def test_returns_and_vol_ratio_are_regime_normalised():
    """Doubling every log return (a calm market made volatile) leaves the volatility-unit features unchanged,
    while the basic bank's raw return doubles."""
    close = closes(400, 2)
    loud = close[0] * np.exp(2.0 * (np.log(close) - np.log(close[0])))
    calm_f, loud_f = slow_features(close), slow_features(loud)
    for name in ("slow_ret_5", "slow_ret_20", "slow_ret_60", "slow_vol_ratio"):
        np.testing.assert_allclose(loud_f[name][200:], calm_f[name][200:], rtol=1e-9, atol=1e-12)
    (basic_ret,) = (p for p in registered_producers("basic") if p.name == "ret_20")
    assert np.allclose(basic_ret(bars_of(loud))["ret_20"][200:], 2 * basic_ret(bars_of(close))["ret_20"][200:])


def test_a_flat_market_is_defined_not_nan():
    features = slow_features(np.full(300, 50.0))
    for name, column in features.items():
        expected = 1.0 if name == "slow_vol_ratio" else 0.0
        assert np.array_equal(column[200:], np.full(100, expected)), name


def test_a_close_only_market_trains_on_the_slow_bank(tmp_path):
    index = pd.bdate_range("2001-01-01", periods=900, name="timestamp")
    path = tmp_path / "closes.csv"
    pd.DataFrame({"close": closes(900, 3)}, index=index).to_csv(path)
    market = prepare_market(str(path), FeatureConfig(bank="slow", cache_dir=None), fill_price="next_close")
    assert market.features.names == SLOW_COLUMNS
    first = market.features.first_valid
    assert first >= 199 and np.isfinite(market.features.values[first:]).all()
