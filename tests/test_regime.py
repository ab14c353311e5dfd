"""Gaussian-HMM regimes: training-range fit, canonical order, filtered (never smoothed) probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from sentio_lab import regime as R
from sentio_lab.regime import RegimeFitError, RegimeModel


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
