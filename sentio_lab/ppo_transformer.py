"""PPO with a hierarchical multi-timeframe transformer policy: one readable file, modelled on ``sentio_lab/ppo.py``.

Run ``python -m sentio_lab.ppo_transformer --help``. The algorithm is ``ppo``'s (rollout, GAE, the clipped
surrogate, truncation bootstrap, checkpoints, exact resume); what differs, and why:

* the observation carries, beside the base feature window and the position, a token block per higher timeframe
  (``--token-timeframes 4h 1D``, ``--token-counts 16 10``): the last K completed bars of that timeframe, each a
  token of its own features (:mod:`sentio_lab.features.tokens`), gathered by the env on its device.
  :func:`env_options` builds them for a market, so evaluation and the experiment runner see the same observation;
* the agent is :class:`~sentio_lab.agents.nets.transformer.MultiTimeframeActorCritic`: a transformer encoder per
timeframe
  (the base window is one, with ``window`` tokens), pooled, fused across timeframes, then actor and critic heads.
  With no token timeframes it is a single-timeframe transformer over the window, the same code;
* mixed precision (``--amp``): ``bf16`` autocast on CPU or CUDA, ``fp16`` autocast with a ``GradScaler`` on CUDA
  (an overflowing fp16 step is skipped by the scaler and counted, not an error), ``off`` for plain fp32. The
  weights, the optimizer state, logits, values and losses stay float32 (fp32 master weights); only the
  matmuls inside the trunk run in the low precision. The scaler's state is saved with the checkpoint;
* ``--compile`` routes the trunk through ``torch.compile`` (state_dict keys unchanged).

Resuming (``--resume PATH``) follows ``ppo``: run-control arguments
(:data:`sentio_lab.agents.arguments.RUN_CONTROL_FIELDS`)
from the command line, every other argument from the checkpoint (a conflicting explicit value is refused); on CPU a
resumed run ends with the same weights as an uninterrupted one (tests/variants/test_ppo_transformer.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sentio_lab.agents import training
from sentio_lab.agents.arguments import DataArgs, Flat, RunArgs, SharedArgs
from sentio_lab.agents.nets.transformer import FUSIONS, MultiTimeframeActorCritic, streams_for
from sentio_lab.agents.rollout import (
    bootstrap_truncated,
    compute_gae,
    kl_early_stop,
    ppo_objective,
    value_loss,
)
from sentio_lab.agents.training import TrainResult, resolve_device
from sentio_lab.env import TradingEnv
from sentio_lab.env.anchor import BENCHMARK_BLOCK
from sentio_lab.env.market import PreparedMarket
from sentio_lab.features.observation_layout import TokenBlock, observation_dim, observation_layout
from sentio_lab.features.tokens import block_name, build_token_blocks, token_span, token_width
from sentio_lab.run_loop import rollout_storage, run_cli, start_run

VARIANT = "ppo_transformer"
#: Mixed-precision modes (--amp) and their autocast dtypes.
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Args(SharedArgs):
    """PPO with a multi-timeframe transformer policy: ppo's argument groups (hourly EUR/USD by default), plus the
    token blocks and the transformer."""

    data: Flat[DataArgs] = field(default_factory=lambda: DataArgs(dataset="eurusd_1h"))
    run: Flat[RunArgs] = field(default_factory=lambda: RunArgs(exp_name=VARIANT))
    token_timeframes: tuple[str, ...] = ("4h", "1D")
    """higher timeframes whose completed bars reach the policy as token sequences (pandas offset aliases; empty =
    the base window only)"""
    token_counts: tuple[int, ...] = (16, 10)
    """tokens (last completed bars) per token timeframe, one count per entry of token_timeframes"""
    d_model: int = 32
    """width of the transformer tokens (the base window is one timeframe, with --window tokens)"""
    n_heads: int = 2
    """attention heads (d_model must divide by it)"""
    n_layers: int = 1
    """transformer blocks per timeframe encoder"""
    ff_size: int = 64
    """feed-forward width inside each transformer block"""
    fusion: Literal["attention", "gated"] = "attention"
    """cross-timeframe fusion: "attention" (the agent state queries the timeframe summaries) or "gated" """
    amp: Literal["off", "bf16", "fp16"] = "off"
    """mixed precision: "off" (fp32), "bf16" (autocast, CPU or CUDA) or "fp16" (autocast + GradScaler, CUDA only);
    weights, optimizer, logits, values and losses stay fp32"""
    compile: bool = False
    """run the network trunk through torch.compile (the first iterations pay the compilation)"""
    compile_backend: str = "inductor"
    """torch.compile backend ("inductor"; "eager" only traces, for tests)"""


#: The hooks orchestration reads (evaluation, the experiment runner, Tune), shared by every variant.
feature_config = training.feature_config_from
cost_model = training.cost_model_from
market_for = training.market_from
resume_args = training.resume_args


def check_args(args: Args) -> None:
    """Reject settings that cannot run, naming the argument (before any data is loaded)."""
    if len(args.token_timeframes) != len(args.token_counts):
        raise ValueError(f"--token-timeframes {args.token_timeframes} and --token-counts {args.token_counts} differ "
                         "in length: give one count per timeframe")
    if args.amp not in AMP_DTYPES:
        raise ValueError(f"--amp {args.amp!r} not in {tuple(AMP_DTYPES)}")
    if args.fusion not in FUSIONS:
        raise ValueError(f"--fusion {args.fusion!r} not in {FUSIONS}")
    if args.amp == "fp16" and resolve_device(args.run.device).type != "cuda":
        raise ValueError("--amp fp16 needs CUDA (fp16 autocast with a GradScaler); use --amp bf16 on CPU")


def env_options(args: Args, market: PreparedMarket) -> dict[str, Any]:
    """Extra env keywords of this variant: the token blocks of ``args.token_timeframes`` on ``market``."""
    if not args.token_timeframes:
        return {}
    return {"token_blocks": build_token_blocks(market, args.token_timeframes, args.token_counts)}


def observation_span(args: Args, market: PreparedMarket) -> int:
    """Base bars before bar t that this variant's observation reads beyond the feature window: the token blocks'
    reach (:func:`sentio_lab.features.tokens.token_span`). The experiment runner sizes its CPCV embargo with it."""
    return token_span(market, args.token_timeframes, args.token_counts) if args.token_timeframes else 0


def make_env(args: Args, market: PreparedMarket, range_name: str = "train") -> TradingEnv:
    """Training env with the token blocks: ``num_envs`` random windows inside the named range (on a fold market,
    inside its training segments only: :func:`sentio_lab.agents.training.training_env`)."""
    return training.training_env(args, market, range_name, **env_options(args, market))


def observation_parts(args: Args, obs_dim: int) -> dict[str, slice]:
    """The observation layout an env of ``args`` with observations ``obs_dim`` wide has (the feature count is
    what remains of ``obs_dim`` after the position and the token blocks, divided by the window)."""
    d = token_width()
    tokens = sum(k * d for k in args.token_counts)
    anchored = args.env.anchor is not None  # the benchmark block (b_t, one value) after the token blocks
    features, rest = divmod(obs_dim - 1 - tokens - int(anchored), args.features.window)
    if rest or features < 1:
        raise ValueError(f"obs_dim {obs_dim} does not fit window {args.features.window} + position + token blocks "
                         f"{dict(zip(args.token_timeframes, args.token_counts, strict=True))} of width {d}")
    shapes = [TokenBlock(block_name(rule), np.zeros((1, d), np.float32), np.zeros((1, k), np.int64))
              for rule, k in zip(args.token_timeframes, args.token_counts, strict=True)]
    if anchored:  # part of the agent's state beside the position (not a stream)
        shapes.append(TokenBlock(BENCHMARK_BLOCK, np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int64)))
    layout = observation_layout(features, args.features.window, shapes)
    assert observation_dim(layout) == obs_dim
    return layout


def build_agent(args: Args, obs_dim: int, num_actions: int) -> MultiTimeframeActorCritic:
    """The actor-critic of this variant (evaluation rebuilds it from a checkpoint's args)."""
    layout = observation_parts(args, obs_dim)
    blocks = [(block_name(rule), k, token_width()) for rule, k in zip(args.token_timeframes, args.token_counts,
                                                                      strict=True)]
    agent = MultiTimeframeActorCritic(
        layout, streams_for(layout, args.features.window, blocks), num_actions, d_model=args.d_model,
        heads=args.n_heads, layers=args.n_layers, ff=args.ff_size, fusion=args.fusion, hidden=args.ppo.hidden_size,
        norm_obs=args.ppo.norm_obs,
    )
    return training.init_towards_benchmark(agent, args)  # anchored: the untrained agent is the benchmark


def train(args: Args, *, market: PreparedMarket | None = None, env: Any | None = None) -> TrainResult:
    """Run PPO with the transformer policy as ``args`` say; ``market`` / ``env`` may be given to reuse prepared data.

    An ``env`` passed in needs ``obs_dim``, ``num_actions``, ``reset()`` and ``step()`` like :class:`TradingEnv`
    (with the token blocks of ``args``); without a market no checkpoint can be written. Raises
    :class:`~sentio_lab.agents.rollout.NonFiniteError` when a reward, value, loss or gradient is not finite.
    """
    run = start_run(VARIANT, args, market=market, env=env, market_for=market_for, make_env=make_env,
                    check=check_args)
    args, env, device, hp = run.args, run.env, run.device, run.args.ppo
    agent = build_agent(args, env.obs_dim, env.num_actions).to(device)
    if args.compile:
        agent.set_compile(True, backend=args.compile_backend)
    optimizer = training.make_optimizer(agent, hp)  # Adam, AdamW with --weight-decay
    # Mixed precision: autocast runs the trunk's matmuls in bf16 / fp16; parameters and Adam stay fp32. fp16 has
    # too few exponent bits for small gradients, hence the scaler (a no-op object unless amp is "fp16").
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    obs, actions, logprobs, rewards, dones, values = rollout_storage(hp.num_steps, hp.num_envs, env.obs_dim, device)
    state = run.restore(agent, optimizer)
    if run.bundle is not None:
        scaler.load_state_dict(run.bundle["scaler"])
    next_obs, next_done = state.next_obs, state.next_done

    def save(iteration: int) -> Path | None:
        state.next_done = next_done
        return run.save(iteration, agent, optimizer, state, scaler=scaler.state_dict())

    iteration = state.start_iteration - 1
    for iteration in range(state.start_iteration, hp.num_iterations + 1):
        run.anneal_learning_rate(optimizer, iteration)

        # ---- rollout: num_steps steps of all num_envs episodes (the network under autocast)
        for step in range(hp.num_steps):
            state.global_step += hp.num_envs
            with torch.no_grad():
                if agent.obs_norm is not None:
                    agent.obs_norm.update(next_obs)
                obs[step] = norm_obs = agent.normalise(next_obs)
                dones[step] = next_done
                with autocast():
                    action, logprob, _, value = agent.get_action_and_value(norm_obs)
                values[step] = value
            actions[step], logprobs[step] = action, logprob

            next_obs, reward, terminated, truncated, info = env.step(action)
            state.episode_return += reward
            reward = reward.to(torch.float32) * args.env.reward_scale
            if bool(truncated.any()):  # the window ended, the market did not: bootstrap V(where we would be next)
                with torch.no_grad(), autocast():
                    final_value = agent.get_value(agent.normalise(info["final_obs"]))
                reward = bootstrap_truncated(reward, final_value, truncated, hp.gamma)
            rewards[step] = reward
            done = terminated | truncated
            next_done = done.to(torch.float32)
            run.end_episodes(state, done)

        # ---- bootstrap value and GAE
        with torch.no_grad():
            with autocast():
                next_value = agent.get_value(agent.normalise(next_obs))
            run.check_rollout(iteration, rewards=rewards, values=values, next_value=next_value)
            advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, hp.gamma, hp.gae_lambda)

        # ---- flatten the batch
        b_obs, b_logprobs, b_actions = obs.reshape((-1, env.obs_dim)), logprobs.reshape(-1), actions.reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)
        batch = (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values)

        # ---- optimise policy and value network (losses in fp32; fp16 gradients through the scaler)
        clipfracs = []
        epochs_run = updates_run = skipped = 0
        for epoch in range(hp.update_epochs):
            for minibatch, mb_inds in run.minibatches():
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns, mb_values = (
                    x.index_select(0, mb_inds) for x in batch)
                with autocast():  # the network's outputs are float32: the losses below are computed in fp32
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions)
                v_loss = value_loss(newvalue, mb_returns, mb_values, hp.clip_coef, hp.clip_vloss)
                # ratio, KL, clip fraction, advantage normalisation, clipped surrogate, entropy bonus
                objective = ppo_objective(newlogprob, mb_logprobs, mb_advantages, entropy, v_loss, hp)
                clipfracs.append(objective.clip_fraction)

                optimizer.zero_grad()
                scaler.scale(objective.loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), hp.max_grad_norm)
                # an fp16 overflow is the scaler's to skip (scaler.step does, and lowers the scale), not an error
                skipped += run.check_update(iteration, epoch, minibatch, objective.loss, grad_norm,
                                            scaled=scaler.is_enabled(), **objective.parts())
                scaler.step(optimizer)
                scaler.update()
                updates_run += 1
            epochs_run += 1
            if kl_early_stop(objective.approx_kl, hp.target_kl):
                break

        losses = objective.losses()
        record = run.record(state, optimizer, losses, clipfracs, b_values, b_returns, epochs_run, updates_run)
        run.log({**record, "losses/skipped_updates": skipped}, state)
        if run.stop_or_checkpoint(iteration, save):
            break

    return run.finish(iteration, save, agent, state)


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo_transformer`` (``--help`` lists the arguments by group)."""
    run_cli(Args, train, prog="python -m sentio_lab.ppo_transformer")


if __name__ == "__main__":
    main()
