"""Market regimes: a Gaussian HMM fitted on the training range, used through *filtered* probabilities.

The HMM sees two inputs per bar: the 1-bar log return and the log of realised volatility over the last
``VOL_WINDOW`` returns. It is fitted with hmmlearn on the training rows only (one range, or several disjoint
runs such as a CPCV fold's training segments: each run is its own sequence, so EM never chains a transition
across a gap), from several seeded restarts; the best converged restart by log-likelihood wins and its states
are ordered by volatility (state 0 = calmest), so labels do not depend on the seed or on EM's arbitrary numbering.

The features are filtered probabilities ``p(z_t | x_1..x_t)`` from the normalised forward recursion,
computed here in numpy from the fitted ``startprob``, ``transmat`` and Gaussian emission densities.
hmmlearn's ``predict`` (Viterbi) and ``predict_proba`` (forward-backward smoothing) condition on the
whole sequence, future included, and are therefore never used for features; ``tests/features/test_regime.py``
shows the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

#: Realised volatility window (in returns) for the HMM's second input.
VOL_WINDOW = 10
#: First row where both inputs exist: the return needs one earlier close, the volatility VOL_WINDOW returns.
INPUT_LOOKBACK = VOL_WINDOW
#: Lower bound on realised volatility before the log: a window of identical closes would otherwise give
#: log(0) = -inf. 1e-6 per bar is far below any traded market's volatility, so real data never hits it.
VOL_FLOOR = 1e-6
#: Fewer training rows per state than this cannot estimate a full-covariance Gaussian state sensibly.
MIN_ROWS_PER_STATE = 20


class RegimeFitError(RuntimeError):
    """Raised when no HMM restart converged (or every restart failed); the message names the training rows."""


#: Rounds of ``restarts`` seeded fits tried before giving up: the first round's seeds are those of one round, so a
#: fit that succeeds there is unchanged; only when every restart fails are fresh seeds drawn (issue 17: the 2-state
#: fit on a long daily file from 1986 failed in linear algebra).
RESTART_ROUNDS = 2


def regime_inputs(close: np.ndarray) -> np.ndarray:
    """HMM inputs ``(T, 2)``: 1-bar log return and log realised volatility; NaN before ``INPUT_LOOKBACK``."""
    close = np.asarray(close, dtype=np.float64)
    out = np.full((len(close), 2), np.nan)
    if len(close) <= INPUT_LOOKBACK:
        return out
    ret = np.diff(np.log(close))  # ret[i] is the return of bar i + 1
    windows = np.lib.stride_tricks.sliding_window_view(ret, VOL_WINDOW)
    vol = np.sqrt(np.mean((windows - windows.mean(axis=1, keepdims=True)) ** 2, axis=1))
    out[1:, 0] = ret
    out[INPUT_LOOKBACK:, 1] = np.log(np.maximum(vol, VOL_FLOOR))
    out[:INPUT_LOOKBACK, 0] = np.nan
    return out


@dataclass
class RegimeModel:
    """A fitted, canonically ordered Gaussian HMM plus the input standardisation it was fitted with."""

    startprob: np.ndarray
    transmat: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    """Full covariance matrices, ``(K, 2, 2)``, in standardised input units."""
    center: np.ndarray
    scale: np.ndarray
    log_likelihood: float
    restarts: list[dict] = field(default_factory=list)
    """Per restart: seed, log-likelihood, iterations, converged (for the record)."""

    @property
    def n_states(self) -> int:
        """Number of hidden states."""
        return len(self.startprob)

    def to_state(self) -> dict:
        """Plain-python description (lists, floats) that ``torch.save`` / JSON can store."""
        return {
            "startprob": self.startprob.tolist(),
            "transmat": self.transmat.tolist(),
            "means": self.means.tolist(),
            "covars": self.covars.tolist(),
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "log_likelihood": float(self.log_likelihood),
            "restarts": [dict(r) for r in self.restarts],
        }

    @classmethod
    def from_state(cls, state: dict) -> RegimeModel:
        """Rebuild a model from :meth:`to_state` output."""
        try:
            return cls(
                startprob=np.asarray(state["startprob"], dtype=np.float64),
                transmat=np.asarray(state["transmat"], dtype=np.float64),
                means=np.asarray(state["means"], dtype=np.float64),
                covars=np.asarray(state["covars"], dtype=np.float64),
                center=np.asarray(state["center"], dtype=np.float64),
                scale=np.asarray(state["scale"], dtype=np.float64),
                log_likelihood=float(state["log_likelihood"]),
                restarts=list(state.get("restarts", [])),
            )
        except KeyError as err:
            raise ValueError(f"regime state lacks {err}; was it written by RegimeModel.to_state()?") from err

    def standardise(self, inputs: np.ndarray) -> np.ndarray:
        """Inputs in the units the HMM was fitted in."""
        return (np.asarray(inputs, dtype=np.float64) - self.center) / self.scale

    def to_hmmlearn(self):  # noqa: ANN201 - hmmlearn is imported lazily
        """An hmmlearn ``GaussianHMM`` with these parameters (for comparisons; never used for features)."""
        from hmmlearn.hmm import GaussianHMM

        model = GaussianHMM(n_components=self.n_states, covariance_type="full", init_params="")
        model.startprob_ = self.startprob.copy()
        model.transmat_ = self.transmat.copy()
        model.means_ = self.means.copy()
        model.covars_ = self.covars.copy()
        model.n_features = self.means.shape[1]
        return model


def _converged(monitor) -> bool:  # noqa: ANN001 - hmmlearn ConvergenceMonitor
    # hmmlearn's own ``monitor.converged`` is also True when EM merely ran out of iterations; count a
    # restart as converged only when the last improvement actually fell below tol.
    history = list(monitor.history)
    return len(history) >= 2 and history[-1] - history[-2] < monitor.tol


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in a boolean row mask, as ``[start, stop)`` pairs in time order."""
    mask = np.asarray(rows, dtype=bool)
    if mask.ndim != 1:
        raise ValueError(f"a row mask must be 1-D, got shape {mask.shape}")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _usable(model) -> str | None:  # noqa: ANN001 - a fitted hmmlearn GaussianHMM
    """Why a fitted restart cannot serve the filter (non-finite parameters, a covariance numpy's Cholesky
    refuses), or None when it can."""
    params = (model.startprob_, model.transmat_, model.means_, model.covars_)
    if not all(np.isfinite(p).all() for p in params):
        return "non-finite parameters"
    for k, covar in enumerate(model.covars_):
        try:
            np.linalg.cholesky(covar)
        except np.linalg.LinAlgError:
            return f"state {k}'s covariance is not positive definite"
    return None


def _row_ranges(runs: list[tuple[int, int]], index=None) -> str:  # noqa: ANN001 - a DatetimeIndex or None
    """The training runs ``[a, b)`` as ``"a..b"`` text, with their first and last timestamps when ``index`` is
    given."""
    def one(a: int, b: int) -> str:
        return f"{a}..{b}" + ("" if index is None else f" ({index[a]} to {index[b - 1]})")
    text = ", ".join(one(a, b) for a, b in runs[:4])
    return text + (f" (+{len(runs) - 4} runs)" if len(runs) > 4 else "")


def fit_regime_model(
    inputs: np.ndarray,
    start: int | None,
    stop: int | None,
    n_states: int,
    *,
    rows: np.ndarray | None = None,
    seed: int = 0,
    restarts: int = 4,
    n_iter: int = 300,
    tol: float = 1e-2,
    index=None,  # noqa: ANN001 - timestamps of the input rows (a DatetimeIndex), for messages only
) -> RegimeModel:
    """Fit a Gaussian HMM on the training rows from seeded restarts: ``inputs[start:stop]``, or the rows where
    the boolean mask ``rows`` (one entry per input row; then ``start`` and ``stop`` are None) is True.

    Each run of consecutive training rows is a separate sequence for EM (hmmlearn's ``lengths``): no transition
    is fitted across a gap, and the standardisation uses the training rows only. A restart that fails (a
    linear-algebra or value error inside EM, no convergence, or parameters the filter cannot use) is recorded and
    skipped; when every restart of a round fails, another round of fresh seeds is tried (:data:`RESTART_ROUNDS`).
    Raises :class:`ValueError` for unusable input and :class:`RegimeFitError`, naming the training rows (and
    their timestamps when ``index`` is given), if no restart gives a usable model.
    """
    from hmmlearn.hmm import GaussianHMM

    if n_states < 2:
        raise ValueError(f"a regime model needs at least 2 states, got {n_states}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    inputs = np.asarray(inputs, dtype=np.float64)
    if rows is None:
        if start is None or stop is None:
            raise ValueError("fit_regime_model: give start and stop, or a rows mask")
        x = inputs[start:stop]
        lengths = np.asarray([len(x)])
        runs = [(int(start), int(start) + len(x))]
    else:
        if start is not None or stop is not None:
            raise ValueError("fit_regime_model: give a rows mask or start and stop, not both")
        mask = np.asarray(rows)
        if mask.dtype != bool or mask.shape != (len(inputs),):
            raise ValueError(f"rows must be a boolean mask of shape ({len(inputs)},), got {mask.dtype} {mask.shape}")
        runs = row_runs(mask)
        x = inputs[mask]
        lengths = np.asarray([b - a for a, b in runs], dtype=np.int64)
    where = _row_ranges(runs, index)
    if len(x) < MIN_ROWS_PER_STATE * n_states:
        raise ValueError(
            f"{len(x)} training rows for a {n_states}-state HMM; "
            f"at least {MIN_ROWS_PER_STATE * n_states} are needed"
        )
    if not np.isfinite(x).all():
        raise ValueError(
            f"HMM inputs contain NaN/inf in training rows {where}; start after the warm-up"
        )
    center, scale = x.mean(axis=0), x.std(axis=0)
    if np.any(scale == 0):
        raise ValueError("HMM inputs are constant on the training range; there is nothing to fit")
    z = (x - center) / scale

    # generate_state is prefix-stable: round 1 draws exactly the seeds a single round always drew.
    all_seeds = np.random.SeedSequence(seed).generate_state(restarts * RESTART_ROUNDS)
    record: list[dict] = []
    best: tuple[float, object] | None = None
    # The matrices are tiny (K states x 2 inputs); multi-threaded BLAS only adds synchronisation
    # overhead, which on a 2-core machine made each EM fit ~15x slower. Results do not depend on it.
    with threadpool_limits(limits=1):
        for round_start in range(0, len(all_seeds), restarts):
            if best is not None:
                break
            for s in all_seeds[round_start:round_start + restarts]:
                model = GaussianHMM(
                    n_components=n_states, covariance_type="full", n_iter=n_iter, tol=tol, random_state=int(s)
                )
                try:
                    model.fit(z, lengths)
                    ll = float(model.score(z, lengths))
                    problem = _usable(model)
                except (ValueError, ArithmeticError, np.linalg.LinAlgError) as err:  # degenerate; others may work
                    record.append({"seed": int(s), "error": str(err), "converged": False})
                    continue
                if problem is not None:
                    record.append({"seed": int(s), "error": problem, "converged": False})
                    continue
                ok = bool(_converged(model.monitor_) and np.isfinite(ll))
                record.append(
                    {"seed": int(s), "log_likelihood": ll, "iterations": int(model.monitor_.iter), "converged": ok}
                )
                if ok and (best is None or ll > best[0]):
                    best = (ll, model)
    if best is None:
        failed = sum("error" in r for r in record)
        raise RegimeFitError(
            f"the {n_states}-state HMM could not be fitted on training rows {where} ({len(z)} rows): none of "
            f"{len(record)} seeded restarts gave a usable model ({failed} failed, the rest never converged within "
            f"{n_iter} EM iterations, tol={tol}); per restart: {record}. Use fewer states (--regimes), another "
            "data range (--data-start / --data-end: long flat stretches, e.g. early stale prices, make a "
            "state's covariance singular) or more iterations."
        )
    ll, model = best
    # Canonical order: by the mean of the volatility input, calmest first.
    order = np.argsort(model.means_[:, 1], kind="stable")
    return RegimeModel(
        startprob=model.startprob_[order].copy(),
        transmat=model.transmat_[np.ix_(order, order)].copy(),
        means=model.means_[order].copy(),
        covars=model.covars_[order].copy(),
        center=center,
        scale=scale,
        log_likelihood=ll,
        restarts=record,
    )


def emission_log_likelihood(model: RegimeModel, z: np.ndarray) -> np.ndarray:
    """Gaussian log-densities ``(n, K)`` of standardised inputs ``z`` under each state."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    n, d = z.shape
    out = np.empty((n, model.n_states))
    for k in range(model.n_states):
        try:
            chol = np.linalg.cholesky(model.covars[k])
        except np.linalg.LinAlgError as err:  # a saved state edited or written elsewhere: say which state
            raise ValueError(f"regime model: state {k}'s covariance {model.covars[k].tolist()} is not positive "
                             "definite; refit the features (the fit never keeps such a state)") from err
        solved = np.linalg.solve(chol, (z - model.means[k]).T)  # L^-1 (x - mu)
        log_det = 2.0 * np.sum(np.log(np.diag(chol)))
        out[:, k] = -0.5 * (d * np.log(2.0 * np.pi) + log_det + np.sum(solved**2, axis=0))
    return out


def forward_filter(model: RegimeModel, z: np.ndarray) -> np.ndarray:
    """Filtered probabilities ``p(z_t | x_1..x_t)`` for a contiguous block of standardised inputs.

    Normalised forward recursion in log space: ``a_t = logsumexp(a_{t-1} + log A) + log b_t(x_t)``, then
    ``a_t -= logsumexp(a_t)``. Row t uses rows <= t only.
    """
    log_b = emission_log_likelihood(model, z)
    with np.errstate(divide="ignore"):
        log_pi = np.log(model.startprob)
    trans = model.transmat
    out = np.empty_like(log_b)
    a = log_pi + log_b[0]
    for t in range(len(log_b)):
        if t:
            # logsumexp over the previous state, done as a shifted matrix product: exp(a - max) <= 1.
            m = a.max()
            with np.errstate(divide="ignore"):
                a = np.log(np.exp(a - m) @ trans) + m + log_b[t]
        m = a.max()
        a = a - (m + np.log(np.sum(np.exp(a - m))))
        out[t] = a
    return np.exp(out)


def filtered_probabilities(model: RegimeModel, inputs: np.ndarray) -> np.ndarray:
    """Filtered state probabilities ``(T, K)`` for raw inputs ``(T, 2)``; NaN rows stay NaN.

    The recursion starts at the first row where the inputs are finite (the inputs' warm-up); after that
    every row must be finite.
    """
    inputs = np.asarray(inputs, dtype=np.float64)
    finite = np.isfinite(inputs).all(axis=1)
    out = np.full((len(inputs), model.n_states), np.nan)
    if not finite.any():
        return out
    first = int(np.argmax(finite))
    if not finite[first:].all():
        bad = first + int(np.argmin(finite[first:]))
        raise ValueError(f"HMM inputs are NaN/inf at row {bad}, after the warm-up ended at row {first}")
    out[first:] = forward_filter(model, model.standardise(inputs[first:]))
    return out
