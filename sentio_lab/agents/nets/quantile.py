"""Distributional critic for ``ppo_risk``: quantile heads, the quantile Huber loss and risk distortions.

* :func:`quantile_midpoints`: the fixed quantile levels ``tau_i = (2 i + 1) / (2 N)`` of QR-DQN (Dabney et al.,
  2018), the minimisers of the 1-Wasserstein distance to a distribution among N-atom ones;
* :func:`quantile_huber` / :func:`quantile_huber_loss`: ``rho^kappa_tau(u) = |tau - 1{u < 0}| L_kappa(u) / kappa``
  over every pair (predicted quantile i, target sample j), mean over j and i (Dabney et al. sum over i), per
  sample / mean over the batch;
* :func:`distort`: the scalar a risk measure takes from N quantiles: ``"neutral"`` is their mean,
  ``"cvar"`` the mean of the lowest ``alpha`` fraction of the distribution (CVaR_alpha, the expected value in
  the worst alpha tail), with the atom straddling alpha weighted by the share of it below alpha;
* :class:`QuantileActorCritic`: the MLP actor of ``ppo``, a critic with N quantile outputs and an optional
  scalar cost critic (expected discounted drawdown cost) for the Lagrangian constraint.

Hand-written: no maintained PyTorch library ships a quantile critic for on-policy PPO (the QR-DQN code in
sb3-contrib is tied to its DQN), and the pieces are a few lines each, tested against known distributions.
"""

from __future__ import annotations

import torch
from torch import nn

from sentio_lab.agents.nets.core import MaskedCategorical, RunningObsNorm, masked_argmax, mlp

RISK_MEASURES = ("neutral", "cvar")


def quantile_midpoints(num_quantiles: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The quantile levels ``tau_i = (2 i + 1) / (2 N)``, ``i = 0 .. N - 1`` (float32, shape (N,))."""
    if num_quantiles < 1:
        raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}")
    return (2 * torch.arange(num_quantiles, device=device, dtype=torch.float32) + 1) / (2 * num_quantiles)


def quantile_huber(
    predicted: torch.Tensor, targets: torch.Tensor, taus: torch.Tensor, kappa: float = 1.0
) -> torch.Tensor:
    """Per-sample quantile Huber loss (Dabney et al., 2018) of ``predicted`` (B, N) quantiles against ``targets``
    (B, M) samples, shape (B,).

    ``u_ij = target_j - predicted_i``; ``L_kappa(u) = u^2 / 2`` for ``|u| <= kappa``, else
    ``kappa (|u| - kappa / 2)``; per sample ``mean_i mean_j |tau_i - 1{u_ij < 0}| L_kappa(u_ij) / kappa``.
    The mean over the N heads replaces Dabney's sum (a positive rescaling: the same minimiser, a loss whose size
    does not grow with N). Targets carry no gradient (pass them detached or computed under ``no_grad``).

    With one quantile (``tau = 0.5``) and every ``|u| <= kappa`` this is ``u^2 / (4 kappa)``: with a power of
    two kappa exactly ``ppo``'s squared error scaled by a power of two (module doc of ``ppo_risk``).
    """
    if kappa <= 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    return _QuantileHuber.apply(predicted, targets.detach(), taus, float(kappa))


class _QuantileHuber(torch.autograd.Function):
    """:func:`quantile_huber` with its gradient written out, so autograd stores no (B, N, M) intermediates.

    Why: this (B, N, M) loss dominated ``ppo_risk``'s update (issue 18 section 3: 0.29x ``ppo`` at 64 episodes).
    Autograd kept ~5 (B, N, M) tensors per call and ran ~10 elementwise passes back over them; the gradient in
    closed form needs one pass in the forward and a (B, N) result:
    ``d loss_b / d predicted_bi = -mean_j |tau_i - 1{u_ij < 0}| clamp(u_ij, -kappa, kappa) / (M N kappa)``
    (``d L_kappa / du = clamp(u, -kappa, kappa)``; the weight is piecewise constant). The loss value is computed by
    the same operations as before (the same bits); the gradient agrees with autograd's to float32 rounding and is
    the same bits where every ``|u| <= kappa`` and N = M = 1 (the ``ppo``-equality identity).
    """

    @staticmethod
    def forward(ctx, predicted: torch.Tensor, targets: torch.Tensor, taus: torch.Tensor,  # noqa: D102
                kappa: float) -> torch.Tensor:
        # (B, N, M) views, row i = predicted quantile i, column j = target j; u_ij = target_j - predicted_i.
        # aten's fused Huber kernels do the elementwise work in one pass each (the (B, N, M) passes dominate):
        # huber_loss(t, p) = L_kappa(t - p) (0.5 u^2 inside kappa, kappa (|u| - kappa / 2) outside), and
        # huber_loss_backward(w, t, p) = w clamp(t - p, -kappa, kappa), i.e. w dL/du.
        shape = (*predicted.shape, targets.shape[-1])
        target_b, predicted_b = targets.unsqueeze(-2).expand(shape), predicted.unsqueeze(-1).expand(shape)
        huber = torch.ops.aten.huber_loss(target_b, predicted_b, 0, kappa)  # reduction 0: none
        weight = torch.where(target_b < predicted_b, 1.0 - taus.unsqueeze(-1), taus.unsqueeze(-1))  # |tau - 1{u<0}|
        loss = (weight * huber).mean((-2, -1)) / kappa
        if ctx.needs_input_grad[0]:
            # summed over the targets j: sum_j w_ij clamp(u_ij, -kappa, kappa)
            slope = torch.ops.aten.huber_loss_backward(weight, target_b, predicted_b, 0, kappa).sum(-1)
            ctx.save_for_backward(slope)
            ctx.scale = -1.0 / (shape[-1] * shape[-2] * kappa)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: D102
        (slope,) = ctx.saved_tensors
        return slope * (grad_loss.unsqueeze(-1) * ctx.scale), None, None, None


def quantile_huber_loss(
    predicted: torch.Tensor, targets: torch.Tensor, taus: torch.Tensor, kappa: float = 1.0
) -> torch.Tensor:
    """:func:`quantile_huber` averaged over the batch (a scalar)."""
    return quantile_huber(predicted, targets, taus, kappa).mean()


def cvar_weights(num_quantiles: int, alpha: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Weights ``w`` (N,) with ``CVaR_alpha = sum_i w_i q_(i)`` over sorted quantiles ``q_(0) <= .. <= q_(N-1)``.

    Each quantile stands for a 1/N slice of probability; CVaR_alpha is the mean of the quantile function over
    ``[0, alpha]``, so atom i gets ``clip(alpha - i / N, 0, 1 / N) / alpha``: 1 / (alpha N) for atoms wholly in
    the tail, a part for the one that straddles alpha, 0 above (the weights sum to 1; alpha = 1 is the mean).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"cvar_alpha must be in (0, 1], got {alpha}")
    lower = torch.arange(num_quantiles, device=device, dtype=torch.float64) / num_quantiles
    weights = (alpha - lower).clamp(0.0, 1.0 / num_quantiles) / alpha
    return weights.to(torch.float32)


def distort(quantiles: torch.Tensor, risk: str = "neutral", alpha: float = 1.0) -> torch.Tensor:
    """The scalar value a risk measure gives N quantiles (..., N) -> (...): module doc.

    ``"cvar"`` sorts the quantiles first (a monotone rearrangement: the heads are trained towards increasing
    levels but nothing forces them not to cross), so the tail is the lowest values whatever their order.
    """
    if risk == "neutral":
        return quantiles.mean(-1)
    if risk == "cvar":
        weights = cvar_weights(quantiles.shape[-1], alpha, quantiles.device).to(quantiles.dtype)
        return (quantiles.sort(-1).values * weights).sum(-1)
    raise ValueError(f"unknown risk measure {risk!r}; known: {RISK_MEASURES}")


class QuantileActorCritic(nn.Module):
    """``ppo``'s MLP actor, a quantile critic (N outputs) and, with ``cost_critic``, a scalar cost critic.

    The modules are built in the order of :class:`~sentio_lab.agents.nets.MLPActorCritic` (normaliser, critic, actor),
    so with one quantile and no cost critic both networks start from the same weights for the same seed; the
    cost critic comes last and draws its initial weights after them.
    """

    def __init__(
        self, obs_dim: int, num_actions: int, hidden: int = 64, norm_obs: bool = True, num_quantiles: int = 32,
        risk: str = "neutral", cvar_alpha: float = 1.0, cost_critic: bool = False,
    ) -> None:
        """Heads as in CleanRL (policy gain 0.01, value gain 1); ``risk`` / ``cvar_alpha`` pick :func:`distort`."""
        super().__init__()
        if risk not in RISK_MEASURES:
            raise ValueError(f"unknown risk measure {risk!r}; known: {RISK_MEASURES}")
        if risk == "cvar":
            cvar_weights(num_quantiles, cvar_alpha)  # validates alpha
        self.num_quantiles, self.risk, self.cvar_alpha = num_quantiles, risk, cvar_alpha
        self.obs_norm = RunningObsNorm(obs_dim) if norm_obs else None
        self.critic = mlp(obs_dim, hidden, num_quantiles, out_std=1.0)
        self.actor = mlp(obs_dim, hidden, num_actions, out_std=0.01)
        self.cost_critic = mlp(obs_dim, hidden, 1, out_std=1.0) if cost_critic else None
        self.register_buffer("taus", quantile_midpoints(num_quantiles))

    def normalise(self, obs: torch.Tensor) -> torch.Tensor:
        """Apply the observation normaliser if there is one."""
        return self.obs_norm(obs) if self.obs_norm is not None else obs

    def get_quantiles(self, obs: torch.Tensor) -> torch.Tensor:
        """Return quantiles (B, N) for normalised observations."""
        return self.critic(obs)

    def value_of(self, quantiles: torch.Tensor) -> torch.Tensor:
        """The distorted scalar value of quantiles (B, N) -> (B,) (the one GAE uses)."""
        return distort(quantiles, self.risk, self.cvar_alpha)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """Distorted state value for normalised observations, shape (B,)."""
        return self.value_of(self.get_quantiles(obs))

    def get_cost_value(self, obs: torch.Tensor) -> torch.Tensor:
        """Expected (discounted) drawdown cost to go for normalised observations, shape (B,)."""
        if self.cost_critic is None:
            raise RuntimeError("this agent has no cost critic (built with cost_critic=False)")
        return self.cost_critic(obs).squeeze(-1)

    def get_action_and_value(
        self, obs: torch.Tensor, action: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or score the given) actions: (action, log_prob, entropy, quantiles (B, N))."""
        dist = MaskedCategorical(self.actor(obs), mask)
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.get_quantiles(obs)

    @torch.no_grad()
    def act_greedy(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Most probable (valid, when ``mask`` is given) action for raw observations (deterministic evaluation)."""
        return masked_argmax(self.actor(self.normalise(obs)), mask)
