"""The variant table and the hooks every stage reads a variant through: orchestration reads this module once.

Variants are the single files a user runs (``python -m sentio_lab.ppo``); nothing below them imports one. They are
reached only by name, through :data:`VARIANTS` (name -> module, imported on first use by :func:`load_variant`), and
each provides ``Args`` (with ``Args.from_dict`` for checkpoints and configs), ``build_agent(args, obs_dim,
num_actions)``, ``feature_config(args)`` and ``cost_model(args)``; optionally ``env_options(args, market)``: the extra
:class:`~sentio_lab.env.TradingEnv` keywords its observation needs (token blocks of higher timeframes, the drawdown
state; :mod:`sentio_lab.features.observation_layout`) and ``observation_span(args, market)``. The hooks here turn a
name and a variant's arguments into what the other stages need: :func:`parse_variant_args` (the variant's parser),
:func:`observation_span` (how far back its observation reads: the embargo), :func:`env_options`,
:func:`agent_obs_dim` (the observation width), :func:`action_masking` (the mask keywords of a masked variant) and
:func:`load_trained` (agent, arguments and market restored from a checkpoint).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import tyro
from torch import nn

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.selection import selected_weights
from sentio_lab.agents.training import anchor_options, num_actions
from sentio_lab.env.market import PreparedMarket, prepare_market
from sentio_lab.features.observation_layout import observation_dim, observation_layout

if TYPE_CHECKING:
    pass

#: The PPO variants evaluation knows about: checkpoint "variant" field -> module.
VARIANTS: dict[str, str] = {
    "ppo": "sentio_lab.ppo",
    "ppo_masked": "sentio_lab.ppo_masked",
    "ppo_risk": "sentio_lab.ppo_risk",
    "ppo_transformer": "sentio_lab.ppo_transformer",
    "ppo_portfolio": "sentio_lab.ppo_portfolio",
}


def load_variant(name: str) -> ModuleType:
    """Import a variant module by its table name."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
    return importlib.import_module(VARIANTS[name])



@dataclass
class TrainedAgent:
    """An agent restored from a checkpoint together with its arguments and its market."""

    agent: nn.Module
    args: Any
    market: PreparedMarket
    bundle: dict[str, Any]


def load_trained(path: str | Path, *, dataset: str | Path | None = None) -> TrainedAgent:
    """Rebuild agent and market from a checkpoint; features reuse the saved training statistics. The agent has the
    weights the run stands for: the selected state when it selected on validation
    (:func:`sentio_lab.agents.selection.selected_weights`), else the last.

    With ``dataset`` the model is applied to other data (e.g. a later file of the same market), loaded whole
    with the default stale-open policy; otherwise the checkpoint's own dataset is reloaded over the same bar
    range (``data_start`` / ``data_end``) with the same stale-open policy, and must match its fingerprint.
    """
    bundle = load_checkpoint(path)
    variant = load_variant(bundle["variant"])
    # flat (older) or nested by group: Args.from_dict reads both; arguments a checkpoint predates take their
    # defaults (the dataset's default range, refusing stale opens), as those checkpoints were trained with them
    args = variant.Args.from_dict(bundle["args"])
    restore = getattr(variant, "restore_trained", None)
    if restore is not None:  # a variant with a market of its own (ppo_portfolio: a panel); no other dataset yet
        if dataset is not None:
            raise ValueError(f"{path}: a {bundle['variant']} checkpoint is evaluated on its own panel (no dataset=)")
        agent, market = restore(args, bundle)
        return TrainedAgent(agent=agent, args=args, market=market, bundle=bundle)
    data = args.data
    if getattr(data, "pool", ()):  # a pooled run: every instrument with its own saved feature state
        if dataset is not None:
            raise ValueError(f"{path}: a pooled checkpoint is evaluated on its own instruments (no dataset=)")
        market = variant.market_for(args, bundle["feature_state"])
    else:
        market = prepare_market(
            dataset if dataset is not None else data.dataset,
            variant.feature_config(args),
            train_fraction=data.train_fraction,
            validation_fraction=data.validation_fraction,
            feature_state=bundle["feature_state"],
            start=data.data_start if dataset is None else None,
            end=data.data_end if dataset is None else None,
            stale_opens=data.stale_opens if dataset is None else "refuse",
            fill_price=data.fill_price,  # the fills the agent was trained with (older checkpoints: next_open)
        )
    if dataset is None and market.data.fingerprint != bundle["data_fingerprint"]:
        raise ValueError(
            f"{path}: dataset {data.dataset!r} now has fingerprint {market.data.fingerprint}, "
            f"the model was trained on {bundle['data_fingerprint']}"
        )
    agent = variant.build_agent(args, agent_obs_dim(args, market), num_actions(args))
    agent.load_state_dict(selected_weights(bundle))  # the run's selected state under --select-on
    agent.eval()
    return TrainedAgent(agent=agent, args=args, market=market, bundle=bundle)


def parse_variant_args(variant: str, argv: tuple[str, ...] | list[str]) -> Any:
    """The variant's ``Args`` from a command-line list (the same parser as ``python -m sentio_lab.<variant>``)."""
    return tyro.cli(load_variant(variant).Args, args=list(argv))


def observation_span(variant: str, args: Any, market: PreparedMarket) -> int | None:
    """How many bars before a decision the agent's observation reads, when the variant declares it (its module's
    ``observation_span(args, market)``: token blocks of completed higher-timeframe bars reach further back than
    the feature window); None when the feature window and span say it all. The CPCV embargo counts it."""
    hook = getattr(load_variant(variant), "observation_span", None)
    return None if hook is None else int(hook(args, market))


def action_masking(args: Any) -> dict[str, Any]:
    """The mask keywords of :func:`evaluate_policy` / :func:`evaluate_policies` for a variant's arguments:
    ``{"masks": args.masks, "invalid_action": args.invalid_action}`` for a masked variant, ``{}`` otherwise."""
    masks = getattr(args, "masks", None)
    if masks is None:
        return {}
    return {"masks": masks, "invalid_action": getattr(args, "invalid_action", "nearest")}


def env_options(args: Any, market: PreparedMarket) -> dict[str, Any]:
    """Extra :class:`~sentio_lab.env.TradingEnv` keywords the agent's observation needs on ``market`` (module
    doc): the variant's own ``env_options(args, market)`` when the module defining ``type(args)`` has one (``ppo``
    and ``ppo_masked`` have none), and the anchor of ``--anchor`` (:func:`sentio_lab.agents.training.anchor_options`,
    the one the training env is built with)."""
    hook = getattr(sys.modules.get(type(args).__module__), "env_options", None)
    options = {} if hook is None else dict(hook(args, market))
    return {**options, **anchor_options(args, market)}


def agent_obs_dim(args: Any, market: PreparedMarket) -> int:
    """Width of the observation an agent with ``args`` sees on ``market`` (window, position and extensions)."""
    options = env_options(args, market)
    blocks = tuple(options.get("token_blocks", ()))
    if options.get("anchor") is not None:  # an anchored env appends the benchmark block (sentio_lab.env.anchor)
        blocks += (options["anchor"].token_block(),)
    layout = observation_layout(market.arrays.features.shape[1], args.features.window, blocks,
                                options.get("drawdown_obs", False))
    return observation_dim(layout)
