"""Benchmark portfolios from skfolio, fitted on training returns only: the weights a baseline or an anchor decides.

Six allocations (:data:`BASELINES`): equal weight, inverse volatility, minimum variance, maximum diversification,
hierarchical risk parity (HRP) and mean-CVaR (the minimum-CVaR portfolio of the mean-CVaR frontier at 95 %: its
mean estimate is left out on purpose, as a few hundred daily returns cannot estimate expected returns). All are
long-only and fully invested (no cash). Equal weight reads no return: it is ``1 / A`` exactly (skfolio's
``EqualWeighted`` rescaled would differ in the last bit for some ``A``).

Fitting (no look-ahead, no fold leakage). The weights decided at the close of bar t come from the estimator fitted on
the simple close-to-close returns of rows ``r <= t`` whose bars ``r - 1`` and ``r`` are both training rows
(``train_rows``: the run's training range, or a fold's training segments, e.g.
:func:`sentio_lab.env.splits.fit_rows`), the last ``lookback`` of them. So the weights at t read returns up to t only,
and only from training bars: a test group's bars (before or after t) and every bar after t are never read (tests
perturb both). With fewer than ``min_returns`` such returns (a test group at the start of the data) the benchmark
holds equal weights and records the bar in :attr:`SkfolioBaseline.fallbacks`. Two bars with the same eligible rows
share one fit (every bar after the last training row, for instance). Rounding: optimiser weights below 0 (solver
noise, ~1e-10) are set to 0 and the weights rescaled to sum to 1.

Used by :mod:`sentio_lab.evaluation.portfolio_baselines` (the baselines run as policies) and by the anchored portfolio
variant (:func:`benchmark_weights`: the series a :class:`~sentio_lab.env.portfolio_anchor.PortfolioAnchor` tilts
around).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from skfolio import RiskMeasure
from skfolio.optimization import (
    EqualWeighted,
    HierarchicalRiskParity,
    InverseVolatility,
    MaximumDiversification,
    MeanRisk,
)

#: The baselines, by name.
BASELINES: tuple[str, ...] = ("equal_weight", "inverse_volatility", "minimum_variance", "maximum_diversification",
                              "hrp", "mean_cvar")


def make_estimator(name: str):
    """A fresh skfolio estimator of the baseline ``name`` (:data:`BASELINES`)."""
    if name == "equal_weight":
        return EqualWeighted()
    if name == "inverse_volatility":
        return InverseVolatility()
    if name == "minimum_variance":
        return MeanRisk(risk_measure=RiskMeasure.VARIANCE)
    if name == "maximum_diversification":
        return MaximumDiversification()
    if name == "hrp":
        return HierarchicalRiskParity()
    if name == "mean_cvar":
        return MeanRisk(risk_measure=RiskMeasure.CVAR, cvar_beta=0.95)
    raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")


def close_returns(close: np.ndarray) -> np.ndarray:
    """float64 (T, A) simple returns; row r is ``close[r] / close[r - 1] - 1`` (row 0 is NaN)."""
    close = np.asarray(close, dtype=np.float64)
    out = np.full_like(close, np.nan)
    out[1:] = close[1:] / close[:-1] - 1.0
    return out


@dataclass
class SkfolioBaseline:
    """One skfolio allocation refitted on training returns up to each decision bar (module doc)."""

    name: str
    close: np.ndarray
    """float64 (T, A) closes of the panel."""
    train_rows: np.ndarray
    """bool (T,): the bars the baseline may fit on (a fold's training segments)."""
    lookback: int = 252
    """At most this many of the latest eligible returns per fit."""
    min_returns: int = 60
    """Fewer eligible returns than this: equal weights (recorded in :attr:`fallbacks`)."""
    assets: Sequence[str] | None = None
    """Asset names (labels of the returns skfolio sees); default ``A0 .. A{A-1}``."""
    fallbacks: list[int] = field(default_factory=list)
    """Decision bars where too few training returns existed and equal weights were held."""

    def __post_init__(self) -> None:
        """Check the inputs and precompute the eligible returns."""
        make_estimator(self.name)
        self.close = np.asarray(self.close, dtype=np.float64)
        rows = np.asarray(self.train_rows, dtype=bool)
        if rows.shape != (len(self.close),):
            raise ValueError(f"train_rows must be bool ({len(self.close)},), got {rows.shape}")
        if self.lookback < self.min_returns or self.min_returns < 2:
            raise ValueError(f"need 2 <= min_returns <= lookback, got min_returns={self.min_returns}, "
                             f"lookback={self.lookback}")
        self._returns = close_returns(self.close)
        # return r lies wholly inside training bars: r - 1 and r both training rows
        self._eligible = np.flatnonzero(rows & np.r_[False, rows[:-1]])
        self._cache: dict[int, np.ndarray] = {}
        self._fits: dict[int, np.ndarray] = {}  # by the number of eligible rows <= t: the same rows, the same fit
        self._labels = list(self.assets) if self.assets is not None else [f"A{a}" for a in range(self.close.shape[1])]

    def fit_rows(self, t: int) -> np.ndarray:
        """The return rows the fit at decision bar t reads: eligible rows ``<= t``, the last ``lookback``."""
        upto = self._eligible[: np.searchsorted(self._eligible, t, side="right")]
        return upto[-self.lookback:]

    def weights_at(self, t: int) -> np.ndarray:
        """float64 (A,) long-only weights summing to 1 decided at the close of bar ``t`` (cached per bar)."""
        t = int(t)
        if t not in self._cache:
            rows = self.fit_rows(t)
            n_assets = self.close.shape[1]
            if len(rows) < self.min_returns:
                self.fallbacks.append(t)
                weights = np.full(n_assets, 1.0 / n_assets)
            elif self.name == "equal_weight":  # reads no return (module doc)
                weights = np.full(n_assets, 1.0 / n_assets)
            else:
                key = int(np.searchsorted(self._eligible, t, side="right"))
                if key not in self._fits:
                    returns = pd.DataFrame(self._returns[rows], columns=self._labels)
                    fitted = np.asarray(make_estimator(self.name).fit(returns).weights_, dtype=np.float64)
                    fitted = np.maximum(fitted, 0.0)
                    self._fits[key] = fitted / fitted.sum()
                weights = self._fits[key]
            self._cache[t] = weights
        return self._cache[t]


def benchmark_weights(baseline: SkfolioBaseline, first_bar: int = 0) -> np.ndarray:
    """float64 ``(T, A + 1)``: row t the weights ``baseline`` decides at bar t, cash (0) last: the series an anchor
    tilts around. Rows before ``first_bar`` (bars no episode decides at, e.g. the feature warm-up) are equal weight
    and fit nothing."""
    n_bars, n_assets = baseline.close.shape
    if not 0 <= first_bar < n_bars:
        raise ValueError(f"benchmark_weights: first_bar {first_bar} outside the panel's {n_bars} bars")
    out = np.zeros((n_bars, n_assets + 1))
    out[:first_bar, :-1] = 1.0 / n_assets
    for t in range(first_bar, n_bars):
        out[t, :-1] = baseline.weights_at(t)
    return out


#: Fitted series by (name, closes, training rows, first bar, assets): an anchored run builds its env several times
#: (training, validation, evaluation) on the same market, and a fit per bar is the slow part.
_FITTED: dict[tuple, np.ndarray] = {}


def fitted_benchmark(name: str, close: np.ndarray, train_rows: np.ndarray, first_bar: int = 0,
                     assets: Sequence[str] | None = None) -> np.ndarray:
    """:func:`benchmark_weights` of the baseline ``name`` fitted on ``train_rows`` of ``close`` (the default
    ``lookback`` and ``min_returns``, as the portfolio runner's), computed once per distinct input; a read-only
    array (the same inputs give the same bits: the fit is deterministic, and a checkpoint compares them)."""
    close, rows = np.ascontiguousarray(close, dtype=np.float64), np.ascontiguousarray(train_rows, dtype=bool)
    digest = hashlib.sha256(close.tobytes() + rows.tobytes()).hexdigest()
    key = (name, digest, close.shape, int(first_bar), tuple(assets) if assets is not None else None)
    if key not in _FITTED:
        weights = benchmark_weights(SkfolioBaseline(name, close, rows, assets=assets), first_bar)
        weights.setflags(write=False)
        _FITTED[key] = weights
    return _FITTED[key]


__all__ = ["BASELINES", "SkfolioBaseline", "benchmark_weights", "close_returns", "fitted_benchmark",
           "make_estimator"]
