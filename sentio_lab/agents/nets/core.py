"""Neural networks shared by the PPO variants: layer init, observation normaliser, masked categorical, MLP
actor-critic."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain ``std`` and constant bias (the CleanRL / openai-baselines init)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class RunningObsNorm(nn.Module):
    """Running mean / variance of observations (parallel Welford), applied as a clipped z-score.

    The statistics are buffers, so they travel in the agent's ``state_dict`` and hence in every checkpoint.
    """

    def __init__(self, dim: int, clip: float = 10.0, epsilon: float = 1e-8) -> None:
        """Start from mean 0, variance 1 and a tiny count (as gymnasium's NormalizeObservation does)."""
        super().__init__()
        self.clip, self.epsilon = clip, epsilon
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        """Merge a batch (B, dim) into the running statistics."""
        # Batch moments in the batch's dtype, two-pass (a float64 var over dim 0 is ~10x slower on CPU);
        # the running merge below stays in float64.
        batch_mean = batch.mean(0)
        batch_var = (batch - batch_mean).square().mean(0)
        batch_mean, batch_var, batch_count = batch_mean.to(torch.float64), batch_var.to(torch.float64), batch.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta.square() * self.count * batch_count / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Normalise ``obs`` with the current statistics (no update)."""
        scale = torch.rsqrt(self.var + self.epsilon).to(obs.dtype)
        return ((obs - self.mean.to(obs.dtype)) * scale).clamp(-self.clip, self.clip)


def mlp(in_dim: int, hidden: int, out_dim: int, out_std: float, layers: int = 2) -> nn.Sequential:
    """Tanh MLP with ``layers`` hidden layers; the last layer's init gain is ``out_std``."""
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        modules += [layer_init(nn.Linear(dim, hidden)), nn.Tanh()]
        dim = hidden
    modules.append(layer_init(nn.Linear(dim, out_dim), std=out_std))
    return nn.Sequential(*modules)


@torch.no_grad()
def favour_action(head: nn.Linear, action: int, probability: float) -> nn.Linear:
    """Raise the bias of ``action`` in a policy head so that it is the greedy action for *every* input, and is
    sampled with ``probability`` where the head's input is 0 (in place; returns ``head``).

    The head reads tanh activations (every policy head of :func:`mlp`), so ``|h_j| <= 1`` and for any input
    ``logit_i - logit_a = (w_i - w_a) . h + b_i - b_a <= ||w_i - w_a||_1 + b_i - b_a``. The bias of ``a`` is set to
    ``max_i b_i + max(log(probability (K - 1) / (1 - probability)), max_i ||w_i - w_a||_1 + 0.1)``: the first term
    gives the probability at ``h = 0`` (with the other biases equal, as initialised), the second, when larger,
    keeps ``a`` the argmax with a margin of 0.1 over the largest change the weights can make. With the CleanRL
    policy init (gain 0.01) the weight bound is ~0.1, so the probability is what is asked for.
    """
    k = head.out_features
    if not 0 <= action < k or not 0.0 < probability < 1.0:
        raise ValueError(f"favour_action: action {action} of {k}, probability {probability} (need 0 < p < 1)")
    others = torch.arange(k, device=head.bias.device) != action
    bound = (head.weight[others] - head.weight[action]).abs().sum(-1).max().item()
    log_odds = float(np.log(probability * (k - 1) / (1.0 - probability)))
    head.bias[action] = head.bias[others].max() + max(log_odds, bound + 0.1)
    return head


def check_mask(mask: torch.Tensor, num_actions: int, rows: bool = True) -> torch.Tensor:
    """``mask`` as a bool tensor ``(..., num_actions)``; a row without a single valid action is a ValueError.

    Never a silent fallback: with every logit masked a softmax would be uniform over *invalid* actions (or NaN).
    The row check costs one host sync per call; ``rows=False`` checks dtype and shape only (no sync), for a
    caller that checks the rows of a whole batch once instead (masked PPO: once per rollout, on its buffer).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"action mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape[-1] != num_actions:
        raise ValueError(f"action mask has {mask.shape[-1]} actions, the policy {num_actions}")
    if not rows:
        return mask
    empty = ~mask.any(-1)
    if bool(empty.any()):
        rows_found = torch.nonzero(empty.reshape(-1)).flatten().tolist()[:10]
        raise ValueError(f"action mask: row(s) {rows_found} (first 10) have no valid action")
    return mask


class MaskedCategorical(Categorical):
    """Categorical over the actions a bool ``mask`` allows (``mask=None``: exactly torch's ``Categorical``).

    Invalid logits are replaced, by ``torch.where``, with the dtype's most negative finite value: their
    probability is exactly 0 (``exp`` underflows), they are never sampled, and ``torch.where`` routes no
    gradient to them, so the policy is not pushed around on actions it cannot take. A finite value rather
    than ``-inf`` keeps ``0 * logit`` at 0 instead of NaN; the entropy sums over valid actions only
    (``-sum_valid p log p``). With every action valid the values and gradients are bit-identical to the
    unmasked distribution (the same softmax of the same logits; ``torch.where`` passes them through).
    """

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor | None = None, mask_checked: bool = False) -> None:
        """``logits`` ``(..., K)``; ``mask`` bool ``(..., K)`` or None (see :func:`check_mask`); ``mask_checked``:
        the caller has already checked that every row allows an action (skips that check and its host sync)."""
        if mask is not None:
            mask = check_mask(mask, logits.shape[-1], rows=not mask_checked)
            logits = torch.where(mask, logits, torch.finfo(logits.dtype).min)
        self.mask = mask
        super().__init__(logits=logits, validate_args=False)  # checks cost time, logits are finite

    def entropy(self) -> torch.Tensor:
        """Entropy over the valid actions; without a mask, torch's."""
        if self.mask is None:
            return super().entropy()
        p_log_p = torch.where(self.mask, self.logits * self.probs, 0.0)
        return -p_log_p.sum(-1)


def masked_argmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Index of the largest logit among the valid actions (``mask=None``: of all); an all-invalid row is an error."""
    if mask is None:
        return logits.argmax(-1)
    mask = check_mask(mask.to(logits.device), logits.shape[-1])
    return torch.where(mask, logits, -torch.inf).argmax(-1)


class MLPActorCritic(nn.Module):
    """Separate actor and critic MLPs over a (normalised) flat observation, categorical policy."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: int = 64, norm_obs: bool = True) -> None:
        """Policy head gain 0.01 (near-uniform start), value head gain 1, as in CleanRL."""
        super().__init__()
        self.obs_norm = RunningObsNorm(obs_dim) if norm_obs else None
        self.critic = mlp(obs_dim, hidden, 1, out_std=1.0)
        self.actor = mlp(obs_dim, hidden, num_actions, out_std=0.01)

    def normalise(self, obs: torch.Tensor) -> torch.Tensor:
        """Apply the observation normaliser if there is one."""
        return self.obs_norm(obs) if self.obs_norm is not None else obs

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """State value for normalised observations, shape (B,)."""
        return self.critic(obs).squeeze(-1)

    def get_action_and_value(
        self, obs: torch.Tensor, action: torch.Tensor | None = None, mask: torch.Tensor | None = None,
        mask_checked: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or score the given) actions: (action, log_prob, entropy, value).

        ``mask`` (bool, ``(B, num_actions)``) restricts the policy to the valid actions (:class:`MaskedCategorical`);
        None is the plain categorical, bit for bit. ``mask_checked=True`` says the caller has checked its rows
        (:func:`check_mask`), so this call costs no host sync.
        """
        dist = MaskedCategorical(self.actor(obs), mask, mask_checked=mask_checked)
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.get_value(obs)

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Most probable (valid, when ``mask`` is given) action for raw observations (deterministic evaluation)."""
        return masked_argmax(self.actor(self.normalise(obs)), mask)
