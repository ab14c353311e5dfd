"""Portfolio baselines from skfolio, fitted on training returns only, run as policies through the portfolio env.

Six allocations (:data:`BASELINES`): equal weight, inverse volatility, minimum variance, maximum diversification,
hierarchical risk parity (HRP) and mean-CVaR (the minimum-CVaR portfolio of the mean-CVaR frontier at 95 %: its
mean estimate is left out on purpose, as a few hundred daily returns cannot estimate expected returns). All are
long-only and fully invested (no cash).

The allocations and their fitting on training returns only live in :mod:`sentio_lab.env.portfolio_benchmarks`
(the anchored portfolio variant tilts around the same weights); they are re-exported here.

Rebalancing at a declared frequency: :func:`run_baseline` re-targets the weights on the first step of an episode and
every ``rebalance_every`` steps after; in between the account holds its shares (``PortfolioEnv.step(hold=...)``), so
the weights drift with prices and no cost is paid. An anchored agent's zero tilt with ``--anchor-rebalance`` k is this
run, bit for bit (:mod:`sentio_lab.env.portfolio_anchor`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_benchmarks import BASELINES, SkfolioBaseline, close_returns, make_estimator

__all__ = ["BASELINES", "SkfolioBaseline", "close_returns", "make_estimator", "run_baseline"]


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
