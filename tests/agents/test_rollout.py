"""The rollout maths against numbers worked out by hand (sentio_lab.agents.rollout).

The toy rollout used throughout: 2 envs x 5 steps, gamma = 0.5 and lambda = 0.5 (gamma * lambda = 0.25),
so every expected number below is a short exact sum.

* env 0: raw rewards 1 2 3 4 5, values 1 2 3 2 1. Its episode is *truncated* after step 1 (the window
  ended) with V(final_obs) = 8, so the reward of step 1 becomes 2 + 0.5 * 8 = 6, and the observation at
  step 2 starts a new episode: dones[2, 0] = 1. The rollout then goes on: next_value 4, next_done 0.
* env 1: rewards 2 0 -2 1 1, values 2 1 0 1 2. Its episode *terminates* after step 2 (ruin: no
  bootstrap, the reward stays -2), so dones[3, 1] = 1; the last step ends an episode too: next_done 1
  (next_value 2 must then be ignored).
"""

from __future__ import annotations

import math

import pytest
import torch

from sentio_lab import ppo
from sentio_lab.agents.rollout import (
    approx_kl,
    bootstrap_truncated,
    clip_fraction,
    compute_gae,
    describe_non_finite,
    kl_early_stop,
    normalise_advantages,
    policy_loss,
    value_loss,
)

F64 = torch.float64


def t(rows):
    """(steps, envs) tensor from per-env columns written as rows: t([[env0...], [env1...]])."""
    return torch.tensor(rows, dtype=F64).T.contiguous()


def toy_rollout():
    """The module docstring's rollout, with the truncation bootstrap applied to step 1."""
    rewards = t([[1, 2, 3, 4, 5], [2, 0, -2, 1, 1]])
    final_value = torch.tensor([8.0, 8.0], dtype=F64)
    rewards[1] = bootstrap_truncated(rewards[1], final_value, torch.tensor([True, False]), gamma=0.5)
    # env 1's termination after step 2: truncated is False there, so nothing is added
    rewards[2] = bootstrap_truncated(rewards[2], final_value, torch.tensor([False, False]), gamma=0.5)
    values = t([[1, 2, 3, 2, 1], [2, 1, 0, 1, 2]])
    dones = t([[0, 0, 1, 0, 0], [0, 0, 0, 1, 0]])
    next_value = torch.tensor([4.0, 2.0], dtype=F64)
    next_done = torch.tensor([0.0, 1.0], dtype=F64)
    return rewards, values, dones, next_value, next_done


def test_truncation_is_bootstrapped_and_termination_is_not():
    rewards, *_ = toy_rollout()
    assert rewards[1].tolist() == [6.0, 0.0]  # 2 + 0.5 * 8 for the truncated env; env 1 untouched
    assert rewards[2].tolist() == [3.0, -2.0]  # the terminated env keeps its reward
    # the sign and the discount are part of the formula: r + gamma * V, not r - gamma * V or r + V
    out = bootstrap_truncated(torch.tensor([1.0]), torch.tensor([-4.0]), torch.tensor([True]), gamma=0.25)
    assert out.item() == 0.0


def test_gae_and_returns_match_hand_computation():
    advantages, returns = compute_gae(*toy_rollout(), gamma=0.5, gae_lambda=0.5)
    # env 0, backwards (delta = r + 0.5 V' (1 - d') - V, A = delta + 0.25 (1 - d') A'):
    #   t4: 5 + 0.5*4 - 1 = 6                      A = 6
    #   t3: 4 + 0.5*1 - 2 = 2.5                    A = 2.5 + 0.25*6 = 4
    #   t2: 3 + 0.5*2 - 3 = 1                      A = 1 + 0.25*4 = 2
    #   t1: 6 - 2 = 4   (dones[2] = 1: cut)        A = 4
    #   t0: 1 + 0.5*2 - 1 = 1                      A = 1 + 0.25*4 = 2
    # env 1:
    #   t4: 1 - 2 = -1  (next_done = 1: cut)       A = -1
    #   t3: 1 + 0.5*2 - 1 = 1                      A = 1 + 0.25*(-1) = 0.75
    #   t2: -2 - 0 = -2 (dones[3] = 1: cut)        A = -2
    #   t1: 0 + 0.5*0 - 1 = -1                     A = -1 + 0.25*(-2) = -1.5
    #   t0: 2 + 0.5*1 - 2 = 0.5                    A = 0.5 + 0.25*(-1.5) = 0.125
    torch.testing.assert_close(advantages, t([[2, 4, 2, 4, 6], [0.125, -1.5, -2, 0.75, -1]]), rtol=0, atol=1e-12)
    # returns = A + V
    torch.testing.assert_close(returns, t([[3, 6, 5, 6, 7], [2.125, -0.5, -2, 1.75, 1]]), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("gae_lambda", "expected_returns"),
    [
        # lambda = 0: one-step TD targets r + gamma V' (1 - d')
        (0.0, [[1 + 0.5 * 2, 6, 3 + 0.5 * 2, 4 + 0.5 * 1, 5 + 0.5 * 4],
               [2 + 0.5 * 1, 0 + 0.5 * 0, -2, 1 + 0.5 * 2, 1]]),
        # lambda = 1: discounted sums of the rewards to the end of the episode, plus gamma^k next_value when the
        # episode runs past the rollout (env 0's second episode; env 1's episodes all end inside it)
        (1.0, [[1 + 0.5 * 6, 6, 3 + 0.5 * 4 + 0.25 * 5 + 0.125 * 4, 4 + 0.5 * 5 + 0.25 * 4, 5 + 0.5 * 4],
               [2 + 0.5 * 0 + 0.25 * -2, 0 + 0.5 * -2, -2, 1 + 0.5 * 1, 1]]),
    ],
)
def test_lambda_limits_are_td0_and_monte_carlo(gae_lambda, expected_returns):
    _, returns = compute_gae(*toy_rollout(), gamma=0.5, gae_lambda=gae_lambda)
    torch.testing.assert_close(returns, t(expected_returns), rtol=0, atol=1e-12)


def test_dones_cut_exactly_at_the_episode_boundary():
    """dones[t] marks the first step of a new episode: nothing from step t on may reach step t - 1."""
    rewards, values, dones, next_value, next_done = toy_rollout()
    base, _ = compute_gae(rewards, values, dones, next_value, next_done, gamma=0.5, gae_lambda=0.5)
    later = rewards.clone()
    later[2:, 0] += 100.0  # env 0's second episode (from step 2 on)
    moved, _ = compute_gae(later, values, dones, next_value, next_done, gamma=0.5, gae_lambda=0.5)
    torch.testing.assert_close(moved[:2], base[:2], rtol=0, atol=0)  # the first episode does not see it
    assert (moved[2:, 0] - base[2:, 0] >= 100.0).all()
    # ...while the step just before the boundary is still part of its own episode
    last_of_first = rewards.clone()
    last_of_first[1, 0] += 100.0
    moved, _ = compute_gae(last_of_first, values, dones, next_value, next_done, gamma=0.5, gae_lambda=0.5)
    assert moved[0, 0] - base[0, 0] == pytest.approx(0.25 * 100.0)
    torch.testing.assert_close(moved[2:], base[2:], rtol=0, atol=0)


def test_clipped_value_loss_matches_hand_values():
    old = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    new = torch.tensor([1.5, 1.1, -1.0, 1.0], dtype=F64)
    ret = torch.tensor([2.0, 0.0, -1.0, 0.5], dtype=F64)
    # unclipped (V - R)^2: 0.25, 1.21, 0, 0.25
    # clipped V (old +- 0.2): 1.2, 1.1, -0.2, 0.2 -> (Vc - R)^2: 0.64, 1.21, 0.64, 0.09
    # max: 0.64, 1.21, 0.64, 0.25 -> 0.5 * mean = 0.5 * 2.74 / 4
    assert value_loss(new, ret, old, clip_coef=0.2, clip=True).item() == pytest.approx(0.3425, abs=1e-12)
    assert value_loss(new, ret, old, clip_coef=0.2, clip=False).item() == pytest.approx(0.5 * 1.71 / 4, abs=1e-12)


def test_clipped_surrogate_matches_hand_values():
    advantages = torch.tensor([1.0, 1.0, -1.0, -2.0], dtype=F64)
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5], dtype=F64)
    # max(-A r, -A clip(r, 0.8, 1.2)): max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(1.5, 1.2) = 1.5;
    # max(1.0, 1.6) = 1.6 -> mean 1.4 / 4
    assert policy_loss(advantages, ratio, clip_coef=0.2).item() == pytest.approx(0.35, abs=1e-12)
    assert clip_fraction(torch.tensor([1.5, 1.1, 0.7, 1.0]), 0.2).item() == 0.5


def test_approx_kl_and_the_target_kl_stop():
    ratio = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    old_kl, kl = approx_kl(ratio.log(), ratio)
    # (r - 1) - log r: 1 - ln 2, 0, -0.5 + ln 2 -> sum 0.5, mean 1/6;   -mean(log r) = 0
    assert kl.item() == pytest.approx(1 / 6, abs=1e-12)
    assert old_kl.item() == pytest.approx(0.0, abs=1e-12)
    assert kl_early_stop(torch.tensor(0.02), 0.01)
    assert not kl_early_stop(torch.tensor(0.01), 0.01)  # strictly above the target
    assert not kl_early_stop(torch.tensor(1e9), None)


def test_normalised_advantages_and_non_finite_report():
    torch.testing.assert_close(normalise_advantages(torch.tensor([1.0, 2.0, 3.0], dtype=F64)),
                               torch.tensor([-1.0, 0.0, 1.0], dtype=F64), rtol=0, atol=1e-7)
    assert describe_non_finite(a=torch.ones(3), b=torch.tensor(2.0)) is None
    rewards = torch.zeros(4, 2)
    rewards[1, 0] = math.nan
    rewards[3, 1] = math.inf
    message = describe_non_finite(values=torch.ones(4, 2), rewards=rewards)
    assert message == "rewards (2 of 8 entries non-finite, first at index (1, 0))"


@pytest.mark.parametrize(("target_kl", "epochs"), [(None, 3), (1e9, 3), (0.0, 1)])
def test_target_kl_stops_the_epoch_loop(tiny_args, synthetic_market, target_kl, epochs):
    """The KL check runs after each epoch: target 0 stops after the first, a huge target never stops."""
    args = tiny_args.replace(update_epochs=3, target_kl=target_kl)
    result = ppo.train(args, market=synthetic_market)
    for record in result.history:
        assert record["losses/epochs"] == epochs
        assert record["losses/updates"] == epochs * args.ppo.num_minibatches
