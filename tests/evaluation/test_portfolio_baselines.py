"""skfolio portfolio baselines (sentio_lab.evaluation.portfolio_baselines): fitted on training returns up to t only
(perturbation), each allocation what it claims to be, rebalanced at the declared frequency through the env."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentio_lab.data.panel import load_sp500_panel
from sentio_lab.env.costs import CostModel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_arrays import build_portfolio_arrays
from sentio_lab.evaluation.portfolio_baselines import (
    BASELINES,
    SkfolioBaseline,
    close_returns,
    make_estimator,
    run_baseline,
)

ASSETS = ["AAPL", "JPM", "XOM", "KO", "PFE"]


@pytest.fixture(scope="module")
def panel():
    return load_sp500_panel(start="2016-01-01", end="2019-12-31", assets=ASSETS)


def fold_rows(n: int) -> np.ndarray:
    """Training rows of a CPCV-like fold: [0, 300) and [500, n), a test group (with its gaps) between."""
    rows = np.zeros(n, dtype=bool)
    rows[:300] = True
    rows[500:] = True
    return rows


@pytest.mark.parametrize("name", BASELINES)
def test_weights_use_training_returns_up_to_t_only(panel, name):
    close = panel.column("close")
    rows = fold_rows(len(close))
    t = 700
    base = SkfolioBaseline(name, close, rows, lookback=252, min_returns=60, assets=ASSETS)
    weights = base.weights_at(t)
    assert weights.shape == (5,) and (weights >= 0).all() and weights.sum() == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(0)
    later = close.copy()
    later[t + 1:] *= np.exp(rng.normal(0, 0.05, later[t + 1:].shape))  # every bar after t
    test_group = close.copy()
    test_group[300:500] *= np.exp(rng.normal(0, 0.05, (200, 5)))  # the test group's bars, before t
    for moved in (later, test_group):
        np.testing.assert_array_equal(SkfolioBaseline(name, moved, rows, assets=ASSETS).weights_at(t), weights)
    fit = base.fit_rows(t)
    assert fit.max() <= t and rows[fit].all() and rows[fit - 1].all() and len(fit) == 252
    if name != "equal_weight":  # the check can fail: training returns up to t do move the weights
        trained = close.copy()
        trained[600:t + 1] *= np.exp(rng.normal(0, 0.05, (t + 1 - 600, 5)))
        assert not np.allclose(SkfolioBaseline(name, trained, rows, assets=ASSETS).weights_at(t), weights)


def test_allocations_are_what_they_claim(panel):
    close = panel.column("close")
    rows = fold_rows(len(close))
    t = 700
    fits = {name: SkfolioBaseline(name, close, rows, assets=ASSETS) for name in BASELINES}
    returns = close_returns(close)[fits["hrp"].fit_rows(t)]
    np.testing.assert_allclose(fits["equal_weight"].weights_at(t), 0.2)
    inverse = 1.0 / returns.std(axis=0, ddof=1)
    np.testing.assert_allclose(fits["inverse_volatility"].weights_at(t), inverse / inverse.sum(), rtol=1e-6)
    cov = np.cov(returns, rowvar=False)
    variance = {name: fits[name].weights_at(t) @ cov @ fits[name].weights_at(t) for name in BASELINES}
    assert variance["minimum_variance"] == min(variance.values())  # lowest in-sample variance of all six
    # and the long-only minimum itself (KKT): equal marginal variance on held assets, no lower on the others
    w = fits["minimum_variance"].weights_at(t)
    marginal = cov @ w
    held = w > 1e-4
    level = marginal[held].mean()
    assert np.ptp(marginal[held]) < 1e-3 * level and (marginal[~held] >= level * (1 - 1e-3)).all()
    random = np.random.default_rng(1).dirichlet(np.ones(5), 2000)
    assert variance["minimum_variance"] <= np.einsum("ij,jk,ik->i", random, cov, random).min()
    losses = -(returns @ np.stack([fits[n].weights_at(t) for n in BASELINES]).T)
    cvar = {n: np.sort(losses[:, i])[-int(np.ceil(0.05 * len(losses))):].mean() for i, n in enumerate(BASELINES)}
    assert cvar["mean_cvar"] <= min(cvar.values()) + 1e-6  # lowest in-sample CVaR (95 %)
    vol = returns.std(axis=0, ddof=1)
    ratio = {n: (fits[n].weights_at(t) @ vol) / np.sqrt(variance[n]) for n in BASELINES}
    assert ratio["maximum_diversification"] >= max(ratio.values()) - 1e-6  # highest diversification ratio
    assert len({tuple(np.round(fits[n].weights_at(t), 6)) for n in BASELINES}) == 6  # six different portfolios


def test_too_few_training_returns_fall_back_to_equal_weight(panel):
    close = panel.column("close")
    rows = np.zeros(len(close), dtype=bool)
    rows[400:] = True  # training after the test group: nothing to fit on before bar 459
    base = SkfolioBaseline("minimum_variance", close, rows)
    np.testing.assert_array_equal(base.weights_at(100), np.full(5, 0.2))
    assert base.fallbacks == [100] and base.fit_rows(100).size == 0
    assert base.fit_rows(470).size == 70 and base.weights_at(470).std() > 0
    with pytest.raises(ValueError, match="unknown baseline 'momentum'"):
        make_estimator("momentum")
    with pytest.raises(ValueError, match="train_rows must be bool"):
        SkfolioBaseline("hrp", close, rows[:10])
    with pytest.raises(ValueError, match="min_returns <= lookback"):
        SkfolioBaseline("hrp", close, rows, lookback=30, min_returns=60)


def test_run_through_the_env_rebalances_at_the_declared_frequency(panel):
    arrays = build_portfolio_arrays(panel, train_stop=300)[0]
    rows = fold_rows(len(arrays.close))
    env = PortfolioEnv(arrays, num_envs=2, window=5, episode_length=60, costs=CostModel(fee_bps=5.0))
    base = SkfolioBaseline("inverse_volatility", arrays.close, rows, assets=ASSETS)
    out = run_baseline(env, base, starts=[650, 800], steps=45, rebalance_every=20)
    decided = ~np.isnan(out["weights"][:, 0, 0])
    np.testing.assert_array_equal(np.flatnonzero(decided), [0, 20, 40])
    np.testing.assert_array_equal(out["weights"][20, 1], base.weights_at(820))
    assert (out["cost"][~decided] == 0).all() and (out["cost"][decided] > 0).all()
    np.testing.assert_allclose(np.log(out["equity"][-1]), out["reward"].sum(0), rtol=1e-12)
    # holding between rebalances: the shares do not move, so equity follows the closes
    env.reset(starts=[650, 800])
    target = torch.tensor(np.c_[np.stack([base.weights_at(650), base.weights_at(800)]), np.zeros(2)])
    env.step(target)
    shares = env.shares.clone()
    env.step(target, hold=torch.tensor([True, True]))
    torch.testing.assert_close(env.shares, shares, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rebalance_every must be >= 1"):
        run_baseline(env, base, [650, 800], 10, rebalance_every=0)
    with pytest.raises(ValueError, match="exceeds the env's episode_length"):
        run_baseline(env, base, [650, 800], 61)
    short = PortfolioEnv(arrays, num_envs=2, window=5, episode_length=60, allocation="long_short")
    with pytest.raises(ValueError, match="baselines are long-only"):
        run_baseline(short, base, [650, 800], 10)


def test_cpcv_fold_baseline_never_reads_its_test_groups(panel):
    from sentio_lab.env.splits import PurgeEmbargo, combinatorial_purged, fit_rows

    close = panel.column("close")
    n = len(close)
    folds = combinatorial_purged(n, PurgeEmbargo(window=5, feature_span=20), n_groups=5, n_test_groups=2)
    fold = next(f for f in folds if f.test[0][0] > 300)  # a test group with training bars before it
    rows = fit_rows(fold.train, n)
    t = fold.test[0][0] + 30
    weights = SkfolioBaseline("hrp", close, rows).weights_at(t)
    moved = close.copy()
    rng = np.random.default_rng(3)
    for a, stop in fold.test:  # every test bar of the fold, before and after t
        moved[a:stop] *= np.exp(rng.normal(0, 0.05, (stop - a, 5)))
    moved[t + 1:] *= np.exp(rng.normal(0, 0.05, (n - t - 1, 5)))
    np.testing.assert_array_equal(SkfolioBaseline("hrp", moved, rows).weights_at(t), weights)
    assert not fold.test_mask(n)[SkfolioBaseline("hrp", close, rows).fit_rows(t)].any()
