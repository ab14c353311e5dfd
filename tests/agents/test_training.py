"""Shared run plumbing: the resume rules (nested groups, allowed changes), sizes, devices and seeding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sentio_lab.agents import training
from sentio_lab.agents.arguments import SharedArgs
from sentio_lab.agents.checkpoint import CheckpointError


@dataclasses.dataclass
class Group:
    """A nested argument group (like ppo_masked's MaskConfig)."""

    limit: float = 1.0
    rule: str = "off"


@dataclasses.dataclass
class Args(SharedArgs):
    """A variant's arguments in miniature: the shared groups and a nested group of its own."""

    group: Group = dataclasses.field(default_factory=Group)


CONTROL = ("total_timesteps", "checkpoint_path")


def test_resume_takes_the_checkpoint_experiment_and_the_callers_control():
    saved = dataclasses.asdict(Args.from_flat(learning_rate=1e-3, group=Group(limit=0.5)))
    resumed = training.resume_args(Args.from_flat(total_timesteps=500), saved, "ck.pt", CONTROL)
    assert resumed.ppo.learning_rate == 1e-3 and resumed.group == Group(limit=0.5)
    assert resumed.ppo.total_timesteps == 500 and resumed.run.checkpoint_path == "ck.pt"


def test_resume_refuses_changes_field_by_field_in_nested_groups():
    # a flat args dict, as checkpoints written before the argument groups hold it
    saved = {"learning_rate": 1e-3, "ent_coef": 0.0, "group": Group(limit=0.5), "total_timesteps": 100,
             "checkpoint_path": None}
    with pytest.raises(CheckpointError) as error:
        training.resume_args(Args.from_flat(learning_rate=2e-3, group=Group(limit=0.7, rule="off")), saved, "ck.pt",
                             CONTROL)
    assert "learning_rate: given 0.002, checkpoint 0.001" in str(error.value)
    assert "group.limit: given 0.7, checkpoint 0.5" in str(error.value)
    assert "group.rule" not in str(error.value)  # left at its default: taken from the checkpoint


def test_same_value_treats_lists_and_tuples_alike():
    assert training.same_value((1, 2), [1, 2]) and not training.same_value((1, 2), [2, 1])
    assert training.same_value(0.5, 0.5) and not training.same_value(0.5, (0.5,))


def test_progress_postfix_and_device():
    assert training.progress_postfix(1234.4, []) == {"sps": "1,234", "ret": "n/a"}
    assert training.resolve_device("cpu") == torch.device("cpu")
    assert training.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_seed_everything_repeats_every_generator():
    draws = []
    for _ in range(2):
        training.seed_everything(7, deterministic=True)
        draws.append((np.random.rand(), torch.rand(1).item(), __import__("random").random()))
    assert draws[0] == draws[1]


@pytest.mark.parametrize("variant", ["ppo", "ppo_masked", "ppo_risk", "ppo_transformer"])
def test_every_variant_takes_every_cost_option(variant):
    """Each variant's Args carries all of COST_FIELDS, and cost_model builds the CostModel they ask for."""
    from sentio_lab.agents.variants import load_variant
    from sentio_lab.env.costs import CostModel

    module = load_variant(variant)
    chosen = dict(fee_bps=2.0, slippage_bps=3.0, borrow_bps=50.0, spread="abdi_ranaldo", impact="sqrt",
                  impact_y=0.5, capital=1e8, adv=2e9, participation=0.05, remainder="carry", cap_volume="forecast")
    assert set(chosen) == set(training.COST_FIELDS)
    args = module.Args.from_flat(**chosen)
    assert module.cost_model(args) == CostModel(**chosen)
    assert module.cost_model(module.Args.from_flat()) == CostModel()  # the defaults are today's flat model
