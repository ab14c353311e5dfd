"""Gaussian-HMM regimes: training-range fit, canonical order, filtered (never smoothed) probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from sentio_lab.features import regime as R
from sentio_lab.features.regime import RegimeFitError, RegimeModel


def two_regime_closes(n: int = 1200, seed: int = 0, block: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Closes whose volatility alternates between calm (0.5%) and wild (2.5%) blocks; and the truth."""
    rng = np.random.default_rng(seed)
    wild = (np.arange(n) // block) % 2 == 1
    ret = rng.normal(0, np.where(wild, 0.025, 0.005))
    return 100 * np.exp(np.cumsum(ret)), wild


@pytest.fixture(scope="module")
def fitted():
    close, wild = two_regime_closes()
    inputs = R.regime_inputs(close)
    model = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 900, 2, seed=0, restarts=3)
    return close, wild, inputs, model


def test_inputs_are_return_and_log_volatility():
    close, _ = two_regime_closes(200)
    x = R.regime_inputs(close)
    assert np.isnan(x[: R.INPUT_LOOKBACK]).all() and np.isfinite(x[R.INPUT_LOOKBACK :]).all()
    r = np.diff(np.log(close))
    t = 50
    assert x[t, 0] == pytest.approx(r[t - 1])
    assert x[t, 1] == pytest.approx(np.log(np.std(r[t - R.VOL_WINDOW : t])))
    assert np.isnan(R.regime_inputs(close[:5])).all()
    flat = R.regime_inputs(np.full(30, 5.0))
    assert flat[-1, 1] == pytest.approx(np.log(R.VOL_FLOOR))


def test_states_are_ordered_calm_first_and_track_the_truth(fitted):
    close, wild, inputs, model = fitted
    assert model.n_states == 2
    assert model.means[0, 1] < model.means[1, 1]  # volatility input: calm state first
    probs = R.filtered_probabilities(model, inputs)
    np.testing.assert_allclose(probs[R.INPUT_LOOKBACK :].sum(axis=1), 1.0)
    hit = (probs[R.INPUT_LOOKBACK :, 1] > 0.5) == wild[R.INPUT_LOOKBACK :]
    assert hit.mean() > 0.85
    assert all(r["converged"] for r in model.restarts)
    assert model.log_likelihood == max(r["log_likelihood"] for r in model.restarts)


def test_labels_are_stable_across_seeds(fitted):
    _, _, inputs, model = fitted
    other = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 900, 2, seed=123, restarts=2)
    np.testing.assert_allclose(other.means, model.means, atol=0.05)
    again = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 900, 2, seed=0, restarts=3)
    np.testing.assert_array_equal(again.transmat, model.transmat)  # same seed, same result


def test_fit_uses_only_the_training_rows(fitted):
    close, _, inputs, model = fitted
    changed = inputs.copy()
    changed[900:] = R.regime_inputs(two_regime_closes(seed=5)[0])[900:]
    again = R.fit_regime_model(changed, R.INPUT_LOOKBACK, 900, 2, seed=0, restarts=3)
    np.testing.assert_array_equal(again.means, model.means)


def test_filtered_equals_smoothed_posterior_of_the_prefix(fitted):
    """p(z_t | x_1..t) is by definition the smoothed posterior of the last row of the prefix x_1..t."""
    _, _, inputs, model = fitted
    hmm = model.to_hmmlearn()
    z = model.standardise(inputs[R.INPUT_LOOKBACK : 400])
    filtered = R.forward_filter(model, z)
    for t in (0, 1, 17, 150, 389):
        np.testing.assert_allclose(filtered[t], hmm.predict_proba(z[: t + 1])[-1], atol=1e-8)


def test_filtered_differs_from_smoothed_and_ignores_the_future(fitted):
    _, _, inputs, model = fitted
    hmm = model.to_hmmlearn()
    z = model.standardise(inputs[R.INPUT_LOOKBACK :])
    filtered = R.forward_filter(model, z)
    smoothed = hmm.predict_proba(z)
    # Smoothing uses the future: it differs from filtering in general, and they agree at the last row.
    assert np.abs(filtered - smoothed).max() > 0.1
    np.testing.assert_allclose(filtered[-1], smoothed[-1], atol=1e-8)
    # Replace the future after t: filtered rows <= t are bit-identical, smoothed rows <= t move.
    # Take the bar where the filter is least sure: there the future matters most to the smoother.
    t = 100 + int(np.argmin(np.abs(filtered[100:-100, 1] - 0.5)))
    other = z.copy()
    other[t + 1 :] = np.random.default_rng(3).normal(0, 3, other[t + 1 :].shape)
    np.testing.assert_array_equal(R.forward_filter(model, other)[: t + 1], filtered[: t + 1])
    assert np.abs(hmm.predict_proba(other)[: t + 1] - smoothed[: t + 1]).max() > 1e-3


def test_emission_log_likelihood_matches_scipy(fitted):
    _, _, inputs, model = fitted
    z = model.standardise(inputs[20:60])
    ours = R.emission_log_likelihood(model, z)
    for k in range(model.n_states):
        np.testing.assert_allclose(ours[:, k], multivariate_normal(model.means[k], model.covars[k]).logpdf(z))


def test_state_round_trip_and_missing_keys(fitted):
    _, _, inputs, model = fitted
    state = model.to_state()
    back = RegimeModel.from_state(state)
    np.testing.assert_array_equal(R.filtered_probabilities(back, inputs), R.filtered_probabilities(model, inputs))
    broken = dict(state)
    del broken["transmat"]
    with pytest.raises(ValueError, match="transmat"):
        RegimeModel.from_state(broken)


def test_filtered_probabilities_handle_warm_up_and_reject_gaps(fitted):
    _, _, inputs, model = fitted
    assert np.isnan(R.filtered_probabilities(model, np.full((5, 2), np.nan))).all()
    holey = inputs.copy()
    holey[300] = np.nan
    with pytest.raises(ValueError, match="row 300"):
        R.filtered_probabilities(model, holey)


def test_three_states_on_real_data_are_ordered_by_volatility():
    from sentio_lab.data import load_market

    # The whole 1999-2018 history (the stale opens do not matter here: only closes are used).
    with pytest.warns(UserWarning, match="stale_opens='allow'"):
        close = load_market("sp500", start="1999", stale_opens="allow").frame["close"].to_numpy()
    inputs = R.regime_inputs(close)
    model = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 3000, 3, seed=1, restarts=2)
    assert np.all(np.diff(model.means[:, 1]) > 0)
    probs = R.filtered_probabilities(model, inputs)
    # 2008 (the crisis) sits mostly in the wildest state, 2005 mostly not.
    crisis = probs[2450:2550, 2].mean()
    calm = probs[1550:1700, 2].mean()
    assert crisis > 0.5 > calm


def test_no_converged_restart_is_an_error():
    close, _ = two_regime_closes()
    inputs = R.regime_inputs(close)
    with pytest.raises(RegimeFitError, match="converged"):
        R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 900, 3, n_iter=1, restarts=2)


def test_failed_restarts_are_recorded_and_skipped(monkeypatch, fitted):
    from hmmlearn.hmm import GaussianHMM

    _, _, inputs, _ = fitted
    real_fit = GaussianHMM.fit
    calls = {"n": 0}

    def flaky_fit(self, X, lengths=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("degenerate start")
        return real_fit(self, X, lengths)

    monkeypatch.setattr(GaussianHMM, "fit", flaky_fit)
    model = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 900, 2, restarts=2)
    assert model.restarts[0] == {"seed": model.restarts[0]["seed"], "error": "degenerate start", "converged": False}
    assert model.restarts[1]["converged"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_states": 1}, "at least 2"),
        ({"restarts": 0}, "restarts"),
        ({"stop": 40}, "training rows"),
        ({"start": 0}, "NaN"),
    ],
)
def test_bad_arguments_raise(fitted, kwargs, match):
    _, _, inputs, _ = fitted
    args = {"start": R.INPUT_LOOKBACK, "stop": 900, "n_states": 2, **kwargs}
    restarts = args.pop("restarts", 1)
    with pytest.raises(ValueError, match=match):
        R.fit_regime_model(inputs, args["start"], args["stop"], args["n_states"], restarts=restarts)


def test_constant_inputs_are_rejected():
    x = np.ones((200, 2))
    with pytest.raises(ValueError, match="constant"):
        R.fit_regime_model(x, 0, 200, 2)


# ------------------------------------------------------------------------------------ several training runs
def _log_likelihood(model, z):
    """log p(z) of one sequence by an independent forward recursion (sum of the log normalisers)."""
    log_b = R.emission_log_likelihood(model, z)
    with np.errstate(divide="ignore"):
        alpha = np.log(model.startprob) + log_b[0]
    total = np.logaddexp.reduce(alpha)
    alpha -= total
    for row in log_b[1:]:
        alpha = np.logaddexp.reduce(alpha[:, None] + np.log(model.transmat), axis=0) + row
        norm = np.logaddexp.reduce(alpha)
        total, alpha = total + norm, alpha - norm
    return total


def test_row_runs():
    mask = np.zeros(12, dtype=bool)
    mask[[0, 1, 2, 5, 9, 10, 11]] = True
    assert R.row_runs(mask) == [(0, 3), (5, 6), (9, 12)]
    assert R.row_runs(np.zeros(4, dtype=bool)) == [] and R.row_runs(np.ones(3, dtype=bool)) == [(0, 3)]
    with pytest.raises(ValueError, match="1-D"):
        R.row_runs(np.ones((2, 2), dtype=bool))


def test_a_rows_mask_fits_each_run_as_its_own_sequence(fitted):
    """Two training runs with a gap: the rows outside are never read (NaN there changes nothing), the
    standardisation is the training rows', and the likelihood is the sum over the runs -- no transition across
    the gap (chaining the runs into one sequence gives another likelihood)."""
    _, _, inputs, _ = fitted
    rows = np.zeros(len(inputs), dtype=bool)
    rows[R.INPUT_LOOKBACK : 400] = True
    rows[620:1000] = True
    model = R.fit_regime_model(inputs, None, None, 2, rows=rows, seed=0, restarts=2)
    poisoned = inputs.copy()
    poisoned[~rows] = np.nan
    again = R.fit_regime_model(poisoned, None, None, 2, rows=rows, seed=0, restarts=2)
    for name in ("startprob", "transmat", "means", "covars", "center", "scale"):
        np.testing.assert_array_equal(getattr(again, name), getattr(model, name), err_msg=name)
    x = inputs[rows]
    np.testing.assert_array_equal(model.center, x.mean(axis=0))
    np.testing.assert_array_equal(model.scale, x.std(axis=0))
    z_a, z_b = model.standardise(inputs[R.INPUT_LOOKBACK : 400]), model.standardise(inputs[620:1000])
    separate = _log_likelihood(model, z_a) + _log_likelihood(model, z_b)
    chained = _log_likelihood(model, np.concatenate([z_a, z_b]))
    assert model.log_likelihood == pytest.approx(separate, rel=1e-9)
    assert abs(chained - separate) > 1e-3  # the check can tell the two apart
    # a single run by mask is exactly the start/stop fit
    prefix = np.arange(len(inputs)) < 900
    prefix[: R.INPUT_LOOKBACK] = False
    by_mask = R.fit_regime_model(inputs, None, None, 2, rows=prefix, seed=0, restarts=3)
    by_range = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 900, 2, seed=0, restarts=3)
    assert by_mask.to_state() == by_range.to_state()


def test_a_rows_mask_is_checked(fitted):
    _, _, inputs, _ = fitted
    rows = np.zeros(len(inputs), dtype=bool)
    rows[100:200] = True
    with pytest.raises(ValueError, match="not both"):
        R.fit_regime_model(inputs, 0, 100, 2, rows=rows)
    with pytest.raises(ValueError, match="give start and stop, or a rows mask"):
        R.fit_regime_model(inputs, None, None, 2)
    with pytest.raises(ValueError, match="boolean mask"):
        R.fit_regime_model(inputs, None, None, 2, rows=rows[:-1])
    with pytest.raises(ValueError, match="boolean mask"):
        R.fit_regime_model(inputs, None, None, 2, rows=rows.astype(int))
    rows[:5] = True
    with pytest.raises(ValueError, match=r"NaN/inf in training rows 0\.\.5, 100\.\.200"):
        R.fit_regime_model(inputs, None, None, 2, rows=rows)
    few = np.zeros(len(inputs), dtype=bool)
    few[[100, 300, 500]] = True
    with pytest.raises(ValueError, match="3 training rows"):
        R.fit_regime_model(inputs, None, None, 2, rows=few)
