"""Smoke test of the ppo_risk throughput benchmark: structure of its output, no timing assertions."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_ppo_risk.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_ppo_risk", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_candidate_its_floor_and_consistent_ratios(tmp_path, capsys):
    bench = load_bench()
    out_path = tmp_path / "bench.json"
    out = bench.main(["--quick", "--json", str(out_path)])
    assert json.loads(out_path.read_text()) == json.loads(json.dumps(out))
    assert [r["num_envs"] for r in out["results"]] == bench.QUICK["num_envs"]
    for r in out["results"]:
        for c in bench.CANDIDATES:
            assert r[c]["steps_per_s"] > 0 and r[c + "_floor"]["steps_per_s"] > 0
            assert r[c + "_over_floor"] is None  # --quick: one run each, no ratio
            assert r[c + "_over_floor_check"]["text"] == "unreliable: 1 run < 3"
            assert r[c]["steps"] == r["batch_size"] * bench.QUICK["iterations"]
        assert r["risk_over_ppo"] is None and r["risk_over_ppo_check"]["text"] == "unreliable: 1 run < 3"
    assert out["settings"]["num_quantiles"] == 4 and "--quick" in out["command"]
    printed = capsys.readouterr().out
    assert "risk/ppo" in printed and "risk_full/floor" in printed and "unreliable: 1 run < 3" in printed


def test_null_cost_env_reports_a_zero_drawdown_cost():
    bench = load_bench()
    env = bench.NullCostEnv(num_envs=3, obs_dim=5, num_actions=3)
    env.reset()
    info = env.step(torch.zeros(3, dtype=torch.long))[4]
    assert info["drawdown_cost"].shape == (3,) and not info["drawdown_cost"].any()
