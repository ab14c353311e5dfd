"""Pooled markets (sentio_lab.env.pool): one calendar, per-instrument features, seeded draws, no leaks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.training import training_env
from sentio_lab.data import DataValidationError
from sentio_lab.env import TradingEnv
from sentio_lab.env.market import prepare_market
from sentio_lab.env.pool import (
    PooledMarket,
    check_pool_env,
    pool_anchor_config,
    pool_first_valid,
    pool_purge_embargo,
    prepare_pool,
    prepare_pool_fold,
)
from sentio_lab.env.splits import PurgeEmbargo, combinatorial_purged, touched_bars
from sentio_lab.features import FeatureConfig

CONFIG = FeatureConfig(cache_dir=None)
WINDOW, LENGTH, BARS = 8, 24, 700
DATES = pd.bdate_range("2001-01-01", periods=BARS)


def ohlcv(seed: int, dates: pd.DatetimeIndex = DATES) -> pd.DataFrame:
    """A random-walk OHLCV frame (real opens: next-open fills are allowed)."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, len(dates))))
    opens = close * np.exp(rng.normal(0, 0.003, len(dates)))
    return pd.DataFrame({"open": opens, "high": np.maximum(opens, close) * 1.004,
                         "low": np.minimum(opens, close) * 0.996, "close": close,
                         "volume": rng.uniform(1e5, 1e6, len(dates))}, index=dates.rename("date"))


def write(tmp_path, name: str, frame: pd.DataFrame) -> str:
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path)
    return str(path)


def rewrite_after(frame: pd.DataFrame, mask: np.ndarray, seed: int = 7) -> pd.DataFrame:
    """``frame`` with the bars in ``mask`` replaced by different valid bars (same dates)."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    k = int(mask.sum())
    c = out["close"].to_numpy()[mask] * np.exp(rng.normal(0, 0.05, k))
    o = out["open"].to_numpy()[mask] * np.exp(rng.normal(0, 0.05, k))
    out.loc[mask, "close"], out.loc[mask, "open"] = c, o
    out.loc[mask, "high"], out.loc[mask, "low"] = np.maximum(o, c) * 1.01, np.minimum(o, c) * 0.99
    out.loc[mask, "volume"] = rng.uniform(1e5, 1e6, k)
    return out


@pytest.fixture()
def files(tmp_path):
    return {name: write(tmp_path, name, ohlcv(seed)) for seed, name in enumerate(("a", "b", "c"))}


def pool_of(paths, **kwargs) -> PooledMarket:
    return prepare_pool(list(paths), CONFIG, fill_price="next_open", window=WINDOW, episode_length=LENGTH, **kwargs)


# ------------------------------------------------------------------------------------------------ loading
def test_members_are_the_instruments_prepared_alone(files):
    """Each member is prepare_market of its file alone: its own normaliser, fitted on its own training rows."""
    pool = pool_of(files.values())
    assert pool.instruments == tuple(files.values())
    assert pool.offsets == (0, BARS, 2 * BARS)
    for k, path in enumerate(files.values()):
        alone = prepare_market(path, CONFIG, window=WINDOW, episode_length=LENGTH)
        member = pool.members[path]
        np.testing.assert_array_equal(member.arrays.features, alone.arrays.features)
        assert member.features.state == alone.features.state == pool.features.state[path]
        np.testing.assert_array_equal(pool.arrays.features[k * BARS:(k + 1) * BARS], alone.arrays.features)
        np.testing.assert_array_equal(pool.arrays.close[k * BARS:(k + 1) * BARS], alone.arrays.close)
    states = [pool.features.state[p]["normaliser"] if "normaliser" in pool.features.state[p]
              else pool.features.state[p] for p in files.values()]
    assert states[0] != states[1]  # per instrument, not one normaliser for all
    assert "common dates" in str(pool.data.quality)
    assert set(pool.data.quality.to_dict()["members"]) == set(files.values())


def test_normaliser_fitted_on_training_rows_only(tmp_path, files):
    """Rewriting instrument a's validation and test bars moves neither its fitted state nor any training row."""
    pool = pool_of(files.values())
    train_stop = pool.members[files["a"]].range("train")[1]
    frame = ohlcv(0)
    mask = np.arange(BARS) >= train_stop
    changed = write(tmp_path, "a2", rewrite_after(frame, mask))
    other = pool_of([changed, files["b"], files["c"]])
    assert other.features.state[changed] == pool.features.state[files["a"]]
    np.testing.assert_array_equal(other.arrays.features[:train_stop], pool.arrays.features[:train_stop])
    assert not np.array_equal(other.arrays.features[:BARS], pool.arrays.features[:BARS])  # the rewrite did bite
    np.testing.assert_array_equal(other.arrays.features[BARS:], pool.arrays.features[BARS:])


@pytest.mark.parametrize("t", [150, 520])
def test_perturbing_b_after_t_moves_neither_a_nor_b_up_to_t(tmp_path, files, t):
    """Instrument b's bars after t rewritten: a's observations never move, b's up to t neither (feature rows and the
    env's observations at starts of both instruments). The fitted states are held (the saved ones, as evaluation
    uses them): a rewrite of training rows refits b's normaliser, which test_normaliser_... covers."""
    pool = pool_of(files.values())
    changed = write(tmp_path, "b2", rewrite_after(ohlcv(1), np.arange(BARS) > t))
    saved = pool.features.state
    other = pool_of([files["a"], changed, files["c"]],
                    feature_state={files["a"]: saved[files["a"]], changed: saved[files["b"]],
                                   files["c"]: saved[files["c"]]})
    np.testing.assert_array_equal(other.arrays.features[:BARS], pool.arrays.features[:BARS])
    np.testing.assert_array_equal(other.arrays.features[BARS:BARS + t + 1], pool.arrays.features[BARS:BARS + t + 1])
    assert not np.array_equal(other.arrays.features[BARS + t + 1:2 * BARS], pool.arrays.features[BARS + t + 1:2 * BARS])
    starts = [30, t, BARS + 30, BARS + t]  # a's rows and b's rows up to t
    obs = [TradingEnv(market.arrays, num_envs=4, window=WINDOW, episode_length=LENGTH).reset(starts=starts)
           for market in (pool, other)]
    torch.testing.assert_close(obs[0], obs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not match the pool"):
        pool_of(files.values(), feature_state={files["a"]: saved[files["a"]]})


def test_calendar_rules(tmp_path, files):
    """Spans are cut to the common dates (and said so); a missing date inside is refused naming it; twice too."""
    late = write(tmp_path, "late", ohlcv(5).iloc[50:])
    pool = pool_of([files["a"], late], train_fraction=0.6)
    assert len(pool.members[late].arrays.close) == BARS - 50
    assert str(DATES[50].date()) in pool.calendar_note
    holey = write(tmp_path, "holey", ohlcv(6).drop(DATES[300]))
    with pytest.raises(DataValidationError, match=f"has no bar at {DATES[300].date()}"):
        pool_of([files["a"], holey])
    with pytest.raises(DataValidationError, match="more than once"):
        pool_of([files["a"], files["a"]])
    with pytest.raises(DataValidationError, match="--fill-price next_close"):
        prepare_pool(["sp500_20:AAPL"], CONFIG, fill_price="next_open")
    with pytest.raises(DataValidationError, match="names no instrument"):
        prepare_pool([" , "], CONFIG)


# ------------------------------------------------------------------------------------------------ drawing
def instrument_draws(pool: PooledMarket, seed: int, resets: int = 40) -> np.ndarray:
    from sentio_lab.ppo import Args

    args = Args.from_flat(num_envs=16, window=WINDOW, episode_length=LENGTH, track=False, seed=seed)
    env = training_env(args, pool)
    starts = []
    for _ in range(resets):
        env.reset()
        starts.append(env.t.clone())  # each env's instrument and start, drawn at the reset
    return torch.cat(starts).numpy()


def test_draw_is_seeded_covers_every_instrument_and_stays_inside_it(files):
    pool = pool_of(files.values())
    starts = instrument_draws(pool, seed=3)
    np.testing.assert_array_equal(starts, instrument_draws(pool, seed=3))
    assert not np.array_equal(starts, instrument_draws(pool, seed=4))
    which = pool.instrument_of(starts)
    counts = np.bincount(which, minlength=3)
    assert (counts > 0).all() and counts.min() > 0.2 * len(starts)  # equal shares: about a third each
    for k, member in enumerate(pool.members.values()):
        mine = starts[which == k] - pool.offsets[k]
        lo, stop = member.arrays.first_valid + WINDOW - 1, member.range("train")[1]
        assert mine.min() >= lo and (mine + LENGTH).max() <= stop - 1  # own warm-up, own training range


def test_pool_env_refuses_what_it_cannot_do(files):
    from sentio_lab.env.costs import CostModel

    pool = pool_of(files.values())
    with pytest.raises(ValueError, match="--spread"):
        check_pool_env(pool, CostModel(spread="corwin_schultz"), {})
    with pytest.raises(ValueError, match="masks"):
        check_pool_env(pool, CostModel(), {"masks": object()})
    check_pool_env(pool, CostModel(), {"anchor": "buy_and_hold"})  # each instrument's own benchmark, stacked
    check_pool_env(pool, CostModel(), {"drawdown_obs": True})  # the risk variant's state is per env: fine


@pytest.mark.parametrize("baseline", ["vol_target", "sma_crossover"])
def test_anchor_is_each_instruments_own_benchmark_stacked(files, baseline):
    from sentio_lab.env.benchmarks import anchor_config

    pool = pool_of(files.values())
    fold = combinatorial_purged(BARS, pool_purge_embargo(pool, WINDOW), n_groups=4, n_test_groups=2,
                                first_valid=pool_first_valid(pool))[0]
    folded = prepare_pool_fold(pool, fold)
    stacked = pool_anchor_config(baseline, folded, deviation_penalty=0.1)
    own = [anchor_config(baseline, member).benchmark for member in folded.members.values()]
    np.testing.assert_array_equal(stacked.benchmark, np.concatenate(own))
    assert stacked.deviation_penalty == 0.1 and len(stacked.benchmark) == len(folded.arrays.close)
    # an instrument's benchmark never reads another instrument's closes: rewriting b leaves a's and c's rows alone
    other = dict(files)
    frame = pd.read_csv(files["b"], index_col=0, parse_dates=True)
    other["b"] = files["b"].replace("b.csv", "b2.csv")
    rewrite_after(frame, np.ones(BARS, dtype=bool)).to_csv(other["b"])
    moved = pool_anchor_config(baseline, prepare_pool_fold(pool_of(other.values()), fold)).benchmark
    for k in (0, 2):
        rows = slice(folded.offsets[k], folded.offsets[k] + BARS)
        np.testing.assert_array_equal(moved[rows], stacked.benchmark[rows])
    assert not np.array_equal(moved[folded.offsets[1]:folded.offsets[2]], stacked.benchmark[folded.offsets[1]:
                                                                                            folded.offsets[2]])


# ------------------------------------------------------------------------------------------------ CPCV
def test_cpcv_test_dates_never_reach_a_training_input(tmp_path, files):
    """Rewriting every instrument's bars of one fold's test groups moves no training input of any instrument:
    feature rows, closes and fills on every bar a training env can touch, the fitted states, the segments."""
    pool = pool_of(files.values())
    gaps = pool_purge_embargo(pool, WINDOW)
    folds = combinatorial_purged(BARS, gaps, n_groups=5, n_test_groups=2, first_valid=pool_first_valid(pool))
    fold = folds[3]
    fold_pool = prepare_pool_fold(pool, fold)
    test = fold.test_mask(BARS)
    changed = [write(tmp_path, f"{k}x", rewrite_after(ohlcv(s), test, seed=11 + s))
               for s, k in enumerate(("a", "b", "c"))]
    other = prepare_pool_fold(pool_of(changed), fold)
    first_valid = pool_first_valid(pool)
    # raw bars a training env reads (feature lookbacks included) and the feature rows it observes (windows only)
    touched = np.unique(np.concatenate([touched_bars(seg, gaps, first_valid=first_valid) for seg in fold.train]))
    observed = np.unique(np.concatenate([touched_bars(seg, PurgeEmbargo(WINDOW, 0), first_valid=first_valid)
                                         for seg in fold.train]))
    assert len(touched) and not test[touched].any()
    for k in range(3):
        rows, bars = observed + k * BARS, touched + k * BARS
        np.testing.assert_array_equal(other.arrays.features[rows], fold_pool.arrays.features[rows])
        np.testing.assert_array_equal(other.arrays.close[bars], fold_pool.arrays.close[bars])
        np.testing.assert_array_equal(other.arrays.fill[bars], fold_pool.arrays.fill[bars])
        assert list(other.features.state.values())[k] == list(fold_pool.features.state.values())[k]
        test_rows = np.flatnonzero(test) + k * BARS
        assert not np.array_equal(other.arrays.close[test_rows], fold_pool.arrays.close[test_rows])
    assert other.train_segments == fold_pool.train_segments
    assert len(fold_pool.train_segments) == 3 * len(fold.train)
    sampler = fold_pool.episode_sampler(WINDOW, LENGTH)
    starts = sampler.sample(2000, torch.Generator().manual_seed(0)).numpy()
    k = fold_pool.instrument_of(starts)
    local = starts - np.asarray(fold_pool.offsets)[k]
    for lo in range(0, LENGTH + 1, 6):  # every bar an episode observes, fills or marks is a training bar
        assert not test[local + lo].any()


def test_sp500_20_tickers_load_close_only_on_one_calendar():
    """The bundled panel: sp500_20 names its 20 tickers; tickers load close-only on the panel's dates."""
    from sentio_lab.env.pool import _expand, load_pool

    names = _expand(["sp500_20"])
    assert len(names) == 20 and names[0] == "sp500_20:AAPL"
    loaded, note = load_pool(["sp500_20:AAPL,sp500_20:XOM"], start="2020-01-01", end="2020-06-30")
    assert list(loaded) == ["sp500_20:AAPL", "sp500_20:XOM"] and "2020-01-02" in note
    frames = [d.frame for d in loaded.values()]
    assert frames[0].index.equals(frames[1].index) and frames[0]["open"].isna().all()
    with pytest.raises(DataValidationError, match="no ticker"):
        load_pool(["sp500_20:NOPE"])
