"""PPO on the batched torch trading env: one readable file, modelled on CleanRL's ``ppo.py``.

Run ``python -m sentio_lab.ppo --help``. The data, features and env come from the shared modules; this
file holds the algorithm: rollout, GAE, the clipped-surrogate update, checkpoints and logging.
Differences from CleanRL, and why:

* the env is a tensor env (``TradingEnv``), so there are no gym vector wrappers: observation
  normalisation is a module inside the agent (its statistics are saved with the weights), rewards are
  log equity changes multiplied by ``reward_scale``;
* truncated episodes (end of a random window) are *not* terminal: the value of the final observation is
  bootstrapped into the last reward (``r += gamma * V(s_final)``), as Stable-Baselines3 does;
* the rollout maths (GAE, the truncation bootstrap, the losses, approximate KL) lives in
  :mod:`sentio_lab.agents.rollout`, shared with the other variants and tested there against hand-computed values;
* runs can stop on a wall-clock budget or an iteration count, and resume from a checkpoint bundle to the
  same final weights as an uninterrupted run (on the same device);
* a NaN / infinite reward, value, loss or gradient stops the run with :class:`~sentio_lab.agents.rollout.NonFiniteError`
  before the optimizer steps on it; the last good checkpoint on disk is left as it was;
* the scaffolding around the algorithm (start / resume, checkpoints, logging, budgets, the command line) is
  :mod:`sentio_lab.run_loop`, shared by every variant; the arguments are the groups of
  :mod:`sentio_lab.agents.arguments`.

Resuming (``--resume PATH``): the run-control arguments (:data:`sentio_lab.agents.arguments.RUN_CONTROL_FIELDS`:
budgets,
tracking, progress bar, where checkpoints go) come from the command line. Every other (experiment) argument comes
from the checkpoint, and one the caller set away from its default to a value other than the checkpoint's
is refused, naming each such field with both values. An argument left at its default is taken from the
checkpoint (an argument given explicitly *at* its default cannot be told apart, and is taken from the
checkpoint too). A checkpoint written on CUDA resumes on a CPU-only machine with a warning: it continues
the same run, but is bit-identical to an uninterrupted run only on the device it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sentio_lab.agents import training
from sentio_lab.agents.arguments import SharedArgs
from sentio_lab.agents.nets import MLPActorCritic
from sentio_lab.agents.rollout import (
    bootstrap_truncated,
    compute_gae,
    gather_minibatch,
    kl_early_stop,
    ppo_objective,
    value_loss,
)
from sentio_lab.agents.training import TrainResult
from sentio_lab.env import TradingEnv
from sentio_lab.env.market import PreparedMarket
from sentio_lab.run_loop import rollout_storage, run_cli, start_run
from sentio_lab.scale import distributed

VARIANT = "ppo"


@dataclass
class Args(SharedArgs):
    """PPO on the batched torch trading env (CleanRL style). The arguments are the shared groups (data, features,
    env and costs, PPO, run control, tracking; sentio_lab/agents/arguments.py): ppo adds none of its own."""


#: The hooks orchestration reads (evaluation, the experiment runner, Tune), shared by every variant.
feature_config = training.feature_config_from
cost_model = training.cost_model_from
market_for = training.market_from
resume_args = training.resume_args


def make_env(args: Args, market: PreparedMarket, range_name: str = "train") -> TradingEnv:
    """Training env: ``num_envs`` random windows inside the named range (on a fold market, inside its training
    segments only: :func:`sentio_lab.agents.training.training_env`)."""
    return training.training_env(args, market, range_name)


def build_agent(args: Args, obs_dim: int, num_actions: int) -> MLPActorCritic:
    """The actor-critic of this variant (evaluation rebuilds it from a checkpoint's args)."""
    agent = MLPActorCritic(obs_dim, num_actions, hidden=args.ppo.hidden_size, norm_obs=args.ppo.norm_obs)
    return training.init_towards_benchmark(agent, args)  # anchored: the untrained agent is the benchmark


def train(args: Args, *, market: PreparedMarket | None = None, env: Any | None = None) -> TrainResult:
    """Run PPO as ``args`` say; ``market`` / ``env`` may be given to reuse prepared data (tests, benchmarks).

    An ``env`` passed in needs ``obs_dim``, ``num_actions``, ``reset()`` and ``step()`` like
    :class:`TradingEnv` (and ``state_dict()`` when checkpoints are written); without a market no
    checkpoint can be written. Raises :class:`~sentio_lab.agents.rollout.NonFiniteError` when a reward, value, loss or
    gradient is not finite, before any update or save uses it.
    """
    # resume or start (sentio_lab.run_loop): arguments, seeds, device, market, env; under torchrun this rank
    # steps n_envs = num_envs / world_size of the episodes, and every distributed.* call below is the identity
    # in a world of one.
    run = start_run(VARIANT, args, market=market, env=env, market_for=market_for, make_env=make_env,
                    distributed_ok=True)
    args, env, device, ctx, n_envs = run.args, run.env, run.device, run.ctx, run.n_envs
    hp = args.ppo
    agent = build_agent(args, env.obs_dim, env.num_actions).to(device)
    optimizer = training.make_optimizer(agent, hp)  # Adam, AdamW with --weight-decay
    obs, actions, logprobs, rewards, dones, values = rollout_storage(hp.num_steps, n_envs, env.obs_dim, device)
    state = run.restore(agent, optimizer)
    next_obs, next_done = state.next_obs, state.next_done

    def save(iteration: int) -> Path | None:
        state.next_done = next_done
        return run.save(iteration, agent, optimizer, state)

    iteration = state.start_iteration - 1
    for iteration in range(state.start_iteration, hp.num_iterations + 1):
        run.anneal_learning_rate(optimizer, iteration)

        # ---- rollout: num_steps steps of all num_envs episodes
        for step in range(hp.num_steps):
            state.global_step += hp.num_envs
            with torch.no_grad():
                if agent.obs_norm is not None:  # with every rank's observations: the same statistics everywhere
                    agent.obs_norm.update(distributed.all_gather_rows(next_obs, ctx))
                norm_obs = agent.normalise(next_obs)
                obs[step] = norm_obs
                dones[step] = next_done
                action, logprob, _, value = agent.get_action_and_value(norm_obs)
                values[step] = value
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, terminated, truncated, info = env.step(action)
            state.episode_return += reward
            reward = reward.to(torch.float32) * args.env.reward_scale
            if bool(truncated.any()):
                # The window ended, the market did not: bootstrap with the value of where we would be next.
                with torch.no_grad():
                    final_value = agent.get_value(agent.normalise(info["final_obs"]))
                reward = bootstrap_truncated(reward, final_value, truncated, hp.gamma)
            rewards[step] = reward
            done = terminated | truncated
            next_done = done.to(torch.float32)
            run.end_episodes(state, done)

        # ---- bootstrap value and GAE
        with torch.no_grad():
            next_value = agent.get_value(agent.normalise(next_obs))
            run.check_rollout(iteration, rewards=rewards, values=values, next_value=next_value)
            advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, hp.gamma, hp.gae_lambda)

        # ---- flatten the batch
        b_obs = obs.reshape((-1, env.obs_dim))
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # ---- optimise policy and value network
        clipfracs = []
        epochs_run = updates_run = 0
        for epoch in range(hp.update_epochs):
            for minibatch, mb_inds in run.minibatches():
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns, mb_values = gather_minibatch(
                    (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values), mb_inds)
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions)
                v_loss = value_loss(newvalue, mb_returns, mb_values, hp.clip_coef, hp.clip_vloss)
                # ratio, KL, clip fraction, advantage normalisation, clipped surrogate, entropy bonus
                objective = ppo_objective(newlogprob, mb_logprobs, mb_advantages, entropy, v_loss, hp)
                clipfracs.append(objective.clip_fraction)

                optimizer.zero_grad()
                objective.loss.backward()
                distributed.average_gradients(agent, ctx)  # the mean over ranks, before clipping (as DDP)
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), hp.max_grad_norm)
                run.check_update(iteration, epoch, minibatch, objective.loss, grad_norm, **objective.parts())
                optimizer.step()
                updates_run += 1
            epochs_run += 1
            if kl_early_stop(distributed.mean_over_ranks(objective.approx_kl, ctx), hp.target_kl):  # all stop together
                break

        losses = objective.losses()
        run.log(run.record(state, optimizer, losses, clipfracs, b_values, b_returns, epochs_run, updates_run), state)
        if run.stop_or_checkpoint(iteration, save):
            break

    return run.finish(iteration, save, agent, state)


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo`` (``--help`` lists the arguments by group)."""
    run_cli(Args, train, prog="python -m sentio_lab.ppo", distributed_ok=True)


if __name__ == "__main__":
    main()
