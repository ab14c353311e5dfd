"""Point-in-time alternative data in the portfolio (issue 20 s5): one market-wide exogenous block, z-scored once on
the training rows and appended to every asset's features (sentio_lab.env.portfolio_arrays,
sentio_lab.features.exogenous.shared_exogenous). Causal (a value released after bar t never moves an observation at
or before t), a monthly value is invisible at its own month's end, a CPCV fold's training observations are blind to
values about its test groups, and the runner's embargo counts the exogenous span."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab import ppo_portfolio
from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data.exogenous import bundled_exogenous
from sentio_lab.data.panel import load_panel
from sentio_lab.env import splits
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_arrays import build_portfolio_arrays
from sentio_lab.experiment import portfolio_plan
from sentio_lab.experiment.config import AgentSpec
from sentio_lab.experiment.portfolio_config import PortfolioExperimentConfig
from sentio_lab.features import FeatureConfig
from sentio_lab.features.exogenous import exogenous_block, exogenous_span, shared_exogenous
from tests.data.test_panel import synthetic_frames
from tests.features.test_exogenous_features import monthly_csv

DAY = pd.Timedelta(days=1)
WINDOW = 4


def frames_2014(n_assets: int = 3, n_bars: int = 700, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Synthetic OHLCV frames on business days from February 2014 (inside the bundled VIX's range)."""
    index = pd.bdate_range("2014-02-03", periods=n_bars)
    return {name: frame.set_axis(index) for name, frame in synthetic_frames(n_assets, n_bars, seed).items()}


def changed_after(frames: dict[str, pd.DataFrame], t: int, seed: int) -> dict[str, pd.DataFrame]:
    """Every price after bar ``t`` rescaled (a different future)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, frame in frames.items():
        frame = frame.copy()
        scale = np.exp(rng.normal(0, 0.05, len(frame) - t - 1))
        for column in ("open", "high", "low", "close"):
            frame.iloc[t + 1:, frame.columns.get_loc(column)] *= scale
        out[name] = frame
    return out


def observation_at(arrays, t: int) -> torch.Tensor:
    """The portfolio env's observation at decision bar ``t`` (a fresh all-cash account)."""
    env = PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=2, start=t, stop=t + 3)
    return env.reset([t])


def test_the_block_is_market_wide_fitted_once_on_training_rows_and_not_ranked(tmp_path):
    csv = monthly_csv(tmp_path / "macro.csv")
    panel = load_panel(frames_2014())
    config = FeatureConfig(bank="close", exogenous=("vix", csv))
    prices, _ = build_portfolio_arrays(panel, FeatureConfig(bank="close"), train_stop=400, cross_sectional=True)
    arrays, states = build_portfolio_arrays(panel, config, train_stop=400, cross_sectional=True)
    exo = ("exo:vix", "exo:vix:chg", "exo:macro", "exo:macro:chg")
    assert arrays.feature_names == prices.feature_names + exo  # after the ranks: a shared value has no rank
    assert not any(n.startswith("xs_rank:exo") for n in arrays.feature_names)
    fv = arrays.first_valid
    # the price features are the price-only run's; the exogenous columns are the same for every asset
    np.testing.assert_array_equal(arrays.features[fv:, :, :-4], prices.features[fv:])
    block = arrays.features[:, :, -4:]
    np.testing.assert_array_equal(block, np.broadcast_to(block[:, :1], block.shape))
    # z-score: mean and std of the raw columns on the training rows from the warm-up on, nothing after
    raw = exogenous_block(panel.index, config.exogenous, DAY).values
    fit = raw[fv:400]
    expected = np.clip((raw - fit.mean(0)) / fit.std(0), -5, 5)
    np.testing.assert_allclose(block[fv:, 0], expected[fv:], rtol=1e-6, atol=1e-6)
    assert np.all(block[:fv] == 0.0)
    shared = states["A0"]["exogenous"]
    assert shared == states["A2"]["exogenous"] and shared["columns"] == list(exo)
    np.testing.assert_allclose(shared["zscore"]["mean"], fit.mean(0))
    # a training range ending elsewhere fits another z-score
    other, _ = build_portfolio_arrays(panel, config, train_stop=600)
    assert not np.allclose(other.features[fv:, 0, -4:], block[fv:, 0])


def test_a_value_released_after_t_never_moves_the_observation_at_or_before_t(tmp_path):
    """Rewrite every exogenous value not visible at bar t (released after the earliest reading of t's close, the
    start of its label date) and every price after t: the portfolio features and the env's observation up to t are
    bit-identical (the raw block for every t; the z-scored block from the last training bar on, where the training
    rows' fit is unchanged). Each t is the bar just before a release shows, so the rewrite moves bar t + 1 (a
    one-bar look-ahead would move t); a value visible at t does move t."""
    frames, train_stop = frames_2014(), 400
    path = tmp_path / "macro.csv"
    monthly_csv(path)
    config = FeatureConfig(bank="close", exogenous=("vix", str(path)))
    arrays, _ = build_portfolio_arrays(load_panel(frames), config, train_stop=train_stop)
    index = load_panel(frames).index
    released = pd.DatetimeIndex(pd.read_csv(path)["released_at"]).as_unit("ns").asi8
    shown = np.searchsorted(released, index.as_unit("ns").asi8, side="right")  # releases visible at each bar
    before_release = np.flatnonzero(np.diff(shown) > 0)  # t: a new value shows at t + 1
    changed_path = tmp_path / "changed" / "macro.csv"
    changed_path.parent.mkdir()
    changed_config = FeatureConfig(bank="close", exogenous=("vix", str(changed_path)))
    train = np.arange(len(index)) < train_stop
    raw = shared_exogenous(index, config.exogenous, DAY, train, normalise=False)
    for target in (150, train_stop - 1, 520, 650):
        t = int(before_release[np.searchsorted(before_release, target)])
        table = pd.read_csv(path)
        later = released > index[t].value
        assert later.any() and (~later).any()
        table.loc[later, "value"] = table.loc[later, "value"] * 3 + 1
        table.to_csv(changed_path, index=False)
        raw_changed = shared_exogenous(index, changed_config.exogenous, DAY, train, normalise=False)
        np.testing.assert_array_equal(raw_changed.values[: t + 1], raw.values[: t + 1])
        assert (raw_changed.values[t + 1, 2:] != raw.values[t + 1, 2:]).all()
        if t >= train_stop - 1:
            moved, _ = build_portfolio_arrays(load_panel(changed_after(frames, t, seed=t)), changed_config,
                                              train_stop=train_stop)
            np.testing.assert_array_equal(moved.features[: t + 1], arrays.features[: t + 1])
            assert (moved.features[t + 1, :, -2:] != arrays.features[t + 1, :, -2:]).any(axis=1).all()  # (clipped)
            assert torch.equal(observation_at(moved, t), observation_at(arrays, t))
        # control: the latest value visible at t is what t shows; changing it moves t
        table = pd.read_csv(path)
        table.loc[np.flatnonzero(~later)[-1], "value"] += 1.0
        table.to_csv(changed_path, index=False)
        control = shared_exogenous(index, changed_config.exogenous, DAY, train, normalise=False)
        assert control.values[t, 2] != raw.values[t, 2]


def test_a_monthly_value_is_invisible_at_its_own_months_end(tmp_path):
    """Moody's spread for month m (released 11 days after m ends) is not what m's last bar shows: that bar shows
    m - 1's; and a value published on its month's last day after the close is first seen by the next bar."""
    panel = load_panel(frames_2014(n_bars=500))
    index = panel.index
    config = FeatureConfig(bank="close", exogenous=("credit_spread",), normalise="none")
    arrays, _ = build_portfolio_arrays(panel, config, train_stop=300)
    level = arrays.features[:, 0, -2]
    spread = bundled_exogenous("credit_spread")
    value = pd.Series(spread.values, index=spread.dates)
    month_ends = pd.Series(np.arange(len(index)), index=index).groupby(index.to_period("M")).max()
    checked = 0
    for month, row in month_ends.items():
        if row < arrays.first_valid or row == len(index) - 1:
            continue
        this, previous = (np.float32(value[m.to_timestamp()]) for m in (month, month - 1))
        assert level[row] == previous
        if this != previous:
            assert level[row] != this
            checked += 1
    assert checked >= 15
    # a user's series published at 21:00 UTC on its month's last day (after the New York close)
    months = pd.period_range("2013-06", "2016-06", freq="M")
    rng = np.random.default_rng(3)
    released = months.to_timestamp(how="end").normalize() + pd.Timedelta(hours=21)
    path = tmp_path / "month_end.csv"
    pd.DataFrame({"date": months.to_timestamp().strftime("%Y-%m-%d"), "value": 2 + rng.normal(0, 0.1, len(months)),
                  "released_at": released.strftime("%Y-%m-%d %H:%M")}).to_csv(path, index=False)
    late = build_portfolio_arrays(panel, FeatureConfig(bank="close", exogenous=(str(path),), normalise="none"),
                                  train_stop=300)[0].features[:, 0, -2]
    table = pd.read_csv(path)
    for month, row in month_ends.items():
        if arrays.first_valid <= row < len(index) - 1 and month <= months[-1]:
            own = np.float32(table.loc[table["date"] == month.to_timestamp().strftime("%Y-%m-%d"), "value"].item())
            assert late[row] != own and late[row + 1] == own


def tiny_config(csv: str, **changes) -> PortfolioExperimentConfig:
    tiny = ("--total-timesteps", "128", "--num-envs", "4", "--num-steps", "16", "--update-epochs", "1",
            "--num-minibatches", "2", "--d-model", "8", "--ff-size", "16", "--hidden-size", "16")
    fields = dict(name="tiny_exogenous", common_args=("--window", str(WINDOW), "--episode-length", "16"),
                  agents=(AgentSpec("prices", "ppo_portfolio", tiny),
                          AgentSpec("exo", "ppo_portfolio", (*tiny, "--exogenous", csv))),
                  n_groups=5, n_test_groups=2, seeds=(1,), baselines=("equal_weight",), rebalance_every=10,
                  lookback=100, min_returns=20, bootstrap_samples=50)
    return PortfolioExperimentConfig(**{**fields, **changes})


@pytest.fixture
def panel_of(monkeypatch):
    """Make the runner read the given frames as its panel."""
    def use(frames):
        portfolio_plan._PANELS.clear()
        monkeypatch.setattr(portfolio_plan, "load_sp500_panel", lambda start=None, end=None: load_panel(frames))
    yield use
    portfolio_plan._PANELS.clear()


def test_the_runner_embargo_counts_the_exogenous_span(panel_of, tmp_path):
    frames = frames_2014(n_bars=1000)
    panel_of(frames)
    csv = monthly_csv(tmp_path / "macro.csv", lag_days=25)
    plan = portfolio_plan.plan_portfolio(tiny_config(csv))
    span = exogenous_span(load_panel(frames).index, (csv,), DAY)
    assert span > 20  # longer than the close bank's 20-bar look-back
    assert (plan.gaps.feature_span, plan.gaps.embargo) == (span, WINDOW - 1 + span)
    prices_only = portfolio_plan.plan_portfolio(tiny_config(csv, agents=tiny_config(csv).agents[:1]))
    assert prices_only.gaps.embargo == WINDOW - 1 + 20 < plan.gaps.embargo


def test_a_cpcv_fold_is_blind_to_exogenous_values_about_its_test_groups(panel_of, tmp_path):
    """Rewrite every exogenous value whose period begins before a test group ends and which is released after it
    begins, and the test bars' prices: the fold's fitted exogenous z-score and every row a training env reads are
    bit-identical; with the bank's embargo alone a row after a test group would see the rewrite."""
    frames = frames_2014(n_bars=1000)
    panel_of(frames)
    path = tmp_path / "macro.csv"
    monthly_csv(path, lag_days=25)
    plan = portfolio_plan.plan_portfolio(tiny_config(str(path)))
    module = load_variant("ppo_portfolio")
    args = parse_variant_args("ppo_portfolio", list(plan.cells[-1].args))
    assert args.features.exogenous == (str(path),)
    fold = next(f for f in plan.folds if len(f.train) >= 2 and f.train[-1][0] > f.test[-1][0])
    market = portfolio_plan.fold_market(plan, fold, module, args)
    index, n = market.panel.index, plan.n_bars
    table = pd.read_csv(path)
    dates, released = pd.DatetimeIndex(table["date"]), pd.DatetimeIndex(table["released_at"])
    about_test = np.zeros(len(table), dtype=bool)
    for a, b in fold.test:
        about_test |= (dates < index[b - 1] + DAY) & (released > index[a])
    assert about_test.sum() >= 4
    table.loc[about_test, "value"] += 10.0
    table.to_csv(path, index=False)
    test = fold.test_mask(n)
    rewritten = {}
    for name, frame in frames.items():
        frame = frame.copy()
        frame.loc[test, ["open", "high", "low", "close"]] *= 1.1
        rewritten[name] = frame
    panel_of(rewritten)
    changed = portfolio_plan.fold_market(plan, fold, module, args)

    def fitted(states):  # the fingerprint records the file (values about the test groups too); nothing reads it
        return {a: {**s, "exogenous": {k: v for k, v in s["exogenous"].items() if k != "fitted"}}
                for a, s in states.items()}

    assert fitted(changed.features.state) == fitted(market.features.state)
    sampler = splits.SegmentEpisodeSampler(fold.train, WINDOW, 16, first_valid=market.arrays.first_valid, n_bars=n)
    observed = np.concatenate([np.arange(lo - WINDOW + 1, hi + 16 + 1) for lo, hi in sampler.bounds])
    np.testing.assert_array_equal(changed.arrays.features[observed], market.arrays.features[observed])
    exo = slice(-2, None)
    assert (changed.arrays.features[test][:, :, exo] != market.arrays.features[test][:, :, exo]).any()
    # control: the bank's embargo alone would let a training row after a test group see the rewrite
    short = splits.PurgeEmbargo.for_features(WINDOW, FeatureConfig(bank="close"), frames["A0"])
    assert short.embargo < plan.gaps.embargo
    rows = np.concatenate([np.arange(b + short.embargo, b + plan.gaps.embargo) for _, b in fold.test
                           if b + plan.gaps.embargo < n])
    assert (changed.arrays.features[rows][:, :, exo] != market.arrays.features[rows][:, :, exo]).any()


def test_ppo_portfolio_takes_the_flag(tmp_path):
    panel = load_panel(frames_2014(n_bars=400))
    csv = monthly_csv(tmp_path / "macro.csv")
    short = ["--window", str(WINDOW), "--episode-length", "32"]
    args = parse_variant_args("ppo_portfolio", ["--exogenous", "vix", csv, *short])
    market = ppo_portfolio.portfolio_market(panel, args)
    assert market.arrays.feature_names[-4:] == ("exo:vix", "exo:vix:chg", "exo:macro", "exo:macro:chg")
    assert market.features.state["A1"]["exogenous"]["series"] == ["vix", csv]
    plain = ppo_portfolio.portfolio_market(panel, parse_variant_args("ppo_portfolio", short))
    env, plain_env = ppo_portfolio.make_env(args, market), ppo_portfolio.make_env(args, plain)
    assert env.obs_dim - plain_env.obs_dim == 3 * WINDOW * 4  # 4 columns per asset and window row


def test_shared_block_edges(tmp_path):
    index = frames_2014(n_bars=300)["A0"].index
    rows = np.arange(300) < 200
    with pytest.raises(ValueError, match="DatetimeIndex"):
        shared_exogenous(pd.RangeIndex(300), ("vix",), DAY, rows)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 training rows after the warm-up"):
        shared_exogenous(index, ("vix",), DAY, rows, warmup=250)
    # a series constant on the training rows is dropped (named in the state); with nothing left, refused
    months = pd.period_range("2013-01", "2016-06", freq="M")
    flat = np.where(months < pd.Period("2015-06", "M"), 1.5, np.linspace(1.0, 2.0, len(months)))
    released = months.to_timestamp(how="end").normalize() + pd.Timedelta(days=5)
    path = tmp_path / "flat.csv"
    pd.DataFrame({"date": months.to_timestamp().strftime("%Y-%m-%d"), "value": flat,
                  "released_at": released.strftime("%Y-%m-%d")}).to_csv(path, index=False)
    kept = shared_exogenous(index, ("vix", str(path)), DAY, rows, warmup=30)
    assert kept.first_valid == 30 and (kept.values[:30] == 0).all() and (kept.values[30] != 0).all()
    assert kept.names == ["exo:vix", "exo:vix:chg"]
    assert kept.state["dropped_constant"] == ["exo:flat", "exo:flat:chg"] and kept.values.shape == (300, 2)
    with pytest.raises(ValueError, match="every column is constant"):
        shared_exogenous(index, (str(path),), DAY, rows)
