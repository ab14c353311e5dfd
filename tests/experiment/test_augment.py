"""Training-data augmentation (issue 19 s4): bootstrapped copies of the training segments only, appended beside the
real bars; validation and test untouched; the copies depend on training rows alone; features fitted on real rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.data import load_market, to_market
from sentio_lab.env import splits as splitting
from sentio_lab.env.market import prepare_fold_market
from sentio_lab.experiment.augment import augmented_frame, augmented_market
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
from sentio_lab.experiment.runner import plan_experiment, run_experiment
from sentio_lab.features import FeatureConfig, build_observation_features
from tests.evaluation.test_baselines import prices

WINDOW = 4
CONFIG = FeatureConfig(regimes=2)  # the basic bank and a filtered HMM: both must stay fitted on real rows


@pytest.fixture(scope="module")
def fold_setup():
    frame = prices(900, seed=5)
    gaps = splitting.PurgeEmbargo.for_features(WINDOW, CONFIG, frame)
    folds = splitting.combinatorial_purged(len(frame), gaps, n_groups=4, n_test_groups=2, first_valid=60)
    fold = next(f for f in folds if f.groups == (1, 2))  # training on both sides of the test groups
    real = prepare_fold_market(to_market(frame, name="p"), fold, feature_config=CONFIG, validation_bars=40)
    return frame, fold, real


def augment(market, paths=2, seed=7, reach=3):
    return augmented_market(market, paths=paths, block_mean=5.0, seed=seed, window=WINDOW, reach=reach)


def validation_and_test(market):
    """The rows of the validation slice and of every test group (what training must never see)."""
    ranges = [market.range(name) for name in market.splits if name == "validation" or name.startswith("test")]
    return np.unique(np.concatenate([np.arange(a, b) for a, b in ranges]))


def scaled(frame, rows, seed=0):
    out = frame.copy()
    factors = np.random.default_rng(seed).uniform(0.8, 1.25, len(rows))
    for column in ("open", "high", "low", "close"):
        out.iloc[rows, out.columns.get_loc(column)] *= factors
    out["high"] = out[["open", "high", "low", "close"]].max(axis=1)
    out["low"] = out[["open", "high", "low", "close"]].min(axis=1)
    return out


def test_the_real_market_is_untouched_and_the_features_stay_fitted_on_real_rows(fold_setup):
    _, _, real = fold_setup
    market, copies = augment(real)
    n = len(real.data.frame)
    assert len(copies) == 2 * len(real.training_segments())
    pd.testing.assert_frame_equal(market.data.frame.iloc[:n], real.data.frame, check_freq=False)
    np.testing.assert_array_equal(market.features.values[:n], real.features.values)
    assert market.features.state is real.features.state and market.features.names == real.features.names
    for field in ("open", "close", "features", "year_fraction", "high", "low", "volume"):
        np.testing.assert_array_equal(getattr(market.arrays, field)[:n], getattr(real.arrays, field))
    for name in ("validation", *[k for k in real.splits if k.startswith("test")]):
        assert market.splits[name] == real.splits[name]
    assert market.train_segments[: len(real.train_segments)] == real.train_segments
    assert market.data.fingerprint != real.data.fingerprint  # a checkpoint records what it trained on
    assert market.data.frame.index.is_monotonic_increasing and market.data.frame.index.is_unique


def test_a_copy_is_a_block_bootstrap_of_its_own_segment(fold_setup):
    frame, _, real = fold_setup
    market, copies = augment(real)
    close = market.data.frame["close"].to_numpy()
    for copy in copies:
        (s, e), (a, b) = copy.source, copy.rows
        assert b - a == e - s and close[a] == close[s]  # the first bar anchors the level
        growth = close[a + 1:b] / close[a:b - 1]
        source = close[s + 1:e] / close[s:e - 1]
        assert np.isin(np.round(growth, 12), np.round(source, 12)).all()  # every return is one of the segment's
        assert not np.allclose(growth, source)  # resampled, not copied
        # the copy keeps the weekdays and spacing of its source bars
        shift = market.data.frame.index[a:b] - frame.index[s:e]
        assert (shift == shift[0]).all() and shift[0] % pd.Timedelta(days=7) == pd.Timedelta(0)


def test_copies_depend_on_training_rows_only(fold_setup):
    """Scaling every validation and test-group bar leaves the copies (bars and features) bit for bit; scaling one
    training bar moves them."""
    frame, fold, real = fold_setup
    n = len(frame)
    market, _ = augment(real)
    outside = scaled(frame, validation_and_test(real))
    other = prepare_fold_market(to_market(outside, name="p"), fold, feature_config=CONFIG, validation_bars=40)
    perturbed, _ = augment(other)
    pd.testing.assert_frame_equal(perturbed.data.frame.iloc[n:], market.data.frame.iloc[n:], check_exact=True)
    np.testing.assert_array_equal(perturbed.features.values[n:], market.features.values[n:])
    assert not perturbed.data.frame.iloc[:n].equals(market.data.frame.iloc[:n])  # the perturbation landed
    a, b = real.training_segments()[0]
    inside, _ = augmented_frame(scaled(frame, np.arange(a + 10, a + 11)), real.training_segments(), paths=2,
                                block_mean=5.0, seed=7)
    assert not inside.iloc[n:].equals(market.data.frame.iloc[n:])


def test_augmentation_is_seeded(fold_setup):
    _, _, real = fold_setup
    first, second, other = (augment(real, seed=s)[0].data.frame for s in (7, 7, 8))
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert not first.equals(other)


def test_episodes_on_a_copy_never_read_across_its_start(fold_setup):
    _, _, real = fold_setup
    reach = 12
    market, copies = augment(real, reach=reach)
    sampler = market.episode_sampler(WINDOW, 16)
    copy_bounds = sampler.bounds[len(real.train_segments):]
    assert len(copy_bounds) == len(copies)  # every copy is drawn from
    for (lo, _), copy in zip(copy_bounds, copies, strict=True):
        a, b = copy.rows
        own = build_observation_features(market.data.frame.iloc[a:b], None, CONFIG, real.features.state,
                                         train_rows=np.ones(b - a, dtype=bool))
        np.testing.assert_array_equal(market.features.values[a:b], own.values)  # computed on the copy alone
        assert own.first_valid > 0 and lo == a + max(own.first_valid + WINDOW - 1, reach)
    starts = sampler.sample(4000, torch.Generator().manual_seed(0)).numpy()
    assert (starts >= len(real.data.frame)).mean() > 0.5  # two copies of every segment: most episodes are augmented


def test_refusals(fold_setup):
    _, _, real = fold_setup
    with pytest.raises(ValueError, match="paths must be >= 1"):
        augmented_frame(real.data.frame, real.training_segments(), paths=0, block_mean=5.0, seed=0)
    with pytest.raises(ValueError, match="exogenous features"):
        augment(dataclasses.replace(real, feature_config=dataclasses.replace(CONFIG, exogenous=("vix",))))
    with pytest.raises(ValueError, match="fold market"):
        augment(dataclasses.replace(real, fold=None))
    with pytest.raises(ValueError, match="needs a DatetimeIndex"):
        augmented_frame(real.data.frame.reset_index(drop=True), real.training_segments(), paths=1, block_mean=5.0,
                        seed=0)
    # a reach longer than every copy: the copies exist but none is drawn from (nothing reads across a start)
    market, copies = augment(real, reach=10_000)
    assert copies and market.train_segments == real.train_segments
    with pytest.raises(ValueError, match="augment_paths must be >= 0"):
        ExperimentConfig(name="x", agents=(AgentSpec("a", "ppo"),), augment_paths=-1)


# ---------------------------------------------------------------------------------------------- runner
TINY = ("--total-timesteps", "256", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--hidden-size", "8")


def test_the_runner_trains_augmented_cells_and_evaluates_them_on_the_real_bars(tmp_path):
    load_market("nasdaq", end="2004-12-31").frame.iloc[:700].to_csv(tmp_path / "nasdaq.csv")
    config = ExperimentConfig(
        name="aug", dataset=str(tmp_path / "nasdaq.csv"), split="walk_forward", n_groups=2, seeds=(1,),
        baselines=("buy_and_hold",), random_seeds=1, augment_paths=1,
        common_args=("--window", "4", "--episode-length", "16", "--feature-cache-dir", str(tmp_path / "cache")),
        agents=(AgentSpec("tiny", "ppo", TINY),),
    )
    plan = plan_experiment(config)
    assert all(c.cell_id.endswith(f"__fold{c.fold:03d}") and "__aug1x5" in c.cell_id for c in plan.cells)
    results = run_experiment(plan, tmp_path / "run", progress=False)  # loading checks fingerprint and features
    assert set(results["name"]) == {"tiny", "buy_and_hold"} and results["sharpe"].notna().all()
    vol = dataclasses.replace(config.agents[0], args=TINY + ("--anchor", "vol_target"))
    with pytest.raises(ValueError, match="augment_paths with --anchor vol_target"):
        plan_experiment(dataclasses.replace(config, agents=(vol,)))
