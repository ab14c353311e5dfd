"""``--weight-decay``: AdamW's decoupled decay on the weight matrices; 0 is the former Adam, bit for bit."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn, optim

from sentio_lab import ppo
from sentio_lab.agents import training
from sentio_lab.agents.checkpoint import load_checkpoint


def former_adam(agent: nn.Module, hp) -> optim.Optimizer:
    """The optimizer every variant built before --weight-decay existed."""
    return optim.Adam(agent.parameters(), lr=hp.learning_rate, eps=1e-5, fused=True)


def matrices(agent: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in agent.named_parameters() if p.ndim >= 2}


def test_zero_decay_trains_exactly_as_the_former_adam(tiny_args, synthetic_market, monkeypatch):
    now = ppo.train(tiny_args, market=synthetic_market)
    monkeypatch.setattr(training, "make_optimizer", former_adam)
    before = ppo.train(tiny_args.replace(run_name="former"), market=synthetic_market)
    now_state, before_state = now.agent.state_dict(), before.agent.state_dict()
    assert all(torch.equal(now_state[k], before_state[k]) for k in now_state)
    assert now.history[-1]["losses/value_loss"] == before.history[-1]["losses/value_loss"]


def test_decay_is_decoupled_and_spares_biases():
    """With a zero gradient Adam does not move, so one AdamW step is the decay alone: every weight matrix times
    (1 - lr * decay), every bias, gain and normaliser statistic exactly as it was."""
    agent = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    hp = ppo.Args.from_flat(learning_rate=0.01, weight_decay=0.5).ppo
    optimizer = training.make_optimizer(agent, hp)
    assert isinstance(optimizer, optim.AdamW)
    before = {name: p.detach().clone() for name, p in agent.named_parameters()}
    (0.0 * sum(p.sum() for p in agent.parameters())).backward()
    optimizer.step()
    for name, p in agent.named_parameters():
        factor = 1 - 0.01 * 0.5 if p.ndim >= 2 else 1.0
        assert torch.allclose(p, before[name] * factor, rtol=0, atol=1e-7), name
        assert p.ndim >= 2 or torch.equal(p, before[name]), name
    plain = training.make_optimizer(agent, ppo.Args.from_flat().ppo)
    assert type(plain) is optim.Adam and len(plain.param_groups) == 1


def test_weight_decay_shrinks_the_trained_weights(tiny_args, synthetic_market):
    args = tiny_args.replace(learning_rate=1e-3, anneal_lr=False)
    free = ppo.train(args, market=synthetic_market)
    decayed = ppo.train(args.replace(run_name="decayed", weight_decay=10.0), market=synthetic_market)
    free_w, decayed_w = matrices(free.agent), matrices(decayed.agent)
    for name in free_w:
        assert decayed_w[name].norm() < 0.95 * free_w[name].norm(), name
    # the checkpoint records the decay, and annealing (when on) moves every parameter group's rate
    bundle = load_checkpoint(decayed.checkpoint_path, variant="ppo")
    assert [g["weight_decay"] for g in bundle["optimizer"]["param_groups"]] == [10.0, 0.0]
    annealed = ppo.train(tiny_args.replace(run_name="annealed", weight_decay=0.1), market=synthetic_market)
    rates = {g["lr"] for g in load_checkpoint(annealed.checkpoint_path)["optimizer"]["param_groups"]}
    assert len(rates) == 1 and rates != {tiny_args.ppo.learning_rate}


@pytest.mark.parametrize("variant", ["ppo_masked", "ppo_risk", "ppo_transformer"])
def test_every_variant_builds_its_optimizer_with_the_flag(variant, tiny_args, synthetic_market):
    module = importlib.import_module(f"sentio_lab.{variant}")
    tokenless = {"token_timeframes": (), "token_counts": (), "d_model": 8, "n_heads": 2}
    own = tokenless if variant == "ppo_transformer" else {}
    args = module.Args.from_flat(**{**tiny_args.flat(), "weight_decay": 0.25, "max_iterations": 1, **own})
    result = module.train(args, market=synthetic_market)
    groups = load_checkpoint(result.checkpoint_path, variant=variant)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]


def test_negative_decay_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--weight-decay -1"):
        training.make_optimizer(nn.Linear(2, 2), ppo.Args.from_flat(weight_decay=-1.0).ppo)
