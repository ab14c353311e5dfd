import math

import numpy as np
import pandas as pd
import pytest
import vectorbt  # noqa: F401  (registers the pandas .vbt accessor used as a cross-check)
from scipy.stats import kurtosis, norm, skew

from sentio_lab.data import load_market
from sentio_lab.evaluation import metrics as mt

# A small series whose moments are worked out by hand below (not with scipy).
RETURNS = np.array([0.012, -0.021, 0.034, 0.004, -0.011, 0.019, 0.0, 0.015, -0.027, 0.008])


def hand_psr(r: np.ndarray, sr_star: float) -> float:
    """PSR written out from ARCHITECTURE.md with explicit central moments."""
    t = len(r)
    mean = sum(r) / t
    sd = math.sqrt(sum((x - mean) ** 2 for x in r) / (t - 1))
    m2 = sum((x - mean) ** 2 for x in r) / t
    m3 = sum((x - mean) ** 3 for x in r) / t
    m4 = sum((x - mean) ** 4 for x in r) / t
    g3, g4 = m3 / m2**1.5, m4 / m2**2
    sr = mean / sd
    z = (sr - sr_star) * math.sqrt(t - 1) / math.sqrt(1 - g3 * sr + (g4 - 1) / 4 * sr**2)
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@pytest.fixture(scope="module")
def sp500() -> pd.DataFrame:
    return load_market("sp500").frame


def curve(returns, start="2020-01-01", freq="B") -> pd.Series:
    values = np.concatenate([[1.0], np.cumprod(1 + np.asarray(returns))])
    return pd.Series(values, index=pd.date_range(start, periods=len(values), freq=freq))


# ------------------------------------------------------------------------------ periods per year
def test_periods_per_year_from_real_indexes(sp500):
    assert mt.periods_per_year(sp500) == 252  # median of the full calendar years 1999..2018
    assert mt.periods_per_year(sp500.index) == 252
    fx = load_market("eurusd_1h").frame
    ppy = mt.periods_per_year(fx)
    assert 24 * 250 <= ppy <= 24 * 262  # about 24 hours x 260 weekdays
    assert ppy == len(fx)  # one year, covered from its first week to its last


def test_periods_per_year_falls_back_to_density_for_short_ranges(sp500):
    part = sp500.iloc[1000:1100]  # about five months, no whole calendar year
    ppy = mt.periods_per_year(part)
    span_years = (part.index[-1] - part.index[0]).days / 365.25
    assert ppy == pytest.approx(99 / span_years)
    assert 235 < ppy < 265


def test_periods_per_year_conventions_for_spacings_and_numbers():
    assert mt.periods_per_year("1D") == 252
    assert mt.periods_per_year(pd.Timedelta(hours=1)) == pytest.approx(24 * 260)
    assert mt.periods_per_year(pd.Timedelta(minutes=30)) == pytest.approx(48 * 260)
    assert mt.periods_per_year("7D") == pytest.approx(365.25 / 7)
    assert mt.periods_per_year(12) == 12.0
    assert mt.periods_per_year(np.float64(52.5)) == 52.5


@pytest.mark.parametrize(
    ("arg", "error", "match"),
    [
        (pd.RangeIndex(10), TypeError, "RangeIndex"),
        (pd.DatetimeIndex(["2020-01-01"]), ValueError, "at least 2"),
        (pd.DatetimeIndex(["2020-01-02", "2020-01-01"]), ValueError, "increasing"),
        (pd.DatetimeIndex(["2020-01-01", "2020-01-01"]), ValueError, "equal"),
        ("0D", ValueError, "positive"),
        (-5, ValueError, "positive"),
        (float("nan"), ValueError, "positive"),
        (True, TypeError, "bool"),
        ([252], TypeError, "list"),
    ],
)
def test_periods_per_year_rejects_bad_input(arg, error, match):
    with pytest.raises(error, match=match):
        mt.periods_per_year(arg)


# -------------------------------------------------------------------------------- basic metrics
def test_returns_total_return_cagr_and_drawdown_on_a_small_curve():
    eq = pd.Series([1.0, 1.1, 0.99, 1.188])
    np.testing.assert_allclose(mt.simple_returns(eq), [0.1, -0.1, 0.2])
    np.testing.assert_allclose(mt.log_returns(eq), np.log([1.1, 0.9, 1.2]))
    assert mt.total_return(eq) == pytest.approx(0.188)
    assert mt.cagr(eq, 3) == pytest.approx(0.188)  # three periods of a 3-per-year clock: one year
    assert mt.cagr(eq, 1.5) == pytest.approx(1.188**0.5 - 1)  # two years
    np.testing.assert_allclose(mt.drawdown(eq), [0.0, 0.0, -0.1, 0.0], atol=1e-15)
    assert mt.max_drawdown(eq) == pytest.approx(-0.1)
    assert mt.calmar_ratio(eq, 3) == pytest.approx(0.188 / 0.1)


def test_ratios_agree_with_vectorbt_and_scale_as_documented():
    rng = np.random.default_rng(3)
    r = pd.Series(rng.normal(0.0004, 0.01, 500), index=pd.date_range("2010-01-01", periods=500, freq="D"))
    acc = r.vbt.returns(freq="1D", year_freq="252D")
    assert mt.sharpe_ratio(r, 252) == pytest.approx(acc.sharpe_ratio(), rel=1e-12)
    assert mt.sortino_ratio(r, 252) == pytest.approx(acc.sortino_ratio(), rel=1e-12)
    assert mt.annualized_volatility(r, 252) == pytest.approx(acc.annualized_volatility(), rel=1e-12)
    eq = curve(r)
    assert mt.max_drawdown(eq) == pytest.approx(r.vbt.returns(freq="1D").max_drawdown(), rel=1e-12)
    # per-period SR is the annualised one without the sqrt(periods) factor, and scale-free
    assert mt.sharpe_ratio(r) * math.sqrt(252) == pytest.approx(mt.sharpe_ratio(r, 252))
    assert mt.sharpe_ratio(3 * r) == pytest.approx(mt.sharpe_ratio(r))
    assert mt.sharpe_ratio(-r) == pytest.approx(-mt.sharpe_ratio(r))


def test_undefined_ratios_are_nan_not_zero():
    flat = np.zeros(20)
    assert math.isnan(mt.sharpe_ratio(flat))
    assert math.isnan(mt.probabilistic_sharpe_ratio(flat))
    assert math.isnan(mt.sortino_ratio([0.01, 0.02, 0.0]))  # never lost
    assert math.isnan(mt.calmar_ratio([1.0, 1.1, 1.2], 252))  # never drew down
    assert math.isnan(mt.hit_rate(flat))  # never exposed


def test_hit_rate_ignores_flat_periods():
    assert mt.hit_rate([0.01, 0.0, -0.02, 0.0, 0.03, 0.01]) == pytest.approx(3 / 4)


def test_weight_metrics_start_from_flat():
    w = [0.0, 1.0, 1.0, -1.0, 0.5, 0.5]
    assert mt.number_of_trades(w) == 3  # 0->0 is no trade; 0->1, 1->-1, -1->0.5
    assert mt.turnover(w) == pytest.approx((0 + 1 + 0 + 2 + 1.5 + 0) / 6)
    assert mt.turnover(w, 252) == pytest.approx(252 * 4.5 / 6)
    assert mt.average_exposure(w) == pytest.approx(4 / 6)
    assert mt.number_of_trades([1.0]) == 1  # the first decision from flat is a fill


# --------------------------------------------------------------------------------- PSR and DSR
def test_psr_matches_the_formula_computed_by_hand():
    for sr_star in (0.0, 0.05, -0.1):
        assert mt.probabilistic_sharpe_ratio(RETURNS, sr_star) == pytest.approx(
            hand_psr(RETURNS, sr_star), rel=1e-12
        )


def test_psr_properties():
    sr = mt.sharpe_ratio(RETURNS)
    assert mt.probabilistic_sharpe_ratio(RETURNS, sr) == pytest.approx(0.5, abs=1e-15)
    values = [mt.probabilistic_sharpe_ratio(RETURNS, s) for s in (-0.2, -0.1, 0.0, 0.1, 0.2)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    # more evidence for the same positive SR: PSR(0) rises with the sample length
    assert mt.probabilistic_sharpe_ratio(np.tile(RETURNS, 10)) > mt.probabilistic_sharpe_ratio(RETURNS)


def psr_with_scipy_moments(r: np.ndarray, sr_star: float = 0.0, *, excess: bool = False, t_factor=None,
                           ddof: int = 1, sr_scale: float = 1.0) -> float:
    """PSR from ARCHITECTURE.md with scipy's moments, conventions stated (and switchable, to build wrong ones).

    SR per period = mean / sample std (ddof=1), not annualised; g3 = scipy.stats.skew(bias=True);
    g4 = scipy.stats.kurtosis(fisher=False, bias=True), non-excess (normal = 3); sqrt(T - 1).
    """
    t = len(r)
    sr = np.mean(r) / np.std(r, ddof=ddof) * sr_scale
    g3 = skew(r, bias=True)
    g4 = kurtosis(r, fisher=excess, bias=True)
    factor = math.sqrt(t - 1) if t_factor is None else t_factor(t)
    return float(norm.cdf((sr - sr_star) * factor / math.sqrt(1 - g3 * sr + (g4 - 1) / 4 * sr**2)))


def skewed_heavy_tailed_returns(t: int = 400, sr: float = 0.08) -> np.ndarray:
    """Student-t returns with a small crash component, shifted to a per-period SR of exactly ``sr``."""
    rng = np.random.default_rng(7)
    z = 0.01 * rng.standard_t(4, t) / math.sqrt(2) - 0.004 * (rng.random(t) < 0.05)
    return z - z.mean() + sr * z.std(ddof=1)


def test_psr_equals_an_independent_computation_and_wrong_formulas_do_not():
    r = skewed_heavy_tailed_returns()
    assert mt.sharpe_ratio(r) == pytest.approx(0.08, rel=1e-12)
    assert skew(r) < -0.1 and kurtosis(r, fisher=False) > 4  # moments that matter in the denominator
    psr = mt.probabilistic_sharpe_ratio(r)
    assert 0.6 < psr < 0.99  # an informative value, not saturated at 1
    tolerance = 1e-12
    for sr_star in (0.0, 0.02, -0.05):
        assert mt.probabilistic_sharpe_ratio(r, sr_star) == pytest.approx(psr_with_scipy_moments(r, sr_star),
                                                                          rel=tolerance)
    # Plausible mistakes, each missed by the old abs=0.01 tolerance on a long Gaussian sample, differ here
    # from the right value by orders of magnitude more than the tolerance used above.
    wrong = {
        "excess kurtosis": psr_with_scipy_moments(r, excess=True),
        "sqrt(T) instead of sqrt(T - 1)": psr_with_scipy_moments(r, t_factor=math.sqrt),
        "population std in the SR": psr_with_scipy_moments(r, ddof=0),
        "annualised SR": psr_with_scipy_moments(r, sr_scale=math.sqrt(252)),
    }
    for name, value in wrong.items():
        assert abs(value - psr) > 1e6 * tolerance * psr, name


def test_dsr_is_psr_at_the_expected_max_sharpe_and_falls_with_more_trials():
    var = 0.002
    for n in (2, 10, 100):
        sr0 = math.sqrt(var) * (
            (1 - 0.5772156649015329) * norm.ppf(1 - 1 / n)
            + 0.5772156649015329 * norm.ppf(1 - 1 / (n * math.e))
        )
        assert mt.expected_max_sharpe(n, var) == pytest.approx(sr0, rel=1e-12)
        assert mt.deflated_sharpe_ratio(RETURNS, n_trials=n, sr_variance=var) == pytest.approx(
            hand_psr(RETURNS, sr0), rel=1e-12
        )
    dsrs = [mt.deflated_sharpe_ratio(RETURNS, n_trials=n, sr_variance=var) for n in (2, 5, 20, 100, 1000)]
    assert all(a > b for a, b in zip(dsrs, dsrs[1:], strict=False))
    assert dsrs[0] < mt.probabilistic_sharpe_ratio(RETURNS)  # even two trials deflate (SR0 > 0)
    # zero variance across trials: nothing to deflate
    assert mt.deflated_sharpe_ratio(RETURNS, n_trials=50, sr_variance=0.0) == pytest.approx(
        mt.probabilistic_sharpe_ratio(RETURNS)
    )


def test_dsr_from_trial_sharpes():
    trials = [0.05, 0.12, -0.03, 0.08]
    expected = mt.deflated_sharpe_ratio(RETURNS, n_trials=4, sr_variance=float(np.var(trials, ddof=1)))
    assert mt.deflated_sharpe_ratio(RETURNS, trial_sharpes=trials) == pytest.approx(expected)
    more = mt.deflated_sharpe_ratio(RETURNS, trial_sharpes=trials, n_trials=40)
    assert more < expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_trials": 1, "sr_variance": 0.1}, "n_trials"),
        ({"n_trials": 2.5, "sr_variance": 0.1}, "n_trials"),
        ({"n_trials": 5, "sr_variance": -0.1}, "sr_variance"),
        ({"n_trials": 5, "sr_variance": float("nan")}, "sr_variance"),
        ({"n_trials": 5}, "needs"),
        ({}, "needs"),
        ({"trial_sharpes": [0.1]}, "at least 2"),
        ({"trial_sharpes": [0.1, 0.2], "sr_variance": 0.1}, "not both"),
    ],
)
def test_dsr_rejects_bad_trial_descriptions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mt.deflated_sharpe_ratio(RETURNS, **kwargs)


# ------------------------------------------------------------------------------ summaries, errors
def test_summary_stats_uses_the_index_and_weights(sp500):
    closes = sp500["close"].iloc[:600]
    eq = closes / closes.iloc[0]
    w = pd.Series(1.0, index=eq.index[:-1])
    s = mt.summary_stats(eq, w)
    assert list(s) == list(mt.STAT_NAMES)
    assert s["periods_per_year"] == 252  # 2014 is covered completely (sp500 starts 2013-05-10)
    assert s["bars"] == 599 and s["start"] == eq.index[0] and s["end"] == eq.index[-1]
    assert s["total_return"] == pytest.approx(closes.iloc[-1] / closes.iloc[0] - 1)
    assert s["sharpe"] == pytest.approx(mt.sharpe_ratio(closes.pct_change().iloc[1:], 252))
    assert s["n_trades"] == 1 and s["avg_exposure"] == 1.0
    assert s["turnover_per_year"] == pytest.approx(252 / 599)
    assert math.isnan(s["dsr"])
    with_trials = mt.summary_stats(eq, periods=252, n_trials=10, sr_variance=0.001)
    assert with_trials["dsr"] < with_trials["psr"]
    assert math.isnan(with_trials["n_trades"])


def test_summary_stats_of_a_two_point_curve_leaves_undefined_entries_nan():
    s = mt.summary_stats(pd.Series([1.0, 1.01]), periods=252)
    assert s["start"] is None and s["total_return"] == pytest.approx(0.01)
    assert math.isnan(s["sharpe"]) and math.isnan(s["psr"]) and math.isnan(s["ann_volatility"])


def test_stats_table_puts_strategies_in_columns():
    a, b = curve([0.01, -0.02, 0.015, 0.003]), curve([0.0, 0.01, 0.01, -0.005])
    table = mt.stats_table({"agent": a, "buy_and_hold": b}, {"agent": [1.0, 1.0, 0.0, -1.0]}, periods=252)
    assert list(table.columns) == ["agent", "buy_and_hold"]
    assert list(table.index) == list(mt.STAT_NAMES)
    assert table.loc["n_trades", "agent"] == 3 and math.isnan(table.loc["n_trades", "buy_and_hold"])
    assert table.loc["total_return", "buy_and_hold"] == pytest.approx(mt.total_return(b))
    with pytest.raises(ValueError, match="unknown strategies"):
        mt.stats_table({"agent": a}, {"other": [1.0]})
    with pytest.raises(ValueError, match="no equity"):
        mt.stats_table({})


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: mt.total_return([1.0, np.nan, 1.2]), ValueError, "NaN or inf"),
        (lambda: mt.total_return([1.0]), ValueError, "at least 2"),
        (lambda: mt.log_returns([1.0, 0.0, 1.0]), ValueError, "> 0"),
        (lambda: mt.drawdown(pd.DataFrame({"a": [1.0, 2.0]})), TypeError, "DataFrame"),
        (lambda: mt.sharpe_ratio(np.ones((3, 2))), ValueError, "1-D"),
        (lambda: mt.sharpe_ratio([0.01]), ValueError, "at least 2"),
        (lambda: mt.cagr([1.0, 2.0], 0), ValueError, "periods_per_year"),
        (lambda: mt.turnover([]), ValueError, "empty"),
        (lambda: mt.average_exposure([0.5, np.inf]), ValueError, "weights"),
        (lambda: mt.summary_stats(curve([0.01, 0.02]), [1.0]), ValueError, "2 decisions|1 decisions"),
        (lambda: mt.summary_stats(pd.Series([1.0, 1.1, 1.2])), TypeError, "RangeIndex"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------ DSR in the stats table
def _family_curves():
    rng = np.random.default_rng(12)
    index = pd.bdate_range("2016-01-04", periods=300)
    curves = {}
    for name, mean in (("seed_0", 0.0008), ("seed_1", 0.0002), ("seed_2", 0.0005), ("buy_and_hold", 0.0004)):
        r = rng.normal(mean, 0.01, 299)
        curves[name] = pd.Series(np.r_[1.0, np.cumprod(1 + r)], index=index)
    return curves


def test_stats_table_deflates_the_trial_family_only():
    curves = _family_curves()
    seeds = ["seed_0", "seed_1", "seed_2"]
    table = mt.stats_table(curves, trial_family=seeds)
    assert math.isnan(table.loc["dsr", "buy_and_hold"])  # a baseline was not searched for
    assert not math.isnan(table.loc["psr", "buy_and_hold"])  # its PSR is still reported
    sharpes = [mt.sharpe_ratio(mt.simple_returns(curves[name])) for name in seeds]
    for name in seeds:
        rets = mt.simple_returns(curves[name])
        expected = mt.deflated_sharpe_ratio(rets, trial_sharpes=sharpes)
        assert table.loc["dsr", name] == pytest.approx(expected, rel=1e-12)
        assert table.loc["dsr", name] < table.loc["psr", name]
    # a family described from outside the table (more was tried than is shown)
    described = mt.stats_table(curves, trial_family=["seed_0"], n_trials=50, sr_variance=0.002)
    rets = mt.simple_returns(curves["seed_0"])
    assert described.loc["dsr", "seed_0"] == pytest.approx(
        mt.deflated_sharpe_ratio(rets, n_trials=50, sr_variance=0.002), rel=1e-12
    )
    assert described[["seed_1", "seed_2", "buy_and_hold"]].loc["dsr"].isna().all()
    # without a family there is no DSR anywhere
    assert mt.stats_table(curves).loc["dsr"].isna().all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_trials": 10, "sr_variance": 0.01}, "without trial_family"),
        ({"trial_sharpes": [0.1, 0.2]}, "without trial_family"),
        ({"trial_family": ["ghost"]}, r"trial_family \['ghost'\] not among"),
        ({"trial_family": []}, "trial_family"),
        ({"trial_family": ["seed_0"]}, "at least two finite Sharpe ratios"),
    ],
)
def test_stats_table_rejects_unclear_trial_families(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mt.stats_table(_family_curves(), **kwargs)


# ------------------------------------------------------------ tail risk, months, drawdown spells, trades
def test_cvar_matches_empyrical_and_a_hand_value():
    """Both report CVaR as a return (negative = loss); tail size ceil(alpha T) here, int((T - 1) alpha) + 1 there,
    the same count for alpha = 1/q (T = 60 checks the float rounding of 0.05 * 60)."""
    import empyrical

    rng = np.random.default_rng(21)
    for t in (20, 21, 39, 60, 101, 1000):
        r = rng.standard_t(3, t) * 0.01
        for alpha in (0.05, 0.01, 0.25):
            assert mt.conditional_value_at_risk(r, alpha) == pytest.approx(
                empyrical.conditional_value_at_risk(r, cutoff=alpha), rel=1e-12
            ), (t, alpha)
    # 40 returns: the worst 5% are the two lowest, -0.08 and -0.04
    r = np.r_[-0.08, -0.04, np.full(38, 0.01)]
    assert mt.conditional_value_at_risk(r) == pytest.approx(-0.06)
    assert mt.conditional_value_at_risk(r, 0.5) == pytest.approx((-0.12 + 18 * 0.01) / 20)
    with pytest.raises(ValueError, match="alpha"):
        mt.conditional_value_at_risk(r, 0.0)


def test_max_drawdown_matches_empyrical():
    """empyrical takes returns, we take the equity they compound to; both give a non-positive fraction."""
    import empyrical

    r = np.random.default_rng(4).normal(0.0002, 0.012, 700)
    assert mt.max_drawdown(curve(r)) == pytest.approx(empyrical.max_drawdown(r), rel=1e-12)


def test_monthly_returns_by_hand_and_against_empyrical():
    import empyrical

    index = pd.DatetimeIndex(["2021-01-29", "2021-02-01", "2021-02-26", "2021-03-01", "2021-03-31", "2021-04-01"])
    eq = pd.Series([1.0, 1.1, 1.05, 1.0, 1.2, 1.2], index=index)
    months = mt.monthly_returns(eq)
    # January holds only the starting value: no return, left out
    np.testing.assert_allclose(months.to_numpy(), [1.05 - 1, 1.2 / 1.05 - 1, 0.0])
    assert list(months.index) == [index[2], index[4], index[5]]
    assert mt.positive_month_share(eq) == pytest.approx(2 / 3)  # April's 0 is not positive
    # a curve starting mid-month: its first month runs from the first value
    assert mt.monthly_returns(eq.iloc[1:]).iloc[0] == pytest.approx(1.05 / 1.1 - 1)
    # independent: empyrical compounds the daily returns of each calendar month
    rng = np.random.default_rng(8)
    eq = curve(rng.normal(0.0003, 0.01, 400), start="2019-05-15")
    expected = empyrical.aggregate_returns(mt.simple_returns(eq), "monthly")
    np.testing.assert_allclose(mt.monthly_returns(eq).to_numpy(), expected.to_numpy(), rtol=1e-12)
    assert mt.positive_month_share(eq) == pytest.approx(float(np.mean(expected > 0)))
    with pytest.raises(TypeError, match="DatetimeIndex"):
        mt.monthly_returns(pd.Series([1.0, 1.1]))


def test_drawdown_spells_by_hand():
    index = pd.DatetimeIndex(["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-06", "2020-01-07", "2020-01-08",
                              "2020-01-09", "2020-01-14"])
    eq = pd.Series([1.0, 1.1, 1.1, 1.0, 1.05, 1.2, 1.1, 1.15], index=index)
    spells = mt.drawdown_spells(eq)
    # peak is the *last* bar at the high (bar 2, not 1); back at the high on bar 5; the second never recovers
    assert spells["peak"].tolist() == [index[2], index[5]] and spells["end"].tolist() == [index[5], index[7]]
    assert spells["bars"].tolist() == [3, 2] and spells["days"].tolist() == [5.0, 6.0]
    assert spells["recovered"].tolist() == [True, False]
    np.testing.assert_allclose(spells["depth"], [1.0 / 1.1 - 1, 1.1 / 1.2 - 1])
    assert mt.longest_drawdown(eq) == (3, 6.0)  # the maxima are taken separately: bars and days
    assert mt.longest_drawdown(curve([0.01, 0.02])) == (0, 0.0)
    bars, days = mt.longest_drawdown([1.0, 1.1, 1.0])
    assert bars == 1 and math.isnan(days)
    # equal to the peak counts as recovered
    assert mt.drawdown_spells([1.0, 1.1, 1.0, 1.1, 1.2])["recovered"].tolist() == [True]


def test_drawdown_spells_agree_with_vectorbt():
    """vectorbt's records: peak_idx (the last bar at the high), end_idx (recovery, or the last bar if active)."""
    r = np.random.default_rng(31).normal(0.0003, 0.01, 800)
    eq = curve(r)
    records = eq.reset_index(drop=True).vbt.drawdowns.records
    spells = mt.drawdown_spells(eq)
    assert len(spells) == len(records)
    np.testing.assert_array_equal(spells["bars"], records["end_idx"] - records["peak_idx"])
    np.testing.assert_array_equal(spells["recovered"], records["status"] == 1)
    assert mt.longest_drawdown(eq)[0] == int((records["end_idx"] - records["peak_idx"]).max())


def test_round_trip_trades_by_hand():
    rets = np.array([0.01, 0.02, -0.01, 0.03, -0.02, 0.01, 0.04, -0.01, 0.02])
    w = [0.0, 1.0, 0.5, 0.0, -1.0, -1.0, 1.0, 1.0, 0.0]
    eq = curve(rets)
    trades = mt.round_trip_trades(eq, w)
    # long from decision 1 (resized to 0.5, same trade), flat at 3: owns returns 1..3 (3 = exit bar);
    # short from 4, flipped at 6: owns 4..5; long from 6 (the flip bar is the new trade's), flat at 8: 6..8
    assert trades[["entry", "exit", "side", "bars"]].to_numpy().tolist() == [[1, 3, 1, 3], [4, 5, -1, 2],
                                                                             [6, 8, 1, 3]]
    np.testing.assert_allclose(trades["pnl"], [1.02 * 0.99 * 1.03 - 1, 0.98 * 1.01 - 1, 1.04 * 0.99 * 1.02 - 1])
    assert trades["closed"].all()
    assert mt.trade_win_rate(eq, w) == pytest.approx(2 / 3)
    assert mt.time_in_market(w) == pytest.approx(6 / 9)
    open_trade = mt.round_trip_trades(eq, [0.0] * 7 + [-1.0, -1.0])
    assert open_trade[["entry", "exit", "bars"]].to_numpy().tolist() == [[7, 8, 2]]
    assert not open_trade["closed"].iloc[0]
    assert math.isnan(mt.trade_win_rate(eq, [0.0] * 9))
    with pytest.raises(ValueError, match="one per return"):
        mt.round_trip_trades(eq, w[:-1])


@pytest.fixture(scope="module")
def long_flat_replay(sp500):
    from sentio_lab.env.costs import CostModel
    from sentio_lab.evaluation import backtest as bt

    rng = np.random.default_rng(5)
    w = np.repeat(rng.choice([0.0, 1.0], 60), rng.integers(1, 12, 60))[:300]
    w[-5:] = 1.0  # end in an open trade
    costs = CostModel(fee_bps=10, slippage_bps=5)
    portfolio = bt.replay(sp500, 1000, w, costs)
    return portfolio, bt.equity(portfolio), w, costs, bt.order_sizes(sp500, 1000, w, costs)


def test_round_trips_match_vectorbt_positions(long_flat_replay):
    """Long / flat with whole-level moves: our trade P&L times the equity at entry is vectorbt's position PnL.

    vectorbt books a position from its entry fill (row entry + 1) to its exit fill, prices and fees included;
    our trades are read from the equity curve alone.
    """
    portfolio, eq, w, _, _ = long_flat_replay
    positions = portfolio.positions.records
    trades = mt.round_trip_trades(eq, w)
    assert len(trades) == len(positions) > 10
    np.testing.assert_array_equal(trades["entry"] + 1, positions["entry_idx"])
    np.testing.assert_array_equal(trades["closed"], positions["status"] == 1)
    np.testing.assert_array_equal(trades["exit"][trades["closed"]] + 1, positions["exit_idx"][positions["status"] == 1])
    np.testing.assert_allclose(trades["pnl"] * eq.to_numpy()[trades["entry"]], positions["pnl"], rtol=1e-9)
    assert mt.trade_win_rate(eq, w) == pytest.approx(float(np.mean(positions["pnl"] > 0)))


def test_fill_costs_match_vectorbt_fees_and_slippage(long_flat_replay, sp500):
    """vectorbt records the fee and the slipped fill price: cost = fee + |size| |fill price - open|."""
    portfolio, eq, _, costs, sizes = long_flat_replay
    opens = sp500["open"]
    paid = mt.fill_costs(sizes, opens, costs)
    orders = portfolio.orders.records
    rows = 1000 + orders["idx"]
    expected = orders["fees"] + orders["size"] * np.abs(orders["price"] - opens.to_numpy()[rows])
    np.testing.assert_allclose(paid.to_numpy()[orders["idx"]], expected, rtol=1e-12)
    assert (paid.drop(paid.index[orders["idx"]]) == 0).all()
    assert mt.costs_paid(paid, eq) == pytest.approx(float(expected.sum()))  # equity starts at 1
    assert mt.costs_paid(paid, 2 * eq) == pytest.approx(float(expected.sum()) / 2)
    with pytest.raises(ValueError, match="negative"):
        mt.costs_paid(-paid, eq)
    with pytest.raises(ValueError, match="open_prices"):
        mt.fill_costs(sizes.to_numpy(), opens.to_numpy()[:5], costs)


def test_summary_rows_for_the_new_statistics(long_flat_replay, sp500):
    portfolio, eq, w, costs, sizes = long_flat_replay
    paid = mt.fill_costs(sizes, sp500["open"], costs)
    s = mt.summary_stats(eq, w, costs=paid)
    rets = mt.simple_returns(eq)
    assert s["cvar_5"] == pytest.approx(mt.conditional_value_at_risk(rets, 0.05))
    assert (s["max_dd_bars"], s["max_dd_days"]) == mt.longest_drawdown(eq)
    assert s["positive_months"] == pytest.approx(mt.positive_month_share(eq))
    assert s["time_in_market"] == pytest.approx(np.mean(w != 0))
    assert s["round_trips"] == len(portfolio.positions.records)
    assert s["trade_win_rate"] == pytest.approx(mt.trade_win_rate(eq, w))
    assert s["costs_paid"] == pytest.approx(mt.costs_paid(paid, eq))
    bare = mt.summary_stats(eq.reset_index(drop=True), periods=252)
    for name in ("positive_months", "max_dd_days", "time_in_market", "round_trips", "trade_win_rate", "costs_paid"):
        assert math.isnan(bare[name]), name
    assert bare["max_dd_bars"] == s["max_dd_bars"]


def test_stats_table_takes_costs_for_some_strategies():
    a, b = curve([0.01, -0.02, 0.015, 0.003]), curve([0.0, 0.01, 0.01, -0.005])
    table = mt.stats_table({"agent": a, "hold": b}, {"agent": [1.0, 1.0, 0.0, -1.0]},
                           costs={"agent": [0.0, 0.002, 0.0, 0.001, 0.003]})
    assert table.loc["costs_paid", "agent"] == pytest.approx(0.006) and math.isnan(table.loc["costs_paid", "hold"])
    assert table.loc["round_trips", "agent"] == 2 and table.loc["time_in_market", "agent"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="costs for unknown strategies"):
        mt.stats_table({"agent": a}, costs={"ghost": [0.0]})
