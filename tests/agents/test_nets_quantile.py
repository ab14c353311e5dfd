"""Quantile critic pieces: the quantile Huber loss recovers known quantiles; CVaR from quantiles vs the normal's."""

import numpy as np
import pytest
import torch
from scipy.stats import expon, norm

from sentio_lab.agents.nets import MLPActorCritic
from sentio_lab.agents.nets.quantile import (
    QuantileActorCritic,
    cvar_weights,
    distort,
    quantile_huber,
    quantile_huber_loss,
    quantile_midpoints,
)


def fit_quantiles(samples: torch.Tensor, num_quantiles: int, kappa: float, steps: int = 400) -> torch.Tensor:
    """Minimise the quantile Huber loss of N free parameters against a fixed sample (full batch, Adam)."""
    theta = torch.zeros(1, num_quantiles, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05, betas=(0.9, 0.9))
    taus = quantile_midpoints(num_quantiles)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: a second thread only adds contention on a shared machine
    try:
        for step in range(steps):
            if step == 3 * steps // 4:
                optimizer.param_groups[0]["lr"] = 0.005  # settle: Adam's steps on a piecewise-linear loss jitter
            optimizer.zero_grad()
            quantile_huber_loss(theta, samples[None], taus, kappa).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return theta.detach()[0]


def test_midpoints():
    assert quantile_midpoints(4).tolist() == [0.125, 0.375, 0.625, 0.875]
    with pytest.raises(ValueError, match="num_quantiles"):
        quantile_midpoints(0)


@pytest.mark.parametrize("dist", [norm(loc=2.0, scale=1.5), expon(scale=1.0)], ids=["normal", "exponential"])
def test_quantile_regression_recovers_the_quantiles_of_a_known_distribution(dist):
    """16 quantiles from 5,000 samples: within 0.01 of the sample's own quantiles (the optimisation; kappa = 0.01
    puts the Huber minimiser within ~kappa of the quantile) and within 0.1 of the distribution's (the sampling error
    of the outermost levels tau = 1/32, 31/32 is ~0.04 here)."""
    samples = torch.tensor(dist.rvs(size=5_000, random_state=np.random.default_rng(0)), dtype=torch.float32)
    fitted = fit_quantiles(samples, 16, kappa=0.01)
    taus = quantile_midpoints(16).double().numpy()
    np.testing.assert_allclose(fitted.numpy(), np.quantile(samples.double().numpy(), taus), atol=0.01)
    np.testing.assert_allclose(fitted.numpy(), dist.ppf(taus), atol=0.1)
    assert torch.all(fitted.diff() > 0)  # ordered like their levels
    # and its CVaR_0.25 is the distribution's (analytic for the normal: mu - sigma phi(z_a) / a)
    if dist.dist.name == "norm":
        exact = 2.0 - 1.5 * norm.pdf(norm.ppf(0.25)) / 0.25
        assert float(distort(fitted, "cvar", 0.25)) == pytest.approx(exact, abs=0.1)


def test_a_large_kappa_learns_the_expectile_like_huber_quantile_not_the_quantile():
    """Why the test above uses a small kappa: with kappa much larger than the spread the loss is a weighted square
    and the median head goes to the mean, not the median (here of a skewed exponential: mean 1, median 0.69)."""
    samples = torch.tensor(expon.rvs(size=5_000, random_state=np.random.default_rng(1)), dtype=torch.float32)
    median = fit_quantiles(samples, 1, kappa=100.0)
    assert float(median) == pytest.approx(float(samples.mean()), abs=0.02)
    assert abs(float(median) - expon.median()) > 0.2


@pytest.mark.parametrize(("n", "alpha", "tolerance"), [(32, 0.25, 0.02), (32, 0.1, 0.05), (32, 0.5, 0.01),
                                                       (200, 0.05, 0.012)])
def test_cvar_of_the_normals_quantiles_matches_the_analytic_cvar(n, alpha, tolerance):
    """CVaR_alpha = mu - sigma phi(Phi^-1(alpha)) / alpha; N midpoint quantiles approximate it within ``tolerance``
    sigma (the step quantile function's error in the tail, of order 1 / (N alpha); it shrinks as N grows)."""
    mu, sigma = 1.5, 2.0
    quantiles = torch.tensor(mu + sigma * norm.ppf(quantile_midpoints(n).double().numpy()), dtype=torch.float32)
    exact = mu - sigma * norm.pdf(norm.ppf(alpha)) / alpha
    got = float(distort(quantiles[torch.randperm(n)], "cvar", alpha))  # order does not matter: sorted inside
    assert got == pytest.approx(exact, abs=tolerance * sigma)
    assert got > exact  # the step approximation underweights the far tail: always above, never below


def test_cvar_weights_and_distortions():
    w = cvar_weights(8, 0.3)  # 2.4 atoms: two whole ones and 0.4 of the third
    np.testing.assert_allclose(w.numpy(), np.array([1, 1, 0.4, 0, 0, 0, 0, 0]) / 2.4, rtol=1e-6)
    assert float(w.sum()) == pytest.approx(1.0)
    q = torch.tensor([[3.0, -1.0, 2.0, 0.0]])
    assert distort(q, "neutral").item() == 1.0
    assert distort(q, "cvar", 1.0).item() == pytest.approx(1.0)
    assert distort(q, "cvar", 0.25).item() == -1.0 and distort(q, "cvar", 0.5).item() == -0.5
    with pytest.raises(ValueError, match="cvar_alpha"):
        cvar_weights(4, 0.0)
    with pytest.raises(ValueError, match="unknown risk"):
        distort(q, "wang")


def test_quantile_huber_loss_by_hand():
    taus = torch.tensor([0.25])
    pred = torch.tensor([[0.0]])
    # u = target - pred: inside kappa squared / 2, outside linear; weight tau above, 1 - tau below; / kappa
    assert quantile_huber(pred, torch.tensor([[0.5]]), taus, kappa=1.0).item() == pytest.approx(0.25 * 0.125)
    assert quantile_huber(pred, torch.tensor([[-3.0]]), taus, kappa=1.0).item() == pytest.approx(0.75 * 2.5)
    assert quantile_huber(pred, torch.tensor([[4.0]]), taus, kappa=2.0).item() == pytest.approx(0.25 * 6.0 / 2.0)
    # one head at tau = 0.5 inside kappa: u^2 / (4 kappa), the identity behind the ppo-equality test
    u = torch.randn(64, 1) * 3
    got = quantile_huber(torch.zeros(64, 1), u, torch.tensor([0.5]), kappa=16.0)
    torch.testing.assert_close(got, u[:, 0] ** 2 / 64.0)
    # every head against every target sample: (B, N) x (B, M) -> (B,)
    assert quantile_huber(torch.zeros(3, 4), torch.ones(3, 5), quantile_midpoints(4)).shape == (3,)
    with pytest.raises(ValueError, match="kappa"):
        quantile_huber(pred, pred, taus, kappa=0.0)


def test_quantile_gradient_pushes_each_head_to_its_level():
    taus = quantile_midpoints(4)
    theta = torch.zeros(1, 4, requires_grad=True)
    targets = torch.tensor([[10.0, -10.0]])  # one sample far above, one far below every head
    quantile_huber_loss(theta, targets, taus, kappa=1.0).backward()
    # linear region: d/dtheta_i = (-(tau_i) + (1 - tau_i)) / (N M) * kappa / kappa = (1 - 2 tau_i) / 8
    torch.testing.assert_close(theta.grad[0], (1 - 2 * taus) / 8)


def test_actor_critic_shapes_and_same_start_as_ppos_with_one_quantile():
    torch.manual_seed(3)
    mine = QuantileActorCritic(6, 3, hidden=8, num_quantiles=1)
    torch.manual_seed(3)
    ppo_net = MLPActorCritic(6, 3, hidden=8)
    ours = {k: v for k, v in mine.state_dict().items() if k != "taus"}
    assert ours.keys() == ppo_net.state_dict().keys()
    assert all(torch.equal(v, ppo_net.state_dict()[k]) for k, v in ours.items())

    net = QuantileActorCritic(6, 3, hidden=8, num_quantiles=5, risk="cvar", cvar_alpha=0.4, cost_critic=True,
                              norm_obs=False)
    obs = torch.randn(7, 6)
    action, logprob, entropy, quantiles = net.get_action_and_value(obs)
    assert action.shape == logprob.shape == entropy.shape == (7,) and quantiles.shape == (7, 5)
    torch.testing.assert_close(net.get_value(obs), quantiles.sort(-1).values[:, :2].mean(-1))
    assert net.get_cost_value(obs).shape == (7,)
    assert net.act_greedy(obs).shape == (7,) and net.normalise(obs) is obs
    mask = torch.zeros(7, 3, dtype=torch.bool)
    mask[:, 1] = True
    assert torch.all(net.act_greedy(obs, mask) == 1)
    assert torch.all(net.get_action_and_value(obs, mask=mask)[0] == 1)
    with pytest.raises(RuntimeError, match="no cost critic"):
        mine.get_cost_value(obs)
    with pytest.raises(ValueError, match="unknown risk"):
        QuantileActorCritic(6, 3, risk="wang")
    with pytest.raises(ValueError, match="cvar_alpha"):
        QuantileActorCritic(6, 3, risk="cvar", cvar_alpha=2.0)
