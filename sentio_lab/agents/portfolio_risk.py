"""The risk-aware critic of ``ppo_portfolio``: a quantile critic with CVaR, a drawdown constraint with a PID multiplier.

``ppo_risk`` does this for one asset inside its own file; the portfolio variant keeps its file to the algorithm and
asks a :class:`PortfolioRisk` for the extra storage, targets, losses and controller state (``--num-quantiles``,
``--risk``, ``--cvar-alpha``, ``--cost-limit``: :class:`~sentio_lab.agents.arguments.RiskCriticArgs`). The methods,
the same as ``ppo_risk``'s (its module doc has the references and the reasons):

* **quantile critic**: N heads regress on per-quantile lambda-returns
  ``R^j_t = r_t + gamma (1 - d) ((1 - lambda) theta_j(s_{t+1}) + lambda R^j_{t+1})`` with the quantile Huber loss
  (:func:`~sentio_lab.agents.nets.quantile.quantile_huber`; with ``--clip-vloss`` per head, around the rollout's
  quantiles); the scalar value GAE and the truncation bootstrap use is their risk distortion (``--risk cvar``:
  CVaR_alpha, a risk-shaped advantage, not an exact CVaR policy gradient). A truncated window bootstraps each
  quantile target with ``gamma theta_j(final obs)``.
* **drawdown constraint** (``--cost-limit``): the per-step cost is the rise of the episode's running maximum drawdown
  ``M_{t+1} - M_t`` (``M`` the largest ``1 - equity / peak`` so far), computed here from ``info["equity"]``, so the
  costs of an episode sum to its maximum drawdown. A cost critic learns the discounted cost to go (the reward's gamma
  and lambda; truncated windows bootstrap it); a :class:`~sentio_lab.agents.constraints.PIDLagrangian` turns the
  mean maximum drawdown of the episodes that finished in the rollout (measured exactly, undiscounted) into the
  multiplier lambda (held when none finished), and the actor's advantage is ``(A_r - lambda A_c) / (1 + lambda)``,
  each normalised per minibatch first when ``--norm-adv``.

Not as ``ppo_risk``: the portfolio observation carries no drawdown state (``D_t``, ``M_t``), so the cost critic's
cost to go averages over the running peak it cannot see (the multiplier and the measured drawdown are exact; the
cost advantage is a noisier baseline-corrected signal). The state (running peaks, PID) is saved with the checkpoint
(:meth:`PortfolioRisk.state_dict`): a resumed run continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from sentio_lab.agents.arguments import RiskCriticArgs
from sentio_lab.agents.constraints import PIDLagrangian
from sentio_lab.agents.nets.quantile import quantile_huber
from sentio_lab.agents.rollout import bootstrap_truncated, compute_gae, normalise_advantages, value_loss


def risk_aware(risk: RiskCriticArgs) -> bool:
    """Whether the flags ask for anything beyond the scalar critic (a quantile critic or a constraint)."""
    return risk.num_quantiles is not None or risk.cost_limit is not None


def check_risk_args(risk: RiskCriticArgs) -> None:
    """Reject risk settings that would not act, naming the flag."""
    if risk.num_quantiles is None and risk.risk != "neutral":
        raise ValueError(f"--risk {risk.risk} needs a quantile critic: add --num-quantiles (e.g. 32)")
    if risk.num_quantiles is not None and risk.num_quantiles < 1:
        raise ValueError(f"--num-quantiles {risk.num_quantiles} must be >= 1")
    if risk.cost_limit is not None and not risk.cost_limit >= 0:
        raise ValueError(f"--cost-limit {risk.cost_limit} must be a drawdown fraction >= 0")


class DrawdownCost:
    """Per-env running peak and maximum drawdown of the episodes; :meth:`step` returns each step's cost (module doc)."""

    def __init__(self, num_envs: int, device: torch.device) -> None:
        """Every episode starts at its peak (equity 1), with no drawdown."""
        self.peak = torch.ones(num_envs, dtype=torch.float64, device=device)
        self.max_drawdown = torch.zeros(num_envs, dtype=torch.float64, device=device)

    def step(self, equity: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cost ``M_{t+1} - M_t`` of a step to ``equity`` (float64 ``(N,)``) and each env's maximum drawdown so
        far (the finished episodes' final one where ``done``); then the finished episodes restart at their peak."""
        peak = torch.maximum(self.peak, equity)
        worst = torch.maximum(self.max_drawdown, 1.0 - equity / peak)
        cost = worst - self.max_drawdown
        self.peak, self.max_drawdown = torch.where(done, 1.0, peak), torch.where(done, 0.0, worst)
        return cost, worst

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running peaks and drawdowns, for resuming."""
        return {"peak": self.peak.cpu().clone(), "max_drawdown": self.max_drawdown.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output."""
        self.peak = state["peak"].to(self.peak.device).clone()
        self.max_drawdown = state["max_drawdown"].to(self.max_drawdown.device).clone()


class PortfolioRisk:
    """Storage, targets, losses and controller of the risk-aware critic for one run (module doc)."""

    def __init__(self, risk: RiskCriticArgs, num_steps: int, num_envs: int, device: torch.device) -> None:
        """Rollout storage of ``(num_steps, num_envs)`` plus the quantile axis; the PID with ``--cost-limit``."""
        check_risk_args(risk)
        self.args, self.quantile, self.constrained = risk, risk.num_quantiles is not None, risk.cost_limit is not None
        shape, n_q = (num_steps, num_envs), risk.num_quantiles or 1
        self.quantiles = torch.zeros((*shape, n_q), device=device)
        self.rewards_q = torch.zeros((*shape, n_q), device=device)
        self.costs, self.cost_values = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        self.drawdown = DrawdownCost(num_envs, device)
        self.lagrangian = (PIDLagrangian(risk.cost_limit, risk.pid_kp, risk.pid_ki, risk.pid_kd)
                           if self.constrained else None)
        self.multiplier, self.finished = 0.0, []
        self.batch: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------- rollout
    def value(self, agent: Any, step: int, critic_out: torch.Tensor, norm_obs: torch.Tensor) -> torch.Tensor:
        """Store the step's quantiles (and cost value); return the scalar value GAE uses (under ``no_grad``)."""
        if self.quantile:
            self.quantiles[step] = critic_out
        if self.constrained:
            self.cost_values[step] = agent.get_cost_value(norm_obs)
        return agent.value_of(critic_out)

    def observe(self, agent: Any, step: int, reward: torch.Tensor, info: dict, truncated: torch.Tensor,
                gamma: float) -> None:
        """Store the step's per-quantile reward and drawdown cost (``reward`` scaled, not yet bootstrapped), each
        bootstrapped on truncated windows; keep the maximum drawdown of each episode that ended."""
        cost, worst = self.drawdown.step(info["equity"].to(torch.float64), info["done"])
        if bool(info["done"].any()):
            self.finished.extend(worst[info["done"]].tolist())
        reward_q = reward.unsqueeze(-1).expand_as(self.rewards_q[step])
        cost = cost.to(torch.float32) * self.args.cost_scale
        if bool(truncated.any()) and (self.quantile or self.constrained):
            with torch.no_grad():
                final_obs = agent.normalise(info["final_obs"])
                if self.quantile:
                    reward_q = reward_q + gamma * agent.get_quantiles(final_obs) * truncated.unsqueeze(-1)
                if self.constrained:
                    cost = bootstrap_truncated(cost, agent.get_cost_value(final_obs), truncated, gamma)
        self.rewards_q[step], self.costs[step] = reward_q, cost

    def end_rollout(self) -> dict[str, float]:
        """One PID step on the rollout's mean finished-episode drawdown (held when none finished); its record."""
        measured = sum(self.finished) / len(self.finished) if self.finished else float("nan")
        if self.lagrangian is not None:
            self.multiplier = self.lagrangian.update(measured if self.finished else None)
        record = {"risk/episode_max_drawdown": measured, "risk/episodes": len(self.finished),
                  "risk/lambda": self.multiplier,
                  "risk/cost_limit": self.args.cost_limit if self.constrained else math.nan}
        self.finished = []
        return record

    def targets(self, agent: Any, next_norm: torch.Tensor, dones: torch.Tensor, next_done: torch.Tensor,
                gamma: float, gae_lambda: float) -> None:
        """The per-quantile lambda-returns and the cost advantages / returns, flattened for the minibatches."""
        with torch.no_grad():
            if self.quantile:
                _, returns_q = compute_gae(self.rewards_q, self.quantiles, dones.unsqueeze(-1),
                                           agent.get_quantiles(next_norm), next_done.unsqueeze(-1), gamma,
                                           gae_lambda)
                n_q = self.quantiles.shape[-1]
                self.batch.update(quantiles=self.quantiles.reshape(-1, n_q), returns_q=returns_q.reshape(-1, n_q))
            if self.constrained:
                advantages, returns = compute_gae(self.costs, self.cost_values, dones, agent.get_cost_value(next_norm),
                                                  next_done, gamma, gae_lambda)
                self.batch.update(cost_advantages=advantages.reshape(-1), cost_returns=returns.reshape(-1),
                                  cost_values=self.cost_values.reshape(-1))

    # ------------------------------------------------------------------------------------------- update
    def advantages(self, advantages: torch.Tensor, mb_inds: torch.Tensor, hp: Any) -> tuple[torch.Tensor, Any]:
        """The actor's minibatch advantages and the PPO group to score them with: unchanged without a constraint;
        else ``(A_r - lambda A_c) / (1 + lambda)`` of the normalised ones, with ``norm_adv`` then off (done here)."""
        if not self.constrained:
            return advantages, hp
        cost_advantages = self.batch["cost_advantages"].index_select(0, mb_inds)
        if hp.norm_adv:
            advantages, cost_advantages = normalise_advantages(advantages), normalise_advantages(cost_advantages)
        combined = (advantages - self.multiplier * cost_advantages) / (1.0 + self.multiplier)
        return combined, dataclasses.replace(hp, norm_adv=False)

    def critic_loss(self, agent: Any, critic_out: torch.Tensor, mb_obs: torch.Tensor, mb_inds: torch.Tensor,
                    mb_returns: torch.Tensor, mb_values: torch.Tensor, hp: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(value loss, cost value loss x --cost-vf-coef)`` of a minibatch: the quantile Huber loss (or ppo's
        value loss with a scalar critic) and the cost critic's value loss (0 without a constraint)."""
        if self.quantile:
            old, targets = (self.batch[k].index_select(0, mb_inds) for k in ("quantiles", "returns_q"))
            loss = quantile_huber(critic_out, targets, agent.taus, self.args.kappa)
            if hp.clip_vloss:  # ppo's pessimistic clip, per head around the rollout's quantiles
                clipped = old + torch.clamp(critic_out - old, -hp.clip_coef, hp.clip_coef)
                loss = torch.max(loss, quantile_huber(clipped, targets, agent.taus, self.args.kappa))
            v_loss = loss.mean()
        else:
            v_loss = value_loss(critic_out, mb_returns, mb_values, hp.clip_coef, hp.clip_vloss)
        c_loss = torch.zeros((), device=critic_out.device)
        if self.constrained:
            returns, values = (self.batch[k].index_select(0, mb_inds) for k in ("cost_returns", "cost_values"))
            c_loss = value_loss(agent.get_cost_value(mb_obs), returns, values, hp.clip_coef, hp.clip_vloss)
        return v_loss, c_loss * self.args.cost_vf_coef

    def record(self, values: torch.Tensor) -> dict[str, float]:
        """The iteration's critic figures: the mean cost value (in drawdown units) and the mean gap between the
        quantiles' mean and the distorted ``values`` GAE used (0 for ``neutral``, > 0 for ``cvar``)."""
        gap = (self.quantiles.mean(-1) - values).mean().item() if self.quantile else math.nan
        cost = self.cost_values.mean().item() / self.args.cost_scale if self.constrained else math.nan
        return {"risk/cost_value": cost, "risk/value_tail_gap": gap}

    # ------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The running drawdowns and the PID state, for the checkpoint."""
        return {"drawdown": self.drawdown.state_dict(),
                "lagrangian": None if self.lagrangian is None else self.lagrangian.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.drawdown.load_state_dict(state["drawdown"])
        if self.lagrangian is not None:
            self.lagrangian.load_state_dict(state["lagrangian"])
            self.multiplier = self.lagrangian.multiplier


__all__ = ["DrawdownCost", "PortfolioRisk", "check_risk_args", "risk_aware"]
