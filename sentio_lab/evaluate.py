"""Evaluate trained agents: deterministic episodes over a whole range, from a checkpoint or a live agent.

Variants are reached only through the explicit table :data:`VARIANTS` (name -> module); each variant
module provides ``Args``, ``build_agent(args, obs_dim, num_actions)``, ``feature_config(args)`` and
``cost_model(args)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sentio_lab.checkpoint import load_checkpoint
from sentio_lab.costs import CostModel
from sentio_lab.env import _MIN_EQUITY as _EQUITY_FLOOR
from sentio_lab.env import TradingEnv
from sentio_lab.market import PreparedMarket, prepare_market

#: The PPO variants evaluation knows about: checkpoint "variant" field -> module.
VARIANTS: dict[str, str] = {"ppo": "sentio_lab.ppo"}


def load_variant(name: str) -> ModuleType:
    """Import a variant module by its table name."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
    return importlib.import_module(VARIANTS[name])


@dataclass
class Evaluation:
    """One deterministic episode over a range: the weights the agent chose and the equity they made."""

    range_name: str
    start: int
    """Bar of the first decision (the first fill is at the next bar's open)."""
    weights: pd.Series
    """Target weight decided at each bar's close (index: decision bars)."""
    equity: pd.Series
    """Equity marked at each close, starting at 1.0 on bar ``start`` (one more row than ``weights``)."""
    costs: CostModel
    ruined: bool = False
    """True when equity hit 0 before the range ended: the episode stops there, and the last equity value is
    floored at the env's own floor (1e-12, as in its log reward) so the curve keeps defined returns."""


@dataclass
class TrainedAgent:
    """An agent restored from a checkpoint together with its arguments and its market."""

    agent: nn.Module
    args: Any
    market: PreparedMarket
    bundle: dict[str, Any]


def load_trained(path: str | Path, *, dataset: str | Path | None = None) -> TrainedAgent:
    """Rebuild agent and market from a checkpoint; features reuse the saved training statistics.

    With ``dataset`` the model is applied to other data (e.g. a later file of the same market), loaded whole
    with the default stale-open policy; otherwise the checkpoint's own dataset is reloaded over the same bar
    range (``data_start`` / ``data_end``) with the same stale-open policy, and must match its fingerprint.
    """
    bundle = load_checkpoint(path)
    variant = load_variant(bundle["variant"])
    args = variant.Args(**bundle["args"])
    # .get: checkpoints older than these arguments loaded the dataset's default range, refusing stale opens
    saved = bundle["args"] if dataset is None else {}
    market = prepare_market(
        dataset if dataset is not None else args.dataset,
        variant.feature_config(args),
        train_fraction=args.train_fraction,
        validation_fraction=args.validation_fraction,
        feature_state=bundle["feature_state"],
        start=saved.get("data_start"),
        end=saved.get("data_end"),
        stale_opens=saved.get("stale_opens", "refuse"),
    )
    if dataset is None and market.data.fingerprint != bundle["data_fingerprint"]:
        raise ValueError(
            f"{path}: dataset {args.dataset!r} now has fingerprint {market.data.fingerprint}, "
            f"the model was trained on {bundle['data_fingerprint']}"
        )
    agent = variant.build_agent(args, market.arrays.features.shape[1] * args.window + 1, len(args.positions))
    agent.load_state_dict(bundle["agent"])
    agent.eval()
    return TrainedAgent(agent=agent, args=args, market=market, bundle=bundle)


def evaluate_policy(
    agent: nn.Module,
    market: PreparedMarket,
    *,
    window: int,
    positions: tuple[float, ...],
    costs: CostModel,
    range_name: str = "test",
) -> Evaluation:
    """Run ``agent.act_greedy`` over the whole named range in one episode (fixed start, no randomness)."""
    start, stop = market.range(range_name)
    first = max(start, market.arrays.first_valid + window - 1)
    length = stop - 1 - first
    env = TradingEnv(market.arrays, num_envs=1, window=window, episode_length=length, start=start, stop=stop,
                     positions=positions, costs=costs, ruin_fraction=0.0)
    obs = env.reset(starts=[first])
    levels = np.asarray(positions, dtype=np.float64)
    chosen = np.empty(length, dtype=np.int64)
    equity = np.empty(length + 1)
    equity[0] = 1.0
    ruined = False
    device = next(agent.parameters()).device
    with torch.no_grad():
        for k in range(length):
            action = agent.act_greedy(obs.to(device))
            chosen[k] = int(action[0])
            obs, _, terminated, _, info = env.step(action)
            equity[k + 1] = float(info["equity"][0])
            if bool(terminated[0]):  # ruin (equity <= 0): the rest of the range is not tradable
                chosen, equity = chosen[: k + 1], equity[: k + 2]
                equity[-1] = max(equity[-1], _EQUITY_FLOOR)
                ruined = True
                break
    index = market.data.frame.index
    return Evaluation(
        range_name=range_name,
        start=first,
        weights=pd.Series(levels[chosen], index=index[first : first + len(chosen)], name="weight"),
        equity=pd.Series(equity, index=index[first : first + len(equity)], name="equity"),
        costs=costs,
        ruined=ruined,
    )


def evaluate_checkpoint(path: str | Path, range_name: str = "test", *, dataset: str | Path | None = None) -> Evaluation:
    """Load a checkpoint and evaluate it deterministically over ``range_name``."""
    trained = load_trained(path, dataset=dataset)
    variant = load_variant(trained.bundle["variant"])
    return evaluate_policy(
        trained.agent, trained.market, window=trained.args.window, positions=tuple(trained.args.positions),
        costs=variant.cost_model(trained.args), range_name=range_name,
    )
