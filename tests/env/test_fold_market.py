"""Fold markets (sentio_lab.env.market.prepare_fold_market): features fitted on a fold's training segments only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.data import to_market
from sentio_lab.env import TradingEnv
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import PreparedMarket, prepare_fold_market, prepare_market
from sentio_lab.env.splits import PurgeEmbargo, combinatorial_purged, touched_bars, walk_forward
from sentio_lab.features import FeatureConfig, build_observation_features

WINDOW, LENGTH = 8, 20
RANGE = {"start": "2004", "end": "2009"}
CONFIGS = {
    "weekly": FeatureConfig(timeframes=("W-FRI",)),
    "regimes": FeatureConfig(regimes=2, regime_restarts=2, prune_corr=0.95),
}


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


@pytest.fixture(scope="module", params=list(CONFIGS))
def base(request) -> PreparedMarket:
    """NASDAQ 2004-2009 (1,510 bars) prepared chronologically, once per feature config."""
    return prepare_market("nasdaq", CONFIGS[request.param], **RANGE)


def cpcv(base: PreparedMarket):
    gaps = PurgeEmbargo.for_features(WINDOW, base.feature_config, base.data.frame)
    folds = combinatorial_purged(len(base.data), gaps, n_groups=5, n_test_groups=2,
                                 first_valid=base.arrays.first_valid)
    return gaps, folds


def non_regime_columns(market: PreparedMarket) -> np.ndarray:
    columns = np.ones(market.arrays.features.shape[1], dtype=bool)
    if "regime" in market.features.blocks:
        columns[market.features.blocks["regime"]] = False
    return columns


def rollout(market: PreparedMarket, steps: int = 120, seed: int = 3):
    """Observations, rewards and bootstrap observations of a training env drawing from the fold's segments."""
    env = TradingEnv(market.arrays, num_envs=16, window=WINDOW, episode_length=LENGTH, costs=CostModel(), seed=seed,
                     start_sampler=market.episode_sampler(WINDOW, LENGTH))
    gen = torch.Generator().manual_seed(seed)
    trace, visited = [env.reset()], [env.t.clone()]
    for _ in range(steps):
        obs, reward, _, _, info = env.step(torch.randint(0, 3, (16,), generator=gen))
        trace += [obs, reward, info["final_obs"]]
        visited.append(env.t.clone())
    return trace, torch.cat(visited).numpy()


def test_a_cpcv_fold_is_fitted_blind_to_its_test_groups(base):
    """Rewrite every test bar of a fold: the fitted state (normaliser, pruning, HMM) is identical, and so is every
    bar a training env can read -- for the regime config, up to the HMM filter's fading memory of the past
    (``splits``: ``extra_embargo``), which the check leaves out. Controls: fitting on the span of the training
    segments (test groups inside) does move, and so does the chronological fit."""
    gaps, folds = cpcv(base)
    frame, n, fv = base.data.frame, len(base.data), base.arrays.first_valid
    after_a_test = [f for f in folds if len(f.train) >= 2 and f.train[-1][0] > f.test[0][0]]
    assert len(after_a_test) >= 2
    for fold in after_a_test[:2]:
        market = prepare_fold_market(base, fold)
        test = fold.test_mask(n)
        changed_data = to_market(rewrite_bars(frame, test), name="rewritten")
        changed = prepare_fold_market(changed_data, fold, feature_config=base.feature_config)
        assert changed.features.state == market.features.state
        assert market.features.state["fit_segments"] == [[max(s, fv), e] for s, e in fold.train]
        touched = np.unique(np.concatenate([touched_bars(seg, gaps, episode_length=LENGTH, first_valid=fv)
                                            for seg in fold.train]))
        assert not test[touched].any()  # the bars the features of the observed rows read
        observed = np.concatenate([np.arange(lo - WINDOW + 1, hi + LENGTH + 1)
                                   for lo, hi in market.episode_sampler(WINDOW, LENGTH).bounds])
        cols = non_regime_columns(market)
        np.testing.assert_array_equal(changed.arrays.features[observed][:, cols],
                                      market.arrays.features[observed][:, cols])
        # Regime columns: the forward filter's memory of a test group fades but never ends (splits.py docstring);
        # measured at float32 noise (~3e-7), so anything near a real leak fails here.
        np.testing.assert_allclose(changed.arrays.features[observed], market.arrays.features[observed], rtol=0,
                                   atol=1e-5)
        for name in ("open", "close"):
            np.testing.assert_array_equal(getattr(changed.arrays, name)[observed],
                                          getattr(market.arrays, name)[observed])
        assert (changed.arrays.features[test] != market.arrays.features[test]).any()  # the rewrite is real
        span_stop = market.range("train")[1]
        naive = build_observation_features(changed_data.frame, span_stop, base.feature_config)
        assert naive.state["normaliser"] != build_observation_features(frame, span_stop, base.feature_config).state[
            "normaliser"]
        assert base.features.state["normaliser"] != market.features.state["normaliser"]
        if "regime" not in market.features.blocks:  # the whole training stream is bit-identical
            before, visited = rollout(market)
            after, _ = rollout(changed)
            assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
            assert not test[visited].any()
            assert {next(k for k, (s, e) in enumerate(fold.train) if s <= t < e) for t in visited} == set(
                range(len(fold.train)))  # every segment was visited


def test_fold_market_ranges(base):
    _, folds = cpcv(base)
    fold = folds[4]
    market = prepare_fold_market(base, fold)
    assert market.fold is fold and market.training_segments() == fold.train == market.train_segments
    assert market.range("train") == (fold.train[0][0], fold.train[-1][1])
    assert [market.range(f"test:{g}") for g in fold.groups] == list(fold.test)
    assert "test" not in market.splits and "validation" not in market.splits
    assert market.splits["train"].first_timestamp == base.data.frame.index[fold.train[0][0]]
    sampler = market.episode_sampler(WINDOW, LENGTH)
    assert sampler.bounds[0][0] == max(fold.train[0][0], market.arrays.first_valid + WINDOW - 1)
    assert sampler.bounds[-1][1] == fold.train[-1][1] - 1 - LENGTH
    assert market.feature_config == base.feature_config and market.data is base.data


def test_a_prefix_walk_forward_fold_is_prepare_market(base):
    """With a one-row window the first training decision is the first feature row: an expanding walk-forward
    fold's training rows are then exactly prepare_market's ``[first_valid, train_stop)``, and so is everything."""
    frame, n, fv = base.data.frame, len(base.data), base.arrays.first_valid
    gaps = PurgeEmbargo.for_features(1, base.feature_config, frame)
    folds = walk_forward(n, gaps, n_folds=3, first_valid=fv)
    for fold in folds[:2]:
        ((s, e),) = fold.train
        assert s == fv
        market = prepare_fold_market(base, fold)
        reference = prepare_market("nasdaq", base.feature_config, train_fraction=e / n, validation_fraction=0.05,
                                   **RANGE)
        assert reference.range("train") == (0, e)
        assert market.features.state == reference.features.state
        for name in ("open", "close", "features", "year_fraction"):
            np.testing.assert_array_equal(getattr(market.arrays, name), getattr(reference.arrays, name), name)
        assert market.arrays.first_valid == reference.arrays.first_valid
        assert market.range("test") == market.range(f"test:{fold.fold}") == fold.test[0]
        assert market.range("train") == (s, e)


def test_validation_bars_are_carved_off_the_last_training_segment(base):
    _, folds = cpcv(base)
    fold = folds[4]
    market = prepare_fold_market(base, fold, validation_bars=60)
    (s, e), a = fold.train[-1], fold.train[-1][1] - 61
    assert market.range("validation") == (a, e) and market.train_segments == (*fold.train[:-1], (s, a))
    assert market.features.state["fit_segments"][-1] == [s, a]  # the validation rows are not fitted on
    gaps = PurgeEmbargo.for_features(WINDOW, base.feature_config, base.data.frame)
    assert touched_bars((s, a), gaps, episode_length=1).max() == a - 1  # training stops before validation
    plain = prepare_fold_market(base, fold)
    assert plain.features.state != market.features.state
    with pytest.raises(ValueError, match="leaves no training decision"):
        prepare_fold_market(base, fold, validation_bars=e - s)
    with pytest.raises(ValueError, match="validation_bars must be >= 0"):
        prepare_fold_market(base, fold, validation_bars=-1)


def test_fold_market_errors(base):
    _, folds = cpcv(base)
    fold = folds[0]
    with pytest.raises(ValueError, match="pass feature_config="):
        prepare_fold_market(base.data, fold)
    bare = PreparedMarket(data=base.data, splits=base.splits, features=base.features, arrays=base.arrays)
    with pytest.raises(ValueError, match="records no feature_config"):
        prepare_fold_market(bare, fold)
    with pytest.raises(TypeError, match="PreparedMarket or MarketData"):
        prepare_fold_market(base.data.frame, fold)
    small = to_market(base.data.frame.iloc[:1000], name="short")
    with pytest.raises(ValueError, match="outside the market"):
        prepare_fold_market(small, fold, feature_config=base.feature_config)
