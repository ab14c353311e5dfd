"""Purged splits: no training sample reads a test bar, the embargo is tight, paths chain, episodes stay in segments."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sentio_lab.env import MarketArrays, TradingEnv, episode_start_bounds
from sentio_lab.env.costs import CostModel
from sentio_lab.env.splits import (
    Fold,
    LeakageError,
    PurgeEmbargo,
    SegmentEpisodeSampler,
    backtest_paths,
    check_fold,
    combinatorial_purged,
    fit_rows,
    segment_start_bounds,
    stitch_equity,
    touched_bars,
    walk_forward,
)
from sentio_lab.features import FeatureConfig, build_observation_features
from sentio_lab.features.spans import feature_span, htf_span, htf_span_bound


# ------------------------------------------------------------------------------------------------ helpers
def reference_touched(segment, window, span, episode_length, first_valid):
    """Bars an env on ``segment`` reads, enumerated start by start and step by step (independent of splits.py)."""
    start, stop = segment
    lo, hi = max(start, first_valid + window - 1), stop - 1 - episode_length
    touched = set()
    for t0 in range(lo, hi + 1):
        for k in range(episode_length):
            t = t0 + k
            touched.update(range(t - window + 1 - span, t + 1))  # observation rows and their inputs
            touched.add(t + 1)  # fill at the open and mark at the close of the next bar
        end = t0 + episode_length  # truncation bootstrap: the observation at the last bar
        touched.update(range(end - window + 1 - span, end + 1))
    return {b for b in touched if b >= 0}


def training_decisions(fold):
    """Decision bars a training env of ``fold`` can choose at (decisions of [s, e) are s .. e - 2)."""
    return set().union(*(range(s, e - 1) for s, e in fold.train))


def bars_of_tests(fold):
    return set().union(*(range(a, b) for a, b in fold.test))


def make_frame(n=1200, seed=0, drop_every=0):
    """Synthetic daily OHLCV on business days (optionally with missing days, like holidays)."""
    rng = np.random.default_rng(seed)
    index = pd.bdate_range("2001-01-01", periods=n + (2 * n // drop_every + 5 if drop_every else 0))
    if drop_every:
        index = index.delete(np.arange(3, len(index), drop_every))[:n]
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    opens = np.concatenate([[100.0], close[:-1]]) * np.exp(rng.normal(0, 0.002, n))
    return pd.DataFrame({
        "open": opens, "close": close,
        "high": np.maximum(opens, close) * (1 + rng.uniform(0, 0.01, n)),
        "low": np.minimum(opens, close) * (1 - rng.uniform(0, 0.01, n)),
        "volume": rng.uniform(1e5, 1e6, n),
    }, index=index[:n].rename("timestamp"))


def perturb(frame, mask, seed=1):
    """Replace the OHLCV of the rows in ``mask`` with different valid bars."""
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


def segmented_env(market, sampler, **kwargs):
    """A TradingEnv drawing every episode start from ``sampler``."""
    return TradingEnv(market, window=sampler.window, episode_length=sampler.episode_length, start_sampler=sampler,
                      **kwargs)


# ------------------------------------------------------------------------------------------------- the rule
@settings(max_examples=60, deadline=None)
@given(
    n_bars=st.integers(200, 2500), window=st.integers(1, 24), span=st.integers(0, 40),
    first_valid=st.integers(0, 60), extra=st.integers(0, 3), n_groups=st.integers(3, 7),
    k=st.integers(2, 6), episode_length=st.integers(1, 4),
)
def test_cpcv_training_never_reads_a_test_bar_and_the_embargo_is_tight(
    n_bars, window, span, first_valid, extra, n_groups, k, episode_length
):
    assume(k < n_groups)
    gaps = PurgeEmbargo(window=window, feature_span=span, extra_embargo=extra)
    d0, d1 = first_valid + window - 1, n_bars - 1
    assume(d1 - d0 > 0 and (d1 - d0) // n_groups > gaps.purge + gaps.embargo + 1)
    folds = combinatorial_purged(n_bars, gaps, n_groups=n_groups, n_test_groups=k, first_valid=first_valid)
    assert len(folds) == math.comb(n_groups, k)
    for fold in folds:
        test = bars_of_tests(fold)
        for segment in fold.train:
            ref = reference_touched(segment, window, span, episode_length, first_valid)
            assert not ref & test, f"segment {segment} reads test bars {sorted(ref & test)[:5]}"
            assert ref <= set(touched_bars(segment, gaps, episode_length=episode_length, first_valid=first_valid))
        # every decision bar outside the forbidden windows [a - 1, b + 1 + embargo) is trained on, and no other
        forbidden = set().union(*(range(a - 1, b + gaps.embargo) for a, b in fold.test))  # b = env stop = last + 1
        assert training_decisions(fold) == set(range(d0, d1)) - forbidden
        # tightness: one more bar either side of a segment would read a test bar
        for s, e in fold.train:
            if s > d0:  # after a test group: starting a bar earlier (than the extra margin) reads a test bar
                assert reference_touched((s - 1 - extra, e), window, span, 1, first_valid) & test
            if e < n_bars:  # before a test group: one more bar is the test group's first bar
                assert e in test


@pytest.mark.parametrize("expanding", [True, False])
@pytest.mark.parametrize("window,span,first_valid", [(1, 0, 0), (8, 20, 20), (32, 105, 110)])
def test_walk_forward_trains_only_before_its_test_group(expanding, window, span, first_valid):
    gaps = PurgeEmbargo(window=window, feature_span=span)
    n_bars = 1500
    folds = walk_forward(n_bars, gaps, n_folds=4, train_size=None if expanding else 300, expanding=expanding,
                         first_valid=first_valid)
    assert len(folds) == 4 and all(f.embargo == 0 and f.purge == 1 for f in folds)
    d0 = first_valid + window - 1
    for prev, fold in zip(folds, folds[1:], strict=False):
        assert fold.test[0][0] == prev.test[0][1] - 1  # the single path chains
    for fold in folds:
        (s, e), ((a, b),) = fold.train[0], fold.test
        assert e == a  # the last training decision is a - 2: the purge is the fill delay
        assert not reference_touched((s, e), window, span, 1, first_valid) & set(range(a, b))
        assert s == d0 if expanding else e - 1 - s == 300
    assert backtest_paths(folds) == {0: [(f.fold, 0) for f in folds]}


def test_walk_forward_sizes_and_errors():
    gaps = PurgeEmbargo(window=4, feature_span=5)
    folds = walk_forward(500, gaps, test_size=50, train_size=100, start=100, stop=450)
    assert folds[0].train == ((100, 201),) and folds[0].test == ((201, 252),)
    assert folds[-1].test[0][1] <= 450
    with pytest.raises(ValueError, match="test_size or n_folds"):
        walk_forward(500, gaps)
    with pytest.raises(ValueError, match="leave test_size"):
        walk_forward(500, gaps, n_folds=600)
    with pytest.raises(ValueError, match="no fold fits"):
        walk_forward(500, gaps, test_size=100, train_size=480)
    with pytest.raises(ValueError, match="outside"):
        walk_forward(500, gaps, test_size=10, stop=501)
    with pytest.raises(ValueError, match="no decision bar"):
        walk_forward(500, gaps, test_size=10, first_valid=497)


def test_cpcv_paths_follow_skfolio_and_chain():
    gaps = PurgeEmbargo(window=8, feature_span=20)
    folds = combinatorial_purged(2000, gaps, n_groups=6, n_test_groups=2, first_valid=20)
    paths = backtest_paths(folds)
    assert len(paths) == math.comb(5, 1) == 5
    by_id = {f.fold: f for f in folds}
    for members in paths.values():
        groups = [by_id[f].groups[j] for f, j in members]
        assert groups == list(range(6))  # each path: every group once, in time order
        ranges = [by_id[f].test[j] for f, j in members]
        assert ranges[0][0] == 27 and ranges[-1][1] == 2000
    assert all(fold.embargo == 27 and fold.purge == 1 for fold in folds)
    # each group is tested in comb(5, 1) splits, and each of those feeds a different path
    pairs = [(g, p) for fold in folds for g, p in zip(fold.groups, fold.paths, strict=True)]
    assert len(set(pairs)) == len(pairs) == 6 * 5
    with pytest.raises(ValueError, match="cannot hold the purge"):
        combinatorial_purged(300, PurgeEmbargo(window=32, feature_span=20), n_groups=6, n_test_groups=2)
    broken = [Fold(0, "cpcv", (), ((0, 10),), (0,), (0,), 1, 0), Fold(1, "cpcv", (), ((12, 20),), (1,), (0,), 1, 0)]
    with pytest.raises(ValueError, match="do not chain"):
        backtest_paths(broken)


def test_check_fold_catches_a_leaking_segment():
    gaps = PurgeEmbargo(window=4, feature_span=6)
    fold = Fold(0, "cpcv", ((0, 100), (110, 200)), ((100, 108),), (1,), (0,), 1, 9)
    with pytest.raises(LeakageError, match=r"\(110, 200\) reads test bars \[101, 102"):
        check_fold(fold, gaps, n_bars=200)
    check_fold(Fold(0, "cpcv", ((0, 100), (117, 200)), ((100, 108),), (1,), (0,), 1, 9), gaps, n_bars=200)
    with pytest.raises(ValueError):
        PurgeEmbargo(window=0, feature_span=1)


# -------------------------------------------------------------------------------------------- feature span
def test_feature_span_from_the_registry_and_the_calendar():
    assert feature_span(FeatureConfig()) == 20  # rvol_20 / volume_z_20: the basic bank's longest lookback
    assert feature_span(FeatureConfig(regimes=2)) == 20
    assert feature_span(FeatureConfig(bank="talib")) == 103
    frame = make_frame(800)
    weekly = FeatureConfig(timeframes=("W-FRI",))
    exact = feature_span(weekly, frame)
    # 21 complete weeks and the open one: at most (20 + 2) * 5 - 1 base bars, at least 21 weeks of 5 days
    assert 21 * 5 <= exact <= htf_span_bound(20, 5) == 109
    holidays = make_frame(800, drop_every=17)
    assert htf_span(holidays, "W-FRI", 20) <= htf_span_bound(20, 5)
    assert feature_span(weekly, bars_per_htf_bar={"W-FRI": 5}) == 109
    gaps = PurgeEmbargo.for_features(8, weekly, frame, extra_embargo=2)
    assert (gaps.feature_span, gaps.embargo, gaps.reach, gaps.purge) == (exact, 7 + exact + 2, 7 + exact, 1)
    assert htf_span(frame.iloc[:30], "W-FRI", 20) == 30  # never defined
    with pytest.raises(ValueError, match="bars_per_htf_bar"):
        feature_span(weekly)
    with pytest.raises(ValueError):
        htf_span_bound(-1, 5)


def test_the_weekly_span_is_exact():
    """A rewritten bar q moves feature rows up to q + span at most, and within a week of that for some q.

    The bound assumes the oldest weekly bar is read whole; the basic bank reads only its close (rvol_20, ret_20),
    which lies up to 4 bars after the week's first bar.
    """
    frame = make_frame(600)
    config = FeatureConfig(timeframes=("W-FRI",), normalise="none")
    span = feature_span(config, frame)
    base = build_observation_features(frame, 400, config)
    reach = []
    for q in range(200, 210):
        one = np.zeros(len(frame), dtype=bool)
        one[q] = True
        changed = build_observation_features(perturb(frame, one), 400, config, state=base.state)
        rows = np.flatnonzero((changed.values != base.values).any(axis=1))
        assert rows.min() == q  # causal: nothing before the bar moves
        reach.append(rows.max() - q)
    assert span - 4 <= max(reach) <= span


# ------------------------------------------------------------------------------------- end to end, real env
def _market(frame, config, state):
    feats = build_observation_features(frame, 300, config, state=state)
    return MarketArrays.from_frame(frame, feats.values, feats.first_valid), feats


def _rollout(market, sampler, steps=150, seed=3):
    env = segmented_env(market, sampler, num_envs=16, positions=(-1.0, 0.0, 1.0), costs=CostModel(), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    obs = env.reset()
    trace, visited = [obs.clone()], [env.t.clone()]
    for _ in range(steps):
        obs, reward, _, _, info = env.step(torch.randint(0, 3, (16,), generator=gen))
        trace += [obs.clone(), reward.clone(), info["final_obs"].clone()]
        visited.append(env.t.clone())
    return trace, torch.cat(visited)


def _boundary_episodes(market, segments, window, length, first_valid):
    """Deterministic episodes from the first and the last valid start of every segment."""
    trace = []
    for (s, e), bounds in zip(segments, segment_start_bounds(segments, window, length, first_valid=first_valid),
                              strict=True):
        for t0 in bounds or ():
            env = TradingEnv(market, num_envs=1, window=window, episode_length=length, start=s, stop=e)
            trace.append(env.reset(starts=[t0]))
            for k in range(length):
                obs, reward, _, _, info = env.step(torch.tensor([k % 3]))
                trace += [obs, reward, info["final_obs"]]
    return trace


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("timeframes", [(), ("W-FRI",)])
def test_a_training_env_is_blind_to_its_test_groups(timeframes):
    """Rewrite every test bar: every observation, reward and bootstrap observation of training stays bit-identical,
    for random episodes through the segment sampler and for the first and last start of every segment.

    Control: one bar less of embargo (base bank: every row reads 20 bars back), or an embargo sized from the base
    lookback alone (weekly block), and the same rewrite reaches a training episode.
    """
    frame = make_frame(1200)
    config = FeatureConfig(timeframes=timeframes)
    original, feats = _market(frame, config, None)
    window, length, fv = 6, 12, feats.first_valid
    span = feature_span(config, frame)
    gaps = PurgeEmbargo(window=window, feature_span=span)
    short = PurgeEmbargo(window=window, feature_span=span - 1 if not timeframes else 20)
    folds = combinatorial_purged(len(frame), gaps, n_groups=5, n_test_groups=2, first_valid=fv)
    leaky = combinatorial_purged(len(frame), short, n_groups=5, n_test_groups=2, first_valid=fv)
    leaks, embargoed = 0, 0
    for fold, bad in zip(folds[::3], leaky[::3], strict=True):
        embargoed += any(s > fold.test[0][0] for s, _ in fold.train)  # some training after a test group
        assert fold.test == bad.test
        changed, _ = _market(perturb(frame, fold.test_mask(len(frame))), config, feats.state)
        sampler = SegmentEpisodeSampler(fold.train, window, length, first_valid=fv)
        before, visited = _rollout(original, sampler)
        after, _ = _rollout(changed, sampler)
        assert _same(before, after)
        assert not fold.test_mask(len(frame))[visited.numpy()].any()
        assert _same(_boundary_episodes(original, fold.train, window, length, fv),
                     _boundary_episodes(changed, fold.train, window, length, fv))
        leaks += not _same(_boundary_episodes(original, bad.train, window, length, fv),
                           _boundary_episodes(changed, bad.train, window, length, fv))
    assert leaks == embargoed >= 2


# ------------------------------------------------------------------------------------------------ sampling
def test_segment_start_bounds_match_the_env():
    market = MarketArrays(open=np.ones(300), close=np.ones(300), features=np.zeros((300, 1), np.float32),
                          first_valid=15)
    segments = [(0, 60), (80, 200), (230, 300)]
    bounds = segment_start_bounds(segments, 8, 20, first_valid=15, n_bars=300)
    assert bounds == [episode_start_bounds(market, 8, s, e, 20) for s, e in segments] == [(22, 39), (80, 179),
                                                                                          (230, 279)]
    assert segment_start_bounds([(0, 25)], 8, 20, first_valid=15) == [None]
    with pytest.raises(ValueError, match="outside"):
        segment_start_bounds([(0, 301)], 8, 20, n_bars=300)


def test_sampler_is_uniform_over_valid_starts_and_never_crosses_a_gap():
    segments = [(0, 50), (100, 130), (200, 205), (300, 311)]
    with pytest.warns(UserWarning, match=r"segments \[\(200, 205\)\] are too short"):
        sampler = SegmentEpisodeSampler(segments, window=4, episode_length=10)
    assert sampler.bounds == [(3, 39), (100, 119), (300, 300)] and sampler.skipped == [(200, 205)]
    assert sampler.num_starts == 37 + 20 + 1 and (sampler.start_low, sampler.start_high) == (3, 300)
    draws = sampler.sample(116_000, torch.Generator().manual_seed(0))
    valid = np.concatenate([np.arange(lo, hi + 1) for lo, hi in sampler.bounds])
    values, counts = np.unique(draws.numpy(), return_counts=True)
    assert np.array_equal(values, valid)  # every valid start, nothing else
    expected = len(draws) / len(valid)
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # uniform, weighted by segment size
    again = sampler.sample(116_000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert sampler.contains(torch.tensor([3, 39, 40, 99, 119, 120, 300])).tolist() == [
        True, True, False, False, True, False, True]
    with pytest.raises(ValueError, match="no segment"):
        SegmentEpisodeSampler([(0, 10)], window=4, episode_length=10)


def test_episodes_in_a_segmented_env_stay_inside_their_segment():
    n = 400
    market = MarketArrays(open=np.linspace(1, 2, n), close=np.linspace(1, 2, n) * 1.001,
                          features=np.arange(n, dtype=np.float32)[:, None], first_valid=0)
    segments = [(0, 60), (150, 190), (300, 400)]
    sampler = SegmentEpisodeSampler(segments, window=3, episode_length=16)
    env = segmented_env(market, sampler, num_envs=32, seed=5)
    env.reset()
    segment_of = np.full(n, -1)
    for k, (s, e) in enumerate(segments):
        segment_of[s:e] = k
    home = segment_of[env.t.numpy()]
    for _ in range(300):
        t_before = env.t.clone()
        _, _, _, _, info = env.step(torch.zeros(32, dtype=torch.long))
        done = info["done"].numpy()
        # the bar filled and marked (t + 1) lies in the episode's own segment, below its stop
        assert (segment_of[t_before.numpy() + 1] == home).all()
        # the bootstrap observation's newest row (features[t] = t) is still in the segment
        assert (segment_of[info["final_obs"][:, -2].long().numpy()] == home).all()
        home = np.where(done, segment_of[env.t.numpy()], home)
        assert (home >= 0).all()


# ------------------------------------------------------------------------------------------- fitting rows
def test_fit_rows_and_touched_bars():
    mask = fit_rows([(0, 50), (80, 120)], 150, first_valid=20)
    assert mask.sum() == 30 + 40 and mask[20] and not mask[19] and mask[119] and not mask[120] and not mask[60]
    with pytest.raises(ValueError, match="outside"):
        fit_rows([(0, 151)], 150)
    gaps = PurgeEmbargo(window=4, feature_span=6)
    assert touched_bars((50, 100), gaps, episode_length=10).tolist() == list(range(41, 100))
    assert touched_bars((50, 55), gaps, episode_length=10).size == 0


def test_stitched_path_equals_one_continuous_episode_without_overnight_gaps_or_costs():
    n = 120
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    opens = np.concatenate([[100.0], close[:-1]])  # open = previous close: no overnight move to miss
    market = MarketArrays(open=opens, close=close, features=np.zeros((n, 1), np.float32))
    index = pd.bdate_range("2020-01-01", periods=n)

    def buy_and_hold(start, stop):
        env = TradingEnv(market, num_envs=1, window=1, episode_length=stop - 1 - start, start=start, stop=stop,
                         positions=(0.0, 1.0), costs=CostModel(0, 0), ruin_fraction=0.0)
        env.reset(starts=[start])
        eq = [1.0] + [float(env.step(torch.ones(1, dtype=torch.long))[4]["equity"][0]) for _ in range(stop - 1 - start)]
        return pd.Series(eq, index=index[start:stop])

    pieces = [buy_and_hold(0, 41), buy_and_hold(40, 81), buy_and_hold(80, 120)]
    whole = buy_and_hold(0, 120)
    np.testing.assert_allclose(stitch_equity(pieces).to_numpy(), whole.to_numpy(), rtol=1e-12)
    assert stitch_equity(pieces).index.equals(whole.index)
    with pytest.raises(ValueError, match="starts at"):
        stitch_equity([pieces[0], pieces[2]])
    with pytest.raises(ValueError, match="no pieces"):
        stitch_equity([])
