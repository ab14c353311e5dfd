"""Run plumbing shared by the PPO variants: devices, seeding, batch sizes, progress and resume rules.

The algorithms live in the variant files (``ppo.py``, ``ppo_masked.py``, ...); what every variant does the
same way around them -- derive its batch sizes, seed the generators, decide which arguments a resumed run may
change, fall back from CUDA to CPU on resume -- lives here once, so the variants cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from sentio_lab.agents.arguments import RUN_CONTROL_FIELDS
from sentio_lab.agents.checkpoint import CheckpointError
from sentio_lab.agents.nets import favour_action
from sentio_lab.env import TradingEnv
from sentio_lab.env.anchor import AnchorConfig, check_tilts
from sentio_lab.env.benchmarks import anchor_config, benchmark_span
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import PreparedMarket, prepare_market
from sentio_lab.env.pool import PooledMarket, check_pool_env, pool_anchor_config, prepare_pool
from sentio_lab.features import FeatureConfig

ArgsT = TypeVar("ArgsT", bound=Any)


@dataclass
class TrainResult:
    """What a variant's ``train`` hands back: the agent, where it was saved, and the logged history."""

    agent: nn.Module
    args: Any
    """The run's arguments (the variant's ``Args``, sizes derived)."""
    checkpoint_path: Path | None
    global_step: int
    finished: bool
    """True when total_timesteps were reached (False after a budget / iteration stop)."""
    history: list[dict[str, float]] = field(default_factory=list)
    market: PreparedMarket | None = None
    selection: dict[str, Any] | None = None
    """with ``--select-on``: :meth:`sentio_lab.agents.selection.Selection.summary` (criterion, selected iteration,
    best score, early stop, history); ``agent`` is then the selected state, not the last one"""


#: The cost-model arguments every variant's ``Args`` carries (the fields of :class:`~sentio_lab.env.costs.CostModel`).
COST_FIELDS = ("fee_bps", "slippage_bps", "borrow_bps", "spread", "impact", "impact_y", "capital", "adv",
               "participation", "remainder", "cap_volume")


def cost_model_from(args: Any) -> CostModel:
    """The :class:`~sentio_lab.env.costs.CostModel` a variant's arguments ask for (their :data:`COST_FIELDS`)."""
    return CostModel(**{name: getattr(args.env, name) for name in COST_FIELDS})


def feature_config_from(args: Any) -> FeatureConfig:
    """The feature pipeline a variant's arguments ask for (bank, timeframes, regimes, normalisation, cache, seed)."""
    features = args.features
    return FeatureConfig(
        bank=features.feature_bank, timeframes=tuple(features.timeframes), regimes=features.regimes,
        regime_restarts=features.regime_restarts, normalise=features.normalise, prune_corr=features.prune_corr,
        cache_dir=features.feature_cache_dir, seed=features.feature_seed,
        exogenous=tuple(features.exogenous),
    )


def market_from(args: Any, feature_state: dict | None = None) -> PreparedMarket:
    """The market a variant's arguments ask for (dataset, bar range, stale-open policy, features, ranges); with
    ``--pool`` the :class:`~sentio_lab.env.pool.PooledMarket` of those instruments (``feature_state``: one state per
    instrument)."""
    data = args.data
    if getattr(data, "pool", ()):
        return prepare_pool(
            data.pool, feature_config_from(args), train_fraction=data.train_fraction,
            validation_fraction=data.validation_fraction, feature_state=feature_state, start=data.data_start,
            end=data.data_end, stale_opens=data.stale_opens, fill_price=data.fill_price,
            window=args.features.window, episode_length=args.env.episode_length,
        )
    return prepare_market(
        data.dataset, feature_config_from(args), train_fraction=data.train_fraction,
        validation_fraction=data.validation_fraction, feature_state=feature_state,
        start=data.data_start, end=data.data_end, stale_opens=data.stale_opens, fill_price=data.fill_price,
        window=args.features.window, episode_length=args.env.episode_length,  # refuses a market too short to train on
    )


def anchor_from(args: Any, market: PreparedMarket) -> AnchorConfig | None:
    """The :class:`~sentio_lab.env.anchor.AnchorConfig` a variant's ``--anchor`` flags ask for on ``market`` (None
    without ``--anchor``): the benchmark's weights on this market (on a fold market, ``vol_target`` scaled by the
    fold's training segments only) and the options. The training env and evaluation (:func:`anchor_options`) both
    build it here, so both trade the same benchmark. An anchor option given without ``--anchor`` is an error."""
    env = args.env
    if env.anchor is None:
        given = [flag for flag, value, default in (
            ("--excess-reward", env.excess_reward, False), ("--deviation-penalty", env.deviation_penalty, 0.0),
            ("--no-trade-band", env.no_trade_band, 0.0)) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} only act with --anchor (a benchmark to tilt around); add --anchor "
                             "buy_and_hold (or another baseline) or drop them")
        return None
    if not 0.0 < env.zero_tilt_prob < 1.0:
        raise ValueError(f"--zero-tilt-prob {env.zero_tilt_prob}: must be in (0, 1)")
    options = {"tilts": tuple(env.tilts), "excess_reward": env.excess_reward,
               "deviation_penalty": env.deviation_penalty, "no_trade_band": env.no_trade_band}
    if isinstance(market, PooledMarket):  # each instrument's own benchmark (its closes, its training rows), stacked
        return pool_anchor_config(env.anchor, market, **options)
    return anchor_config(env.anchor, market, **options)


def anchor_options(args: Any, market: PreparedMarket) -> dict[str, Any]:
    """``{"anchor": config}`` for an anchored run's env keywords, ``{}`` otherwise (:func:`anchor_from`); arguments
    without the env group (a hand-made arguments object) have no anchor."""
    if getattr(args, "env", None) is None:
        return {}
    anchor = anchor_from(args, market)
    return {} if anchor is None else {"anchor": anchor}


def anchor_span(args: Any, market: PreparedMarket) -> int:
    """Bars before bar ``t`` that an anchored run's benchmark weight at ``t`` reads on ``market`` (0 unanchored):
    the CPCV purge / embargo must cover it (:func:`sentio_lab.env.benchmarks.benchmark_span`)."""
    if args.env.anchor is None:
        return 0
    if isinstance(market, PooledMarket):  # the longest reach of any instrument
        return max(benchmark_span(args.env.anchor, member) for member in market.members.values())
    return benchmark_span(args.env.anchor, market)


def num_actions(args: Any) -> int:
    """Actions of a variant's policy: one per tilt when anchored, one per position level otherwise."""
    return len(args.env.tilts) if args.env.anchor is not None else len(args.env.positions)


def init_towards_benchmark(agent: nn.Module, args: Any) -> nn.Module:
    """An anchored run's fresh agent starts as its benchmark: the actor's last layer is biased towards the zero tilt
    (:func:`sentio_lab.agents.nets.favour_action`), so the greedy action is the zero tilt for every observation and
    the sampled one has probability about ``--zero-tilt-prob``. Unanchored agents are returned untouched."""
    if args.env.anchor is not None:
        favour_action(agent.actor[-1], check_tilts(args.env.tilts).index(0.0), args.env.zero_tilt_prob)
    return agent


def training_env(args: Any, market: PreparedMarket, range_name: str = "train", **env_kwargs: Any) -> TradingEnv:
    """A variant's training env: ``num_envs`` random windows inside the named range; ``env_kwargs`` are the
    variant's own extras (masks, token blocks, the drawdown state).

    On a fold market (purged walk-forward / CPCV, :func:`sentio_lab.env.market.prepare_fold_market`) the training
    range spans test groups: episodes are then drawn from the fold's training segments only, and none crosses
    a gap between them.
    """
    check_pool_env(market, cost_model_from(args), {"anchor": args.env.anchor, **env_kwargs})  # not yet: one line
    options = {**anchor_options(args, market), **env_kwargs}
    start, stop = market.range(range_name)
    window, episode_length = args.features.window, args.env.episode_length
    sampler = None
    if range_name == "train" and market.train_segments is not None:
        sampler = market.episode_sampler(window, episode_length)
    return TradingEnv(
        market.arrays, num_envs=args.ppo.num_envs, window=window, episode_length=episode_length,
        start=start, stop=stop, positions=args.env.positions, costs=cost_model_from(args),
        device=resolve_device(args.run.device), seed=args.run.seed, start_sampler=sampler, **options,
    )


def make_optimizer(agent: nn.Module, ppo: Any) -> torch.optim.Optimizer:
    """The optimizer of every variant: Adam (eps 1e-5, as CleanRL), or with ``ppo.weight_decay > 0`` AdamW.

    AdamW's decay is decoupled from the gradient (``w <- w - lr * decay * w`` beside the Adam step), so it shrinks
    weights whatever the loss scale; it applies to parameters of two or more dimensions (weight matrices, the
    transformer's token projections), not to biases and layer-norm gains, whose pull to zero only distorts. A decay
    of 0 builds exactly the former ``Adam(agent.parameters(), ...)``: one parameter group, bit-identical results.
    """
    if ppo.weight_decay < 0:
        raise ValueError(f"--weight-decay {ppo.weight_decay}: must be >= 0")
    if ppo.weight_decay == 0:
        # fused: one kernel for all parameters instead of ~10 small ops per tensor (measured ~3x faster step)
        return torch.optim.Adam(agent.parameters(), lr=ppo.learning_rate, eps=1e-5, fused=True)
    params = list(agent.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": ppo.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=ppo.learning_rate, eps=1e-5, fused=True)


def resolve_device(name: str) -> torch.device:
    """Map "auto" to cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def progress_postfix(sps: float, recent_returns: list[float]) -> dict[str, str]:
    """What the progress bar shows: steps per second and the mean recent episode log return ("n/a" before one ends)."""
    ret = f"{float(np.mean(recent_returns)):+.4f}" if recent_returns else "n/a"
    return {"sps": f"{sps:,.0f}", "ret": ret}


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python's, numpy's and torch's global generators; ``deterministic`` asks cuDNN for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


def same_value(a: Any, b: Any) -> bool:
    """Argument equality that treats tuples (command line) and lists (older checkpoints) alike."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def _conflicts(name: str, mine: Any, theirs: Any, default: Any) -> list[str]:
    # Nested argument groups (e.g. ppo_masked's MaskConfig) are compared field by field: a field left at its
    # default is taken from the checkpoint, exactly like a top-level argument.
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        found = []
        for spec in dataclasses.fields(default):
            found += _conflicts(f"{name}.{spec.name}", getattr(mine, spec.name), getattr(theirs, spec.name),
                                getattr(default, spec.name))
        return found
    if not same_value(mine, default) and not same_value(mine, theirs):
        return [f"{name}: given {mine!r}, checkpoint {theirs!r}"]
    return []


#: Experiment arguments a resumed run may still raise: a larger ``total_timesteps`` continues the run (finished or not)
#: to the new total; the iteration count is re-derived from it (see :func:`resume_args`).
EXTENDABLE_FIELDS = ("total_timesteps",)


def resume_args(
    given: ArgsT,
    saved: dict[str, Any],
    source: str | Path,
    run_control_fields: Collection[str] = RUN_CONTROL_FIELDS,
) -> ArgsT:
    """The arguments of a resumed run: the checkpoint's experiment, the caller's run control.

    ``saved`` is the checkpoint's ``args`` dict, nested by group or (checkpoints written before the groups) flat:
    :meth:`~sentio_lab.agents.arguments.VariantArgs.from_dict` reads both. An experiment argument (not in
    ``run_control_fields``) that the caller changed from its default and that differs from the checkpoint's value is
    an error naming each such field with both values; one left at its default is taken from the checkpoint.
    (Population-based training changes hyperparameters inside the bundle instead:
    :func:`sentio_lab.scale.tune.apply_mutation`.)

    ``total_timesteps`` (:data:`EXTENDABLE_FIELDS`) is the exception: a value larger than the checkpoint's
    continues the run to the new total (``num_iterations`` re-derived as ``total_timesteps // batch_size``), which
    is how a finished run is trained further; a smaller one is refused. With ``anneal_lr`` the learning rate of the
    remaining iterations then follows the schedule of the new total, ``lr * (1 - (iteration - 1) / num_iterations)``
    (it rises again from the near-zero rate a finished run ended at; the iterations already run keep the rates
    they had, so the result is not the run a fresh start with the larger total would give).
    """
    cls = type(given)
    try:
        saved_args = cls.from_dict(saved)
    except TypeError as err:
        raise CheckpointError(f"--resume {source}: the checkpoint's arguments do not fit this variant ({err})") from err
    mine, theirs, defaults = given.flat(), saved_args.flat(), cls().flat()
    conflicts = []
    extended = {}
    for name in mine:
        if name in run_control_fields:
            continue
        if name in EXTENDABLE_FIELDS and not same_value(mine[name], defaults[name]) and mine[name] != theirs[name]:
            if mine[name] > theirs[name]:
                extended[name] = mine[name]
                continue
            conflicts.append(f"{name}: given {mine[name]!r}, checkpoint {theirs[name]!r} (it can only grow: a larger "
                             "value continues the run)")
            continue
        conflicts += _conflicts(name, mine[name], theirs[name], defaults[name])
    if conflicts:
        raise CheckpointError(
            f"--resume {source}: experiment arguments differ from the checkpoint's ({'; '.join(conflicts)}); "
            "leave them out to continue that run, or start a new run without --resume"
        )
    control = {name: mine[name] for name in run_control_fields}
    control["checkpoint_path"] = given.run.checkpoint_path or str(source)
    if extended:
        control.update(extended, num_iterations=extended["total_timesteps"] // saved_args.ppo.batch_size)
    return saved_args.replace(**control)


def derive_sizes(args: ArgsT) -> ArgsT:
    """A copy of a fresh run's arguments with batch sizes, iteration count and run name filled in.

    Sizes that cannot run are a ``ValueError`` naming the flag to change (``--num-envs 0``, ...).
    """
    ppo = args.ppo
    for flag, value in (("--num-envs", ppo.num_envs), ("--num-steps", ppo.num_steps),
                        ("--total-timesteps", ppo.total_timesteps)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    batch_size = ppo.num_envs * ppo.num_steps
    if ppo.num_minibatches < 1 or ppo.num_minibatches > batch_size:
        raise ValueError(
            f"--num-minibatches {ppo.num_minibatches} must be in [1, batch_size={batch_size}] "
            f"(batch_size = --num-envs {ppo.num_envs} x --num-steps {ppo.num_steps}): minibatches would be empty"
        )
    num_iterations = ppo.total_timesteps // batch_size
    if num_iterations < 1:
        raise ValueError(f"--total-timesteps {ppo.total_timesteps} < one rollout ({batch_size} steps = --num-envs "
                         f"{ppo.num_envs} x --num-steps {ppo.num_steps})")
    stem = "pool" if getattr(args.data, "pool", ()) else Path(str(args.data.dataset)).stem
    run_name = args.run.run_name or f"{stem}__{args.run.exp_name}__{args.run.seed}__{int(time.time())}"
    return args.replace(batch_size=batch_size, minibatch_size=batch_size // ppo.num_minibatches,
                        num_iterations=num_iterations, run_name=run_name)


def resume_device(args: Any, bundle: dict[str, Any]) -> bool:
    """Fall back from CUDA to cpu when CUDA is absent (in place); True when the device type changed, with a warning."""
    run = args.run
    if run.device != "auto" and torch.device(run.device).type == "cuda" and not torch.cuda.is_available():
        run.device = "cpu"
    now = resolve_device(run.device).type
    # "device" is recorded since the CUDA fallback exists; older bundles only have the argument (flat or nested)
    saved_args = bundle["args"]
    saved = bundle["extra"].get("device", saved_args.get("run", saved_args).get("device", "cpu"))
    saved = resolve_device(saved).type if saved != "auto" else now
    if now == saved:
        return False
    warnings.warn(
        f"--resume {run.resume}: the checkpoint was trained on {saved}, continuing on {now}. The run goes on "
        "from the saved state, but it is bit-identical to an uninterrupted run only on the same device "
        "(random streams and kernels differ); the env's episode sampler is reseeded.",
        RuntimeWarning, stacklevel=3,
    )
    return True
