"""Evaluate trained agents: deterministic episodes over a whole range, from a checkpoint or a live agent.

Variants are reached only through the explicit table :data:`VARIANTS` (name -> module); each variant
module provides ``Args``, ``build_agent(args, obs_dim, num_actions)``, ``feature_config(args)`` and
``cost_model(args)``.

Masked variants (``ppo_masked``: their ``Args`` carry ``masks``, a :class:`~sentio_lab.env.masks.MaskConfig`, and
``invalid_action``) are evaluated under the same mask rules: pass ``**action_masking(args)`` to
:func:`evaluate_policy` / :func:`evaluate_policies` (:func:`evaluate_checkpoint` does), the env is built with
those masks and the greedy action is the best *valid* one (``act_greedy(obs, env.action_masks())``). Without
masks both functions run exactly as before.

Variants whose agents observe more than the feature window and position (token blocks of higher timeframes,
the drawdown state; :mod:`sentio_lab.features.observation_layout`) define ``env_options(args, market)`` in their module:
the extra :class:`~sentio_lab.env.TradingEnv` keywords for a market. :func:`env_options` finds it from the
arguments' class; pass its result as ``env_options=`` to :func:`evaluate_policy` / :func:`evaluate_policies`.

:func:`evaluate_policy` runs one agent over one range, one env step per bar: the reference.
:func:`evaluate_policies` runs many agents over many ranges (e.g. every seed of a variant over every CPCV
path) in one batched env and gives the same :class:`Evaluation` objects, bit for bit on CPU.
Each :class:`Evaluation` carries its :attr:`~Evaluation.summary`, the statistics the reports show
(:func:`sentio_lab.evaluation.metrics.summary_stats` of its equity and weights).

The command line ``python -m sentio_lab.evaluate CHECKPOINT [--dataset FILE] [--range validation|test|all]
[--output DIR]`` writes the demo-style report of a checkpoint against buy-and-hold
(:mod:`sentio_lab.evaluation.agent_report`)
and prints its summary; errors are one line and a non-zero exit.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sentio_lab.agents.nets import MLPActorCritic, check_mask
from sentio_lab.agents.variants import action_masking, env_options, load_trained, load_variant
from sentio_lab.env import _MIN_EQUITY as _EQUITY_FLOOR
from sentio_lab.env import TradingEnv, episode_start_bounds
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import PreparedMarket
from sentio_lab.env.mask_inputs import MaskInputs, market_mask_inputs
from sentio_lab.env.masks import MaskConfig
from sentio_lab.evaluation.metrics import summary_stats


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
    fill_price: str = "next_open"
    """Where the orders filled (the market's ``MarketArrays.fill_price``): replay them with the same."""

    @cached_property
    def summary(self) -> dict[str, object]:
        """The statistics the reports show for this episode: :func:`sentio_lab.evaluation.metrics.summary_stats` of the
        equity
        and the weights (keys :data:`sentio_lab.evaluation.metrics.STAT_NAMES`; Sharpe, drawdown, turnover, trades,
        ...)."""
        return summary_stats(self.equity, self.weights)

def _mask_env_kwargs(masks: MaskConfig | None, invalid_action: str, market: PreparedMarket) -> dict[str, Any]:
    """TradingEnv keywords for ``masks`` (none without masks, so the unmasked env is built exactly as before)."""
    if masks is None:
        return {}
    return {"masks": masks, "invalid_action": invalid_action, "mask_inputs": _mask_inputs(masks, market)}


def _mask_inputs(masks: MaskConfig, market: PreparedMarket) -> MaskInputs | None:
    """As the variant's own: :func:`sentio_lab.env.mask_inputs.market_mask_inputs` (GARCH fitted on training bars
    only)."""
    return market_mask_inputs(masks, market)


def evaluate_policy(
    agent: nn.Module,
    market: PreparedMarket,
    *,
    window: int,
    positions: tuple[float, ...],
    costs: CostModel,
    range_name: str = "test",
    masks: MaskConfig | None = None,
    invalid_action: str = "nearest",
    env_options: dict[str, Any] | None = None,
    bars: tuple[int, int] | None = None,
) -> Evaluation:
    """Run ``agent.act_greedy`` over the whole named range in one episode (fixed start, no randomness).

    With ``masks`` the env applies those rules and each decision is ``agent.act_greedy(obs, env.action_masks())``:
    the best valid action (see :func:`action_masking`). ``env_options`` are extra env keywords (module doc).
    ``bars`` (``(start, stop)`` bar positions) replaces the named range's bars, e.g. every bar of the market;
    ``range_name`` then only labels the result.
    """
    start, stop = market.range(range_name) if bars is None else bars
    first = max(start, market.arrays.first_valid + window - 1)
    length = stop - 1 - first
    env = TradingEnv(market.arrays, num_envs=1, window=window, episode_length=length, start=start, stop=stop,
                     positions=positions, costs=costs, ruin_fraction=0.0,
                     **_mask_env_kwargs(masks, invalid_action, market), **(env_options or {}))
    obs = env.reset(starts=[first])
    levels = np.asarray(positions, dtype=np.float64)
    chosen = np.empty(length, dtype=np.int64)
    filled = np.empty(length)  # the weight each decision held: its level, or an anchored env's target
    equity = np.empty(length + 1)
    equity[0] = 1.0
    ruined = False
    device = next(agent.parameters()).device
    with torch.no_grad():
        for k in range(length):
            if masks is None:
                action = agent.act_greedy(obs.to(device))
            else:
                action = agent.act_greedy(obs.to(device), env.action_masks().to(device))
            chosen[k] = int(action[0])
            obs, _, terminated, _, info = env.step(action)
            equity[k + 1] = float(info["equity"][0])
            filled[k] = float(info["weight"][0]) if "weight" in info else levels[chosen[k]]
            if bool(terminated[0]):  # ruin (equity <= 0): the rest of the range is not tradable
                chosen, equity, filled = chosen[: k + 1], equity[: k + 2], filled[: k + 1]
                equity[-1] = max(equity[-1], _EQUITY_FLOOR)
                ruined = True
                break
    index = market.data.frame.index
    return Evaluation(
        range_name=range_name,
        start=first,
        weights=pd.Series(filled, index=index[first : first + len(chosen)], name="weight"),
        equity=pd.Series(equity, index=index[first : first + len(equity)], name="equity"),
        costs=costs,
        ruined=ruined,
        fill_price=market.arrays.fill_price,
    )


def evaluate_checkpoint(path: str | Path, range_name: str = "test", *, dataset: str | Path | None = None) -> Evaluation:
    """Load a checkpoint and evaluate it deterministically over ``range_name``; the result's ``summary`` holds the
    statistics the reports show (Sharpe, max drawdown, turnover, ...: :attr:`Evaluation.summary`).

    The checkpoint is verified first (:func:`sentio_lab.agents.checkpoint.load_checkpoint`): a damaged file raises
    :class:`~sentio_lab.agents.checkpoint.CheckpointError` instead of giving a normal-looking result."""
    trained = load_trained(path, dataset=dataset)
    variant = load_variant(trained.bundle["variant"])
    return evaluate_policy(
        trained.agent, trained.market, window=trained.args.features.window, positions=tuple(trained.args.env.positions),
        costs=variant.cost_model(trained.args), range_name=range_name, **action_masking(trained.args),
        env_options=env_options(trained.args, trained.market),
    )


# ------------------------------------------------------------------------------------------ batched evaluation
#: Where the two largest logits of a stacked (vmapped) forward are closer than
#: ``TIE_ATOL + TIE_RTOL * scale``, the greedy action is recomputed by the agent's own ``act_greedy`` on that one
#: observation, the call :func:`evaluate_policy` makes. ``scale`` is the agent's largest ``sum_j |W_kj| + |b_k|``
#: over the rows of the actor's last linear layer: with tanh activations before it (``|h_j| <= 1``) it bounds every
#: term of the last dot products, so rounding errors there are a few float32 ulps of it. A float32 matmul over a
#: batch need not round like the same matmul over one row (other kernels, other summation orders): the logits
#: differ by about 3e-8 x scale (tests/evaluation/test_evaluate.py measures it and checks a margin of at least 20x), so
#: outside the band the argmax cannot differ, and inside it (exact ties included) the unbatched computation decides.
TIE_ATOL = 1e-6
TIE_RTOL = 1e-5


def _agent_device(agent: Any, default: str | torch.device) -> torch.device:
    """The device of the agent's first parameter (where :func:`evaluate_policy` sends observations)."""
    for parameter in agent.parameters():
        return parameter.device
    return torch.device(default)


def _stackable(agent: Any) -> bool:
    """True when the agent's greedy action is :class:`MLPActorCritic`'s ``actor(normalise(obs)).argmax(-1)``."""
    cls = type(agent)
    if not (isinstance(agent, MLPActorCritic) and cls.act_greedy is MLPActorCritic.act_greedy
            and cls.normalise is MLPActorCritic.normalise):
        return False
    actor = agent.actor  # the tie guard's scale needs tanh -> linear at the end (as nets.mlp builds it)
    return (isinstance(actor, nn.Sequential) and len(actor) >= 2 and type(actor[-1]) is nn.Linear
            and type(actor[-2]) is nn.Tanh)


def _module_signature(module: nn.Module | None) -> tuple:
    """What must agree for modules to share one functional forward: structure, tensor shapes, scalar settings."""
    if module is None:
        return (None,)
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items())
    settings = tuple(
        tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))))
        for m in module.modules()
    )
    return (type(module), repr(module), tensors, settings)


def _stacked_state(modules: list[nn.Module], device: str | torch.device) -> dict[str, torch.Tensor]:
    """Parameters and buffers of same-architecture modules, stacked along a new first dimension, on ``device``."""
    params, buffers = torch.func.stack_module_state(modules)
    return {k: v.detach().to(device) for k, v in {**params, **buffers}.items()}


class _StackedGreedy:
    """Greedy actions of :class:`MLPActorCritic` agents of one architecture: one vmapped forward over their stacked
    normalisers and actors (each agent normalises with its own running statistics), then the argmax, with the
    :data:`TIE_ATOL` / :data:`TIE_RTOL` guard (agents must pass :func:`_stackable`)."""

    def __init__(self, agents: list[MLPActorCritic], device: str | torch.device) -> None:
        self.agents = agents
        self.devices = [_agent_device(a, device) for a in agents]
        first = agents[0]
        self._actor = copy.deepcopy(first.actor).to("meta")
        self._norm = None if first.obs_norm is None else copy.deepcopy(first.obs_norm).to("meta")
        self._actor_state = _stacked_state([a.actor for a in agents], device)
        self._norm_state = {} if self._norm is None else _stacked_state([a.obs_norm for a in agents], device)
        last = str(len(first.actor) - 1)
        weight, bias = self._actor_state[f"{last}.weight"], self._actor_state[f"{last}.bias"]
        self.scale = (weight.abs().sum(-1) + bias.abs()).amax(-1)  # (G,): see TIE_RTOL
        self._vmapped = torch.vmap(self._one)
        self.rechecked = 0
        """Rows whose action was recomputed unbatched (near-ties), over the object's life."""

    def _one(self, norm_state: dict, actor_state: dict, obs: torch.Tensor) -> torch.Tensor:
        x = obs if self._norm is None else torch.func.functional_call(self._norm, norm_state, (obs,))
        return torch.func.functional_call(self._actor, actor_state, (x,))

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Actor logits ``(G, B, K)`` for raw observations ``(G, B, D)``, row g through agent g."""
        return self._vmapped(self._norm_state, self._actor_state, obs)

    def __call__(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy actions ``(G, B)``: the argmax of :meth:`logits`, near-ties decided by the agent's ``act_greedy``.

        With ``mask`` (bool ``(G, B, K)``) invalid logits become ``-inf`` first, as ``act_greedy(obs, mask)`` does:
        the argmax and the two largest logits of the tie guard are then over valid actions only (a row with one
        valid action has a gap of ``inf``, never a near-tie), and a near-tie is recomputed with the row's mask.
        """
        logits = self.logits(obs)
        if mask is not None:
            logits = torch.where(check_mask(mask, logits.shape[-1]), logits, -torch.inf)
        actions = logits.argmax(-1)
        if logits.shape[-1] > 1:
            top = logits.topk(2, dim=-1).values
            near = (top[..., 0] - top[..., 1]) <= (TIE_ATOL + TIE_RTOL * self.scale)[:, None]
            if bool(near.any()):
                for g, b in near.nonzero().tolist():
                    row = obs[g, b : b + 1].to(self.devices[g])
                    if mask is None:
                        actions[g, b] = self.agents[g].act_greedy(row)[0].to(actions.device)
                    else:
                        row_mask = mask[g, b : b + 1].to(self.devices[g])
                        actions[g, b] = self.agents[g].act_greedy(row, row_mask)[0].to(actions.device)
                    self.rechecked += 1
        return actions


class _GreedyPolicies:
    """Greedy actions of several agents, each for its own block of rows of one batched observation.

    Rows are agent-major: rows ``[i * B, (i + 1) * B)`` belong to agent i. :class:`MLPActorCritic` agents are
    grouped by architecture and each group runs as one :class:`_StackedGreedy`; any other agent (another
    ``act_greedy``) gets its block in one call of its own ``act_greedy``.
    """

    def __init__(self, agents: Sequence[Any], device: str | torch.device) -> None:
        groups: dict[tuple, list[int]] = {}
        self.loose: list[tuple[int, Any, torch.device]] = []
        for i, agent in enumerate(agents):
            if _stackable(agent):
                key = (_module_signature(agent.actor), _module_signature(agent.obs_norm))
                groups.setdefault(key, []).append(i)
            else:
                self.loose.append((i, agent, _agent_device(agent, device)))
        self.num_agents = len(agents)
        self.groups = [
            (idx, torch.tensor(idx, dtype=torch.long, device=device), _StackedGreedy([agents[i] for i in idx], device))
            for idx in groups.values()
        ]

    @property
    def rechecked(self) -> int:
        """Rows decided unbatched by the near-tie guard so far."""
        return sum(stacked.rechecked for _, _, stacked in self.groups)

    def __call__(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One action per row of ``obs`` ``(num_agents * B, D)``, valid under ``mask`` ``(num_agents * B, K)``."""
        blocks = obs.view(self.num_agents, -1, obs.shape[-1])
        masks = None if mask is None else mask.view(self.num_agents, -1, mask.shape[-1])
        actions = torch.empty(blocks.shape[:2], dtype=torch.long, device=obs.device)
        for idx, index, stacked in self.groups:
            if idx == list(range(self.num_agents)):
                actions = stacked(blocks, masks)
            else:
                actions[index] = stacked(blocks.index_select(0, index),
                                         None if masks is None else masks.index_select(0, index))
        for i, agent, device in self.loose:
            if masks is None:
                actions[i] = agent.act_greedy(blocks[i].to(device)).to(obs.device)
            else:
                actions[i] = agent.act_greedy(blocks[i].to(device), masks[i].to(device)).to(obs.device)
        return actions.reshape(-1)


def _length_buckets(firsts: list[int], lengths: list[int], n_bars: int) -> list[list[int]]:
    """Group ranges so that each group can run in one env of its longest length: range j may run ``L`` steps
    from its first bar when ``first_j + L <= n_bars - 1`` (it reads bars past its own end, never past the data)."""
    remaining = sorted(range(len(lengths)), key=lambda j: (-lengths[j], j))
    buckets = []
    while remaining:
        longest = lengths[remaining[0]]
        fits = [j for j in remaining if firsts[j] + longest <= n_bars - 1]
        buckets.append(fits)
        taken = set(fits)
        remaining = [j for j in remaining if j not in taken]
    return buckets


def evaluate_policies(
    agents: Sequence[nn.Module],
    market: PreparedMarket,
    range_names: Sequence[str],
    *,
    window: int,
    positions: tuple[float, ...],
    costs: CostModel,
    device: str | torch.device = "cpu",
    masks: MaskConfig | None = None,
    invalid_action: str = "nearest",
    rule_counts: dict[str, int] | None = None,
    env_options: dict[str, Any] | None = None,
) -> list[list[Evaluation]]:
    """Every agent over every named range, all episodes stepped together: ``result[i][j]`` is agent i on range j.

    ``rule_counts``, when given, receives per mask rule ``binding:<rule>`` (decisions in which the rule masked
    at least one level) and ``masked:<rule>`` (chosen actions it masked), summed over every env, and
    ``decisions``; the recorded steps of ruined episodes and the steps past a short range's own end are
    included in those sums (they are counts of the envs, not of the recorded episodes). ``env_options`` are
    extra env keywords (module doc), the same for every agent.

    The same as ``evaluate_policy(agents[i], market, range_name=range_names[j], ...)`` for each pair (same
    :class:`Evaluation` fields, same first bar, length and ruin handling; on CPU the weights and the equity are
    bit-identical), computed in as few :class:`~sentio_lab.env.TradingEnv` as the ranges allow: ranges are
    bucketed so that each bucket runs ``num_envs = len(agents) x len(bucket)`` episodes for its longest length,
    and a range shorter than that is cut at its own length (its env reads a few later bars, which nobody
    records, and never steps past the data). Usually that is one env, e.g. for CPCV test groups; a short range
    ending near the market's last bar gets a bucket of its own.

    Forward passes are batched: :class:`~sentio_lab.agents.nets.MLPActorCritic` agents of one architecture run as one
    ``torch.vmap`` of ``torch.func.functional_call`` over their stacked weights and normaliser statistics, and a
    near-tie of logits (within :data:`TIE_ATOL` + :data:`TIE_RTOL` x the last layer's scale) is decided by its own
    unbatched ``act_greedy``, so the action is the one :func:`evaluate_policy` picks. Other agents (another
    ``act_greedy``) get one call per step on their block of rows; their actions equal the one-row ones when
    their ``act_greedy`` does not depend on the batch (true of any row-wise rule).

    The env runs on ``device``; stacked weights are copied there, near-ties are recomputed on the agent's own
    device. On CUDA the float64 accounting may round differently from the CPU reference (fused multiply-adds).

    With ``masks`` every env applies those rules and the greedy actions are the best valid ones, in the stacked
    forward too (invalid logits set to ``-inf`` before the argmax and the tie guard), as in
    :func:`evaluate_policy` with the same ``masks``.

    An unknown range name is a KeyError; a range without a single observable bar (it ends inside the warm-up
    and the first window) is a ValueError, raised before anything runs.
    """
    agents, names = list(agents), list(range_names)
    index = market.data.frame.index
    arrays = market.arrays
    firsts, lengths = [], []
    for name in names:
        start, stop = market.range(name)
        first = max(start, arrays.first_valid + window - 1)
        length = stop - 1 - first
        if length < 0:
            raise ValueError(
                f"range {name!r} [{start}, {stop}) is too short: its first observable bar is {first} "
                f"({arrays.first_valid} warm-up bars + a {window}-bar window), after its last decision bar {stop - 2}"
            )
        episode_start_bounds(arrays, window, start, stop, length)  # the errors evaluate_policy's env would raise
        firsts.append(first)
        lengths.append(length)
    results: list[list[Evaluation | None]] = [[None] * len(names) for _ in agents]
    if not agents or not names:
        return results  # type: ignore[return-value]
    greedy = _GreedyPolicies(agents, device)
    levels = np.asarray(positions, dtype=np.float64)
    for bucket in _length_buckets(firsts, lengths, len(arrays.close)):
        longest = lengths[bucket[0]]
        env = TradingEnv(arrays, num_envs=len(agents) * len(bucket), window=window, episode_length=longest,
                         start=min(firsts[j] for j in bucket), stop=max(firsts[j] for j in bucket) + longest + 1,
                         positions=positions, costs=costs, ruin_fraction=0.0, device=device,
                         **_mask_env_kwargs(masks, invalid_action, market), **(env_options or {}))
        obs = env.reset(starts=[firsts[j] for _ in agents for j in bucket])  # agent-major rows
        levels_t = torch.as_tensor(levels, device=env.device)
        own_length = torch.tensor([lengths[j] for _ in agents for j in bucket], device=env.device)
        recorded = own_length.clone()  # steps kept per env: its own length, or up to its ruin
        ruined = torch.zeros_like(own_length, dtype=torch.bool)
        chosen, equity, filled = [], [], []
        with torch.no_grad():
            for k in range(longest):
                action = greedy(obs) if masks is None else greedy(obs, env.action_masks())
                obs, _, terminated, _, info = env.step(action)
                chosen.append(action)
                equity.append(info["equity"])
                filled.append(info["weight"] if "weight" in info else levels_t.index_select(0, action.to(env.device)))
                # ruin inside the env's own range: the rest of that range is not tradable (as in evaluate_policy)
                ruin = terminated & ~ruined & (k < own_length)
                recorded = torch.where(ruin, k + 1, recorded)
                ruined = ruined | ruin
                if not bool((~ruined & (k + 1 < own_length)).any()):
                    break
        if chosen:
            equity_np = torch.stack(equity, dim=1).cpu().numpy()
            filled_np = torch.stack(filled, dim=1).cpu().numpy()
        else:
            equity_np = filled_np = np.empty((env.num_envs, 0))
        if rule_counts is not None:
            rule_counts["decisions"] = rule_counts.get("decisions", 0) + len(chosen) * env.num_envs
            for kind, counts in (("binding", env.mask_binding), ("masked", env.mask_counts)):
                for rule, n in counts.items():
                    rule_counts[f"{kind}:{rule}"] = rule_counts.get(f"{kind}:{rule}", 0) + int(n)
        recorded_np, ruined_np = recorded.cpu().numpy(), ruined.cpu().numpy()
        for e in range(env.num_envs):
            i, j = divmod(e, len(bucket))
            j = bucket[j]
            n, first = int(recorded_np[e]), firsts[j]
            curve = np.concatenate([[1.0], equity_np[e, :n]])
            if ruined_np[e]:
                curve[-1] = max(curve[-1], _EQUITY_FLOOR)
            results[i][j] = Evaluation(
                range_name=names[j],
                start=first,
                weights=pd.Series(filled_np[e, :n], index=index[first : first + n], name="weight"),
                equity=pd.Series(curve, index=index[first : first + n + 1], name="equity"),
                costs=costs,
                ruined=bool(ruined_np[e]),
                fill_price=market.arrays.fill_price,
            )
    return results  # type: ignore[return-value]


