"""Smoke test of the throughput benchmark: structure of its output, no timing assertions."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("stable_baselines3")

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_ppo_vs_sb3.py"


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
        # --quick runs each candidate once: no ratio from a single run, and the table says so
        for name in ("ours_over_floor", "ours_over_sb3"):
            assert r[name] is None and r[name + "_check"]["text"] == "unreliable: 1 run < 3"
        assert r["ours"]["n"] == 1 and r["ours"]["all_steps_per_s"] == [ours]
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
    assert "unreliable: 1 run < 3" in printed
    assert set(out["goals"].values()) == {None}  # no goal judged on refused ratios


def test_ratios_and_goals_from_repeated_runs_median_and_refusal():
    bench = load_bench()

    def runs(*values):
        return bench._best([{"steps_per_s": v} for v in values])

    row = {"num_envs": 512, "ours": runs(90.0, 91.0, 89.0), "floor": runs(100.0, 100.0, 101.0),
           "sb3": runs(20.0, 21.0, 19.0)}
    bench.set_ratio(row, "ours_over_floor", "ours", "floor")
    bench.set_ratio(row, "ours_over_sb3", "ours", "sb3")
    assert math.isclose(row["ours_over_floor"], 0.9) and math.isclose(row["ours_over_sb3"], 4.5)
    assert all(bench.goals([row]).values())
    assert "0.90" in bench.format_table([{**row, "batch_size": 1, "minibatch_size": 1, "sb3": {**row["sb3"],
                                                                                               "vec_env": "Dummy"}}])
    # the incident: the floor hit once by outside load would have read ours/floor 6.36
    row["floor"] = runs(100.0, 14.0, 101.0)
    bench.set_ratio(row, "ours_over_floor", "ours", "floor")
    assert row["ours_over_floor"] is None and row["ours_over_floor_check"]["text"].startswith("unreliable: spread")
    assert bench.goals([row])["ours_over_floor>=0.8_at_every_N"] is None


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
