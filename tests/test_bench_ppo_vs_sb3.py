"""Smoke test of the throughput benchmark: structure of its output, no timing assertions."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("stable_baselines3")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "bench_ppo_vs_sb3.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_ppo_vs_sb3", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_all_three_and_consistent_ratios(tmp_path, capsys):
    bench = load_bench()
    out_path = tmp_path / "bench.json"
    out = bench.main(["--quick", "--json", str(out_path)])

    assert json.loads(out_path.read_text()) == json.loads(json.dumps(out))
    assert [r["num_envs"] for r in out["results"]] == bench.QUICK["num_envs"]
    for r in out["results"]:
        ours, sb3, floor = (r[k]["steps_per_s"] for k in ("ours", "sb3", "floor"))
        assert ours > 0 and sb3 > 0 and floor > 0
        assert math.isclose(r["ours_over_floor"], ours / floor)
        assert math.isclose(r["ours_over_sb3"], ours / sb3)
        assert r["sb3"]["vec_env"] in r["sb3"]["candidates"]
        assert r["sb3"]["steps_per_s"] == max(r["sb3"]["candidates"].values())
        assert r["batch_size"] == r["num_envs"] * r["num_steps"]
        assert r["minibatch_size"] == min(bench.QUICK["minibatch_size"], r["batch_size"])
        for k in ("ours", "sb3", "floor"):
            assert r[k]["steps"] == r["batch_size"] * bench.QUICK["iterations"]
    # Both vec envs were measured where N <= subproc_max_envs, DummyVecEnv only above.
    first, last = out["results"][0], out["results"][-1]
    assert set(first["sb3"]["candidates"]) == {"DummyVecEnv", "SubprocVecEnv"}
    assert set(last["sb3"]["candidates"]) == {"DummyVecEnv"}

    machine = out["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] == 2
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    assert "--quick" in out["command"]

    printed = capsys.readouterr().out
    assert "ours/floor" in printed and "ours/SB3" in printed and "DummyVecEnv" in printed


def test_null_env_costs_nothing_and_never_ends():
    import torch

    bench = load_bench()
    env = bench.NullEnv(num_envs=3, obs_dim=5, num_actions=3)
    first = env.reset()
    obs, reward, terminated, truncated, info = env.step(torch.zeros(3, dtype=torch.long))
    assert obs.shape == first.shape == (3, 5) and not torch.equal(obs, first)
    assert reward.dtype == torch.float64 and not reward.any()
    assert terminated.dtype == truncated.dtype == torch.bool and not (terminated | truncated).any()
    assert info["final_obs"] is obs


def test_minibatch_is_capped_at_the_batch():
    bench = load_bench()
    cli = bench.parse_args(["--num-envs", "8", "512"])
    small, large = (bench.settings_for(n, cli) for n in cli.num_envs)
    assert small["batch_size"] == 1024 and small["minibatch_size"] == 1024 and small["num_minibatches"] == 1
    assert large["batch_size"] == 65536 and large["minibatch_size"] == 2048 and large["num_minibatches"] == 32
