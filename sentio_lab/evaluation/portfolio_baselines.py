"""Portfolio baselines from skfolio, fitted on training returns only, run as policies through the portfolio env.

Six allocations (:data:`BASELINES`): equal weight, inverse volatility, minimum variance, maximum diversification,
hierarchical risk parity (HRP) and mean-CVaR (the minimum-CVaR portfolio of the mean-CVaR frontier at 95 %: its
mean estimate is left out on purpose, as a few hundred daily returns cannot estimate expected returns). All are
long-only and fully invested (no cash).

Fitting (no look-ahead, no fold leakage). At a rebalance decided at the close of bar t, the estimator is refitted on
the simple close-to-close returns of rows ``r <= t`` whose bars ``r - 1`` and ``r`` are both training rows
(``train_rows``: a fold's training segments, e.g. :func:`sentio_lab.env.splits.fit_rows`), the last ``lookback`` of
them. So the weights at t read returns up to t only, and only from training bars: a test group's bars (before or after
t) and every bar after t are never read (tests perturb both). With fewer than ``min_returns`` such returns (a test
group at the start of the data) the baseline holds equal weights and records the bar in
:attr:`SkfolioBaseline.fallbacks`.

Rebalancing at a declared frequency: :func:`run_baseline` re-targets the weights on the first step of an episode and
every ``rebalance_every`` steps after; in between the account holds its shares (``PortfolioEnv.step(hold=...)``), so
the weights drift with prices and no cost is paid. Rounding: optimiser weights below 0 (solver noise, ~1e-10) are set
to 0 and the weights rescaled to sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from skfolio import RiskMeasure
from skfolio.optimization import (
    EqualWeighted,
    HierarchicalRiskParity,
    InverseVolatility,
    MaximumDiversification,
    MeanRisk,
)

from sentio_lab.env.portfolio import PortfolioEnv

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
            else:
                returns = pd.DataFrame(self._returns[rows], columns=self._labels)
                weights = np.maximum(np.asarray(make_estimator(self.name).fit(returns).weights_, dtype=np.float64),
                                     0.0)
                weights = weights / weights.sum()
            self._cache[t] = weights
        return self._cache[t]


def run_baseline(env: PortfolioEnv, baseline: SkfolioBaseline, starts: Sequence[int], steps: int,
                 rebalance_every: int = 21) -> dict[str, np.ndarray]:
    """Run ``baseline`` through a long-only ``env`` (one account per start) for ``steps`` steps from ``starts``.

    Returns ``equity`` (steps, N), ``reward`` (steps, N), ``weights`` (steps, N, A) the targets decided (NaN where
    the account held) and ``cost`` (steps, N). The env's ``episode_length`` must be at least ``steps`` (no reset
    inside the run)."""
    if env.allocation != "long_only":
        raise ValueError("baselines are long-only: build the env with allocation='long_only'")
    if rebalance_every < 1:
        raise ValueError(f"rebalance_every must be >= 1 step, got {rebalance_every}")
    if steps > env.episode_length:
        raise ValueError(f"steps={steps} exceeds the env's episode_length {env.episode_length}")
    env.reset(starts=list(starts))
    n, a = env.num_envs, env.num_assets
    out = {"equity": np.zeros((steps, n)), "reward": np.zeros((steps, n)), "weights": np.full((steps, n, a), np.nan),
           "cost": np.zeros((steps, n))}
    for k in range(steps):
        rebalance = k % rebalance_every == 0
        targets = np.zeros((n, a + 1))
        if rebalance:
            targets[:, :a] = np.stack([baseline.weights_at(t) for t in env.t.tolist()])
            out["weights"][k] = targets[:, :a]
        else:
            targets[:, a] = 1.0  # ignored: the accounts hold
        hold = torch.full((n,), not rebalance, dtype=torch.bool)
        _, reward, *_, info = env.step(torch.tensor(targets, dtype=torch.float64), hold=hold)
        out["equity"][k], out["reward"][k] = info["equity"].cpu().numpy(), reward.cpu().numpy()
        out["cost"][k] = info["cost"].cpu().numpy()
    return out
