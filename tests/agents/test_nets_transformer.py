"""The multi-timeframe transformer actor-critic: shapes, padding masks, one code path for one or many timeframes,
mixed precision within stated tolerances, and the compile switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentio_lab.agents.nets.transformer import (
    MultiTimeframeActorCritic,
    Stream,
    sinusoidal_encoding,
    streams_for,
)
from sentio_lab.features.observation_layout import TokenBlock, observation_layout

WINDOW, F, D = 6, 4, 5  # base window tokens, base features, token width (4 features + validity flag)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny transformer ops only lose to thread hand-offs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layout_and_streams(blocks=(("tokens:4h", 3), ("tokens:1D", 2))):
    """An observation layout with the base window, the position and the given token blocks."""
    shapes = [TokenBlock(name, np.zeros((1, D), np.float32), np.zeros((1, k), np.int64)) for name, k in blocks]
    layout = observation_layout(F, WINDOW, shapes)
    return layout, streams_for(layout, WINDOW, [(name, k, D) for name, k in blocks])


def random_obs(layout, streams, n=16, seed=0):
    """Random observations whose validity flags are 0 / 1 (a few padded tokens)."""
    g = torch.Generator().manual_seed(seed)
    dim = max(p.stop for p in layout.values())
    obs = torch.randn(n, dim, generator=g)
    for stream in streams:
        if stream.has_valid_flag:
            part = layout[stream.name]
            flags = (torch.rand(n, stream.num_tokens, generator=g) > 0.3).float()
            flags[:, -1] = 1.0
            obs[:, part.start + stream.token_dim - 1 : part.stop : stream.token_dim] = flags
    return obs


def make_agent(fusion="attention", blocks=(("tokens:4h", 3), ("tokens:1D", 2)), seed=0, **kw):
    torch.manual_seed(seed)
    layout, streams = layout_and_streams(blocks)
    return MultiTimeframeActorCritic(layout, streams, 3, d_model=16, heads=2, layers=2, ff=32, fusion=fusion,
                                     hidden=16, **kw), layout, streams


def test_sinusoidal_encoding_matches_the_formula():
    pe = sinusoidal_encoding(7, 6)
    p, i = 5, 2
    assert pe[p, 2 * i] == pytest.approx(np.sin(p / 10000 ** (2 * i / 6)), abs=1e-6)
    assert pe[p, 2 * i + 1] == pytest.approx(np.cos(p / 10000 ** (2 * i / 6)), abs=1e-6)
    assert sinusoidal_encoding(3, 5).shape == (3, 5)  # odd widths too


@pytest.mark.parametrize("fusion", ["attention", "gated"])
def test_outputs_have_the_right_shapes_and_are_float32(fusion):
    agent, layout, streams = make_agent(fusion)
    obs = agent.normalise(random_obs(layout, streams))
    action, logprob, entropy, value = agent.get_action_and_value(obs)
    assert action.shape == logprob.shape == entropy.shape == value.shape == (16,)
    assert logprob.dtype == value.dtype == torch.float32
    assert agent.get_value(obs).shape == (16,)
    assert agent.act_greedy(random_obs(layout, streams)).shape == (16,)
    mask = torch.zeros(16, 3, dtype=torch.bool)
    mask[:, 1] = True
    assert (agent.act_greedy(random_obs(layout, streams), mask) == 1).all()


def test_single_timeframe_is_the_same_code_with_one_stream():
    agent, layout, streams = make_agent(blocks=())
    assert [s.name for s in agent.streams] == ["window"] and len(agent.encoders) == 1
    obs = random_obs(layout, streams)
    assert torch.isfinite(agent.get_value(agent.normalise(obs))).all()


def test_padded_tokens_do_not_move_the_output_and_all_padding_stays_finite():
    agent, layout, streams = make_agent()
    agent.eval()
    obs = random_obs(layout, streams)
    part, stream = layout["tokens:4h"], streams[1]
    tokens = obs[:, part].view(16, stream.num_tokens, D)
    changed = obs.clone()
    changed_tokens = changed[:, part].view(16, stream.num_tokens, D)
    padded = tokens[..., -1] == 0
    assert padded.any()
    changed_tokens[..., :-1] = torch.where(padded[..., None], changed_tokens[..., :-1] + 7.0, changed_tokens[..., :-1])
    changed[:, part] = changed_tokens.reshape(16, -1)
    torch.testing.assert_close(agent.encode(changed), agent.encode(obs), rtol=0, atol=1e-6)
    # every token of a timeframe padded: the summary token keeps attention defined
    empty = obs.clone()
    empty[:, part.start + D - 1 : part.stop : D] = 0.0
    assert torch.isfinite(agent.encode(empty)).all()


def test_validity_flags_pass_the_normaliser_unchanged():
    agent, layout, streams = make_agent()
    obs = random_obs(layout, streams) * 3 + 1
    flag_cols = agent.raw_columns.nonzero().flatten()
    obs[:, flag_cols] = (obs[:, flag_cols] > 1).float()
    agent.obs_norm.update(obs)
    out = agent.normalise(obs)
    torch.testing.assert_close(out[:, flag_cols], obs[:, flag_cols], rtol=0, atol=0)
    assert not torch.equal(out[:, :5], obs[:, :5])
    plain, *_ = make_agent(norm_obs=False)
    assert plain.normalise(obs) is obs


def test_bad_configurations_are_refused():
    layout, streams = layout_and_streams()
    with pytest.raises(ValueError, match="at least one stream"):
        MultiTimeframeActorCritic(layout, [], 3)
    with pytest.raises(ValueError, match="fusion"):
        MultiTimeframeActorCritic(layout, streams, 3, fusion="sum")
    with pytest.raises(ValueError, match="divisible"):
        MultiTimeframeActorCritic(layout, streams, 3, d_model=15, heads=2)
    with pytest.raises(ValueError, match="layout width"):
        MultiTimeframeActorCritic(layout, [Stream("window", WINDOW + 1, F)], 3)
    with pytest.raises(ValueError, match="no agent state"):
        MultiTimeframeActorCritic({"window": layout["window"]}, streams[:1], 3)
    with pytest.raises(ValueError, match="does not split"):
        streams_for(layout, WINDOW + 1, [])


def losses_and_grads(agent, obs, actions, autocast_dtype=None):
    """A PPO-like loss (log-prob, entropy, value) and the gradient of every parameter, fp32 or under autocast."""
    agent.zero_grad()
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        _, logprob, entropy, value = agent.get_action_and_value(obs, actions)
    loss = -(logprob * torch.linspace(-1, 1, len(obs))).mean() - 0.01 * entropy.mean() + 0.5 * value.square().mean()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in agent.parameters()])


def test_bf16_autocast_matches_fp32_within_tolerance():
    """Stated tolerances: bf16 keeps 8 mantissa bits (~4e-3 relative per op). The loss agrees to 1e-2 absolute, the
    gradient vector (every parameter) to cosine similarity >= 0.999 and 5% relative norm. Measured on this case
    (2 blocks, d_model 16): 1.1e-3, 0.99996 and 1.0%."""
    agent, layout, streams = make_agent()
    obs = agent.normalise(random_obs(layout, streams, n=64))
    actions = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    loss32, grad32 = losses_and_grads(agent, obs, actions)
    loss16, grad16 = losses_and_grads(agent, obs, actions, torch.bfloat16)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in agent.parameters())
    assert torch.isfinite(grad16).all()
    assert abs(loss16.item() - loss32.item()) < 1e-2
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0).item()
    assert cosine >= 0.999, cosine
    assert (grad16.norm() - grad32.norm()).abs() / grad32.norm() < 0.05
    assert not torch.equal(grad16, grad32)  # autocast did run in bf16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast + GradScaler needs CUDA")
def test_fp16_on_cuda_matches_fp32_within_tolerance():  # pragma: no cover - CUDA only
    """fp16 has 11 mantissa bits: loss to 1e-2, gradient cosine >= 0.99 (scaled backward, then unscaled)."""
    agent, layout, streams = make_agent()
    agent = agent.cuda()
    obs = agent.normalise(random_obs(layout, streams, n=64).cuda())
    actions = torch.randint(0, 3, (64,)).cuda()
    loss32, grad32 = losses_and_grads_cuda(agent, obs, actions, None)
    loss16, grad16 = losses_and_grads_cuda(agent, obs, actions, torch.float16)
    assert abs(loss16.item() - loss32.item()) < 1e-2
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0).item() >= 0.99


def losses_and_grads_cuda(agent, obs, actions, dtype):  # pragma: no cover - CUDA only
    """As :func:`losses_and_grads` on CUDA, fp16 through a GradScaler."""
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.0)
    agent.zero_grad()
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        _, logprob, entropy, value = agent.get_action_and_value(obs, actions)
    loss = -(logprob * torch.linspace(-1, 1, len(obs), device="cuda")).mean() + 0.5 * value.square().mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    return loss.detach(), torch.cat([p.grad.flatten() for p in agent.parameters()])


def test_compile_switch_keeps_state_dict_keys_and_outputs():
    agent, layout, streams = make_agent()
    obs = agent.normalise(random_obs(layout, streams))
    eager = agent.get_value(obs)
    keys = list(agent.state_dict())
    agent.set_compile(True, backend="eager")  # dynamo traces; "eager" runs the captured graph without codegen
    torch.testing.assert_close(agent.get_value(obs), eager, rtol=1e-6, atol=1e-6)
    assert list(agent.state_dict()) == keys
    agent.set_compile(False)
    assert torch.equal(agent.get_value(obs), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor code generation is exercised on the GPU machine")
def test_inductor_compile_on_cuda():  # pragma: no cover - CUDA only
    agent, layout, streams = make_agent()
    agent = agent.cuda()
    obs = agent.normalise(random_obs(layout, streams).cuda())
    eager = agent.get_value(obs)
    agent.set_compile(True)
    torch.testing.assert_close(agent.get_value(obs), eager, rtol=1e-4, atol=1e-4)
