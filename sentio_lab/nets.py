"""Neural networks shared by the PPO variants: layer init, observation normaliser, MLP actor-critic."""

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
        self, obs: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or score the given) actions: (action, log_prob, entropy, value)."""
        dist = Categorical(logits=self.actor(obs), validate_args=False)  # checks cost time, logits are finite
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.get_value(obs)

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor) -> torch.Tensor:
        """Most probable action for raw observations (deterministic evaluation)."""
        return self.actor(self.normalise(obs)).argmax(-1)
