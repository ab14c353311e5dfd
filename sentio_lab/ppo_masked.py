"""PPO with action masking on the batched torch trading env: one readable file, modelled on ``ppo.py``.

Run ``python -m sentio_lab.ppo_masked --help``. Everything ``ppo.py`` does (rollout, GAE, truncation bootstrap,
clipped update, checkpoints, exact resume, non-finite stops, resume rules) is done the same way here, line for
line, so that the one difference is easy to see: the policy is a categorical over the *valid* actions only.

* The env's mask rules (:class:`sentio_lab.env.masks.MaskConfig`: ``--masks.long-only``, ``--masks.cooldown 5``, ...)
  say which position levels the next decision may take; ``env.action_masks()`` returns them after every reset
  and step (auto-resets included).
* Invalid logits are set to the dtype's most negative finite value (:class:`sentio_lab.agents.nets.MaskedCategorical`):
  invalid actions have probability 0, are never sampled, get no gradient, and the entropy bonus counts valid
  actions only. (Huang and Ontanon, 2022, "A Closer Look at Invalid Action Masking in Policy Gradient
  Algorithms": masking beats penalising invalid actions, and its gradient is the valid policy gradient.)
* The mask of every rollout step is stored in the buffer and reused in the update, so the old and the new
  log-probability of an action come from the same (masked) distribution: the PPO ratio is ``pi_new(a | s, m) /
  pi_old(a | s, m)``. Recomputing masks at update time could not work anyway (they depend on episode state).
* ``invalid_action`` is what the env does with an invalid action anyway ("nearest" valid level or "refuse"):
  the sampled actions are valid, so it only matters for other callers; it is recorded with the run.
* With every action valid (no rule on) the run is bit-identical to ``ppo.py`` for the same seed (tested): the
  masked distribution then has the same logits, samples, log-probabilities, entropy and gradients.
* Greedy evaluation applies the same masks (:mod:`sentio_lab.evaluation.episodes` builds the env from these arguments).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sentio_lab.agents import training
from sentio_lab.agents.arguments import Flat, RunArgs, SharedArgs
from sentio_lab.agents.nets import MLPActorCritic
from sentio_lab.agents.rollout import (
    bootstrap_truncated,
    compute_gae,
    kl_early_stop,
    ppo_objective,
    value_loss,
)
from sentio_lab.agents.training import TrainResult
from sentio_lab.env import TradingEnv
from sentio_lab.env.market import PreparedMarket
from sentio_lab.env.mask_inputs import MaskInputs, market_mask_inputs
from sentio_lab.env.masks import MaskConfig
from sentio_lab.run_loop import rollout_storage, run_cli, start_run

VARIANT = "ppo_masked"


@dataclass
class Args(SharedArgs):
    """PPO with invalid-action masking: ppo's argument groups, plus the mask rules (--masks.*) and what the env
    does with an invalid action."""

    run: Flat[RunArgs] = field(default_factory=lambda: RunArgs(exp_name=VARIANT))
    masks: MaskConfig = field(default_factory=MaskConfig)
    """mask rules over the env's state (sentio_lab.env.masks; every rule off by default: then this is ppo, bit for
    bit); given as --masks.<field>, e.g. --masks.long-only --masks.cooldown 5 --masks.max-abs-level 0.5"""
    invalid_action: Literal["nearest", "refuse"] = "nearest"
    """what the env does with an action its masks forbid: the "nearest" valid level, or "refuse" (an error); the
    policy never samples one, so this only matters to other callers of the same env"""

    def __post_init__(self) -> None:
        """Check ``invalid_action`` when built in code (the command line checks the choice itself)."""
        if self.invalid_action not in ("nearest", "refuse"):
            raise ValueError(f"--invalid-action must be 'nearest' or 'refuse', got {self.invalid_action!r}")


#: The hooks orchestration reads (evaluation, the experiment runner, Tune), shared by every variant.
feature_config = training.feature_config_from
cost_model = training.cost_model_from
market_for = training.market_from
resume_args = training.resume_args


def mask_config(args: Args) -> MaskConfig:
    """The mask rules these arguments ask for (evaluation builds its env with the same)."""
    return args.masks


def mask_inputs(config: MaskConfig, market: PreparedMarket) -> MaskInputs | None:
    """The series the mask rules read on ``market`` (GARCH fitted on training bars only; the regime column):
    :func:`sentio_lab.env.mask_inputs.market_mask_inputs`, shared with the evaluation so both see the same masks."""
    return market_mask_inputs(config, market)


def make_env(args: Args, market: PreparedMarket, range_name: str = "train") -> TradingEnv:
    """Training env with the mask rules: ``num_envs`` random windows inside the named range (on a fold market,
    inside its training segments only: :func:`sentio_lab.agents.training.training_env`)."""
    return training.training_env(
        args, market, range_name, masks=mask_config(args), invalid_action=args.invalid_action,
        mask_inputs=market_mask_inputs(mask_config(args), market, training=range_name == "train"),
    )


def build_agent(args: Args, obs_dim: int, num_actions: int) -> MLPActorCritic:
    """The actor-critic of this variant (ppo's; the masks act on its logits)."""
    agent = MLPActorCritic(obs_dim, num_actions, hidden=args.ppo.hidden_size, norm_obs=args.ppo.norm_obs)
    return training.init_towards_benchmark(agent, args)  # anchored: the untrained agent is the benchmark


def train(args: Args, *, market: PreparedMarket | None = None, env: Any | None = None) -> TrainResult:
    """Run masked PPO as ``args`` say; ``market`` / ``env`` may be given to reuse prepared data (tests, benchmarks).

    An ``env`` passed in needs ``obs_dim``, ``num_actions``, ``reset()``, ``step()`` and ``action_masks()`` like
    :class:`TradingEnv` (and ``state_dict()`` when checkpoints are written); without a market no
    checkpoint can be written. Raises :class:`~sentio_lab.agents.rollout.NonFiniteError` when a reward, value, loss or
    gradient is not finite, before any update or save uses it.
    """
    run = start_run(VARIANT, args, market=market, env=env, market_for=market_for, make_env=make_env)
    args, env, device, hp = run.args, run.env, run.device, run.args.ppo
    agent = build_agent(args, env.obs_dim, env.num_actions).to(device)
    optimizer = training.make_optimizer(agent, hp)  # Adam, AdamW with --weight-decay
    obs, actions, logprobs, rewards, dones, values = rollout_storage(hp.num_steps, hp.num_envs, env.obs_dim, device)
    # the valid actions of each stored decision: the update scores actions under the mask they were sampled with
    masks = torch.zeros((hp.num_steps, hp.num_envs, env.num_actions), dtype=torch.bool, device=device)
    state = run.restore(agent, optimizer)
    next_obs, next_done = state.next_obs, state.next_done

    def save(iteration: int) -> Path | None:
        state.next_done = next_done
        return run.save(iteration, agent, optimizer, state)

    iteration = state.start_iteration - 1
    for iteration in range(state.start_iteration, hp.num_iterations + 1):
        run.anneal_learning_rate(optimizer, iteration)

        # ---- rollout: num_steps steps of all num_envs episodes, each decision under the env's masks
        for step in range(hp.num_steps):
            state.global_step += hp.num_envs
            with torch.no_grad():
                if agent.obs_norm is not None:
                    agent.obs_norm.update(next_obs)
                obs[step] = norm_obs = agent.normalise(next_obs)
                dones[step] = next_done
                # the env's masks after its last reset / step (auto-resets included): this decision's valid actions;
                # their rows are checked once per rollout (below), not here: no host sync per step for that
                masks[step] = mask = env.action_masks().to(device)
                action, logprob, _, value = agent.get_action_and_value(norm_obs, mask=mask, mask_checked=True)
                values[step] = value
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, terminated, truncated, info = env.step(action)
            state.episode_return += reward
            reward = reward.to(torch.float32) * args.env.reward_scale
            done = terminated | truncated
            any_truncated, any_done = torch.stack([truncated.any(), done.any()]).tolist()  # one host sync
            if any_truncated:  # the window ended, the market did not: bootstrap V(where we would be next)
                with torch.no_grad():
                    final_value = agent.get_value(agent.normalise(info["final_obs"]))
                reward = bootstrap_truncated(reward, final_value, truncated, hp.gamma)
            rewards[step] = reward
            next_done = done.to(torch.float32)
            if any_done:
                run.end_episodes(state, done)

        # ---- every stored decision allowed some action (one check per rollout, before anything uses it)
        check_rollout_masks(masks)

        # ---- bootstrap value and GAE
        with torch.no_grad():
            next_value = agent.get_value(agent.normalise(next_obs))
            run.check_rollout(iteration, rewards=rewards, values=values, next_value=next_value)
            advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, hp.gamma, hp.gae_lambda)

        # ---- flatten the batch (the masks too)
        b_obs, b_masks = obs.reshape((-1, env.obs_dim)), masks.reshape((-1, env.num_actions))
        b_logprobs, b_actions, b_values = logprobs.reshape(-1), actions.reshape(-1), values.reshape(-1)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)

        # ---- optimise policy and value network
        clipfracs = []
        epochs_run = updates_run = 0
        for epoch in range(hp.update_epochs):
            for minibatch, mb_inds in run.minibatches():
                batch = (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values, b_masks)
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns, mb_values, mb_masks = (
                    x.index_select(0, mb_inds) for x in batch
                )
                # the rollout's masks, not today's: old and new log-probabilities of the same masked distribution
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions, mask=mb_masks,
                                                                              mask_checked=True)
                v_loss = value_loss(newvalue, mb_returns, mb_values, hp.clip_coef, hp.clip_vloss)
                # ratio, KL, clip fraction, advantage normalisation, clipped surrogate, entropy bonus (the entropy is
                # over the valid actions only: MaskedCategorical)
                objective = ppo_objective(newlogprob, mb_logprobs, mb_advantages, entropy, v_loss, hp)
                clipfracs.append(objective.clip_fraction)

                optimizer.zero_grad()
                objective.loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), hp.max_grad_norm)
                run.check_update(iteration, epoch, minibatch, objective.loss, grad_norm, **objective.parts())
                optimizer.step()
                updates_run += 1
            epochs_run += 1
            if kl_early_stop(objective.approx_kl, hp.target_kl):
                break

        losses = objective.losses()
        record = run.record(state, optimizer, losses, clipfracs, b_values, b_returns, epochs_run, updates_run)
        record["charts/masked_fraction"] = float((~masks).float().mean())
        # the env's per-rule counters (cumulative): how often each rule masked the chosen action, and bound at all
        for rule, count in _mask_counts(env, "mask_counts").items():
            record[f"masks/{rule}"] = count
        for rule, count in _mask_counts(env, "mask_binding").items():
            record[f"masks_binding/{rule}"] = count
        run.log(record, state)
        if run.stop_or_checkpoint(iteration, save):
            break

    return run.finish(iteration, save, agent, state)


def check_rollout_masks(masks: torch.Tensor) -> None:
    """Raise a ValueError naming the first rollout step and env (up to 10) whose stored mask ``(num_steps, num_envs,
    num_actions)`` allows no action; one host sync for the whole rollout. (:class:`TradingEnv` already refuses to
    hand out such a mask; an env passed in by a caller might not.)"""
    empty = ~masks.any(-1)
    if bool(empty.any()):
        where = [(int(s), int(e)) for s, e in torch.nonzero(empty)[:10].tolist()]
        raise ValueError(f"action masks: (rollout step, env) {where} (first 10) allow no action; an env's "
                         "action_masks() must leave at least one valid action in every row")


def _mask_counts(env: Any, kind: str) -> dict[str, float]:
    """``env.mask_counts`` (chosen actions a rule masked) or ``env.mask_binding`` (decisions in which it masked a
    level) as ``{rule: count}`` floats for logging (empty when the env keeps none)."""
    counts = getattr(env, kind, None) or {}
    return {str(k): float(torch.as_tensor(v).sum()) for k, v in dict(counts).items()}


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo_masked`` (``--help`` lists the arguments by group)."""
    run_cli(Args, train, prog="python -m sentio_lab.ppo_masked")


if __name__ == "__main__":
    main()
