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

**Long-short** (``policy="long_short"``). A Dirichlet over ``2A + 1`` entries: each asset's long leg ``l_i`` and short
leg ``s_i`` (the per-asset head gives both concentrations) and one unused-gross entry (from the pooled encoding);
:meth:`PortfolioActorCritic.env_action` maps a draw to the signed weights ``w_i = G (l_i - s_i)`` (``G`` the gross
limit), so ``sum |w_i| <= G (1 - unused) < G`` always holds and cash is ``1 - sum w``. The log-probability is the
Dirichlet's of the stored ``2A + 1`` vector, exact (the map to ``w`` is not inverted: the ratio compares two densities
of the same stored vector); the greedy action maps the mean.

**Benchmark tilt** (``policy="tilt"``). A diagonal Gaussian over a tilt ``tau`` in ``R^(A + 1)`` (cash last): the mean
from the per-asset head and, for cash, the pooled encoding; one learned log standard deviation shared by every entry
(so the assets stay alike), starting at ``log(tilt_std)``. The log-probability is the Gaussian's,
``sum_k log N(tau_k; mu_k, sigma)``, of the raw tilt: the projection of ``b_t + tau`` onto the simplex is the env's
(:mod:`sentio_lab.env.portfolio_anchor`), as CleanRL's continuous PPO leaves action clipping to the env. The mean
heads' last layers start at zero, so the untrained greedy action is the zero tilt: the benchmark itself.

**Risk-aware critic** (``num_quantiles``, ``cost_critic``; :mod:`sentio_lab.agents.portfolio_risk` trains them). With
``num_quantiles`` N the critic head outputs N quantiles of the return at the levels ``(2i + 1) / 2N``
(:mod:`sentio_lab.agents.nets.quantile`), :meth:`PortfolioActorCritic.get_action_and_value` returns them ``(B, N)``
in place of the value, and :meth:`PortfolioActorCritic.get_value` is their risk distortion (``risk="neutral"``: the
mean; ``"cvar"``: CVaR at ``cvar_alpha``). ``cost_critic`` adds a scalar head on the same pooled encoding for the
expected discounted drawdown cost. Both heads are built after every other module, so with neither the network draws
the same initial weights as before for the same seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Dirichlet, Distribution, Normal

from sentio_lab.agents.nets.core import RunningObsNorm, mlp
from sentio_lab.agents.nets.quantile import RISK_MEASURES, cvar_weights, distort, quantile_midpoints
from sentio_lab.agents.nets.transformer import EncoderBlock

#: Floor of a stored weight (module doc: a float32 Dirichlet draw can round a component to 0).
MIN_WEIGHT = 1e-6
#: The action distributions (module doc): long-only Dirichlet, long-short Dirichlet over legs, Gaussian tilt.
POLICIES: tuple[str, ...] = ("dirichlet", "long_short", "tilt")


class PortfolioActorCritic(nn.Module):
    """Dirichlet policy and value over ``num_assets`` assets encoded alike (module doc)."""

    def __init__(self, num_assets: int, token_dim: int, *, d_model: int = 32, heads: int = 2, layers: int = 1,
                 ff: int = 64, hidden: int = 64, norm_obs: bool = True, min_concentration: float = 1.0,
                 policy: str = "dirichlet", gross_limit: float = 1.0, tilt_std: float = 0.05,
                 num_quantiles: int | None = None, risk: str = "neutral", cvar_alpha: float = 1.0,
                 cost_critic: bool = False) -> None:
        """``token_dim``: the width of one asset's block (``window x F + 1``); ``policy`` one of :data:`POLICIES`
        (``gross_limit`` for ``long_short``, ``tilt_std`` the starting standard deviation of ``tilt``);
        ``num_quantiles`` / ``risk`` / ``cvar_alpha`` / ``cost_critic``: the risk-aware critic (module doc)."""
        super().__init__()
        if num_assets < 1 or token_dim < 1:
            raise ValueError(f"PortfolioActorCritic: num_assets {num_assets} and token_dim {token_dim} must be >= 1")
        if min_concentration <= 0:
            raise ValueError(f"--min-concentration {min_concentration}: must be > 0")
        if policy not in POLICIES or not gross_limit > 0 or not tilt_std > 0:
            raise ValueError(f"PortfolioActorCritic: policy {policy!r} (choose from {POLICIES}), gross_limit "
                             f"{gross_limit} and tilt_std {tilt_std} (both > 0)")
        self.num_assets, self.token_dim, self.min_concentration = num_assets, token_dim, float(min_concentration)
        self.policy, self.gross_limit = policy, float(gross_limit)
        self.obs_norm = RunningObsNorm(token_dim) if norm_obs else None
        self.embed = nn.Linear(token_dim + 1, d_model)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, heads, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.asset_head = mlp(d_model, hidden, 2 if policy == "long_short" else 1, out_std=0.01)
        self.cash_head = mlp(d_model, hidden, 1, out_std=0.01)
        self.critic = mlp(d_model + 1, hidden, 1, out_std=1.0)
        if policy == "tilt":  # the untrained mean tilt is 0 for every observation: the agent starts as the benchmark
            for head in (self.asset_head, self.cash_head):
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)
            self.log_std = nn.Parameter(torch.tensor(math.log(tilt_std)))
        self.num_quantiles, self.risk, self.cvar_alpha = num_quantiles, risk, float(cvar_alpha)
        if num_quantiles is not None:  # built last: without it the initial weights are the scalar critic's
            if risk not in RISK_MEASURES:
                raise ValueError(f"--risk {risk!r}: choose from {RISK_MEASURES}")
            cvar_weights(num_quantiles, cvar_alpha)  # validates --cvar-alpha
            self.critic = mlp(d_model + 1, hidden, num_quantiles, out_std=1.0)
            self.register_buffer("taus", quantile_midpoints(num_quantiles))
        self.cost_critic = mlp(d_model + 1, hidden, 1, out_std=1.0) if cost_critic else None

    @property
    def action_dim(self) -> int:
        """Width of the stored action: ``A + 1`` (dirichlet, tilt) or ``2A + 1`` (long_short's legs)."""
        return 2 * self.num_assets + 1 if self.policy == "long_short" else self.num_assets + 1

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

    def _heads(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The heads' outputs ``(B, action_dim)``: per asset (long legs, then short legs), then the pooled entry."""
        per_asset = self.asset_head(x)  # (B, A, 1) or (B, A, 2)
        return torch.cat([per_asset.transpose(1, 2).reshape(len(x), -1), self.cash_head(pooled)], dim=1)

    def _distribution(self, x: torch.Tensor, pooled: torch.Tensor) -> Distribution:
        raw = self._heads(x, pooled)
        if self.policy == "tilt":
            return Normal(raw, self.log_std.exp().expand_as(raw))
        return Dirichlet(self.min_concentration + F.softplus(raw))

    def concentration(self, obs: torch.Tensor) -> torch.Tensor:
        """Dirichlet concentrations ``(B, action_dim)`` (cash / unused gross last) for normalised observations."""
        x, pooled, _ = self.encode(obs)
        return self.min_concentration + F.softplus(self._heads(x, pooled))

    def env_action(self, action: torch.Tensor) -> torch.Tensor:
        """What the env steps on for a stored action: the weights (dirichlet), the tilt (tilt), or long-short's signed
        weights ``G (l - s)`` in float64 ``(B, A)`` (module doc)."""
        if self.policy != "long_short":
            return action
        legs = action.to(torch.float64)
        legs = legs / legs.sum(-1, keepdim=True)  # float32 draws sum to 1 only to ~1e-7: keep sum |w| < G exactly
        a = self.num_assets
        return self.gross_limit * (legs[:, :a] - legs[:, a:2 * a])

    def _critic(self, pooled: torch.Tensor, cash: torch.Tensor) -> torch.Tensor:
        out = self.critic(torch.cat([pooled, cash], dim=1))
        return out.squeeze(-1) if self.num_quantiles is None else out

    def value_of(self, critic_out: torch.Tensor) -> torch.Tensor:
        """The scalar value ``(B,)`` of the critic's output: itself, or the risk distortion of ``(B, N)`` quantiles."""
        return critic_out if self.num_quantiles is None else distort(critic_out, self.risk, self.cvar_alpha)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """State value ``(B,)`` for normalised observations (the distorted quantiles with a quantile critic)."""
        _, pooled, cash = self.encode(obs)
        return self.value_of(self._critic(pooled, cash))

    def get_quantiles(self, obs: torch.Tensor) -> torch.Tensor:
        """The quantile critic's ``(B, N)`` output for normalised observations."""
        if self.num_quantiles is None:
            raise RuntimeError("this agent has a scalar critic (built without num_quantiles)")
        _, pooled, cash = self.encode(obs)
        return self._critic(pooled, cash)

    def get_cost_value(self, obs: torch.Tensor) -> torch.Tensor:
        """Expected discounted drawdown cost to go ``(B,)`` for normalised observations."""
        if self.cost_critic is None:
            raise RuntimeError("this agent has no cost critic (built with cost_critic=False)")
        _, pooled, cash = self.encode(obs)
        return self.cost_critic(torch.cat([pooled, cash], dim=1)).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or score the given) weights: ``(weights (B, A + 1), log_prob, entropy, value)`` (module doc); the
        value is ``(B,)``, or the ``(B, N)`` quantiles with a quantile critic."""
        x, pooled, cash = self.encode(obs)
        dist = self._distribution(x, pooled)
        if action is None and self.policy == "tilt":
            action = dist.sample()
        elif action is None:
            action = dist.sample().clamp_min(MIN_WEIGHT)
            action = action / action.sum(-1, keepdim=True)
        value = self._critic(pooled, cash)
        log_prob, entropy = dist.log_prob(action), dist.entropy()
        if self.policy == "tilt":  # independent entries: the joint density is the product
            log_prob, entropy = log_prob.sum(-1), entropy.sum(-1)
        return action, log_prob, entropy, value

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor) -> torch.Tensor:
        """The env action of the distribution's mean for raw observations (deterministic evaluation): the weights
        ``alpha / sum alpha``, the mean tilt, or long-short's signed weights of the mean legs."""
        x, pooled, _ = self.encode(self.normalise(obs))
        if self.policy == "tilt":
            return self._heads(x, pooled)
        alpha = self.min_concentration + F.softplus(self._heads(x, pooled))
        return self.env_action(alpha / alpha.sum(-1, keepdim=True))


__all__ = ["MIN_WEIGHT", "POLICIES", "PortfolioActorCritic"]
