"""Tests of sentio_lab.evaluation.inference: PSR / DSR against benchmarks and trials, PBO by CSCV, paired Sharpe A/B,
SPA.

Conventions checked here: Sharpe ratios per period (mean / std, ddof=1) unless annualised by ``periods``;
kurtosis non-excess in PSR (as in test_metrics); PBO ranks out of sample ascending (1 = worst), w = rank / (N + 1),
overfit when log(w / (1 - w)) <= 0; SPA on losses = -returns.
"""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from arch.bootstrap import SPA, StationaryBootstrap
from scipy.stats import kurtosis, norm, skew

from sentio_lab.evaluation import inference as inf
from sentio_lab.evaluation import metrics as mt

EULER_GAMMA = 0.5772156649015329


def psr_by_formula(r: np.ndarray, sr_star: float) -> float:
    """PSR of ARCHITECTURE.md with scipy's moments (non-excess kurtosis, sqrt(T - 1))."""
    sr = np.mean(r) / np.std(r, ddof=1)
    g3, g4 = skew(r), kurtosis(r, fisher=False)
    return float(norm.cdf((sr - sr_star) * math.sqrt(len(r) - 1) / math.sqrt(1 - g3 * sr + (g4 - 1) / 4 * sr**2)))


# ------------------------------------------------------------------------------------------ PSR, DSR
def test_psr_against_the_best_benchmark():
    rng = np.random.default_rng(0)
    agent = rng.normal(0.001, 0.01, 500)
    baselines = pd.DataFrame({"buy_and_hold": rng.normal(0.0006, 0.01, 500), "sma": rng.normal(0.0, 0.01, 500),
                              "flat": np.zeros(500)})  # flat has no Sharpe ratio: ignored
    result = inf.psr_against_benchmarks(agent, baselines)
    sharpes = {c: np.mean(baselines[c]) / np.std(baselines[c], ddof=1) for c in ("buy_and_hold", "sma")}
    best = max(sharpes, key=sharpes.get)
    assert result.benchmark == best and result.sr_benchmark == pytest.approx(sharpes[best], rel=1e-12)
    assert result.psr == pytest.approx(psr_by_formula(agent, sharpes[best]), rel=1e-12)
    assert result.psr < mt.probabilistic_sharpe_ratio(agent)  # a positive bar is harder to clear than 0
    with pytest.raises(ValueError, match="no benchmark has a defined"):
        inf.psr_against_benchmarks(agent, {"flat": np.zeros(500)})


def test_dsr_of_trials_uses_the_trial_count_and_the_variance_of_their_sharpes():
    rng = np.random.default_rng(1)
    trials = pd.DataFrame(rng.normal(0.0004, 0.01, (600, 6)), columns=[f"cfg{i}" for i in range(6)])
    trials["cfg3"] += 0.001
    result = inf.deflated_sharpe_of_trials(trials)
    sharpes = trials.mean() / trials.std(ddof=1)
    assert result.selected == "cfg3" and result.sharpe == pytest.approx(sharpes["cfg3"])
    var = float(np.var(sharpes, ddof=1))
    sr0 = math.sqrt(var) * ((1 - EULER_GAMMA) * norm.ppf(1 - 1 / 6) + EULER_GAMMA * norm.ppf(1 - 1 / (6 * math.e)))
    assert result.sr_variance == pytest.approx(var, rel=1e-12) and result.sr0 == pytest.approx(sr0, rel=1e-12)
    assert result.dsr == pytest.approx(psr_by_formula(trials["cfg3"].to_numpy(), sr0), rel=1e-12)
    more = inf.deflated_sharpe_of_trials(trials, n_trials=60)  # the runner tried more than it kept
    assert more.n_trials == 60 and more.dsr < result.dsr
    other = inf.deflated_sharpe_of_trials({c: trials[c] for c in trials}, selected="cfg0")
    assert other.selected == "cfg0" and other.dsr < result.dsr
    with pytest.raises(ValueError, match="fewer than"):
        inf.deflated_sharpe_of_trials(trials, n_trials=3)
    with pytest.raises(ValueError, match="not among"):
        inf.deflated_sharpe_of_trials(trials, selected="ghost")


# ---------------------------------------------------------------------------------------------- PBO
def test_pbo_of_a_hand_built_case():
    """S = 4 blocks of 2 rows, N = 3: A moves by block, B = -A, C has mean 0 (Sharpe 0).

    A's block means are 4, 2, -1, -3 (times 0.01, +-0.005 inside a block), so in any half A's Sharpe has the sign
    of the sum of its block means, B the opposite one, and the ranking is A > C > B or B > C > A. The in-sample
    best is A where the in-sample blocks sum above 0, else B; out of sample it is the best (rank 3, w = 3/4,
    logit log 3) if its out-of-sample sum has the same sign, else the worst (rank 1, w = 1/4, logit -log 3):
      IS {0,1}: +6 -> A, OOS {2,3}: -4 -> worst     IS {0,2}: +3 -> A, OOS {1,3}: -1 -> worst
      IS {0,3}: +1 -> A, OOS {1,2}: +1 -> best      IS {1,2}: +1 -> A, OOS {0,3}: +1 -> best
      IS {1,3}: -1 -> B, OOS {0,2}: +3 -> worst     IS {2,3}: -4 -> B, OOS {0,1}: +6 -> worst
    PBO = 4 / 6.
    """
    wiggle = np.array([0.005, -0.005])
    a = np.concatenate([0.01 * m + wiggle for m in (4, 2, -1, -3)])
    returns = pd.DataFrame({"A": a, "B": -a, "C": np.tile(wiggle, 4)})
    result = inf.probability_of_backtest_overfitting(returns, n_blocks=4)
    assert result.pbo == pytest.approx(4 / 6)
    np.testing.assert_allclose(result.logits, np.log(3) * np.array([-1, -1, 1, 1, -1, -1]), rtol=1e-12)
    np.testing.assert_allclose(result.relative_ranks, [0.25, 0.25, 0.75, 0.75, 0.25, 0.25])
    assert result.chosen.tolist() == [0, 0, 0, 0, 1, 1] and result.names == ("A", "B", "C")
    assert (result.is_performance > 0).all()  # the in-sample winner always has a positive Sharpe here
    # out of sample: A's sums -4, -1, +1, +1, then B's, the negatives of A's +3 and +6
    assert np.sign(result.oos_performance).tolist() == [-1, -1, 1, 1, -1, -1]


def test_pbo_counts_a_median_choice_as_overfit():
    """N = 3 per-path scores, S = 2: each half's winner lands exactly in the middle of the other (rank 2 of 3,
    w = 1/2, logit 0), which the convention lambda <= 0 counts as overfit."""
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [2.0, 3.0, 1.0], [2.0, 3.0, 1.0]])
    result = inf.probability_of_backtest_overfitting(scores, n_blocks=2, statistic="mean")
    assert result.chosen.tolist() == [0, 1] and result.logits.tolist() == [0.0, 0.0] and result.pbo == 1.0


def slow_pbo(values: np.ndarray, n_blocks: int) -> tuple[float, np.ndarray]:
    """CSCV written out with loops, np.std and ranks counted by hand (independent of the vectorised code)."""
    blocks = np.array_split(np.arange(len(values)), n_blocks)
    n = values.shape[1]
    logits = []
    for chosen in itertools.combinations(range(n_blocks), n_blocks // 2):
        is_rows = np.concatenate([blocks[b] for b in chosen])
        oos_rows = np.concatenate([blocks[b] for b in range(n_blocks) if b not in chosen])
        is_sr = [np.mean(values[is_rows, j]) / np.std(values[is_rows, j], ddof=1) for j in range(n)]
        oos_sr = [np.mean(values[oos_rows, j]) / np.std(values[oos_rows, j], ddof=1) for j in range(n)]
        best = int(np.argmax(is_sr))
        rank = 1 + sum(s < oos_sr[best] for s in oos_sr) + 0.5 * (sum(s == oos_sr[best] for s in oos_sr) - 1)
        w = rank / (n + 1)
        logits.append(math.log(w / (1 - w)))
    logits = np.array(logits)
    return float(np.mean(logits <= 0)), logits


def test_pbo_equals_a_loop_implementation():
    values = np.random.default_rng(2).normal(0.0002, 0.01, (123, 5))  # 123 rows: blocks of 21 and 20
    result = inf.probability_of_backtest_overfitting(values, n_blocks=6)
    pbo, logits = slow_pbo(values, 6)
    assert result.pbo == pbo and len(result.logits) == math.comb(6, 3)
    np.testing.assert_allclose(result.logits, logits, rtol=1e-12)
    # "mean" ranks by the half's mean; a callable doing the same gives the same answer
    by_mean = inf.probability_of_backtest_overfitting(values, n_blocks=6, statistic="mean")
    by_callable = inf.probability_of_backtest_overfitting(values, n_blocks=6, statistic=lambda x: x.mean(axis=0))
    np.testing.assert_allclose(by_mean.logits, by_callable.logits)


def test_pbo_is_zero_when_one_configuration_dominates_every_block():
    rng = np.random.default_rng(3)
    values = rng.normal(0.0, 0.01, (480, 8))
    values[:, 5] += 0.01  # a Sharpe of about 1 per bar against 0: best in every half, in and out of sample
    result = inf.probability_of_backtest_overfitting(values)
    assert len(result.logits) == math.comb(16, 8) == 12870
    assert result.pbo == 0.0 and (result.chosen == 5).all()
    np.testing.assert_allclose(result.logits, math.log(8))  # rank N: w = N / (N + 1), logit log N


def test_pbo_of_pure_noise_is_about_one_half():
    """Noise: the in-sample choice is independent of the out-of-sample ranks, so E[PBO] = P(rank <= N/2) = 1/2.

    The 12,870 splits of one data set are not independent draws (they reuse the same 480 rows), so the binomial
    standard error sqrt(0.25 / 12870) = 0.004 does not apply: over data sets PBO spreads with a standard
    deviation of about 0.17 (measured: 0.169 over 20 seeds). The mean over 20 data sets has a standard error
    of about 0.17 / sqrt(20) = 0.038; the tolerance 0.12 is three of them.
    """
    pbos = [inf.probability_of_backtest_overfitting(np.random.default_rng(100 + s).normal(0, 0.01, (480, 10))).pbo
            for s in range(20)]
    assert np.mean(pbos) == pytest.approx(0.5, abs=0.12)
    assert np.std(pbos) > 0.05  # it does vary from one data set to the next


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_blocks": 5}, "even"),
        ({"n_blocks": 0}, "even"),
        ({"n_blocks": 32}, "2 rows per block"),
        ({"statistic": "sortino"}, "statistic"),
    ],
)
def test_pbo_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inf.probability_of_backtest_overfitting(np.random.default_rng(0).normal(size=(40, 3)), **kwargs)


def test_pbo_rejects_bad_matrices():
    with pytest.raises(ValueError, match="at least 2 columns"):
        inf.probability_of_backtest_overfitting(np.ones((40, 1)))
    with pytest.raises(ValueError, match="NaN"):
        inf.probability_of_backtest_overfitting(np.full((40, 2), np.nan))


# ------------------------------------------------------------------------------------------ A/B test
@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(4)
    common = rng.normal(0.0, 0.01, 750)
    index = pd.bdate_range("2015-01-01", periods=750)
    a = pd.Series(common + rng.normal(0.0015, 0.004, 750), index=index)  # clearly better than b
    b = pd.Series(common + rng.normal(0.0, 0.004, 750), index=index)
    return a, b


def test_ab_identical_configurations_differ_by_nothing(pair):
    a, _ = pair
    result = inf.sharpe_difference_test(a, a, reps=500)
    assert result.difference == 0.0 and result.ci_low == 0.0 and result.ci_high == 0.0 and result.p_value == 1.0


def test_ab_a_clearly_better_configuration(pair):
    a, b = pair
    result = inf.sharpe_difference_test(a, b, reps=1000, seed=7)
    assert result.difference == pytest.approx(mt.sharpe_ratio(a) - mt.sharpe_ratio(b), rel=1e-12)
    assert 0 < result.ci_low < result.difference < result.ci_high
    assert result.p_value < 0.01 and result.reps == 1000
    flipped = inf.sharpe_difference_test(b, a, reps=1000, seed=7)  # same draws: a mirror image
    assert flipped.difference == pytest.approx(-result.difference)
    assert flipped.ci_high == pytest.approx(-result.ci_low) and flipped.p_value == result.p_value


def test_ab_interval_is_arch_percentile_interval_and_reproducible(pair):
    a, b = pair
    result = inf.sharpe_difference_test(a, b, reps=500, seed=11, block_size=5)
    assert result == inf.sharpe_difference_test(a, b, reps=500, seed=11, block_size=5)
    assert result != inf.sharpe_difference_test(a, b, reps=500, seed=12, block_size=5)

    def diff(x, y):
        return np.array([x.mean() / x.std(ddof=1) - y.mean() / y.std(ddof=1)])

    arch_ci = StationaryBootstrap(5, a.to_numpy(), b.to_numpy(), seed=11).conf_int(diff, 500, method="percentile")
    np.testing.assert_allclose([result.ci_low, result.ci_high], arch_ci[:, 0], rtol=1e-12)
    annual = inf.sharpe_difference_test(a, b, reps=500, seed=11, block_size=5, periods=252)
    assert annual.difference == pytest.approx(result.difference * math.sqrt(252))
    assert annual.ci_low == pytest.approx(result.ci_low * math.sqrt(252))
    assert annual.p_value == result.p_value and annual.sharpe_a == pytest.approx(mt.sharpe_ratio(a, 252))


def test_ab_default_block_length_comes_from_the_data(pair):
    a, b = pair
    rng = np.random.default_rng(5)
    persistent = pd.Series(np.convolve(rng.normal(0, 0.01, 800), np.ones(20) / 20, mode="valid")[:750],
                           index=a.index)
    assert inf.block_length(a.to_numpy(), b.to_numpy()) <= 3  # nearly independent returns: short blocks
    assert inf.block_length(persistent.to_numpy()) > 10  # a 20-bar moving average: long ones
    assert inf.sharpe_difference_test(persistent, b, reps=200).block_size == inf.block_length(persistent, b)


def test_ab_rejects_unpaired_input(pair):
    a, b = pair
    with pytest.raises(ValueError, match="same bars"):
        inf.sharpe_difference_test(a, b.shift(1, freq="B"))
    with pytest.raises(ValueError, match="same bars"):
        inf.sharpe_difference_test(a, b.iloc[:-1])
    with pytest.raises(ValueError, match="do not vary"):
        inf.sharpe_difference_test(a, pd.Series(0.0, index=a.index))


# ------------------------------------------------------------------------------------------------ SPA
@pytest.fixture(scope="module")
def baselines():
    rng = np.random.default_rng(6)
    return pd.DataFrame(rng.normal(0.0002, 0.01, (750, 4)), columns=["buy_and_hold", "sma", "momentum", "random"])


def test_spa_test_is_arch_spa_on_negative_returns(baselines):
    rng = np.random.default_rng(7)
    agent = rng.normal(0.0004, 0.01, 750)
    ours = inf.spa_test(agent, baselines, benchmark_name="ppo", reps=300, block_size=3, seed=5)
    spa = SPA(-agent, -baselines.to_numpy(), block_size=3, reps=300, seed=5)
    spa.compute()
    assert (ours.consistent, ours.lower, ours.upper) == tuple(float(spa.pvalues[k])
                                                            for k in ("consistent", "lower", "upper"))
    assert ours.models == tuple(baselines.columns) and ours.benchmark == "ppo"


def test_spa_a_strong_agent_beats_noisy_baselines(baselines):
    agent = pd.Series(np.random.default_rng(8).normal(0.003, 0.01, 750), name="ppo")
    result = inf.spa_agent_vs_baselines(agent, baselines, reps=500, seed=1)
    assert result.consistent < 0.01 and result.upper < 0.01  # the largest of the per-baseline p-values
    assert set(result.per_baseline) == set(baselines.columns)
    assert all(r.models == ("ppo",) for r in result.per_baseline.values())
    assert result.reverse["ppo"].consistent > 0.2  # no baseline beats it either


def test_spa_an_agent_equal_to_a_baseline_does_not_beat_the_baselines(baselines):
    clone = baselines["sma"].rename("clone")
    result = inf.spa_agent_vs_baselines(clone, baselines, reps=500, seed=1)
    assert result.per_baseline["sma"].excluded == ("clone",) and result.per_baseline["sma"].consistent == 1.0
    assert result.consistent == 1.0  # arch 8.0 alone says 0.0 here (0 / 0 in its studentisation)
    assert result.reverse["clone"].excluded == ("sma",)
    noisy = baselines["sma"] + np.random.default_rng(9).normal(0, 0.002, 750)
    assert inf.spa_agent_vs_baselines(noisy, baselines, reps=500, seed=1).consistent > 0.2


def test_spa_several_agents_and_reverse_direction(baselines):
    rng = np.random.default_rng(10)
    agents = pd.DataFrame({"good": rng.normal(0.003, 0.01, 750), "bad": rng.normal(-0.003, 0.01, 750)})
    result = inf.spa_agent_vs_baselines(agents, baselines, reps=500, seed=2)
    assert result.consistent < 0.05  # the good one beats every baseline, after the choice among two agents
    assert result.reverse["bad"].consistent < 0.05  # baselines beat the bad one
    assert result.reverse["good"].consistent > 0.2
    with pytest.raises(ValueError, match="not the same bars"):
        inf.spa_agent_vs_baselines(agents.iloc[:-1], baselines)
