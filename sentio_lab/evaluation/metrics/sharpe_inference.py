"""Sharpe-ratio inference: the probabilistic Sharpe ratio (PSR) and the deflated Sharpe ratio (DSR) of a search,
after Bailey & Lopez de Prado."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from sentio_lab.evaluation.metrics.inputs import _as_series, _returns
from sentio_lab.evaluation.metrics.returns import sharpe_ratio

#: Euler-Mascheroni constant, used by the expected maximum Sharpe ratio of the deflated Sharpe ratio.
EULER_GAMMA = 0.5772156649015329


def probabilistic_sharpe_ratio(
    returns: pd.Series | np.ndarray | Sequence[float], sr_benchmark: float = 0.0
) -> float:
    """Probability that the true per-period Sharpe ratio exceeds ``sr_benchmark`` (Bailey & Lopez de Prado).

    ``PSR(SR*) = Phi((SR - SR*) sqrt(T - 1) / sqrt(1 - g3 SR + (g4 - 1) / 4 SR^2))`` with ``SR`` the
    per-period (not annualised) Sharpe ratio of the ``T`` returns, ``g3`` their skewness and ``g4`` their
    non-excess kurtosis. ``sr_benchmark`` is per period too. NaN when the returns do not vary.
    """
    values = _returns(returns, minimum=3)
    sr = sharpe_ratio(values)
    if not np.isfinite(sr):
        return float("nan")
    g3 = float(sps.skew(values, bias=True))
    g4 = float(sps.kurtosis(values, fisher=False, bias=True))
    variance_term = 1.0 - g3 * sr + (g4 - 1.0) / 4.0 * sr**2
    z = (sr - float(sr_benchmark)) * np.sqrt(len(values) - 1) / np.sqrt(variance_term)
    return float(sps.norm.cdf(z))


def expected_max_sharpe(n_trials: int, sr_variance: float) -> float:
    """``SR0``: the Sharpe ratio the best of ``n_trials`` unskilled trials is expected to reach.

    ``SR0 = sqrt(Var[SR_n]) ((1 - gamma) Phi^-1(1 - 1/N) + gamma Phi^-1(1 - 1/(N e)))`` with ``Var[SR_n]``
    the variance of the trials' per-period Sharpe ratios and ``gamma`` the Euler-Mascheroni constant.
    """
    if isinstance(n_trials, bool) or int(n_trials) != n_trials or n_trials < 2:
        raise ValueError(
            f"n_trials must be an integer >= 2, got {n_trials} (one trial has nothing to deflate: "
            "use probabilistic_sharpe_ratio)"
        )
    if not (np.isfinite(sr_variance) and sr_variance >= 0):
        raise ValueError(f"sr_variance must be a finite number >= 0, got {sr_variance}")
    n = float(n_trials)
    quantiles = (1.0 - EULER_GAMMA) * sps.norm.ppf(1.0 - 1.0 / n) + EULER_GAMMA * sps.norm.ppf(
        1.0 - 1.0 / (n * np.e)
    )
    return float(np.sqrt(sr_variance) * quantiles)


def deflated_sharpe_ratio(
    returns: pd.Series | np.ndarray | Sequence[float],
    *,
    n_trials: int | None = None,
    sr_variance: float | None = None,
    trial_sharpes: Sequence[float] | np.ndarray | None = None,
) -> float:
    """PSR against the expected maximum Sharpe ratio of ``n_trials`` trials (Bailey & Lopez de Prado, 2014).

    Give either ``trial_sharpes`` (the per-period Sharpe ratios of every trial tried, including this
    one: their count is ``N`` unless ``n_trials`` says otherwise, their sample variance is ``Var[SR_n]``)
    or both ``n_trials`` and ``sr_variance``.
    """
    if trial_sharpes is not None:
        if sr_variance is not None:
            raise ValueError("give trial_sharpes or sr_variance, not both")
        sharpes = _as_series(trial_sharpes, "trial_sharpes").to_numpy()
        if len(sharpes) < 2:
            raise ValueError(f"trial_sharpes: need at least 2 trials, got {len(sharpes)}")
        sr_variance = float(np.var(sharpes, ddof=1))
        n_trials = len(sharpes) if n_trials is None else n_trials
    if n_trials is None or sr_variance is None:
        raise ValueError("deflated_sharpe_ratio needs trial_sharpes, or n_trials and sr_variance")
    return probabilistic_sharpe_ratio(returns, expected_max_sharpe(n_trials, sr_variance))
