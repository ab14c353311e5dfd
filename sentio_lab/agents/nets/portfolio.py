"""An actor-critic that treats the assets of a portfolio alike: a shared per-asset encoder with attention across assets.

The flat portfolio observation (:mod:`sentio_lab.env.portfolio`) is asset-major: ``A`` blocks of ``token_dim = window x
F + 1`` values (an asset's feature window, then its held weight), then the cash weight. Each block becomes one token:

* **normalisation** -- one :class:`~sentio_lab.agents.nets.core.RunningObsNorm` of width ``token_dim``, its statistics
  pooled over every asset (a per-position normaliser would give asset 3 other statistics than asset 5, and the
  network would no longer treat them alike); the cash weight (in [0, 1]) passes raw;
* **encoder** -- a linear embedding of the token joined by the cash weight (the same for every asset), then pre-LN
  transformer blocks (:class:`~sentio_lab.agents.nets.transformer.EncoderBlock`) **without positional encodings**:
  attention mixes the assets, but nothing tells the network where in the list an asset sits;
* **actor** -- a per-asset head gives each asset's Dirichlet concentration; the cash concentration comes from the
  mean of the asset encodings (a symmetric pooling). Concentrations are ``min_concentration + softplus(x)``;
* **critic** -- an MLP on the mean of the asset encodings and the cash weight.

So permuting the assets of the observation permutes the asset concentrations (and the sampled weights' density) the
same way and leaves the cash concentration and the value unchanged (tested, up to float rounding of the mean).

**The policy and its log-probability.** The action is the vector of target weights ``w`` on the simplex ``(A + 1``
entries, cash last``)``, drawn from ``Dirichlet(alpha)``; :meth:`PortfolioActorCritic.get_action_and_value` returns
``torch.distributions.Dirichlet.log_prob(w)`` -- the density with respect to the Lebesgue measure on the first ``A``
coordinates of the simplex (``w_cash = 1 - sum w_i``): ``log Gamma(sum alpha) - sum log Gamma(alpha_k) + sum (alpha_k
- 1) log w_k``. No change-of-variables term enters: the weights are sampled on the simplex directly, not squashed from
an unconstrained variable. The stored action is the sample clamped at :data:`MIN_WEIGHT` and renormalised (a float32
Dirichlet draw can round a component to exactly 0, whose log-density is -inf); old and new log-probabilities are both
evaluated at that stored action, so the PPO ratio is exact. The entropy is the Dirichlet's differential entropy.
``min_concentration = 1`` (the default) keeps the density log-concave and bounded (no mass piling on the faces); the
greedy action is the mean ``alpha / sum alpha``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Dirichlet

from sentio_lab.agents.nets.core import RunningObsNorm, mlp
from sentio_lab.agents.nets.transformer import EncoderBlock

#: Floor of a stored weight (module doc: a float32 Dirichlet draw can round a component to 0).
MIN_WEIGHT = 1e-6


class PortfolioActorCritic(nn.Module):
    """Dirichlet policy and value over ``num_assets`` assets encoded alike (module doc)."""

    def __init__(self, num_assets: int, token_dim: int, *, d_model: int = 32, heads: int = 2, layers: int = 1,
                 ff: int = 64, hidden: int = 64, norm_obs: bool = True, min_concentration: float = 1.0) -> None:
        """``token_dim``: the width of one asset's block (``window x F + 1``)."""
        super().__init__()
        if num_assets < 1 or token_dim < 1:
            raise ValueError(f"PortfolioActorCritic: num_assets {num_assets} and token_dim {token_dim} must be >= 1")
        if min_concentration <= 0:
            raise ValueError(f"--min-concentration {min_concentration}: must be > 0")
        self.num_assets, self.token_dim, self.min_concentration = num_assets, token_dim, float(min_concentration)
        self.obs_norm = RunningObsNorm(token_dim) if norm_obs else None
        self.embed = nn.Linear(token_dim + 1, d_model)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.asset_head = mlp(d_model, hidden, 1, out_std=0.01)
        self.cash_head = mlp(d_model, hidden, 1, out_std=0.01)
        self.critic = mlp(d_model + 1, hidden, 1, out_std=1.0)

    @property
    def obs_dim(self) -> int:
        """Width of the flat observation: ``A x token_dim + 1``."""
        return self.num_assets * self.token_dim + 1

    def split(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat observation ``(B, obs_dim)``: asset tokens ``(B, A, token_dim)`` and the cash weight ``(B, 1)``."""
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"observation width {obs.shape[-1]}; this network reads {self.num_assets} assets x "
                             f"{self.token_dim} + 1 = {self.obs_dim}")
        tokens = obs[:, :-1].reshape(len(obs), self.num_assets, self.token_dim)
        return tokens, obs[:, -1:]

    @torch.no_grad()
    def update_norm(self, obs: torch.Tensor) -> None:
        """Merge raw observations into the normaliser (every asset's token is one sample)."""
        if self.obs_norm is not None:
            self.obs_norm.update(self.split(obs)[0].reshape(-1, self.token_dim))

    def normalise(self, obs: torch.Tensor) -> torch.Tensor:
        """Normalise every asset token with the shared statistics; the cash weight passes raw."""
        if self.obs_norm is None:
            return obs
        tokens, cash = self.split(obs)
        return torch.cat([self.obs_norm(tokens).reshape(len(obs), -1), cash], dim=1)

    def encode(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-asset encodings ``(B, A, d)``, their mean ``(B, d)`` and the cash weight ``(B, 1)``."""
        tokens, cash = self.split(obs)
        x = self.embed(torch.cat([tokens, cash[:, None, :].expand(-1, self.num_assets, 1)], dim=2))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x, x.mean(1), cash

    def concentration(self, obs: torch.Tensor) -> torch.Tensor:
        """Dirichlet concentrations ``(B, A + 1)`` (cash last) for normalised observations."""
        x, pooled, _ = self.encode(obs)
        raw = torch.cat([self.asset_head(x).squeeze(-1), self.cash_head(pooled)], dim=1)
        return self.min_concentration + F.softplus(raw)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """State value ``(B,)`` for normalised observations."""
        _, pooled, cash = self.encode(obs)
        return self.critic(torch.cat([pooled, cash], dim=1)).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or score the given) weights: ``(weights (B, A + 1), log_prob, entropy, value)`` (module doc)."""
        x, pooled, cash = self.encode(obs)
        raw = torch.cat([self.asset_head(x).squeeze(-1), self.cash_head(pooled)], dim=1)
        dist = Dirichlet(self.min_concentration + F.softplus(raw))
        if action is None:
            action = dist.sample().clamp_min(MIN_WEIGHT)
            action = action / action.sum(-1, keepdim=True)
        value = self.critic(torch.cat([pooled, cash], dim=1)).squeeze(-1)
        return action, dist.log_prob(action), dist.entropy(), value

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean weights ``alpha / sum alpha`` for raw observations (deterministic evaluation)."""
        alpha = self.concentration(self.normalise(obs))
        return alpha / alpha.sum(-1, keepdim=True)


__all__ = ["MIN_WEIGHT", "PortfolioActorCritic"]
