import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical

from sentio_lab.agents.nets import MaskedCategorical, MLPActorCritic, RunningObsNorm, layer_init, masked_argmax


def test_running_norm_matches_numpy_over_batches():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 4))
    norm = RunningObsNorm(4)
    for chunk in np.array_split(data, 7):
        norm.update(torch.as_tensor(chunk, dtype=torch.float32))
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-4)
    out = norm(torch.as_tensor(data, dtype=torch.float32))
    assert abs(out.mean().item()) < 1e-2 and abs(out.std().item() - 1) < 1e-2
    assert norm(torch.full((1, 4), 1e9)).max().item() == norm.clip


def test_layer_init_is_orthogonal_with_gain():
    layer = layer_init(torch.nn.Linear(8, 8), std=2.0, bias_const=0.5)
    w = layer.weight.detach()
    torch.testing.assert_close(w @ w.T, 4.0 * torch.eye(8), atol=1e-5, rtol=0)
    assert torch.all(layer.bias == 0.5)


def test_actor_critic_shapes_greedy_and_stats_in_state_dict():
    torch.manual_seed(0)
    agent = MLPActorCritic(obs_dim=5, num_actions=3)
    obs = torch.randn(16, 5)
    action, logprob, entropy, value = agent.get_action_and_value(obs)
    assert action.shape == logprob.shape == entropy.shape == value.shape == (16,)
    _, lp_given, _, _ = agent.get_action_and_value(obs, action)
    torch.testing.assert_close(lp_given, logprob)
    greedy = agent.act_greedy(obs)
    torch.testing.assert_close(greedy, agent.actor(agent.normalise(obs)).argmax(-1))
    assert {"obs_norm.mean", "obs_norm.var", "obs_norm.count"} <= set(agent.state_dict())
    # the policy head starts near uniform (gain 0.01), so the first entropy is close to log(3)
    assert abs(entropy.mean().item() - np.log(3)) < 0.01


# ------------------------------------------------------------------------------------------- masked categorical


@st.composite
def logits_and_mask(draw, max_actions: int = 6, max_rows: int = 5):
    """Float32 logits (B, K) of moderate size and a bool mask with at least one valid action per row."""
    rows = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_actions))
    values = st.floats(-20.0, 20.0, allow_nan=False, width=32)
    logits = np.array(draw(st.lists(values, min_size=rows * k, max_size=rows * k)), dtype=np.float32).reshape(rows, k)
    mask = np.array(draw(st.lists(st.booleans(), min_size=rows * k, max_size=rows * k))).reshape(rows, k)
    keep = draw(st.lists(st.integers(0, k - 1), min_size=rows, max_size=rows))
    mask[np.arange(rows), keep] = True  # one guaranteed valid action per row
    return logits, mask


def _reference(logits: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and entropy of the softmax over each row's valid logits only, in float64, by hand."""
    probs = np.zeros(logits.shape)
    entropy = np.zeros(len(logits))
    for r, (row, valid) in enumerate(zip(logits.astype(np.float64), mask, strict=True)):
        v = row[valid]
        e = np.exp(v - v.max())
        p = e / e.sum()
        probs[r, valid] = p
        entropy[r] = -(p * np.log(p, where=p > 0, out=np.zeros_like(p))).sum()
    return probs, entropy


@settings(max_examples=200, deadline=None)
@given(logits_and_mask())
def test_masked_log_probs_and_entropy_equal_the_softmax_over_valid_logits(case):
    logits, mask = case
    dist = MaskedCategorical(torch.as_tensor(logits), torch.as_tensor(mask))
    probs, entropy = _reference(logits, mask)
    np.testing.assert_allclose(dist.probs.double().numpy(), probs, atol=1e-6)
    np.testing.assert_allclose(dist.entropy().double().numpy(), entropy, atol=1e-5)
    rows, k = logits.shape
    for a in range(k):
        valid = mask[:, a]
        if valid.any():
            lp = dist.log_prob(torch.full((rows,), a)).double().numpy()[valid]
            np.testing.assert_allclose(lp, np.log(probs[valid, a]), atol=1e-5)
    assert np.all(dist.probs.numpy()[~mask] == 0.0)


@settings(max_examples=100, deadline=None)
@given(logits_and_mask(), st.integers(0, 2**31 - 1))
def test_masked_actions_are_never_sampled(case, seed):
    logits, mask = case
    # put the largest logit on an invalid action where there is one: the mask, not the logits, must exclude it
    logits = np.where(mask, logits, 50.0).astype(np.float32)
    dist = MaskedCategorical(torch.as_tensor(logits), torch.as_tensor(mask))
    torch.manual_seed(seed)
    samples = dist.sample((200,))  # (200, B)
    assert mask[np.arange(len(mask))[None, :], samples.numpy()].all()


@settings(max_examples=100, deadline=None)
@given(logits_and_mask())
def test_masked_logits_get_zero_gradient_and_valid_ones_the_analytic_gradient(case):
    logits, mask = case
    x = torch.as_tensor(logits).clone().requires_grad_(True)
    dist = MaskedCategorical(x, torch.as_tensor(mask))
    actions = torch.as_tensor(mask.argmax(1))  # a valid action per row
    (dist.log_prob(actions) + dist.entropy()).sum().backward()
    grad = x.grad.numpy()
    assert np.all(grad[~mask] == 0.0)
    # d/dl_i [log p_a + H] = 1[i = a] - p_i - p_i (log p_i + H), over valid i
    probs, entropy = _reference(logits, mask)
    with np.errstate(divide="ignore"):
        log_p = np.where(mask, np.log(np.where(mask, probs, 1.0)), 0.0)
    expected = -probs - probs * (log_p + entropy[:, None])
    expected[np.arange(len(mask)), actions.numpy()] += 1.0
    np.testing.assert_allclose(grad[mask], expected[mask], atol=1e-4)


@settings(max_examples=100, deadline=None)
@given(logits_and_mask())
def test_all_valid_mask_is_bit_identical_to_the_plain_categorical(case):
    logits, _ = case
    mask = torch.ones(logits.shape, dtype=torch.bool)
    x1 = torch.as_tensor(logits).clone().requires_grad_(True)
    x2 = torch.as_tensor(logits).clone().requires_grad_(True)
    masked, plain = MaskedCategorical(x1, mask), Categorical(logits=x2, validate_args=False)
    actions = torch.as_tensor(logits.argmin(1))
    lm, lp = masked.log_prob(actions), plain.log_prob(actions)
    em, ep = masked.entropy(), plain.entropy()
    assert torch.equal(lm, lp) and torch.equal(em, ep)
    (lm - 0.01 * em).sum().backward()
    (lp - 0.01 * ep).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    torch.manual_seed(3)
    a = masked.sample((50,))
    torch.manual_seed(3)
    assert torch.equal(a, plain.sample((50,)))


@settings(max_examples=100, deadline=None)
@given(logits_and_mask())
def test_masked_argmax_is_the_best_valid_action(case):
    logits, mask = case
    got = masked_argmax(torch.as_tensor(logits), torch.as_tensor(mask)).numpy()
    assert mask[np.arange(len(mask)), got].all()
    best = np.where(mask, logits, -np.inf).max(1)
    np.testing.assert_array_equal(logits[np.arange(len(mask)), got], best)


def test_a_row_without_a_valid_action_is_an_error_not_a_uniform_sample():
    logits = torch.zeros(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"row\(s\) \[1\].*no valid action"):
        MaskedCategorical(logits, mask)
    with pytest.raises(ValueError, match="no valid action"):
        masked_argmax(logits, mask)
    with pytest.raises(TypeError, match="bool"):
        MaskedCategorical(logits, mask.float())
    with pytest.raises(ValueError, match="3 actions, the policy 4"):
        MaskedCategorical(logits, mask[:, :3])


def test_actor_critic_with_mask_none_is_unchanged_and_a_mask_restricts_it():
    torch.manual_seed(0)
    agent = MLPActorCritic(obs_dim=5, num_actions=3)
    obs = torch.randn(64, 5)
    torch.manual_seed(1)
    plain = agent.get_action_and_value(obs)
    torch.manual_seed(1)
    with_none = agent.get_action_and_value(obs, mask=None)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_none, strict=True))
    torch.manual_seed(1)
    everything = agent.get_action_and_value(obs, mask=torch.ones(64, 3, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(plain, everything, strict=True))
    mask = torch.ones(64, 3, dtype=torch.bool)
    mask[:, 2] = False
    mask[::2, 0] = False
    action, logprob, entropy, _ = agent.get_action_and_value(obs, mask=mask)
    assert mask.gather(1, action[:, None]).all()
    assert torch.all(logprob[::2] == 0.0) and torch.all(entropy[::2] == 0.0)  # one valid action: certain
    assert torch.all(entropy[1::2] <= np.log(2) + 1e-6) and torch.all(entropy[1::2] > 0.6)
    assert torch.equal(agent.act_greedy(obs), agent.act_greedy(obs, None))
    greedy = agent.act_greedy(obs, mask)
    assert mask.gather(1, greedy[:, None]).all() and torch.all(greedy[::2] == 1)
