"""Feature bank, normalisation, pruning, cache and the observation-matrix contract."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import talib

from sentio_lab import features as F
from sentio_lab.data import DataValidationError, chronological_split, load_market
from sentio_lab.features import (
    FEATURE_REGISTRY,
    Bars,
    FeatureConfig,
    FeatureProducer,
    build_observation_features,
    registered_producers,
)
from sentio_lab.features import raw as features_raw
from sentio_lab.features import registry as features_registry


def random_ohlcv(n: int, seed: int, *, freq: str = "B", start: str = "2010-01-04", price: float = 100.0):
    """Valid synthetic OHLCV: geometric random walk with volatility clusters and lognormal volume."""
    rng = np.random.default_rng(seed)
    vol = 0.01 * np.exp(np.cumsum(rng.normal(0, 0.05, n)).clip(-1.5, 1.5))
    close = price * np.exp(np.cumsum(rng.normal(0, 1, n) * vol))
    open_ = np.r_[price, close[:-1]] * np.exp(rng.normal(0, 0.002, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.004, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.004, n)))
    volume = rng.lognormal(15, 0.4, n)
    index = pd.date_range(start, periods=n, freq=freq, name="timestamp").as_unit("us")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index)


@pytest.fixture(scope="module")
def daily():
    """NASDAQ daily 1999-2018: 5,031 bars with real opens (and two zero-volume days)."""
    return load_market("nasdaq")


@pytest.fixture(scope="module")
def sp500_1999():
    """sp500 from 1999 with its stale opens (open == previous close on ~40% of days), loaded knowingly."""
    with pytest.warns(UserWarning, match="stale_opens='allow'"):
        return load_market("sp500", start="1999", stale_opens="allow")


# ------------------------------------------------------------------------------------------- registry
def test_registry_lists_basic_inside_talib_and_names_are_unique():
    basic = registered_producers("basic")
    talib_bank = registered_producers("talib")
    assert {p.name for p in basic} < {p.name for p in talib_bank}
    assert registered_producers() == list(FEATURE_REGISTRY.values())
    assert all(p.bank in F.BANKS and p.lookback >= 0 and p.description for p in registered_producers())
    values, names, lookback = F.compute_features(Bars.from_frame(random_ohlcv(300, 0)), talib_bank)
    assert len(names) == len(set(names)) == values.shape[1]
    assert lookback == max(p.lookback for p in talib_bank)
    with pytest.raises(ValueError, match="unknown bank"):
        registered_producers("exotic")


def test_register_feature_rejects_duplicates_bad_banks_and_negative_lookback(monkeypatch):
    monkeypatch.setattr(features_registry, "FEATURE_REGISTRY", dict(FEATURE_REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        F.register_feature("ret_1", lookback=1)(lambda b: {})
    with pytest.raises(ValueError, match="unknown bank"):
        F.register_feature("x", lookback=1, bank="nope")
    with pytest.raises(ValueError, match="lookback"):
        F.register_feature("x", lookback=-1)

    @F.register_feature("test_double_close", lookback=0)
    def _double(b):
        """Twice the close."""
        return {"test_double_close": 2 * b.close}

    producer = features_registry.FEATURE_REGISTRY["test_double_close"]
    assert producer.description == "Twice the close." and producer.bank == "basic"
    bars = Bars.from_frame(random_ohlcv(10, 1))
    np.testing.assert_array_equal(producer(bars)["test_double_close"], 2 * bars.close)


def test_producer_rejects_wrong_output_shape():
    bad = FeatureProducer("bad", 0, "basic", lambda b: {"bad": b.close[:-1]})
    with pytest.raises(ValueError, match="shape"):
        bad(Bars.from_frame(random_ohlcv(20, 0)))


def test_compute_features_rejects_duplicate_column_names():
    p = FeatureProducer("dup", 0, "basic", lambda b: {"ret_1": b.close})
    with pytest.raises(ValueError, match="duplicate"):
        F.compute_features(Bars.from_frame(random_ohlcv(20, 0)), [FEATURE_REGISTRY["ret_1"], p])


@pytest.mark.parametrize("source", ["synthetic", "sp500", "eurusd_1h"])
def test_every_producer_is_finite_after_its_declared_lookback(source):
    frame = random_ohlcv(600, 3) if source == "synthetic" else load_market(source).frame.iloc[:1500]
    bars = Bars.from_frame(frame)
    for producer in registered_producers():
        for name, col in producer(bars).items():
            assert np.isfinite(col[producer.lookback :]).all(), f"{producer.name}/{name} NaN after lookback"


def test_talib_bank_covers_every_talib_function_or_says_why_not():
    used, excluded = F.talib_coverage()
    every = set(talib.get_functions())
    assert not used & set(excluded)
    assert used | set(excluded) == every, sorted(every - used - set(excluded))
    assert all(len(reason) > 20 for reason in excluded.values())


@pytest.mark.parametrize("dataset", ["sp500", "eurusd_1h"])
def test_talib_bank_has_150_distinct_informative_features(dataset):
    market = load_market(dataset)
    raw = F.raw_features(market.frame, FeatureConfig(bank="talib"), market.bar_freq)
    usable = raw.values[raw.first_valid :]
    assert np.isfinite(usable).all()
    informative = usable[:, np.ptp(usable, axis=0) > 0]  # constant candlestick patterns do not count
    distinct = np.unique(np.round(informative, 12), axis=1)
    assert distinct.shape[1] >= 150
    patterns = [n for n in raw.names if n.startswith("cdl")]
    assert len(patterns) == 61


def test_talib_features_are_scale_free():
    """Multiplying prices by 1000 and volume by 7 must not change any feature (they are ratios)."""
    frame = load_market("sp500").frame.iloc[:1200]
    scaled = frame.copy()
    scaled[["open", "high", "low", "close"]] *= 1000.0
    scaled["volume"] *= 7.0
    a, names, lb = F.compute_features(Bars.from_frame(frame), registered_producers("talib"))
    b, _, _ = F.compute_features(Bars.from_frame(scaled), registered_producers("talib"))
    close = np.isclose(a[lb:], b[lb:], rtol=1e-6, atol=1e-6)
    # Candlestick rules compare bodies and shadows with thresholds; float rounding at a threshold may
    # flip a rare bar, so allow a handful of pattern bars but no continuous feature at all.
    for j, name in enumerate(names):
        wrong = int((~close[:, j]).sum())
        limit = 3 if name.startswith("cdl") else 0
        assert wrong <= limit, f"{name} is not scale-free ({wrong} rows differ)"


# ------------------------------------------------------------------------------------- basic features
def test_basic_features_match_their_definitions():
    frame = random_ohlcv(80, 5)
    frame.iloc[10, frame.columns.get_loc("high")] = frame["open"].iloc[10]
    frame.iloc[10, frame.columns.get_loc("low")] = frame["open"].iloc[10]
    frame.iloc[10, frame.columns.get_loc("close")] = frame["open"].iloc[10]  # a bar with no range
    values, names, lookback = F.compute_features(Bars.from_frame(frame), registered_producers("basic"))
    col = {n: values[:, i] for i, n in enumerate(names)}
    c, o, h, lo, v = (frame[k].to_numpy() for k in ("close", "open", "high", "low", "volume"))
    assert lookback == 20
    np.testing.assert_allclose(col["ret_1"][1:], np.log(c[1:] / c[:-1]))
    np.testing.assert_allclose(col["ret_20"][20:], np.log(c[20:] / c[:-20]))
    assert np.isnan(col["ret_20"][:20]).all() and np.isnan(col["rvol_20"][:20]).all()
    r = np.diff(np.log(c))
    assert col["rvol_20"][20] == pytest.approx(np.std(r[:20]))
    assert col["rvol_5"][50] == pytest.approx(np.std(r[45:50]))
    np.testing.assert_allclose(col["range_hl"], np.log(h / lo))
    np.testing.assert_allclose(col["body"], np.log(c / o))
    np.testing.assert_allclose(col["gap"][1:], np.log(o[1:] / c[:-1]))
    assert col["close_loc"][10] == 0.0
    with np.errstate(invalid="ignore"):
        expected = (2 * c - h - lo) / (h - lo)
    np.testing.assert_allclose(np.delete(col["close_loc"], 10), np.delete(expected, 10))
    lv = np.log1p(v[11:31])
    assert col["volume_z_20"][30] == pytest.approx((lv[-1] - lv.mean()) / lv.std())


def test_volume_z_is_zero_when_the_window_volume_is_constant():
    frame = random_ohlcv(40, 6)
    frame["volume"] = 0.0
    z = FEATURE_REGISTRY["volume_z_20"](Bars.from_frame(frame))["volume_z_20"]
    assert (z[19:] == 0).all() and np.isnan(z[:19]).all()


def test_safe_div_defines_zero_denominators_and_keeps_nan():
    out = F._safe_div(np.array([1.0, 2.0, np.nan, 3.0]), np.array([2.0, 0.0, 1.0, np.nan]), undefined=-7.0)
    np.testing.assert_array_equal(out[:2], [0.5, -7.0])
    assert np.isnan(out[2:]).all()


def test_rolling_and_lag_on_short_input_are_all_nan():
    x = np.arange(3.0)
    assert np.isnan(F._rolling(x, 5, np.mean)).all()
    assert np.isnan(F._lag(x, 5)).all()


# ---------------------------------------------------------------------------------- observation matrix
def test_default_observation_contract(daily):
    stop = chronological_split(daily)["train"].stop
    obs = build_observation_features(daily.frame, stop)
    t, f = obs.values.shape
    assert t == len(daily.frame) and obs.values.dtype == np.float32 and f == len(obs.names)
    assert obs.blocks == {"base": slice(0, f)}
    assert obs.first_valid == max(p.lookback for p in registered_producers("basic"))
    assert (obs.values[: obs.first_valid] == 0).all()
    assert np.isfinite(obs.values).all() and np.abs(obs.values).max() <= 5.0
    assert obs.state["fit_rows"] == [obs.first_valid, stop]
    again = build_observation_features(daily.frame, stop)
    np.testing.assert_array_equal(obs.values, again.values)


def test_robust_normalisation_is_fitted_on_the_training_rows(sp500_1999):
    stop = chronological_split(sp500_1999)["train"].stop
    cfg = FeatureConfig(clip=1e9)
    obs = build_observation_features(sp500_1999.frame, stop, cfg)
    train = obs.values[obs.first_valid : stop].astype(np.float64)
    np.testing.assert_allclose(np.median(train, axis=0), 0.0, atol=1e-6)
    iqr = np.subtract(*np.percentile(train, [75, 25], axis=0))
    # sp500 opens at the previous close on ~40% of days: the gap's IQR is 0 and the fallback scale
    # (largest training departure from the median) maps its training values into [-1, 1].
    gap = obs.names.index("gap")
    assert np.abs(train[:, gap]).max() == pytest.approx(1.0)
    np.testing.assert_allclose(np.delete(iqr, gap), F._IQR_TO_STD, rtol=1e-4)
    # Test-range statistics differ: the normaliser did not look there.
    test = obs.values[stop:].astype(np.float64)
    assert np.abs(np.median(test, axis=0)).max() > 0.01


def test_rank_normalisation_maps_training_values_to_minus_one_one(daily):
    stop = chronological_split(daily)["train"].stop
    obs = build_observation_features(daily.frame, stop, FeatureConfig(normalise="rank"))
    train = obs.values[obs.first_valid : stop]
    assert train.min() >= -1.0 and train.max() <= 1.0
    np.testing.assert_allclose(np.median(train, axis=0), 0.0, atol=0.1)  # ties (the gap) shift it a bit
    # Extremes reach -1 / +1 up to ties (close == low happens often: tied values share a level).
    assert (train.min(axis=0) <= -0.95).all() and (train.max(axis=0) >= 0.95).all()


def test_rank_normalisation_handles_tied_discrete_values():
    x = np.zeros((200, 1))
    x[::50] = 1.0  # a sparse flag: quantiles tie at 0
    params = F._fit_normaliser(x, "rank")
    knots, levels = params["knots"][0], params["levels"][0]
    assert knots[0] == 0.0 and knots[-1] == 1.0 and np.all(np.diff(knots) > 0) and len(knots) == len(levels)
    assert len(knots) < F.RANK_KNOTS  # the ~98 tied quantiles at 0 collapsed into one knot
    out = F._apply_normaliser(np.array([[0.0], [1.0], [5.0], [-3.0]]), params, 5.0)
    assert out[1, 0] == out[2, 0] > 0.9 and out[0, 0] == out[3, 0]  # saturates outside the train range
    assert -0.1 < out[0, 0] < 0.1  # a tie at 0 sits at the middle of its CDF levels


def test_robust_scale_falls_back_to_the_largest_departure_for_sparse_columns():
    x = np.zeros((100, 1))
    x[3], x[7] = 1.0, -2.0
    params = F._fit_normaliser(x, "robust")
    assert params["center"] == [0.0] and params["scale"] == [2.0]


def test_normalise_none_returns_raw_values(daily):
    frame = daily.frame.iloc[:600]
    obs = build_observation_features(frame, 400, FeatureConfig(normalise="none"))
    raw = F.raw_features(frame, FeatureConfig(), pd.Timedelta("1D"))
    cols = [raw.names.index(n) for n in obs.names]
    np.testing.assert_array_equal(
        obs.values[obs.first_valid :], raw.values[obs.first_valid :, cols].astype(np.float32)
    )


def test_clip_bounds_the_values(daily):
    obs = build_observation_features(daily.frame, 3000, FeatureConfig(clip=1.5))
    assert np.abs(obs.values).max() == pytest.approx(1.5)


def test_state_is_plain_python_and_survives_torch_and_json(daily, tmp_path):
    torch = pytest.importorskip("torch")
    frame = daily.frame
    cfg = FeatureConfig(bank="talib", normalise="rank", regimes=2, regime_restarts=2)
    obs = build_observation_features(frame, 3000, cfg)
    json.dumps(obs.state)  # only plain python inside
    buffer = io.BytesIO()
    torch.save({"features": obs.state}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["features"]
    again = build_observation_features(frame, 3000, cfg, state=state)
    np.testing.assert_array_equal(obs.values, again.values)
    assert F.config_from_state(state, regime_restarts=2) == cfg
    assert json.loads(F.describe_config(cfg))["bank"] == "talib"


def test_state_is_applied_without_refitting(daily):
    frame = daily.frame
    fitted = build_observation_features(frame, 3000)
    # Applying the state to a later slice of the data normalises with the training statistics.
    later = frame.iloc[2500:]
    applied = build_observation_features(later, 10, state=fitted.state)
    assert applied.state is fitted.state
    refit = build_observation_features(later, 2000)
    assert refit.state["normaliser"] != fitted.state["normaliser"]
    lo = applied.first_valid
    np.testing.assert_array_equal(applied.values[lo + 100 :], fitted.values[2500 + lo + 100 :])


def test_state_from_another_config_or_version_is_rejected(daily):
    frame = daily.frame.iloc[:800]
    state = build_observation_features(frame, 500).state
    with pytest.raises(ValueError, match="different config"):
        build_observation_features(frame, 500, FeatureConfig(normalise="rank"), state=state)
    with pytest.raises(ValueError, match="version"):
        build_observation_features(frame, 500, state={**state, "version": -1})
    with pytest.raises(ValueError, match="lacks"):
        build_observation_features(frame, 500, state={"config": state["config"]})
    with pytest.raises(ValueError, match="did not produce"):
        build_observation_features(frame, 500, state={**state, "columns": ["ret_1", "no_such_feature"]})


def test_fitting_ignores_rows_after_train_stop(daily):
    frame = daily.frame.iloc[:1500].copy()
    a = build_observation_features(frame, 1000, FeatureConfig(bank="talib", prune_corr=0.9))
    changed = frame.copy()
    changed.iloc[1000:] = random_ohlcv(500, 9, price=float(frame["close"].iloc[999])).to_numpy()
    b = build_observation_features(changed, 1000, FeatureConfig(bank="talib", prune_corr=0.9))
    assert a.state == b.state
    np.testing.assert_array_equal(a.values[:1000], b.values[:1000])


def test_constant_training_columns_are_dropped(monkeypatch):
    monkeypatch.setattr(features_registry, "FEATURE_REGISTRY", dict(FEATURE_REGISTRY))

    @F.register_feature("late_flag", lookback=0)
    def _late(b):
        """Zero during training, one afterwards."""
        out = np.zeros(len(b))
        out[150:] = 1.0
        return {"late_flag": out}

    obs = build_observation_features(random_ohlcv(200, 2), 100)
    assert "late_flag" not in obs.names and obs.state["dropped_constant"] == ["late_flag"]


def test_a_block_with_only_constant_columns_is_an_error(monkeypatch):
    monkeypatch.setattr(features_registry, "FEATURE_REGISTRY", {})
    F.register_feature("zero", lookback=0)(lambda b: {"zero": np.zeros(len(b))})
    with pytest.raises(ValueError, match="every feature is constant"):
        build_observation_features(random_ohlcv(200, 2), 100)


def test_nan_after_the_warm_up_is_an_error_naming_the_feature(monkeypatch):
    monkeypatch.setattr(features_registry, "FEATURE_REGISTRY", dict(FEATURE_REGISTRY))

    @F.register_feature("leaky", lookback=2)
    def _leaky(b):
        """Undefined at row 120 although it claims a 2-bar warm-up."""
        out = b.close.copy()
        out[120] = np.nan
        return {"leaky": out}

    with pytest.raises(ValueError, match=r"leaky \(first at"):
        build_observation_features(random_ohlcv(200, 2), 150)


def test_pruning_removes_near_duplicates_within_blocks(daily):
    stop = 3000
    full = build_observation_features(daily.frame, stop, FeatureConfig(bank="talib"))
    pruned = build_observation_features(daily.frame, stop, FeatureConfig(bank="talib", prune_corr=0.9))
    assert len(pruned.names) < len(full.names)
    assert set(pruned.state["dropped_correlated"]) == set(full.names) - set(pruned.names)
    train = pruned.values[pruned.first_valid : stop].astype(np.float64)
    corr = np.abs(np.corrcoef(train, rowvar=False))
    np.fill_diagonal(corr, 0.0)
    assert corr.max() <= 0.9 + 1e-4
    assert pruned.names[0] == "ret_1"  # greedy in registry order: the first column always stays
    assert F._prune(np.ones((5, 1)), 0.5) == [0]


def test_cache_hit_returns_identical_values(daily, tmp_path, monkeypatch):
    frame = daily.frame.iloc[:1500]
    cfg = FeatureConfig(bank="talib", timeframes=("W-FRI",), cache_dir=str(tmp_path / "cache"))
    first = build_observation_features(frame, 1200, cfg)
    files = list((tmp_path / "cache").glob("raw-*.parquet"))
    assert len(files) == 1

    def boom(*args, **kwargs):
        raise AssertionError("features recomputed despite a cache hit")

    monkeypatch.setattr(features_raw, "compute_features", boom)
    second = build_observation_features(frame, 1200, cfg)
    np.testing.assert_array_equal(first.values, second.values)
    assert first.names == second.names and first.blocks == second.blocks
    assert first.first_valid == second.first_valid
    # Different data -> different key -> a miss (which here would recompute and fail loudly).
    with pytest.raises(AssertionError, match="recomputed"):
        build_observation_features(frame.iloc[:1400], 1200, cfg)


def test_cache_key_depends_on_data_and_bank(daily):
    frame = daily.frame.iloc[:300]
    day = pd.Timedelta("1D")
    keys = {
        F._raw_cache_key(frame, FeatureConfig(), day),
        F._raw_cache_key(frame.iloc[:299], FeatureConfig(), day),
        F._raw_cache_key(frame, FeatureConfig(bank="talib"), day),
        F._raw_cache_key(frame, FeatureConfig(timeframes=("W-FRI",)), day),
        F._raw_cache_key(frame, FeatureConfig(), pd.Timedelta("1h")),
    }
    assert len(keys) == 5
    assert F._raw_cache_key(frame, FeatureConfig(normalise="rank", clip=2.0), day) in keys


def test_timeframe_and_regime_blocks(daily):
    cfg = FeatureConfig(timeframes=("W-FRI",), regimes=3, regime_restarts=2)
    obs = build_observation_features(daily.frame, 3000, cfg)
    assert list(obs.blocks) == ["base", "W-FRI", "regime"]
    assert obs.names[obs.blocks["W-FRI"]][0] == "W-FRI:ret_1"
    assert obs.names[obs.blocks["regime"]] == ["regime:p0", "regime:p1", "regime:p2"]
    probs = obs.values[obs.first_valid :, obs.blocks["regime"]]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Weekly features need 20 complete weeks: far more than the daily warm-up.
    assert obs.first_valid > 20 * 5
    weekly = obs.values[obs.first_valid :, obs.blocks["W-FRI"]]
    # A weekly value only changes when a week completes: far fewer changes than daily rows.
    changes = np.count_nonzero(np.any(np.diff(weekly, axis=0) != 0, axis=1))
    assert changes < len(weekly) / 4
    # The stored log-likelihood is that of the training rows under the stored model: recompute it with an
    # independent forward recursion (sum of the log normalisers) and with hmmlearn's score.
    model = F._regime.RegimeModel.from_state(obs.state["regime"])
    start, stop = obs.state["fit_rows"]
    z = model.standardise(F._regime.regime_inputs(daily.frame["close"].to_numpy())[start:stop])
    log_b = F._regime.emission_log_likelihood(model, z)
    with np.errstate(divide="ignore"):  # a state the chain never starts in has log probability -inf
        alpha = np.log(model.startprob) + log_b[0]
    total = np.logaddexp.reduce(alpha)
    alpha -= total
    for row in log_b[1:]:
        alpha = np.logaddexp.reduce(alpha[:, None] + np.log(model.transmat), axis=0) + row
        norm = np.logaddexp.reduce(alpha)
        total, alpha = total + norm, alpha - norm
    stored = obs.state["regime"]["log_likelihood"]
    assert stored == pytest.approx(total, rel=1e-9, abs=1e-6)
    assert stored == pytest.approx(model.to_hmmlearn().score(z), rel=1e-9)
    assert stored == max(r["log_likelihood"] for r in obs.state["regime"]["restarts"] if r["converged"])


def test_bad_inputs_raise_clear_errors(daily):
    frame = daily.frame.iloc[:300]
    with pytest.raises(ValueError, match="outside"):
        build_observation_features(frame, 0)
    with pytest.raises(ValueError, match="outside"):
        build_observation_features(frame, 301)
    with pytest.raises(TypeError, match="integer"):
        build_observation_features(frame, 100.0)
    with pytest.raises(TypeError, match="integer"):
        build_observation_features(frame, True)
    with pytest.raises(ValueError, match="training rows"):
        build_observation_features(frame, 60)
    with pytest.raises(ValueError, match="too few rows"):
        build_observation_features(frame.iloc[:15], 15)
    with pytest.raises(TypeError, match="DataFrame"):
        build_observation_features(frame.to_numpy(), 100)
    broken = frame.copy()
    broken.iloc[5, 3] = np.nan
    with pytest.raises(DataValidationError, match="NaN"):
        build_observation_features(broken, 200)
    with pytest.raises(ValueError, match="base bar duration"):
        build_observation_features(frame, 1, FeatureConfig(timeframes=("W-FRI",)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bank": "huge"}, "bank"),
        ({"timeframes": "4h"}, "tuple"),
        ({"timeframes": ("4h", "4h")}, "distinct"),
        ({"timeframes": ("regime",)}, "block names"),
        ({"regimes": 1}, "regimes"),
        ({"regimes": -2}, "regimes"),
        ({"normalise": "zscore"}, "normalise"),
        ({"clip": 0.0}, "clip"),
        ({"prune_corr": 1.5}, "prune_corr"),
        ({"regime_restarts": 0}, "regime_restarts"),
        ({"session_close": "17:00"}, "FeatureConfig.session_close '17:00'"),
        ({"session_close": "17:00 Atlantis/Capital"}, "unknown time zone"),
    ],
)
def test_feature_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureConfig(**kwargs)


def test_feature_config_accepts_lists_of_timeframes_and_is_hashable():
    cfg = FeatureConfig(timeframes=["4h", "1D"])
    assert cfg.timeframes == ("4h", "1D") and hash(cfg) == hash(FeatureConfig(timeframes=("4h", "1D")))


def test_session_close_is_canonical_recorded_with_timeframes_and_in_the_cache_key(daily):
    cfg = FeatureConfig(timeframes=("W-FRI",), session_close="5:00 Asia/Tokyo")
    assert cfg.session_close == "05:00 Asia/Tokyo" and cfg == FeatureConfig(timeframes=("W-FRI",),
                                                                             session_close="05:00 Asia/Tokyo")
    assert cfg.fitted_fields()["session_close"] == "05:00 Asia/Tokyo"
    # Without timeframes it changes nothing, so a state fits every session close.
    assert FeatureConfig(session_close="05:00 Asia/Tokyo").fitted_fields() == FeatureConfig().fitted_fields()
    frame, hour = daily.frame.iloc[:300], pd.Timedelta("1h")
    assert F._raw_cache_key(frame, cfg, hour) != F._raw_cache_key(frame, FeatureConfig(timeframes=("W-FRI",)), hour)
    assert F._raw_cache_key(frame, FeatureConfig(session_close="05:00 Asia/Tokyo"), hour) == F._raw_cache_key(
        frame, FeatureConfig(), hour
    )
    state = build_observation_features(daily.frame.iloc[:900], 700, cfg).state
    assert state["config"]["session_close"] == "05:00 Asia/Tokyo" and F.config_from_state(state) == cfg


def test_fx_daily_block_is_built_on_session_days():
    frame = load_market("eurusd_1h").frame.iloc[:2000]
    hour = pd.Timedelta("1h")
    session = F.raw_features(frame, FeatureConfig(timeframes=("1D",), session_close="17:00 America/New_York"), hour)
    view = F.resample_causal(frame, "1D", hour, session_close="17:00 America/New_York")
    # The daily ret_1 at a row is the log return between the last two sessions visible there.
    daily_ret = np.log(view.bars["close"]).diff().to_numpy()
    np.testing.assert_array_equal(session.values[:, session.names.index("1D:ret_1")], view.align(daily_ret))


def test_raw_features_validates_its_input():
    frame = random_ohlcv(120, 4)
    cfg = FeatureConfig()
    duplicated = frame.copy()
    index = duplicated.index.to_numpy().copy()
    index[61] = index[60]
    duplicated.index = pd.DatetimeIndex(index, name="timestamp")
    with pytest.raises(DataValidationError, match=r"raw_features: duplicate timestamp\(s\) in 2 row\(s\)") as err:
        F.raw_features(duplicated, cfg, pd.Timedelta("1D"))
    assert str(frame.index[60]) in str(err.value)
    swapped = frame.iloc[[*range(30), 31, 30, *range(32, 120)]]
    with pytest.raises(DataValidationError, match="not in increasing order") as err:
        F.raw_features(swapped, cfg, pd.Timedelta("1D"))
    assert str(frame.index[30]) in str(err.value)
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['volume'\]"):
        F.raw_features(frame.drop(columns="volume"), cfg, pd.Timedelta("1D"))
    with pytest.raises(DataValidationError, match="numeric"):
        F.raw_features(frame.reset_index(drop=True), cfg, pd.Timedelta("1D"))
    with pytest.raises(TypeError, match="raw_features: frame must be a pandas DataFrame"):
        F.raw_features(frame.to_numpy(), cfg, pd.Timedelta("1D"))
    # Valid input in another column order and case gives the same features as the canonical frame.
    shuffled = frame[["volume", "close", "open", "low", "high"]].rename(columns=str.title)
    np.testing.assert_array_equal(F.raw_features(shuffled, cfg, pd.Timedelta("1D")).values,
                                  F.raw_features(frame, cfg, pd.Timedelta("1D")).values)


# ------------------------------------------------------------------------------- training rows as a mask
def rewrite_bars(frame: pd.DataFrame, mask: np.ndarray, seed: int = 1) -> pd.DataFrame:
    """``frame`` with the OHLCV of the rows in ``mask`` replaced by different valid bars (same timestamps)."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    k = int(mask.sum())
    o = out["open"].to_numpy()[mask] * np.exp(rng.normal(0, 0.05, k))
    c = out["close"].to_numpy()[mask] * np.exp(rng.normal(0, 0.05, k))
    out.loc[mask, "open"], out.loc[mask, "close"] = o, c
    out.loc[mask, "high"] = np.maximum(o, c) * 1.02
    out.loc[mask, "low"] = np.minimum(o, c) * 0.98
    out.loc[mask, "volume"] = rng.uniform(1e5, 1e7, k)
    return out


@pytest.fixture(scope="module")
def two_segments():
    """A frame, a config with every fitted part (pruning, a weekly block, an HMM), two training segments with
    test bars between and after them, and the embargo after the first test block (one feature span)."""
    from sentio_lab.features.spans import feature_span

    frame = random_ohlcv(1100, 3)
    config = FeatureConfig(timeframes=("W-FRI",), regimes=2, regime_restarts=2, prune_corr=0.95)
    span = feature_span(config, frame)
    test = np.zeros(len(frame), dtype=bool)
    test[350:450] = test[900:] = True
    embargo = np.zeros(len(frame), dtype=bool)
    embargo[450 : 450 + span] = True
    train = ~test & ~embargo
    fitted = build_observation_features(frame, None, config, train_rows=train)
    return frame, config, train, test, embargo, fitted


def test_train_rows_fit_on_the_training_segments_only(two_segments):
    """Rewrite every test bar: no fitted statistic moves (normaliser, kept and dropped columns, HMM), nor any
    training row's features. Control: rewriting the embargo bars, which training rows read, moves the state."""
    frame, config, train, test, embargo, fitted = two_segments
    span = int(embargo.sum())
    fv = fitted.first_valid
    assert fitted.state["fit_segments"] == [[fv, 350], [450 + span, 900]]
    assert fitted.state["fit_rows"] == [fv, 900] and fitted.state["regime"] is not None
    changed = build_observation_features(rewrite_bars(frame, test), None, config, train_rows=train)
    assert changed.state == fitted.state
    np.testing.assert_array_equal(changed.values[train], fitted.values[train])
    assert (changed.values[test] != fitted.values[test]).any()  # the rewrite is real
    leaky = build_observation_features(rewrite_bars(frame, embargo), None, config, train_rows=train)
    assert leaky.state["normaliser"] != fitted.state["normaliser"]
    assert leaky.state["regime"]["means"] != fitted.state["regime"]["means"]
    # the training rows are the fit: statistics of the first segment alone differ
    first_only = build_observation_features(frame, 350, config)
    assert first_only.state["normaliser"] != fitted.state["normaliser"]


def test_train_rows_features_stay_causal(two_segments):
    """With the fitted transform fixed, row t of the features reads bars <= t only."""
    frame, config, train, _, _, fitted = two_segments
    for t in (400, 700, 1000):
        future = np.arange(len(frame)) > t
        again = build_observation_features(rewrite_bars(frame, future, seed=t), None, config, fitted.state,
                                           train_rows=train)
        np.testing.assert_array_equal(again.values[: t + 1], fitted.values[: t + 1])
        assert (again.values[t + 1 :] != fitted.values[t + 1 :]).any()


def test_a_prefix_mask_is_the_train_stop_fit(daily):
    frame = daily.frame.iloc[:900]
    config = FeatureConfig(bank="talib", prune_corr=0.9, timeframes=("W-FRI",), regimes=2, regime_restarts=2)
    by_stop = build_observation_features(frame, 700, config)
    by_mask = build_observation_features(frame, None, config, train_rows=np.arange(900) < 700)
    assert by_mask.state == by_stop.state and by_mask.names == by_stop.names
    np.testing.assert_array_equal(by_mask.values, by_stop.values)


def test_train_rows_are_checked(two_segments):
    frame, config, train, *_ = two_segments
    with pytest.raises(ValueError, match="not both"):
        build_observation_features(frame, 500, config, train_rows=train)
    with pytest.raises(ValueError, match=r"boolean mask of shape \(1100,\)"):
        build_observation_features(frame, None, config, train_rows=train[:-1])
    with pytest.raises(ValueError, match="boolean mask"):
        build_observation_features(frame, None, config, train_rows=train.astype(np.int8))
    with pytest.raises(ValueError, match="selects no row"):
        build_observation_features(frame, None, config, train_rows=np.zeros(len(frame), dtype=bool))
    few = np.zeros(len(frame), dtype=bool)
    few[:110] = True  # all but a few rows inside the weekly warm-up
    with pytest.raises(ValueError, match=r"train_rows \(110 rows\) leaves \d+ training rows"):
        build_observation_features(frame, None, config, train_rows=few)
    with pytest.raises(TypeError, match="integer"):
        build_observation_features(frame, None, config)
