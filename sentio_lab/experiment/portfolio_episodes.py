"""How the portfolio runner plays a policy and stores what it played: the greedy agent, a seed ensemble and a skfolio
baseline as a ``Decide`` (:func:`sentio_lab.evaluation.portfolio_report.record_episode` steps the env on it), an
episode as one table row per mark and back, and the Sharpe of episodes put end to end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from sentio_lab.env.portfolio_anchor import project_to_simplex
from sentio_lab.evaluation.metrics import sharpe_ratio
from sentio_lab.evaluation.portfolio_baselines import SkfolioBaseline
from sentio_lab.evaluation.portfolio_report import PortfolioEpisode


def agent_decide(agent: torch.nn.Module) -> Any:
    """The greedy policy of a portfolio agent as a ``Decide`` (sentio_lab.evaluation.portfolio_report): what its env
    steps on (weights, signed weights or a tilt)."""
    def decide(k: int, t: int, obs: torch.Tensor) -> tuple[np.ndarray, bool]:
        return agent.act_greedy(obs)[0].to(torch.float64).numpy(), False
    return decide


def ensemble_decide(members: list[torch.nn.Module], tilt_base: Callable[[], torch.Tensor] | None) -> Any:
    """A seed ensemble as a ``Decide``: at each decision every member's greedy target weights for the same
    observation (each through its own normaliser), and their plain mean traded. Long-only weights and long-short
    signed weights are the env actions themselves (the mean of points of a convex set stays in it: on the simplex,
    or within ``sum |w| <= G``). Anchored, ``tilt_base`` returns the ``(1, A + 1)`` weights the env being stepped
    adds this step's tilt to (:meth:`~sentio_lab.env.portfolio.PortfolioEnv.tilt_base`: ``b_t`` on the benchmark's
    re-targets, its drifted weights ``d_t`` in between); a member's target is ``P(base + tau_i)`` and the ensemble
    steps on the tilt ``mean_i P(base + tau_i) - base``, which the env projects back onto that mean (already on the
    simplex). ``None``: the env is not anchored."""
    def decide(k: int, t: int, obs: torch.Tensor) -> tuple[np.ndarray, bool]:
        actions = torch.stack([m.act_greedy(obs)[0].to(torch.float64) for m in members])
        if tilt_base is None:
            return actions.mean(0).numpy(), False
        base = tilt_base()[0]
        return (project_to_simplex(base + actions).mean(0) - base).numpy(), False
    return decide


def baseline_decide(baseline: SkfolioBaseline, rebalance_every: int) -> Any:
    """A skfolio baseline at its declared frequency: its weights at bar t on step 0, every ``rebalance_every``
    steps after; held in between (as :func:`~sentio_lab.evaluation.portfolio_baselines.run_baseline`)."""
    def decide(k: int, t: int, obs: torch.Tensor) -> tuple[np.ndarray, bool]:
        rebalance = k % rebalance_every == 0
        weights = baseline.weights_at(t) if rebalance else np.full(baseline.close.shape[1], 0.0)
        return np.r_[weights, 0.0 if rebalance else 1.0], not rebalance
    return decide


def episode_frame(episode: PortfolioEpisode, index: pd.DatetimeIndex, assets: tuple[str, ...]) -> pd.DataFrame:
    """One row per mark of ``episode`` (``L + 1``: the start, then each step's): the equity, and each step's costs,
    per-asset contributions, turnover and held weights (the start row: nothing traded, all cash)."""
    steps = len(episode.cost)
    def pad(values: np.ndarray, first: float = 0.0) -> np.ndarray:
        return np.concatenate([np.full((1, *values.shape[1:]), first), values])
    columns: dict[str, Any] = {"timestamp": index[episode.start: episode.start + steps + 1],
                               "equity": episode.equity, "cost": pad(episode.cost)}
    for a, name in enumerate(assets):
        columns[f"contrib:{name}"] = pad(episode.contribution[:, a])
        columns[f"turnover:{name}"] = pad(episode.turnover[:, a])
        columns[f"weight:{name}"] = pad(episode.weights[:, a])
    columns["weight:cash"] = pad(episode.weights[:, -1], 1.0)
    return pd.DataFrame(columns)


def frame_episode(frame: pd.DataFrame, assets: tuple[str, ...], start: int) -> PortfolioEpisode:
    """:func:`episode_frame` read back."""
    rows = frame.iloc[1:]
    def block(prefix: str) -> np.ndarray:
        return rows[[f"{prefix}:{a}" for a in assets]].to_numpy()
    return PortfolioEpisode(start=start, equity=frame["equity"].to_numpy(), contribution=block("contrib"),
                            cost=rows["cost"].to_numpy(), turnover=block("turnover"),
                            weights=np.column_stack([block("weight"), rows["weight:cash"].to_numpy()]))


def chained_sharpe(episodes: list[PortfolioEpisode]) -> float:
    """Annualised (x sqrt 252: daily bars) Sharpe of the episodes' returns put end to end."""
    returns = np.concatenate([e.returns for e in episodes])
    return float(sharpe_ratio(returns, periods=252.0)) if len(returns) > 1 and returns.std() > 0 else float("nan")
