"""The "exogenous" feature block (sentio_lab.features.exogenous): causal, truncation-stable, fitted on training rows
only, carried in the feature state, counted in the CPCV embargo and blind to a fold's test groups."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab import ppo
from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.training import feature_config_from
from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data import DataValidationError, load_market, to_market
from sentio_lab.data.exogenous import bundled_exogenous
from sentio_lab.env.market import prepare_fold_market, prepare_market
from sentio_lab.env.splits import PurgeEmbargo, combinatorial_purged
from sentio_lab.evaluation.episodes import evaluate_checkpoint, evaluate_policy
from sentio_lab.features import FeatureConfig, build_observation_features
from sentio_lab.features.config import config_from_state
from sentio_lab.features.exogenous import (
    EXOGENOUS_BLOCK,
    apply_zscore,
    exogenous_block,
    exogenous_span,
    fit_zscore,
)
from sentio_lab.features.observation import warmup_rows
from sentio_lab.features.spans import feature_span

DAY = pd.Timedelta(days=1)
BUNDLED = ("vix", "credit_spread", "core_cpi", "wti", "ff_mkt_rf")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_market("sp500").frame


def monthly_csv(path, *, lag_days: int = 20, seed: int = 0, start: str = "2012-01", end: str = "2019-06",
                overrides: dict | None = None):
    """A monthly series released ``lag_days`` after each month's end at 13:30 UTC (``overrides``: date -> value)."""
    months = pd.period_range(start, end, freq="M")
    rng = np.random.default_rng(seed)
    values = 2.0 + np.cumsum(rng.normal(0, 0.1, len(months)))
    dates = months.to_timestamp()
    released = months.to_timestamp(how="end").normalize() + pd.Timedelta(days=lag_days, hours=13, minutes=30)
    table = pd.DataFrame({"date": dates.strftime("%Y-%m-%d"), "value": values,
                          "released_at": released.strftime("%Y-%m-%d %H:%M")})
    for date, value in (overrides or {}).items():
        table.loc[table["date"] == date, "value"] = value
    table.to_csv(path, index=False)
    return str(path)


def test_bundled_block_on_sp500(frame):
    block = exogenous_block(frame.index, BUNDLED, DAY)
    assert block.names[:2] == ["exo:vix", "exo:vix:chg"] and block.values.shape == (len(frame), 2 * len(BUNDLED))
    # VIX starts 2014-01-03 (a Friday, released Saturday): level from Monday, its change from Tuesday
    assert frame.index[block.first_valid] == pd.Timestamp("2014-01-07")
    vix = block.values[:, 0]
    assert np.isnan(vix[frame.index < pd.Timestamp("2014-01-06")]).all()  # missing, never back-filled
    assert vix[frame.index.get_loc(pd.Timestamp("2014-01-06"))] == 13.76
    assert np.isnan(block.values[frame.index.get_loc(pd.Timestamp("2014-01-06")), 1])
    assert block.values[block.first_valid, 1] == pytest.approx(np.log(13.55 / 13.76))
    assert np.isfinite(block.values[block.first_valid:]).all()
    spread = block.values[:, 2:4]  # credit spread changes are differences
    series = bundled_exogenous("credit_spread")
    jan, dec = (series.values[series.dates.get_loc(pd.Timestamp(d))] for d in ("2016-01-01", "2015-12-01"))
    row = frame.index.get_loc(pd.Timestamp("2016-03-01"))  # January's spread is out on 11 February, February's not
    assert spread[row, 0] == jan and spread[row, 1] == pytest.approx(jan - dec)
    assert exogenous_block(frame.index, (), DAY).values.shape == (len(frame), 0)


def perturb_after(frame: pd.DataFrame, t: int, seed: int) -> pd.DataFrame:
    """Bars after ``t`` replaced (values and timestamps shifted by hours)."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    scale = np.exp(rng.normal(0, 0.05, len(frame) - t - 1))
    for column in ("open", "high", "low", "close"):
        out.iloc[t + 1:, out.columns.get_loc(column)] *= scale
    out.iloc[t + 1:, out.columns.get_loc("volume")] *= 2
    index = out.index.to_numpy().copy()
    index[t + 1:] = index[t + 1:] + np.timedelta64(3, "h")
    out.index = pd.DatetimeIndex(index, name=frame.index.name)
    return out


def test_a_change_after_t_never_moves_anything_up_to_t(frame, tmp_path):
    """Rewrite every exogenous value released after bar t's close, and every bar after t: the raw block and the
    observation (fixed state) up to t are bit-identical; the same rewrite released one bar earlier does move t."""
    path = tmp_path / "macro.csv"
    config = FeatureConfig(exogenous=("vix", monthly_csv(path)))
    full = build_observation_features(frame, 700, config)
    close = frame.index.as_unit("ns").asi8 + DAY.value
    for t in (650, 700, 1100):
        table = pd.read_csv(path)
        later = pd.DatetimeIndex(table["released_at"]).as_unit("ns").asi8 > close[t]
        assert later.any() and (~later).any()
        table.loc[later, "value"] = table.loc[later, "value"] * 3 + 1
        changed_path = tmp_path / "changed" / "macro.csv"
        changed_path.parent.mkdir(exist_ok=True)
        table.to_csv(changed_path, index=False)
        changed_config = FeatureConfig(exogenous=("vix", str(changed_path)))
        changed_frame = perturb_after(frame, t, seed=t)
        before = exogenous_block(frame.index, config.exogenous, DAY)
        after = exogenous_block(changed_frame.index, changed_config.exogenous, DAY)
        np.testing.assert_array_equal(after.values[: t + 1], before.values[: t + 1])
        assert not np.array_equal(after.values[t + 1:], before.values[t + 1:], equal_nan=True)
        # the fixed state applied to a rewritten future (its fingerprint of the fitted values is set aside: here
        # the rewrite may reach into the fit range on purpose, which a real run refuses)
        exo_state = {k: v for k, v in full.state["exogenous"].items() if k != "fitted"}
        state = {**full.state, "config": changed_config.fitted_fields(),
                 "exogenous": {**exo_state, "series": list(changed_config.exogenous)}}
        rebuilt = build_observation_features(changed_frame, 700, changed_config, state=state)
        np.testing.assert_array_equal(rebuilt.values[: t + 1], full.values[: t + 1])
        # control: a value released by bar t's close does move bar t
        table = pd.read_csv(path)
        first_visible = np.flatnonzero(~later)[-1]
        table.loc[first_visible, "value"] += 1
        table.to_csv(changed_path, index=False)
        moved = exogenous_block(frame.index, changed_config.exogenous, DAY)
        assert moved.values[t, 2] != before.values[t, 2]


def test_truncation_computing_on_a_prefix_is_the_prefix(frame, tmp_path):
    config = FeatureConfig(exogenous=("vix", "core_cpi", monthly_csv(tmp_path / "macro.csv")))
    full = build_observation_features(frame, 700, config)
    whole = exogenous_block(frame.index, config.exogenous, DAY)
    for k in (300, 701, 1000):
        part = exogenous_block(frame.index[:k], config.exogenous, DAY)
        np.testing.assert_array_equal(part.values, whole.values[:k])
        np.testing.assert_array_equal(part.visible, whole.visible[:k])
        prefix = build_observation_features(frame.iloc[:k], 700 if k > 700 else None, config, state=full.state,
                                            train_rows=None if k > 700 else np.arange(k) < k)
        np.testing.assert_array_equal(prefix.values, full.values[:k])


def test_zscore_is_fitted_on_training_rows_only_and_carried_in_the_state(frame, tmp_path):
    path = tmp_path / "macro.csv"
    config = FeatureConfig(exogenous=("vix", monthly_csv(path)))
    features = build_observation_features(frame, 700, config)
    block = features.blocks[EXOGENOUS_BLOCK]
    raw = exogenous_block(frame.index, config.exogenous, DAY).values
    fit = slice(features.first_valid, 700)
    zscore = features.state["exogenous"]["zscore"]
    np.testing.assert_allclose(zscore["mean"], raw[fit].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(zscore["std"], raw[fit].std(axis=0), rtol=1e-12)
    expected = np.clip((raw - raw[fit].mean(axis=0)) / raw[fit].std(axis=0), -5, 5)
    np.testing.assert_allclose(features.values[features.first_valid:, block], expected[features.first_valid:],
                               rtol=1e-5, atol=1e-6)
    assert features.state["exogenous"]["series"] == list(config.exogenous)
    assert config_from_state(features.state).exogenous == config.exogenous
    # rewriting every value released after the training range leaves the fitted state as it was
    table = pd.read_csv(path)
    table.loc[pd.DatetimeIndex(table["released_at"]) > frame.index[699] + DAY, "value"] += 5
    table.to_csv(path, index=False)
    refit = build_observation_features(frame, 700, config)
    assert refit.state == features.state
    assert not np.array_equal(refit.values, features.values)
    # the fitted state still applies to the revised file (later values may change) ...
    build_observation_features(frame, 700, config, state=features.state)
    # ... but not once a value it was fitted on changed (review finding: silent vintage mixing)
    table.loc[0, "value"] += 1.0
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="values released up to the model's last training bar .* differ"):
        build_observation_features(frame, 700, config, state=features.state)
    # "none" keeps raw values: no z-score is fitted
    raw_config = FeatureConfig(exogenous=("vix",), normalise="none")
    unscaled = build_observation_features(frame, 700, raw_config)
    assert unscaled.state["exogenous"]["zscore"] is None
    np.testing.assert_array_equal(unscaled.values[unscaled.first_valid:, -2],
                                  raw[unscaled.first_valid:, 0].astype(np.float32))


def test_states_apply_only_to_their_series(frame):
    plain = build_observation_features(frame, 700, FeatureConfig())
    assert "exogenous" not in plain.state["config"] and plain.state["exogenous"] is None
    exo = build_observation_features(frame, 700, FeatureConfig(exogenous=("vix",)))
    with pytest.raises(ValueError, match="different config"):
        build_observation_features(frame, 700, FeatureConfig(exogenous=("wti",)), state=exo.state)
    with pytest.raises(ValueError, match="different config"):
        build_observation_features(frame, 700, FeatureConfig(), state=exo.state)
    old = {k: v for k, v in plain.state.items() if k != "exogenous"}  # a state saved before the field existed
    np.testing.assert_array_equal(build_observation_features(frame, 700, FeatureConfig(), state=old).values,
                                  plain.values)
    assert warmup_rows(frame, 700, FeatureConfig(exogenous=("vix",))) == exo.first_valid
    assert exo.first_valid > plain.first_valid


def test_a_stale_series_is_refused(frame, tmp_path):
    path = monthly_csv(tmp_path / "short.csv", end="2016-01")
    with pytest.raises(DataValidationError, match=r"exogenous series 'short': the bar 2016-05-23 00:00:00 sees a "
                       r"value released 2016-02-20 13:30:00 \(93.4 days before, more than the 93 allowed\).*"
                       r"end the market by 2016-05-20 \(--data-end\)") as err:
        exogenous_block(frame.index, (path,), DAY)
    assert err.value.flag == "--data-end" and err.value.value == "2016-05-20"
    exogenous_block(frame.index[frame.index <= pd.Timestamp("2016-05-20")], (path,), DAY)  # fresh until then
    with pytest.raises(ValueError, match="names repeat"):
        exogenous_block(frame.index, (path, f"{tmp_path / 'short.csv'}"), DAY)


def test_the_span_counts_the_oldest_period_read(frame, tmp_path):
    """At bar r the change reads the previous month's value, whose period began up to ~2 months + lag earlier."""
    path = monthly_csv(tmp_path / "macro.csv", lag_days=20)
    span = exogenous_span(frame.index, (path,), DAY)
    # brute force: at each bar, the period before the latest one released by its close, and that period's first bar
    table = pd.read_csv(path)
    dates, released = pd.DatetimeIndex(table["date"]), pd.DatetimeIndex(table["released_at"])
    closes, expected = (frame.index + DAY).to_numpy(), 0
    for r, close in enumerate(closes):
        out = int((released.to_numpy() <= close).sum())  # values released by the bar's close
        if out >= 2:
            expected = max(expected, r - int(np.argmax(closes > dates.to_numpy()[out - 2])))
    assert span == expected
    # a bar just before a release shows months m-1 and m-2: m-2 began 3 months + 20 days before, ~75 trading bars
    assert 70 <= span <= 82
    longer = exogenous_span(frame.index, (monthly_csv(tmp_path / "late.csv", lag_days=40),), DAY)
    assert longer > span + 10
    assert exogenous_span(frame.index, (), DAY) == 0
    config = FeatureConfig(exogenous=(path,))
    assert feature_span(config, frame) == max(span, feature_span(FeatureConfig(), frame))
    assert PurgeEmbargo.for_features(8, config, frame).embargo >= 7 + span
    with pytest.raises(ValueError, match="pass the frame"):
        feature_span(config)
    vix = exogenous_span(frame.index, ("vix",), DAY)
    assert 2 <= vix <= 6  # the previous day's value, a weekend or a holiday between


def test_a_cpcv_fold_is_blind_to_exogenous_values_about_its_test_groups(tmp_path):
    """Rewrite every exogenous value whose period begins before a test group ends and which is released after it
    begins (information about the test bars), and the test bars themselves: the fold's fitted state and every row
    a training env reads are bit-identical."""
    path = tmp_path / "macro.csv"
    monthly_csv(path, lag_days=25)
    config = FeatureConfig(exogenous=(str(path),))
    base = prepare_market("sp500", config)
    frame, n = base.data.frame, len(base.data)
    gaps = PurgeEmbargo.for_features(8, base.feature_config, frame)
    folds = combinatorial_purged(n, gaps, n_groups=5, n_test_groups=2, first_valid=base.arrays.first_valid)
    fold = next(f for f in folds if len(f.train) >= 2 and f.train[-1][0] > f.test[-1][0])
    market = prepare_fold_market(base, fold)
    table = pd.read_csv(path)
    dates, released = pd.DatetimeIndex(table["date"]), pd.DatetimeIndex(table["released_at"])
    about_test = np.zeros(len(table), dtype=bool)
    for a, b in fold.test:
        about_test |= (dates < frame.index[b - 1] + DAY) & (released > frame.index[a])
    assert about_test.sum() >= 4
    table.loc[about_test, "value"] += 10.0
    table.to_csv(path, index=False)
    test = fold.test_mask(n)
    rewritten = frame.copy()
    rewritten.loc[test, ["open", "high", "low", "close"]] *= 1.1
    changed = prepare_fold_market(to_market(rewritten, name="rewritten"), fold, feature_config=config)

    def fitted_part(state):  # the fingerprint records the file (values about test groups included); nothing reads it
        return {**state, "exogenous": {k: v for k, v in state["exogenous"].items() if k != "fitted"}}

    assert fitted_part(changed.features.state) == fitted_part(market.features.state)
    observed = np.concatenate([np.arange(lo - 8 + 1, hi + 24 + 1) for lo, hi in market.episode_sampler(8, 24).bounds])
    np.testing.assert_array_equal(changed.arrays.features[observed], market.arrays.features[observed])
    block = market.features.blocks[EXOGENOUS_BLOCK]
    assert (changed.arrays.features[test][:, block] != market.arrays.features[test][:, block]).any()
    # control: with the embargo of the bank alone (no exogenous span) a training row would see the rewrite
    short = PurgeEmbargo.for_features(8, FeatureConfig(), frame)
    assert short.embargo < gaps.embargo
    after_test = [np.arange(b + short.embargo, b + gaps.embargo) for _, b in fold.test if b + gaps.embargo < n]
    rows = np.concatenate(after_test)
    assert (changed.arrays.features[rows][:, block] != market.arrays.features[rows][:, block]).any()


def test_the_flag_reaches_the_feature_config():
    args = parse_variant_args("ppo", ["--exogenous", "vix,credit_spread", "core_cpi"])
    assert args.features.exogenous == ("vix,credit_spread", "core_cpi")
    assert feature_config_from(args).exogenous == ("vix", "credit_spread", "core_cpi")
    assert feature_config_from(parse_variant_args("ppo", [])).exogenous == ()
    for bad, message in [(("vixx",), "unknown series 'vixx'"), ("vix", "the string"), (("vix", "vix"), "twice")]:
        with pytest.raises(ValueError, match=message):
            FeatureConfig(exogenous=bad)
    with pytest.raises(ValueError, match="block names"):
        FeatureConfig(timeframes=("exogenous",))
    assert FeatureConfig(exogenous=("a.csv@1D",)).fitted_fields()["exogenous"] == ["a.csv@1D"]


@pytest.mark.parametrize("variant", ["ppo", "ppo_masked", "ppo_risk", "ppo_transformer"])
def test_every_variant_takes_the_flag(variant):
    args = parse_variant_args(variant, ["--exogenous", "vix", "credit_spread"])
    assert load_variant(variant).feature_config(args).exogenous == ("vix", "credit_spread")


def test_a_checkpoint_carries_the_fitted_exogenous_state(tiny_args):
    """Train a tiny PPO with VIX and the credit spread; the checkpoint re-evaluates to the live agent's equity, with
    the features rebuilt from its saved state (the z-score included)."""
    args = tiny_args.replace(exogenous=("vix", "credit_spread"))
    market = prepare_market("sp500", feature_config_from(args))
    result = ppo.train(args, market=market)
    saved = load_checkpoint(result.checkpoint_path)["feature_state"]
    assert saved["exogenous"]["series"] == ["vix", "credit_spread"] and len(saved["exogenous"]["zscore"]["mean"]) == 4
    assert [n for n in market.features.names if n.startswith("exo:")] == [
        "exo:vix", "exo:vix:chg", "exo:credit_spread", "exo:credit_spread:chg"]
    live = evaluate_policy(result.agent, market, window=args.features.window, positions=args.env.positions,
                           costs=ppo.cost_model(args))
    restored = evaluate_checkpoint(result.checkpoint_path)
    pd.testing.assert_series_equal(live.equity, restored.equity)


def test_zscore_and_span_edges(frame, tmp_path):
    with pytest.raises(ValueError, match="constant on the training rows"):
        fit_zscore(np.array([[1.0, 2.0], [1.0, 3.0]]))
    params = fit_zscore(np.array([[1.0], [3.0]]))
    np.testing.assert_array_equal(apply_zscore(np.array([[2.0], [11.0]]), params, 5.0), [[0.0], [5.0]])
    one = tmp_path / "one.csv"
    one.write_text("date,value\n2014-01-01,1\n")  # one release: a level, never a change, so no span
    assert exogenous_span(frame.index[:10], (f"{one}@1D",), DAY) == 0
