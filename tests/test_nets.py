import numpy as np
import torch

from sentio_lab.nets import MLPActorCritic, RunningObsNorm, layer_init


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
