"""Rollout maths shared by the PPO variants: GAE, the truncation bootstrap, the PPO losses, approximate KL, and the
minibatch objective assembled from them (:func:`ppo_objective`).

Pure tensor functions, no state: each variant's train loop calls them, and ``tests/agents/test_rollout.py``
checks them against numbers worked out by hand, so a broken algorithm fails a test.

Storage convention (CleanRL's): tensors are ``(num_steps, num_envs)``; ``dones[t]`` says whether the
observation at step t *started a new episode* (the previous step ended one), so the link from step t to
step t+1 is cut by ``dones[t + 1]`` and the link from the last step to the next rollout by ``next_done``.
A truncated episode (end of a random window) is not terminal: :func:`bootstrap_truncated` adds the value
of where the agent would have been next to the last reward before GAE cuts the link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient, reward or value (the message says which, and where)."""


def bootstrap_truncated(
    rewards: torch.Tensor, final_values: torch.Tensor, truncated: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``r + gamma * V(final_obs)`` where an episode was truncated, ``r`` elsewhere (terminations get nothing).

    The window ended, the market did not: the value of the observation the agent would have seen next
    stands in for the rewards it would have collected (as Stable-Baselines3 does).
    """
    return rewards + gamma * final_values * truncated


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    next_value: torch.Tensor,
    next_done: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016): ``(advantages, returns)``, both (T, N).

    ``delta_t = r_t + gamma V_{t+1} (1 - d_{t+1}) - V_t`` and ``A_t = delta_t + gamma lambda (1 - d_{t+1}) A_{t+1}``,
    with ``d`` = ``dones`` (module docstring), ``V_T = next_value`` and ``d_T = next_done``; ``returns = A + V``
    are the value targets.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


def normalise_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (sample) standard deviation; the 1e-8 keeps a constant minibatch finite."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def policy_loss(advantages: torch.Tensor, ratio: torch.Tensor, clip_coef: float) -> torch.Tensor:
    """Clipped surrogate objective, as a loss: ``mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))``."""
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    return torch.max(pg_loss1, pg_loss2).mean()


def value_loss(
    new_values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor, clip_coef: float, clip: bool
) -> torch.Tensor:
    """``0.5 mean((V - R)^2)``; with ``clip`` the PPO implementation's pessimistic clipped form.

    Clipped: ``0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))``, so the value estimate
    gains nothing by moving more than ``clip_coef`` away from the rollout's estimate ``V_old``.
    """
    if clip:
        v_loss_unclipped = (new_values - returns) ** 2
        v_clipped = old_values + torch.clamp(new_values - old_values, -clip_coef, clip_coef)
        v_loss_clipped = (v_clipped - returns) ** 2
        return 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    return 0.5 * ((new_values - returns) ** 2).mean()


def approx_kl(logratio: torch.Tensor, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(old_approx_kl, approx_kl)``: the estimators ``mean(-log r)`` and ``mean((r - 1) - log r)`` of KL(old || new).

    The second is unbiased and never negative (http://joschu.net/blog/kl-approx.html); ``ratio = exp(logratio)``
    is passed in because the caller has it already.
    """
    return (-logratio).mean(), ((ratio - 1) - logratio).mean()


def clip_fraction(ratio: torch.Tensor, clip_coef: float) -> torch.Tensor:
    """Share of samples whose probability ratio lies outside ``[1 - clip_coef, 1 + clip_coef]``."""
    return ((ratio - 1.0).abs() > clip_coef).float().mean()


def kl_early_stop(approx_kl_value: float | torch.Tensor, target_kl: float | None) -> bool:
    """Whether the epoch loop stops after this epoch: ``approx_kl > target_kl`` (never when ``target_kl`` is None).

    Checked once per epoch on the last minibatch's KL, as CleanRL does.
    """
    return target_kl is not None and bool(approx_kl_value > target_kl)


def describe_non_finite(**tensors: torch.Tensor) -> str | None:
    """None when every tensor is finite, else a short account: which are not, and how many entries (first index)."""
    problems = []
    for name, tensor in tensors.items():
        bad = ~torch.isfinite(tensor.detach())
        if bool(bad.any()):
            first = tuple(int(i) for i in torch.nonzero(bad)[0]) if tensor.dim() else ()
            where = f", first at index {first}" if first else ""
            problems.append(f"{name} ({int(bad.sum())} of {tensor.numel()} entries non-finite{where})")
    return "; ".join(problems) or None


@dataclass
class PPOObjective:
    """One minibatch's PPO loss and its parts (:func:`ppo_objective`): what a variant backpropagates and logs."""

    loss: torch.Tensor
    """``policy_loss - ent_coef * entropy + vf_coef * value_loss``, the tensor to backpropagate"""
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    """the minibatch's mean entropy (the bonus term before its coefficient)"""
    old_approx_kl: torch.Tensor
    approx_kl: torch.Tensor
    clip_fraction: float
    """share of the minibatch whose ratio left ``[1 - clip_coef, 1 + clip_coef]`` (one host sync)"""

    def parts(self) -> dict[str, torch.Tensor]:
        """The loss's three terms by name, for the non-finite message
        (:meth:`sentio_lab.run_loop.TrainingRun.check_update`)."""
        return {"policy_loss": self.policy_loss, "value_loss": self.value_loss, "entropy": self.entropy}

    def losses(self) -> dict[str, torch.Tensor]:
        """The terms the run loop logs, by their log names (``losses/<name>``)."""
        return {"value_loss": self.value_loss, "policy_loss": self.policy_loss, "entropy": self.entropy,
                "old_approx_kl": self.old_approx_kl, "approx_kl": self.approx_kl}


def gather_minibatch(batch: Sequence[torch.Tensor], indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows ``indices`` of every flattened rollout tensor: one contiguous gather each (``index_select`` is several
    times faster than ``x[indices]``)."""
    return tuple(x.index_select(0, indices) for x in batch)


def ppo_objective(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
                  entropy: torch.Tensor, value_loss_term: torch.Tensor, hp: Any) -> PPOObjective:
    """The clipped-surrogate PPO loss of one minibatch, CleanRL's order of operations (so every variant that calls it
    is bit-identical to writing it out): ratio from the log-probabilities, the KL estimators and clip fraction
    without gradient, advantages normalised when ``hp.norm_adv``, then
    ``loss = policy_loss - hp.ent_coef * mean(entropy) + hp.vf_coef * value_loss_term``.

    ``value_loss_term`` is the variant's own critic loss (:func:`value_loss`, or a quantile Huber loss), computed by
    the caller; ``hp`` is the PPO argument group (``clip_coef``, ``norm_adv``, ``ent_coef``, ``vf_coef``).
    """
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    with torch.no_grad():
        old_kl, kl = approx_kl(logratio, ratio)
        clipped = clip_fraction(ratio, hp.clip_coef).item()
    if hp.norm_adv:
        advantages = normalise_advantages(advantages)
    pg_loss = policy_loss(advantages, ratio, hp.clip_coef)
    entropy_loss = entropy.mean()
    loss = pg_loss - hp.ent_coef * entropy_loss + value_loss_term * hp.vf_coef
    return PPOObjective(loss, pg_loss, value_loss_term, entropy_loss, old_kl, kl, clipped)
