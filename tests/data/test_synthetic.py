"""Planted-signal markets (sentio_lab.data.synthetic): the oracle's Sharpe formulas against long simulations, the
solved rungs, determinism by seed, no look-ahead in the oracle policies, the files load like any user file, and the
oracle traded through the env earns the stated net Sharpe.

Statistical tolerances: the annualised Sharpe of n daily bars has a standard error of about
``sqrt((1 + SR_bar^2 / 2) / n) * sqrt(252)`` (0.025 at n = 400,000); the tests allow 4 standard errors. Differences
on one path (net minus gross, env minus the additive formula) share the noise and get much tighter bounds.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import load_market
from sentio_lab.data.synthetic import (
    BARS_PER_YEAR,
    RUNGS,
    AR1Market,
    OracleRule,
    RegimeMarket,
    SyntheticPath,
    ar1_for_sharpe,
    close_returns,
    filtered_up_probability,
    policy_sharpe,
    regime_for_sharpe,
    write_ladder,
)
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import prepare_market
from sentio_lab.evaluation.baselines import PriceHistory, WeightPolicy, run_policy
from sentio_lab.evaluation.metrics import sharpe_ratio
from sentio_lab.features import FeatureConfig

LONG = 400_000
SE_LONG = math.sqrt(BARS_PER_YEAR / LONG)  # about 0.025


def returns_and_gaps(path: SyntheticPath) -> tuple[np.ndarray, np.ndarray]:
    """Close-to-close log returns and overnight gaps read back from the frame (what the env sees)."""
    close, open_ = path.frame["close"].to_numpy(), path.frame["open"].to_numpy()
    x = close_returns(close)
    previous = np.r_[np.nan, np.log(close[:-1])]
    gap = np.log(open_) - previous
    gap[0] = 0.0
    return x, gap


@pytest.fixture(scope="module")
def regime_ladder() -> dict[float, RegimeMarket]:
    """The regime rungs (solved once per module: a few seconds of simulation each)."""
    return {rung: regime_for_sharpe(rung) for rung in (1.0, 2.0)}


# ============================================================================================ formulas
@pytest.mark.parametrize("phi", [0.178, 0.45])
def test_ar1_oracle_sharpe_matches_a_long_simulation(phi: float) -> None:
    market = AR1Market(phi)
    path = market.simulate(LONG, seed=11)
    x, gap = returns_and_gaps(path)
    w = market.oracle_weights(path.frame["close"].to_numpy())
    net, gross = policy_sharpe(w, x, gap), policy_sharpe(w, x, gap, 0.0)
    assert net == pytest.approx(market.oracle_sharpe(), abs=4 * SE_LONG)
    assert gross == pytest.approx(market.gross_sharpe(), abs=4 * SE_LONG)
    # the cost terms (E[D], Var D, Cov(R, D)) on the same path: noise largely cancels
    assert net - gross == pytest.approx(market.oracle_sharpe() - market.gross_sharpe(), abs=0.01)


def test_regime_true_state_sharpe_matches_a_long_simulation() -> None:
    market = RegimeMarket(0.003, p_stay=0.95)
    path = market.simulate(LONG, seed=5)
    x, gap = returns_and_gaps(path)
    w = market.true_state_weights(path.state)
    net, gross = policy_sharpe(w, x, gap), policy_sharpe(w, x, gap, 0.0)
    assert net == pytest.approx(market.true_state_sharpe(), abs=4 * SE_LONG)
    assert gross == pytest.approx(market.true_state_sharpe(0.0), abs=4 * SE_LONG)
    assert net - gross == pytest.approx(market.true_state_sharpe() - market.true_state_sharpe(0.0), abs=0.01)


def test_regime_filtered_sharpe_is_reproducible_across_simulation_seeds(regime_ladder) -> None:
    market = regime_ladder[2.0]
    other = market.filtered_sharpe(seed=7)  # an independent 1,000,000-bar simulation
    assert other == pytest.approx(2.0, abs=4 * math.sqrt(BARS_PER_YEAR / 1_000_000))
    # the filter cannot beat knowing the state, and earns something
    assert 0.5 < market.filtered_sharpe() < market.true_state_sharpe()


def test_filtered_policy_on_one_path_matches_the_simulated_sharpe(regime_ladder) -> None:
    market = regime_ladder[2.0]
    path = market.simulate(LONG, seed=3)
    x, gap = returns_and_gaps(path)
    w = market.oracle_weights(path.frame["close"].to_numpy())
    assert policy_sharpe(w, x, gap, burn_in=250) == pytest.approx(2.0, abs=4 * SE_LONG * 2)  # slow regimes: x2


# ============================================================================================== rungs
@pytest.mark.parametrize("rung", RUNGS)
def test_ar1_rungs_are_solved_for_the_net_oracle_sharpe(rung: float) -> None:
    market = ar1_for_sharpe(rung)
    assert market.oracle_sharpe() == pytest.approx(rung, abs=1e-8)
    assert market.gross_sharpe() >= market.oracle_sharpe()
    assert (market.phi == 0) == (rung == 0)


def test_rungs_grow_with_the_signal(regime_ladder) -> None:
    phis = [ar1_for_sharpe(r).phi for r in RUNGS]
    assert phis == sorted(phis) and len(set(phis)) == len(phis)
    assert regime_ladder[1.0].mu < regime_ladder[2.0].mu
    for rung, market in regime_ladder.items():
        assert market.filtered_sharpe() == pytest.approx(rung, abs=1e-3)
    assert regime_for_sharpe(0.0).mu == 0 and regime_for_sharpe(0.0).oracle_sharpe() == 0


def test_costs_lower_the_oracle_sharpe() -> None:
    market = AR1Market(0.1)
    assert market.oracle_sharpe(4.0) < market.oracle_sharpe(2.0) < market.gross_sharpe()
    regime = RegimeMarket(0.002)
    assert regime.true_state_sharpe(4.0) < regime.true_state_sharpe(2.0) < regime.true_state_sharpe(0.0)


def test_no_signal_means_a_flat_oracle() -> None:
    path = AR1Market(0.0).simulate(300, seed=1)
    assert not AR1Market(0.0).oracle_weights(path.frame["close"].to_numpy()).any()
    assert AR1Market(0.0).oracle_sharpe() == 0
    assert not RegimeMarket(0.0).oracle_weights(path.frame["close"].to_numpy()).any()
    assert RegimeMarket(0.0).true_state_sharpe() == 0 and RegimeMarket(0.0).filtered_sharpe() == 0


# ======================================================================================== the process
def test_ar1_path_has_the_planted_autocorrelation_and_real_opens() -> None:
    market = AR1Market(0.3)
    path = market.simulate(200_000, seed=2)
    x, gap = returns_and_gaps(path)
    assert np.corrcoef(x[1:-1], x[2:])[0, 1] == pytest.approx(0.3, abs=0.01)
    assert np.std(x) == pytest.approx(0.01 / math.sqrt(1 - 0.09), rel=0.01)
    # the overnight gap is noise: it does not depend on the last return; the intraday part carries the signal
    day = x - gap
    assert abs(np.corrcoef(x[1:-1], gap[2:])[0, 1]) < 0.01
    assert np.corrcoef(x[1:-1], day[2:])[0, 1] > 0.3
    np.testing.assert_allclose(path.forecast[1:], 0.3 * x[1:])  # x_0 is not observable from the closes
    frame = path.frame
    assert (frame["high"] >= frame[["open", "close"]].max(axis=1)).all()
    assert (frame["low"] <= frame[["open", "close"]].min(axis=1)).all()


def test_regime_path_switches_at_the_stated_rate() -> None:
    path = RegimeMarket(0.002, p_stay=0.9).simulate(100_000, seed=4)
    assert path.state is not None
    assert np.mean(path.state[1:] != path.state[:-1]) == pytest.approx(0.1, abs=0.005)
    assert np.mean(path.state) == pytest.approx(0.5, abs=0.05)


def test_same_seed_same_market_other_seed_other_market() -> None:
    for market in (AR1Market(0.1), RegimeMarket(0.002)):
        a, b, c = market.simulate(500, 1), market.simulate(500, 1), market.simulate(500, 2)
        pd.testing.assert_frame_equal(a.frame, b.frame)
        assert not np.allclose(a.frame["close"], c.frame["close"])


def test_write_ladder_is_reproducible_and_loads_as_a_user_file(tmp_path) -> None:
    first = write_ladder(tmp_path / "a", n_bars=600, rungs=(0.0, 1.0), families=("ar1",))
    second = write_ladder(tmp_path / "b", n_bars=600, rungs=(0.0, 1.0), families=("ar1",))
    assert [e.path.name for e in first] == ["ar1_sharpe0.csv", "ar1_sharpe1.csv"]
    for a, b in zip(first, second, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes()
        market = load_market(a.path)  # the stale-open rule accepts it: opens are real
        assert market.quality is not None and not market.quality.stale_stretches
        assert len(market.frame) == 600
        assert (market.frame["open"].to_numpy()[1:] != market.frame["close"].to_numpy()[:-1]).all()
    (regime,) = write_ladder(tmp_path / "d", n_bars=600, rungs=(0.0,), families=("regime",))
    assert regime.path.name == "regime_sharpe0.csv" and isinstance(regime.market, RegimeMarket)
    with pytest.raises(ValueError, match="unknown family 'garch'"):
        write_ladder(tmp_path / "c", n_bars=600, rungs=(0.0,), families=("garch",))


# ======================================================================================= no look-ahead
@pytest.mark.parametrize("market", [AR1Market(0.2), RegimeMarket(0.003)], ids=["ar1", "regime"])
def test_oracle_weights_at_t_ignore_bars_after_t(market) -> None:
    close = market.simulate(400, seed=9).frame["close"].to_numpy()
    base = market.oracle_weights(close)
    rng = np.random.default_rng(0)
    for t in (50, 200, 398):
        perturbed = close.copy()
        perturbed[t + 1 :] *= np.exp(rng.normal(0, 0.05, len(close) - t - 1))
        changed = market.oracle_weights(perturbed)
        np.testing.assert_array_equal(changed[: t + 1], base[: t + 1])
        # the perturbation is not a no-op: later decisions do react
        assert t == 398 or (changed[t + 1 :] != base[t + 1 :]).any()


def test_filter_runs_paths_side_by_side() -> None:
    market = RegimeMarket(0.003)
    a, b = market.simulate(300, 1).frame["close"], market.simulate(300, 2).frame["close"]
    both = filtered_up_probability(np.c_[a, b], 0.003, 0.98, 0.01)
    np.testing.assert_allclose(both[:, 0], filtered_up_probability(a.to_numpy(), 0.003, 0.98, 0.01))
    np.testing.assert_allclose(both[:, 1], filtered_up_probability(b.to_numpy(), 0.003, 0.98, 0.01))
    assert ((both > 0) & (both < 1)).all()


# ========================================================================================== the env
@pytest.mark.parametrize("n_bars", [6000, pytest.param(20_000, marks=pytest.mark.slow)])
def test_oracle_through_the_env_earns_the_stated_net_sharpe(tmp_path, n_bars: int) -> None:
    market = ar1_for_sharpe(2.0)
    path = market.simulate(n_bars, seed=21)
    csv = tmp_path / "ar1.csv"
    path.frame.to_csv(csv)
    prepared = prepare_market(csv, FeatureConfig(), train_fraction=0.6, validation_fraction=0.2)
    positions = (-1.0, 0.0, 1.0)
    costs = CostModel(fee_bps=1.0, slippage_bps=1.0)
    policy = WeightPolicy(OracleRule(market), PriceHistory.from_market(prepared), positions)
    start = prepared.arrays.first_valid + 32
    (evaluation,) = run_policy(policy, prepared, window=1, positions=positions, costs=costs,
                               bars=(start, len(path.frame)))
    env_sharpe = sharpe_ratio(evaluation.equity.pct_change().dropna(), BARS_PER_YEAR)
    # the env on these bars equals the additive formula on the same bars (compounding / share drift only; the same
    # noise on both sides) ...
    x, gap = returns_and_gaps(path)
    w = market.oracle_weights(path.frame["close"].to_numpy())
    same_bars = policy_sharpe(w[start - 1 :], x[start - 1 :], gap[start - 1 :])
    assert env_sharpe == pytest.approx(same_bars, abs=0.02)
    # ... and the stated net Sharpe within 4 standard errors (0.11 with 20,000 bars, 0.2 with 6,000)
    assert env_sharpe == pytest.approx(market.oracle_sharpe(), abs=4 * math.sqrt(BARS_PER_YEAR / n_bars))
    # costs were paid: the same policy without costs earns more
    (free,) = run_policy(policy, prepared, window=1, positions=positions, costs=CostModel(fee_bps=0, slippage_bps=0),
                         bars=(start, len(path.frame)))
    assert sharpe_ratio(free.equity.pct_change().dropna(), BARS_PER_YEAR) > env_sharpe + 0.1


# ============================================================================================ errors
def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="phi=1"):
        AR1Market(1.0)
    with pytest.raises(ValueError, match="p_stay=0.4"):
        RegimeMarket(0.001, p_stay=0.4)
    with pytest.raises(ValueError, match="overnight_share"):
        AR1Market(0.1, overnight_share=1.0)
    with pytest.raises(ValueError, match="n_bars >= 2"):
        AR1Market(0.1).simulate(1, seed=0)
    with pytest.raises(ValueError, match="target=-1"):
        ar1_for_sharpe(-1.0)
    with pytest.raises(ValueError, match="target=-1"):
        regime_for_sharpe(-1.0)


def test_names_say_the_parameters() -> None:
    assert AR1Market(0.1234).name == "ar1_phi0.1234"
    assert RegimeMarket(0.00123).name == "regime_mu0.00123"
