"""Smoke test of the transformer profile: both tables, shares that add up, the variant left as it was."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sentio_lab.agents.nets import transformer as transformer_nets

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "profile_transformer.py"


def load():
    spec = importlib.util.spec_from_file_location("profile_transformer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_profile_gives_phase_and_op_shares_and_restores_the_variant(tmp_path):
    profile = load()
    net = transformer_nets.MultiTimeframeActorCritic
    before = (net.get_action_and_value, net.get_value, torch.Tensor.backward, torch.optim.Adam.step)
    threads = torch.get_num_threads()
    try:
        out = profile.main(["--quick", "--threads", "1", "--json", str(tmp_path / "p.json")])
    finally:
        torch.set_num_threads(threads)
    assert (net.get_action_and_value, net.get_value, torch.Tensor.backward, torch.optim.Adam.step) == before
    assert [r["phase"] for r in out["phases"]] == list(profile.PHASES)
    # every labelled phase ran inside the profiled iteration, and together they fit inside it
    assert all(r["seconds"] > 0 for r in out["phases"]) and sum(r["share"] for r in out["phases"]) <= 1.0
    assert len(out["ops"]) == profile.QUICK["top"] and all(r["op"].startswith("aten::") for r in out["ops"])
    shares = [r["share"] for r in out["ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0
    assert out["batch"] == profile.QUICK["num_envs"] * profile.QUICK["num_steps"]
