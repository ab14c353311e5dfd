"""Drift detection for a deployed model: does the live stream still look like what the model was trained and
evaluated on?

A :class:`DriftReference` holds what the model saw: per feature the sorted training values, the training-quantile
bins and their shares, and the integrated autocorrelation time; the HMM's mean filtered state shares on the
training rows; the shares of the levels the policy chose in its evaluation; the scale of training market returns;
and, from the experiment's out-of-sample CPCV paths (:func:`oos_equity_paths`), the Sharpe ratio and drawdown of
every window of ``performance_window`` bars. A :class:`~sentio_lab.deploy.drift_monitor.DriftMonitor` is fed one
bar at a time and writes a :class:`~sentio_lab.deploy.alerts.DriftAlert` to its sink when a check crosses its
threshold (:class:`~sentio_lab.deploy.alerts.DriftThresholds`). Every statistic at bar t reads bars <= t only.

The checks, and who computes them:

* Feature drift, per feature, over a rolling window: PSI against the training bins (:func:`psi`, written here: a
  three-line formula that no installed library offers; ``evidently`` has it but would add a large dependency
  tree for one formula), and a two-sample Kolmogorov-Smirnov test (:func:`ks_statistic`, checked against
  ``scipy.stats.ks_2samp``; the p-value from scipy's Kolmogorov distribution, ``scipy.special.kolmogorov``).
* Regime occupancy: PSI of the window's mean filtered HMM state probabilities
  (:func:`sentio_lab.features.regime.filtered_probabilities`, the ``regime:p<k>`` observation columns) against
  the training rows' mean.
* Action drift: PSI of the window's chosen levels against the evaluation's.

Serial dependence (why the thresholds are not the textbook ones alone). A KS p-value or a chi-square reading of
PSI assumes independent draws. A 20-bar realised volatility, a filtered regime probability or a held position
carries about 20 to 100 times fewer independent values than rows, so the plain p-value alarms on most stationary
windows (measured: every few dozen bars). Every windowed statistic therefore uses *effective* sample sizes
``n / tau``, with ``tau`` the integrated autocorrelation time of the training series (:func:`autocorrelation_time`;
ACF from ``statsmodels``): the KS p-value is computed at those sizes, and a PSI alerts only above both its
configured threshold and the level sampling noise reaches with probability ``psi_alpha`` (:func:`psi_noise_bound`).
A chi-square *test* over levels is not used for the same reason: positions persist.
* Volatility change: ``river``'s ADWIN on the absolute market return in units of its training mean.
* Performance drift: the rolling paper Sharpe ratio and drawdown against the same-length windows of the
  out-of-sample paths, as empirical p-values (:func:`empirical_p_value`: how many evaluation windows were this bad
  or worse), and ``river``'s Page-Hinkley test (mode "down") on the paper returns in units of the evaluation's
  standard deviation, for a fall inside the paper run.
* Parity: ``|log(paper equity / expected equity)|`` against a tolerance; the expectation is the backtest replay
  of the same positions (:mod:`sentio_lab.evaluation.backtest`), which the paper account must equal.

A windowed check alerts when it crosses its threshold and re-arms once it has stayed back inside for
``rearm_bars``: a lasting shift gives one alert per check, not one per bar. The river detectors reset themselves
after a detection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special, stats
from statsmodels.tsa.stattools import acf

from sentio_lab.deploy.alerts import DriftThresholds
from sentio_lab.experiment.assembly import EQUITY_FILE
from sentio_lab.features import ObservationFeatures


def quantile_edges(training: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges at the training quantiles ``1/n .. (n-1)/n``; repeated quantiles (ties) merge bins."""
    values = np.asarray(training, dtype=np.float64)
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin cut at ``edges`` (``len(edges) + 1`` bins; a value on an edge goes up)."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def psi(expected: np.ndarray, actual: np.ndarray, floor: float = 1e-4) -> float:
    """Population stability index ``sum (a - e) ln(a / e)``; shares below ``floor`` count as ``floor``."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    a = np.maximum(np.asarray(actual, dtype=np.float64), floor)
    return float(np.sum((a - e) * np.log(a / e)))


def autocorrelation_time(values: np.ndarray) -> float:
    """Integrated autocorrelation time ``1 + 2 sum_k rho_k`` of a series (``statsmodels`` ACF), summed over the
    initial run of positive autocorrelations up to lag ``n // 4``; 1.0 for a constant or very short series.

    ``n / tau`` values are worth about ``n`` independent draws for a mean or a share: the effective sample size.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 8 or np.all(x == x[0]):
        return 1.0
    rho = acf(x, nlags=len(x) // 4, fft=True)[1:]
    stop = int(np.argmax(rho <= 0)) if np.any(rho <= 0) else len(rho)
    return float(max(1.0, 1.0 + 2.0 * np.sum(rho[:stop])))


def effective_size(n: int, tau: float) -> float:
    """Independent draws worth of ``n`` values with autocorrelation time ``tau``: ``n / tau``, at least 1."""
    return max(1.0, n / tau)


def ks_statistic(training_sorted: np.ndarray, window: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``max |F_train - F_window|`` (equals ``scipy.stats.ks_2samp``'s;
    written out because scipy's wrapper costs ~3 ms a call, 30 times the arithmetic, on every check)."""
    window = np.sort(np.asarray(window, dtype=np.float64))
    points = np.concatenate([training_sorted, window])
    cdf_train = np.searchsorted(training_sorted, points, side="right") / len(training_sorted)
    cdf_window = np.searchsorted(window, points, side="right") / len(window)
    return float(np.max(np.abs(cdf_train - cdf_window)))


def ks_p_value(training_sorted: np.ndarray, window: np.ndarray, tau: float) -> tuple[float, float]:
    """KS statistic of ``window`` against the sorted training values and its asymptotic (Kolmogorov) p-value at
    effective sample sizes (both samples share the training autocorrelation time ``tau``)."""
    statistic = ks_statistic(training_sorted, window)
    n = effective_size(len(training_sorted), tau)
    m = effective_size(len(window), tau)
    return statistic, float(special.kolmogorov(math.sqrt(n * m / (n + m)) * statistic))


def psi_noise_bound(bins: int, n_reference: float, n_window: float, alpha: float) -> float:
    """The PSI that sampling noise alone exceeds with probability ``alpha``: PSI is close to
    ``chi2(bins - 1) (1/n + 1/m)`` for two samples of one distribution (PSI ~ sum (a - e)^2 / e for small
    differences), at effective sample sizes ``n`` and ``m``."""
    return float(stats.chi2.ppf(1.0 - alpha, bins - 1) * (1.0 / n_reference + 1.0 / n_window))


def empirical_p_value(reference: np.ndarray, value: float, worse: str) -> float:
    """``(1 + #{reference values as bad or worse}) / (1 + n)``: ``worse="lower"`` counts values <= ``value``,
    ``worse="higher"`` values >= it. Never 0, so a run worse than every evaluation window reads ``1 / (1 + n)``."""
    reference = np.asarray(reference, dtype=np.float64)
    if worse == "lower":
        count = int(np.sum(reference <= value))
    elif worse == "higher":
        count = int(np.sum(reference >= value))
    else:
        raise ValueError(f"worse must be 'lower' or 'higher', got {worse!r}")
    return (1 + count) / (1 + len(reference))


def window_sharpe(log_returns: np.ndarray) -> np.ndarray:
    """Per-bar Sharpe ratio (mean / sample std) along the last axis; 0 where the returns do not vary (a flat
    stretch is neither good nor bad)."""
    r = np.asarray(log_returns, dtype=np.float64)
    std = r.std(axis=-1, ddof=1)
    mean = r.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > 0, mean / np.where(std > 0, std, 1.0), 0.0)


def window_drawdown(log_returns: np.ndarray) -> np.ndarray:
    """Deepest drawdown ``1 - equity / running peak`` inside each window, as a positive depth (the window starts
    at its own peak; :func:`sentio_lab.evaluation.metrics.drawdowns.max_drawdown` reports the same number negative)."""
    r = np.asarray(log_returns, dtype=np.float64)
    zeros = np.zeros((*r.shape[:-1], 1))
    log_equity = np.concatenate([zeros, np.cumsum(r, axis=-1)], axis=-1)
    return (1.0 - np.exp(log_equity - np.maximum.accumulate(log_equity, axis=-1))).max(axis=-1)


@dataclass(frozen=True)
class FeatureReference:
    """What one feature looked like on the training rows."""

    name: str
    sample: np.ndarray
    """Sorted training values (the KS reference)."""
    edges: np.ndarray
    """Inner PSI bin edges at training quantiles."""
    shares: np.ndarray
    """Training share per bin."""
    autocorrelation_time: float
    """Training integrated autocorrelation time (:func:`autocorrelation_time`)."""


@dataclass(frozen=True)
class PerformanceReference:
    """The out-of-sample evaluation's windows of ``window`` bars: their Sharpe ratios and drawdowns."""

    window: int
    sharpe: np.ndarray
    drawdown: np.ndarray
    return_mean: float
    """Mean per-bar log return over every out-of-sample bar."""
    return_std: float
    """Its standard deviation (the Page-Hinkley unit)."""


def performance_reference(paths: Sequence[pd.Series | np.ndarray], window: int) -> PerformanceReference:
    """Sharpe ratio and drawdown of every ``window``-bar stretch of the out-of-sample equity ``paths``."""
    returns = []
    for i, path in enumerate(paths):
        equity = np.asarray(path, dtype=np.float64)
        if equity.ndim != 1 or not np.all(np.isfinite(equity)) or np.any(equity <= 0):
            raise ValueError(f"out-of-sample path {i}: equity must be a 1-D series of finite positive values")
        returns.append(np.diff(np.log(equity)))
    windows = [np.lib.stride_tricks.sliding_window_view(r, window) for r in returns if len(r) >= window]
    if not windows:
        longest = max((len(r) for r in returns), default=0)
        raise ValueError(f"no out-of-sample path has {window} returns (longest: {longest}); lower performance_window")
    stacked = np.concatenate(windows)
    every = np.concatenate(returns)
    std = float(every.std(ddof=1)) if len(every) > 1 else 0.0
    if std == 0.0:
        raise ValueError("the out-of-sample paths never move; there is no performance to compare against")
    return PerformanceReference(window=window, sharpe=window_sharpe(stacked), drawdown=window_drawdown(stacked),
                                return_mean=float(every.mean()), return_std=std)


def oos_equity_paths(folder: str | Path, name: str, seeds: Sequence[int] | None = None) -> list[pd.Series]:
    """The out-of-sample CPCV path equities of configuration ``name`` from a finished experiment folder (its
    ``equity.parquet``), one series per (seed, path); ``seeds`` keeps only those seeds."""
    file = Path(folder) / EQUITY_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file}: no path equities; run the experiment (python -m sentio_lab.experiment)")
    curves = pd.read_parquet(file)
    chosen = curves[curves["name"] == name]
    if seeds is not None:
        chosen = chosen[chosen["seed"].isin(list(seeds))]
    if chosen.empty:
        raise ValueError(f"{file}: no paths for name={name!r} seeds={seeds}; names there: "
                         f"{sorted(curves['name'].unique())}")
    return [pd.Series(g["equity"].to_numpy(), index=pd.DatetimeIndex(g["timestamp"]), name=f"{seed}/{path}")
            for (seed, path), g in chosen.groupby(["seed", "path"], sort=True)]


@dataclass(frozen=True)
class DriftReference:
    """Everything the monitor compares the live stream against (see the module docstring)."""

    features: tuple[FeatureReference, ...]
    regime_shares: np.ndarray | None = None
    """Mean filtered state probabilities on the training rows; None: no regime check."""
    regime_time: float = 1.0
    """Autocorrelation time of the training filtered probabilities (the largest over states)."""
    regime_rows: int = 0
    """Training rows behind :attr:`regime_shares`."""
    levels: np.ndarray | None = None
    """The policy's level values; None: no action check."""
    level_shares: np.ndarray | None = None
    """Share of each level among the evaluation's decisions."""
    level_time: float = 1.0
    """Autocorrelation time of the evaluation's chosen level (in its time order)."""
    level_rows: int = 0
    """Evaluation decisions behind :attr:`level_shares`."""
    market_abs_return: float | None = None
    """Mean absolute training market log return (the ADWIN unit); None: no volatility-change check."""
    performance: PerformanceReference | None = None
    """The out-of-sample windows; None: no Sharpe, drawdown or Page-Hinkley check."""

    @property
    def feature_names(self) -> list[str]:
        """Names of the reference features, in column order."""
        return [f.name for f in self.features]


def level_indices(chosen: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of each chosen level in ``levels`` (exact match); an unknown value is refused with its row."""
    chosen = np.asarray(chosen, dtype=np.float64)
    hits = np.asarray(chosen)[:, None] == np.asarray(levels, dtype=np.float64)[None, :]
    missing = np.flatnonzero(~hits.any(axis=1))
    if len(missing):
        raise ValueError(f"chosen level {float(chosen[missing[0]])} at row {int(missing[0])} is not one of the "
                         f"levels {[float(v) for v in levels]}")
    return hits.argmax(axis=1)


def fit_reference(
    features: np.ndarray,
    names: Sequence[str],
    *,
    psi_bins: int = DriftThresholds.psi_bins,
    regime_probabilities: np.ndarray | None = None,
    levels: Sequence[float] | None = None,
    evaluation_levels: np.ndarray | None = None,
    market_returns: np.ndarray | None = None,
    oos_paths: Sequence[pd.Series | np.ndarray] | None = None,
    performance_window: int = DriftThresholds.performance_window,
) -> DriftReference:
    """A :class:`DriftReference` from training rows only: ``features`` ``(N, F)`` named ``names``, the training
    rows' filtered ``regime_probabilities`` ``(N, K)``, the policy's ``levels`` with the levels chosen in the
    evaluation, the training ``market_returns`` (log) and the out-of-sample ``oos_paths`` (equity)."""
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"features must be (rows, {len(names)}) for {len(names)} names, got {values.shape}")
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        row, col = bad[0]
        raise ValueError(f"training feature {names[col]!r} is not finite at row {row}; pass rows after the warm-up")
    if len(values) < 2 * psi_bins:
        raise ValueError(f"{len(values)} training rows for {psi_bins} PSI bins; need at least {2 * psi_bins}")
    refs = []
    for j, name in enumerate(names):
        edges = quantile_edges(values[:, j], psi_bins)
        refs.append(FeatureReference(name=str(name), sample=np.sort(values[:, j]), edges=edges,
                                     shares=bin_shares(values[:, j], edges),
                                     autocorrelation_time=autocorrelation_time(values[:, j])))
    regime, regime_time, level_time = None, 1.0, 1.0
    if regime_probabilities is not None:
        probs = np.asarray(regime_probabilities, dtype=np.float64)
        if probs.ndim != 2 or not np.all(np.isfinite(probs)):
            raise ValueError("regime_probabilities must be a finite (rows, states) array of training rows")
        regime = probs.mean(axis=0)
        regime_time = max(autocorrelation_time(probs[:, k]) for k in range(probs.shape[1]))
    level_values = level_shares = None
    if (levels is None) != (evaluation_levels is None):
        raise ValueError("give both levels and evaluation_levels for the action check, or neither")
    if levels is not None:
        level_values = np.asarray(levels, dtype=np.float64)
        index = level_indices(np.asarray(evaluation_levels), level_values)
        level_shares = np.bincount(index, minlength=len(level_values)) / len(index)
        level_time = autocorrelation_time(level_values[index])
    scale = None
    if market_returns is not None:
        r = np.asarray(market_returns, dtype=np.float64)
        if not np.all(np.isfinite(r)) or not np.any(r != 0):
            raise ValueError("market_returns must be finite training log returns that move")
        scale = float(np.mean(np.abs(r)))
    performance = None if oos_paths is None else performance_reference(oos_paths, performance_window)
    return DriftReference(
        features=tuple(refs), regime_shares=regime, regime_time=regime_time,
        regime_rows=0 if regime_probabilities is None else len(regime_probabilities), levels=level_values,
        level_shares=level_shares, level_time=level_time,
        level_rows=0 if evaluation_levels is None else len(evaluation_levels), market_abs_return=scale,
        performance=performance)


def observation_blocks(observation: ObservationFeatures) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """An observation matrix split into its non-regime features (values, names) and its filtered regime
    probabilities (None without regimes), as :func:`fit_reference` and :meth:`DriftMonitor.update` take them."""
    regime = observation.blocks.get("regime")
    keep = np.ones(len(observation.names), dtype=bool)
    if regime is not None:
        keep[regime] = False
    names = [n for n, k in zip(observation.names, keep, strict=True) if k]
    values = np.asarray(observation.values, dtype=np.float64)
    return values[:, keep], names, None if regime is None else values[:, regime]
