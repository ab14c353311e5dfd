"""Risk-aware PPO on the batched torch trading env: one readable file, modelled on ``ppo.py``.

Run ``python -m sentio_lab.ppo_risk --help``. Everything ``ppo.py`` does (rollout, GAE, truncation bootstrap,
clipped surrogate, checkpoints, exact resume, non-finite guards) is done here the same way; on top of it:

* **distributional critic** (:mod:`sentio_lab.agents.nets.quantile`): ``num_quantiles`` quantile heads trained with
  the quantile Huber loss (Dabney et al., 2018). Each head regresses on per-quantile lambda-returns
  ``R^j_t = r_t + gamma (1 - d) ((1 - lambda) theta_j(s_{t+1}) + lambda R^j_{t+1})`` (with lambda = 0 this is
  QR-DQN's target ``r + gamma theta_j(s')``), every head against every target sample. The scalar value GAE
  uses is a risk distortion of the quantiles (``--risk neutral``: their mean; ``--risk cvar``: CVaR_alpha, the
  mean of the lowest ``cvar_alpha`` fraction). A truncated episode is bootstrapped as in ``ppo``: the reward
  gets ``gamma V(final obs)`` with the *distorted* V, each quantile target ``gamma theta_j(final obs)``.
  The CVaR advantage is a risk-shaped advantage (the actor prefers actions whose worst-tail value is high);
  it is not an exact CVaR policy gradient of the episode return, and the report says so.
* **drawdown constraint** (``--cost-limit``; Stooke, Achiam and Abbeel, 2020): the env runs with
  ``drawdown_obs`` (:func:`env_options`: ``D_t, M_t`` join the observation, ``info["drawdown_cost"]`` is
  ``M_{t+1} - M_t``, summing to the episode's maximum drawdown). A cost critic learns the cost to go; its
  advantage ``A_c`` comes from its own GAE on ``cost_scale * cost``, *with the reward's gamma and lambda*:
  episodes are random windows and the observation does not say how many steps a window has left, so an
  undiscounted cost to go would not be a function of the observation, while a discounted one is (and the
  same horizon keeps ``A_r`` and ``A_c`` comparable). Truncated windows bootstrap the cost like the reward
  (the market, and the drawdown, go on). What the constraint bounds is measured exactly and undiscounted:
  the mean maximum drawdown of the episodes that finished in the rollout; a
  :class:`~sentio_lab.agents.constraints.PIDLagrangian` turns its excess over the limit into the multiplier lambda
  (held as it was when no episode finished in an iteration), and the actor's advantage is
  ``(A_r - lambda A_c) / (1 + lambda)`` (both normalised per minibatch first when ``norm_adv``).
* **adaptive KL penalty** (``--kl-penalty``, PPO paper): ``+ beta KL(old || new)`` in the loss, beta doubled /
  halved after each update when the full-batch KL is above 1.5 x / below 1 / 1.5 x ``kl_target``
  (:class:`~sentio_lab.agents.constraints.AdaptiveKL`); and **trust-region early stopping** (``--target-kl``): the
  epoch loop stops once the approximate KL exceeds it (:func:`sentio_lab.agents.rollout.kl_early_stop`).
* a per-iteration history (``history.csv`` beside the checkpoint, and in the checkpoint): lambda and its P, I
  and D terms, the measured episode drawdown against the limit, the cost value, beta and the approximate KL.

The multiplier, the PID state and beta are saved in the checkpoint; a resumed run continues bit-identically.
With one quantile, ``--risk neutral``, no constraint, no KL penalty and ``kappa`` a power of two larger than
every TD error, ``vf_coef = 2 kappa`` times ppo's gives *exactly* ppo's update on the same batch (the quantile
Huber loss at tau = 0.5 is ``u^2 / (4 kappa)`` there; powers of two scale floats exactly): tested.
The quantile loss is the mean over the quantile heads, not Dabney's sum: the same minimiser, but the loss
(and its share of the global gradient-norm clip, which actor and critic share) does not grow with N.

``--clip-vloss`` is off by default here (ppo's default is on): the clipped branch (per head, the max of the
losses of the new quantiles and of the rollout's quantiles moved by at most ``clip_coef``) doubles the
(batch, N, N) quantile loss that dominates the update, and value clipping did not help in Andrychowicz et al.
(2021, "What matters in on-policy RL"). ``--vf-coef`` weighs the quantile loss (ppo's 0.5 MSE equals it at one
quantile with ``vf_coef`` 2 kappa times ppo's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sentio_lab.agents import training
from sentio_lab.agents.arguments import Flat, PPOArgs, RiskCriticArgs, RunArgs, SharedArgs
from sentio_lab.agents.constraints import AdaptiveKL, PIDLagrangian
from sentio_lab.agents.nets.quantile import QuantileActorCritic, quantile_huber
from sentio_lab.agents.rollout import (
    approx_kl,
    bootstrap_truncated,
    clip_fraction,
    compute_gae,
    kl_early_stop,
    normalise_advantages,
    policy_loss,
    value_loss,
)
from sentio_lab.env import TradingEnv
from sentio_lab.env.market import PreparedMarket
from sentio_lab.run_loop import rollout_storage, run_cli, start_run

VARIANT = "ppo_risk"


@dataclass
class Args(SharedArgs):
    """Risk-aware PPO: ppo's argument groups (value clipping off by default), plus the distributional critic, the
    drawdown constraint and the adaptive KL penalty."""

    ppo: Flat[PPOArgs] = field(default_factory=lambda: PPOArgs(clip_vloss=False))
    run: Flat[RunArgs] = field(default_factory=lambda: RunArgs(exp_name=VARIANT))
    risk_critic: Flat[RiskCriticArgs] = field(default_factory=lambda: RiskCriticArgs(num_quantiles=32))
    """the distributional critic and the drawdown constraint (the group ppo_portfolio shares); here the critic is
    always distributional, so --num-quantiles defaults to 32 and None is refused"""
    kl_penalty: bool = False
    """add an adaptive KL penalty beta KL(old || new) to the loss (PPO paper)"""
    kl_coef: float = 0.2
    """initial beta of the KL penalty"""
    kl_target: float = 0.01
    """KL the adaptive beta steers towards (x2 above 1.5 target, /2 below target / 1.5)"""


@dataclass
class TrainResult(training.TrainResult):
    """:class:`sentio_lab.agents.training.TrainResult` plus the constraint's controllers; ``history`` holds this
    invocation's iterations (the whole run's are in ``history.csv`` and the checkpoint)."""

    lagrangian: PIDLagrangian | None = None
    kl_control: AdaptiveKL | None = None


#: The hooks orchestration reads (evaluation, the experiment runner, Tune), shared by every variant.
feature_config = training.feature_config_from
cost_model = training.cost_model_from
market_for = training.market_from
resume_args = training.resume_args


def env_options(args: Args, market: PreparedMarket) -> dict[str, Any]:
    """Extra env keywords of this variant (for training, evaluation and the runner): the drawdown state
    ``(D_t, M_t)`` joins the observation and the env reports the per-step drawdown cost."""
    return {"drawdown_obs": True}


def make_env(args: Args, market: PreparedMarket, range_name: str = "train") -> TradingEnv:
    """Training env: ``num_envs`` random windows inside the named range, with the drawdown state.

    On a fold market (purged walk-forward / CPCV) episodes are drawn from the fold's training segments only.
    """
    return training.training_env(args, market, range_name, **env_options(args, market))


def check_args(args: Args) -> None:
    """Reject settings this variant cannot run, naming the flag (before any data is loaded)."""
    if args.risk_critic.num_quantiles is None:
        raise ValueError("ppo_risk's critic is distributional: set --num-quantiles to an integer >= 1 (the scalar "
                         "critic is ppo's)")


def build_agent(args: Args, obs_dim: int, num_actions: int) -> QuantileActorCritic:
    """The actor-critic of this variant (evaluation rebuilds it from a checkpoint's args)."""
    check_args(args)
    critic = args.risk_critic
    agent = QuantileActorCritic(
        obs_dim, num_actions, hidden=args.ppo.hidden_size, norm_obs=args.ppo.norm_obs,
        num_quantiles=critic.num_quantiles, risk=critic.risk, cvar_alpha=critic.cvar_alpha,
        cost_critic=critic.cost_limit is not None,
    )
    return training.init_towards_benchmark(agent, args)  # anchored: the untrained agent is the benchmark


def history_path(checkpoint_path: Path) -> Path:
    """Where a run's per-iteration history is written: ``history.csv`` beside its checkpoint."""
    return checkpoint_path.with_name("history.csv")


def train(args: Args, *, market: PreparedMarket | None = None, env: Any | None = None) -> TrainResult:
    """Run risk-aware PPO as ``args`` say; ``market`` / ``env`` may be given to reuse prepared data.

    An ``env`` passed in needs ``obs_dim``, ``num_actions``, ``reset()`` and ``step()`` like
    :class:`TradingEnv` and, with ``cost_limit``, ``info["drawdown_cost"]`` (build it with
    ``drawdown_obs=True``); without a market no checkpoint is written. Raises
    :class:`~sentio_lab.agents.rollout.NonFiniteError` when a reward, cost, value, loss or gradient is not finite,
    before
    any update or save uses it.
    """
    check_args(args)
    run = start_run(VARIANT, args, market=market, env=env, market_for=market_for, make_env=make_env)
    args, env, device, hp, rc = run.args, run.env, run.device, run.args.ppo, run.args.risk_critic
    constrained = rc.cost_limit is not None
    agent = build_agent(args, env.obs_dim, env.num_actions).to(device)
    optimizer = training.make_optimizer(agent, hp)  # Adam, AdamW with --weight-decay
    lagrangian = PIDLagrangian(rc.cost_limit, rc.pid_kp, rc.pid_ki, rc.pid_kd) if constrained else None
    kl_control = AdaptiveKL(args.kl_coef, args.kl_target) if args.kl_penalty else None

    # Rollout storage: (step, env) as in ppo, plus a quantile axis for the critic, and the costs
    n_q, shape = rc.num_quantiles, (hp.num_steps, hp.num_envs)
    obs, actions, logprobs, rewards, dones, values = rollout_storage(*shape, env.obs_dim, device)
    rewards_q, quantiles = torch.zeros((*shape, n_q), device=device), torch.zeros((*shape, n_q), device=device)
    costs, cost_values = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    episode_cost = torch.zeros(hp.num_envs, dtype=torch.float64, device=device)  # sums to the max drawdown
    full_history: list[dict[str, float]] = []  # every iteration of the run, across resumptions
    state = run.restore(agent, optimizer)
    next_obs, next_done = state.next_obs, state.next_done
    if run.bundle is not None:
        extra = run.bundle["extra"]
        episode_cost = extra["episode_cost"].to(device)
        full_history = [dict(record) for record in extra["history"]]
        if lagrangian is not None:
            lagrangian.load_state_dict(extra["lagrangian"])
        if kl_control is not None:
            kl_control.load_state_dict(extra["kl_control"])

    def save(iteration: int) -> Path | None:
        state.next_done = next_done
        path = run.save(iteration, agent, optimizer, state, extra={
            "episode_cost": episode_cost.cpu(), "history": [dict(record) for record in full_history],
            "lagrangian": None if lagrangian is None else lagrangian.state_dict(),
            "kl_control": None if kl_control is None else kl_control.state_dict()})
        if path is not None:
            pd.DataFrame(full_history).to_csv(history_path(path), index=False)
        return path

    iteration = state.start_iteration - 1
    for iteration in range(state.start_iteration, hp.num_iterations + 1):
        run.anneal_learning_rate(optimizer, iteration)

        # ---- rollout: num_steps steps of all num_envs episodes, with the drawdown cost of each step
        finished_drawdowns: list[float] = []  # max drawdown of each episode that ended in this rollout
        for step in range(hp.num_steps):
            state.global_step += hp.num_envs
            with torch.no_grad():
                if agent.obs_norm is not None:
                    agent.obs_norm.update(next_obs)
                obs[step] = norm_obs = agent.normalise(next_obs)
                dones[step] = next_done
                action, logprob, _, step_quantiles = agent.get_action_and_value(norm_obs)
                quantiles[step] = step_quantiles
                values[step] = agent.value_of(step_quantiles)
                if constrained:
                    cost_values[step] = agent.get_cost_value(norm_obs)
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, terminated, truncated, info = env.step(action)
            state.episode_return += reward
            reward = reward.to(torch.float32) * args.env.reward_scale
            step_cost = info.get("drawdown_cost")
            if step_cost is not None:
                episode_cost += step_cost
            elif constrained:
                raise ValueError("--cost-limit needs an env built with drawdown_obs=True (info['drawdown_cost'])")
            cost = step_cost.to(torch.float32) * rc.cost_scale if constrained else torch.zeros_like(reward)
            reward_q = reward.unsqueeze(-1).expand(-1, n_q)
            if bool(truncated.any()):
                # The window ended, the market did not: bootstrap the distorted value, each quantile, the cost.
                with torch.no_grad():
                    final_obs = agent.normalise(info["final_obs"])
                    final_quantiles = agent.get_quantiles(final_obs)
                    reward_q = reward_q + hp.gamma * final_quantiles * truncated.unsqueeze(-1)
                    reward = bootstrap_truncated(reward, agent.value_of(final_quantiles), truncated, hp.gamma)
                    if constrained:
                        cost = bootstrap_truncated(cost, agent.get_cost_value(final_obs), truncated, hp.gamma)
            rewards[step], rewards_q[step], costs[step] = reward, reward_q, cost
            done = terminated | truncated
            next_done = done.to(torch.float32)
            if step_cost is not None and bool(done.any()):  # an env without the drawdown state has nothing to measure
                finished_drawdowns.extend(episode_cost[done].tolist())
                episode_cost = torch.where(done, 0.0, episode_cost)
            run.end_episodes(state, done)

        # ---- the multiplier: one PID step on this rollout's measured episode drawdown (held when none ended)
        mean_drawdown = float(np.mean(finished_drawdowns)) if finished_drawdowns else float("nan")
        multiplier = lagrangian.update(mean_drawdown if finished_drawdowns else None) if lagrangian else 0.0

        # ---- bootstrap value and GAE: the distorted value, each quantile (targets), the cost
        with torch.no_grad():
            next_norm = agent.normalise(next_obs)
            next_quantiles = agent.get_quantiles(next_norm)
            next_value = agent.value_of(next_quantiles)
            next_cost_value = agent.get_cost_value(next_norm) if constrained else torch.zeros_like(next_value)
            run.check_rollout(iteration, rewards=rewards, values=values, next_value=next_value, quantiles=quantiles,
                              costs=costs, cost_values=cost_values)
            gamma, gae_lambda = hp.gamma, hp.gae_lambda
            advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda)
            # per-quantile lambda-returns: (T, N, Q) targets; dones broadcast over the quantile axis
            _, returns_q = compute_gae(rewards_q, quantiles, dones.unsqueeze(-1), next_quantiles,
                                       next_done.unsqueeze(-1), gamma, gae_lambda)
            if constrained:
                cost_advantages, cost_returns = compute_gae(costs, cost_values, dones, next_cost_value, next_done,
                                                            gamma, gae_lambda)

        # ---- flatten the batch
        b_obs, b_logprobs, b_actions = obs.reshape((-1, env.obs_dim)), logprobs.reshape(-1), actions.reshape(-1)
        b_returns, b_values = returns.reshape(-1), values.reshape(-1)
        batch = [b_obs, b_actions, b_logprobs, advantages.reshape(-1), quantiles.reshape((-1, n_q)),
                 returns_q.reshape((-1, n_q))]
        if constrained:
            batch += [cost_advantages.reshape(-1), cost_returns.reshape(-1), cost_values.reshape(-1)]

        # ---- optimise policy, quantile critic and cost critic
        clipfracs = []
        epochs_run = updates_run = 0
        c_loss = kl_penalty = torch.zeros((), device=device)
        beta = kl_control.coef if kl_control is not None else 0.0
        for epoch in range(hp.update_epochs):
            for minibatch, mb_inds in run.minibatches():
                mb = [x.index_select(0, mb_inds) for x in batch]
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_quantiles, mb_returns_q = mb[:6]
                _, newlogprob, entropy, newquantiles = agent.get_action_and_value(mb_obs, mb_actions)
                logratio = newlogprob - mb_logprobs
                ratio = logratio.exp()
                with torch.no_grad():
                    old_kl, kl = approx_kl(logratio, ratio)
                    clipfracs.append(clip_fraction(ratio, hp.clip_coef).item())

                if hp.norm_adv:
                    mb_advantages = normalise_advantages(mb_advantages)
                if constrained:
                    mb_cost_advantages, mb_cost_returns, mb_cost_values = mb[6:]
                    if hp.norm_adv:
                        mb_cost_advantages = normalise_advantages(mb_cost_advantages)
                    # Stooke et al.: (A_r - lambda A_c) / (1 + lambda) keeps the step size bounded as lambda grows
                    mb_advantages = (mb_advantages - multiplier * mb_cost_advantages) / (1.0 + multiplier)
                pg_loss = policy_loss(mb_advantages, ratio, hp.clip_coef)
                v_loss = quantile_huber(newquantiles, mb_returns_q, agent.taus, rc.kappa)
                if hp.clip_vloss:  # ppo's pessimistic clip, per quantile head around the rollout's quantiles
                    clipped = mb_quantiles + torch.clamp(newquantiles - mb_quantiles, -hp.clip_coef, hp.clip_coef)
                    v_loss = torch.max(v_loss, quantile_huber(clipped, mb_returns_q, agent.taus, rc.kappa))
                v_loss = v_loss.mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - hp.ent_coef * entropy_loss + v_loss * hp.vf_coef
                if constrained:
                    new_cost_values = agent.get_cost_value(mb_obs)
                    c_loss = value_loss(new_cost_values, mb_cost_returns, mb_cost_values, hp.clip_coef, hp.clip_vloss)
                    loss = loss + c_loss * rc.cost_vf_coef
                if kl_control is not None:
                    kl_penalty = ((ratio - 1) - logratio).mean()  # the unbiased, non-negative estimator, with grad
                    loss = loss + beta * kl_penalty

                optimizer.zero_grad()
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), hp.max_grad_norm)
                run.check_update(iteration, epoch, minibatch, loss, grad_norm, policy_loss=pg_loss,
                                 value_loss=v_loss, cost_value_loss=c_loss, entropy=entropy_loss)
                optimizer.step()
                updates_run += 1
            epochs_run += 1
            if kl_early_stop(kl, hp.target_kl):
                break

        batch_kl = float("nan")
        if kl_control is not None:
            # the PPO paper's rule reads the KL of the whole update: old policy vs new, over the whole batch
            with torch.no_grad():
                _, new_logprobs, _, _ = agent.get_action_and_value(b_obs, b_actions)
                logratio = new_logprobs - b_logprobs
                batch_kl = approx_kl(logratio, logratio.exp())[1].item()
            kl_control.update(batch_kl)

        pid = lagrangian.state_dict() if lagrangian is not None else {}
        losses = {"value_loss": v_loss, "cost_value_loss": c_loss, "policy_loss": pg_loss, "entropy": entropy_loss,
                  "old_approx_kl": old_kl, "approx_kl": kl, "kl_penalty": kl_penalty}
        record = {"iteration": iteration,
                  **run.record(state, optimizer, losses, clipfracs, b_values, b_returns, epochs_run, updates_run),
                  "losses/batch_kl": batch_kl,
                  "losses/kl_coef": beta,
                  "losses/kl_coef_next": kl_control.coef if kl_control is not None else 0.0,
                  "risk/episode_max_drawdown": mean_drawdown,
                  "risk/episodes": len(finished_drawdowns),
                  "risk/cost_limit": rc.cost_limit if constrained else float("nan"),
                  "risk/lambda": multiplier,
                  **{f"risk/pid_{name}": pid.get(key, float("nan")) for name, key in
                     (("error", "error"), ("p", "p_term"), ("i", "i_term"), ("d", "d_term"),
                      ("integral", "integral"))},
                  "risk/cost_value": cost_values.mean().item() / rc.cost_scale if constrained else float("nan"),
                  "risk/value_tail_gap": (quantiles.mean(-1) - values).mean().item()}
        full_history.append(record)
        postfix = {"mdd": f"{mean_drawdown:.3f}"} if finished_drawdowns else {}
        if constrained:
            postfix["lambda"] = f"{multiplier:.2f}"
        run.log(record, state, postfix)
        if run.stop_or_checkpoint(iteration, save):
            break

    return run.finish(iteration, save, agent, state, result_type=TrainResult, lagrangian=lagrangian,
                      kl_control=kl_control)


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo_risk`` (``--help`` lists the arguments by group)."""
    run_cli(Args, train, prog="python -m sentio_lab.ppo_risk")


if __name__ == "__main__":
    main()
