"""Benchmark-anchored portfolio actions: the action is a tilt around a benchmark's weights, projected onto the simplex.

With a :class:`PortfolioAnchor` a long-only :class:`~sentio_lab.env.portfolio.PortfolioEnv` reads its action ``tau``
(``(N, A + 1)``, any real numbers) as a tilt and trades towards

    target_t = P(b_t + tau)

with ``b_t`` the benchmark's weights decided at bar ``t`` (``(A + 1,)``, cash last, on the simplex; bars ``<= t``
only) and ``P`` the **Euclidean projection onto the simplex** ``{w >= 0, sum w = 1}`` (:func:`project_to_simplex`:
the sort algorithm of Held, Wolfe and Crowder 1974 / Duchi et al. 2008; ``P(v) = max(v - theta, 0)`` with the one
``theta`` that makes the sum 1). ``P`` ignores a constant added to every entry, so only the tilt's component off the
all-ones direction moves the target. A row already on the simplex is returned as it is (not recomputed), so the
zero tilt *is* the benchmark, bit for bit: the same target weights, the same fills, costs and equity as the
benchmark run as a policy through the same env (tests/env/test_portfolio_anchor.py).

``excess_reward``: the reward is the agent's log return minus the benchmark's over the same bar. The benchmark runs
as a shadow account beside each of the agent's (:class:`ShadowAccount`: same start, same fill prices, the same cost
model and cost inputs, reset with the agent's episodes; it holds on its own clock only, never on a caller's
``hold``), so its trades pay the same costs;
``info["benchmark_equity"]`` is its equity. A zero tilt earns an excess reward of exactly 0.

Benchmarks: :func:`equal_weight_benchmark` (``1 / A`` in every asset, no cash; ``--anchor equal_weight``). Any other
``(T, A + 1)`` series of weights decided from bars ``<= t`` works the same way: a skfolio portfolio fitted on training
returns only (:func:`sentio_lab.env.portfolio_benchmarks.benchmark_weights`).

**Rebalancing at a declared frequency** (``rebalance_every`` k > 1). The benchmark re-targets ``b_t`` on the first
step of each episode and every k steps after; in between it holds its shares, so its weights drift with the prices
(the shadow account keeps them, whether or not ``excess_reward``). Between rebalances the agent's target is
``P(d_t + tau)``, ``d_t`` the benchmark's drifted weights at bar t's close
(:meth:`~sentio_lab.env.portfolio.PortfolioEnv.tilt_base` gives the base of each step), and an account whose tilt is
exactly zero and whose shares and cash are the benchmark's trades nothing (no trade is needed to stay there, and
recomputing shares from weights would trade rounding dust); one that tilted before trades to ``P(d_t) = d_t``, as a
tilt of 1e-12 would. So the zero tilt *is* the runner's baseline of the same name at the same frequency
(:func:`sentio_lab.evaluation.portfolio_baselines.run_baseline`), bit for bit. With k = 1 (the default) every step
re-targets ``b_t`` (a constant mix: the drift is traded back every bar).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sentio_lab.env.arrays import _MIN_EQUITY

#: A row within this distance of sum 1 (and non-negative) counts as on the simplex and is not recomputed.
ON_SIMPLEX_TOLERANCE = 1e-12


def equal_weight_benchmark(n_bars: int, num_assets: int) -> np.ndarray:
    """float64 ``(n_bars, A + 1)``: ``1 / A`` in every asset and no cash at every bar (reads no bar at all)."""
    if n_bars < 1 or num_assets < 1:
        raise ValueError(f"equal_weight_benchmark: n_bars {n_bars} and num_assets {num_assets} must be >= 1")
    weights = np.zeros((n_bars, num_assets + 1))
    weights[:, :-1] = 1.0 / num_assets
    return weights


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row of ``v`` ``(..., K)`` onto ``{w >= 0, sum w = 1}`` (module doc).

    ``u`` the row sorted in decreasing order, ``rho`` the largest ``k`` with ``u_k > (sum_{j<=k} u_j - 1) / k``,
    ``theta = (sum_{j<=rho} u_j - 1) / rho``, ``w = max(v - theta, 0)``. Rows already non-negative and summing to 1
    within :data:`ON_SIMPLEX_TOLERANCE` are returned unchanged (their projection, without its rounding).
    """
    u = torch.sort(v, dim=-1, descending=True).values
    cumulative = u.cumsum(-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    rho = ((u - cumulative / k) > 0).sum(-1, keepdim=True)  # the condition holds exactly for k = 1 .. rho
    theta = cumulative.gather(-1, rho - 1) / rho.to(v.dtype)
    projected = (v - theta).clamp_min(0.0)
    inside = (v >= 0).all(-1, keepdim=True) & ((v.sum(-1, keepdim=True) - 1.0).abs() <= ON_SIMPLEX_TOLERANCE)
    return torch.where(inside, v, projected)


@dataclass(frozen=True, eq=False)
class PortfolioAnchor:
    """What anchors a portfolio env's actions to a benchmark (module doc)."""

    benchmark: np.ndarray = field(repr=False)
    """float64 ``(T, A + 1)``: the benchmark's weights decided at each bar, cash last, each row on the simplex."""
    excess_reward: bool = False
    """Reward in excess of the benchmark's own log return (its shadow account pays the same costs)."""
    name: str = "benchmark"
    """The benchmark's name (``equal_weight``), for reports."""
    rebalance_every: int = 1
    """Episode steps between two re-targets of the benchmark; it drifts in between (module doc). 1: every step."""

    def __post_init__(self) -> None:
        """Check the series once: float64 ``(T, A + 1)``, finite, non-negative rows summing to 1 (first bad bar)."""
        if self.rebalance_every < 1:
            raise ValueError(f"anchor: --anchor-rebalance {self.rebalance_every} must be >= 1 step")
        w = np.asarray(self.benchmark)
        if w.ndim != 2 or w.dtype != np.float64 or w.shape[1] < 2:
            raise ValueError(f"anchor: benchmark must be float64 (T, A + 1) weights, got {w.dtype} {w.shape}")
        bad = ~np.isfinite(w).all(1) | (w < 0).any(1) | (np.abs(w.sum(1) - 1.0) > 1e-9)
        if bad.any():
            raise ValueError(f"anchor: benchmark weights at bars {np.flatnonzero(bad)[:5].tolist()} are not finite, "
                             "non-negative and summing to 1 (assets + cash)")

    @property
    def drifts(self) -> bool:
        """Whether the benchmark holds (drifts) between re-targets, so the env keeps its account."""
        return self.rebalance_every > 1

    def check(self, n_bars: int, num_assets: int) -> None:
        """Raise unless the series has one row of ``A + 1`` weights per bar of the env's arrays."""
        if self.benchmark.shape != (n_bars, num_assets + 1):
            raise ValueError(f"anchor: benchmark has shape {self.benchmark.shape}, the env needs ({n_bars}, "
                             f"{num_assets + 1}) (one row of {num_assets} asset weights + cash per bar)")


class ShadowAccount:
    """The benchmark's own accounts beside the agent's (module doc): cash, shares, equity and the steps since the
    episode began (``age``: the rebalance clock) per env."""

    _STATE = ("cash", "shares", "equity", "age")

    def __init__(self, num_envs: int, num_assets: int, device: torch.device) -> None:
        """All in cash, equity 1 (as every episode starts)."""
        f64 = torch.float64
        self.cash = torch.ones(num_envs, dtype=f64, device=device)
        self.shares = torch.zeros(num_envs, num_assets, dtype=f64, device=device)
        self.equity = torch.ones(num_envs, dtype=f64, device=device)
        self.age = torch.zeros(num_envs, dtype=torch.long, device=device)

    def reset(self, done: torch.Tensor | None = None) -> None:
        """Back to all cash, equity 1: every account, or those where ``done`` (out of place)."""
        if done is None:
            done = torch.ones_like(self.cash, dtype=torch.bool)
        one = torch.ones_like(self.cash)
        self.cash = torch.where(done, one, self.cash)
        self.shares = torch.where(done[:, None], 0.0 * self.shares, self.shares)
        self.equity = torch.where(done, one, self.equity)
        self.age = torch.where(done, 0, self.age)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accounts, for resuming."""
        return {f"benchmark_{k}": getattr(self, k).detach().cpu().clone() for k in self._STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore :meth:`state_dict` output."""
        for k in self._STATE:
            setattr(self, k, state[f"benchmark_{k}"].to(device).clone())

    def log_return(self, cash: torch.Tensor, shares: torch.Tensor, close: torch.Tensor) -> torch.Tensor:
        """Move to the account after a fill (``cash``, ``shares``) marked at ``close``; return its log return."""
        equity = cash + (shares * close).sum(-1)
        log_return = torch.log(equity.clamp_min(_MIN_EQUITY) / self.equity.clamp_min(_MIN_EQUITY))
        self.cash, self.shares, self.equity, self.age = cash, shares, equity, self.age + 1
        return log_return


__all__ = ["ON_SIMPLEX_TOLERANCE", "PortfolioAnchor", "ShadowAccount", "equal_weight_benchmark",
           "project_to_simplex"]
