"""Smoke test of the masked throughput benchmark: structure of its output, no timing assertions."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sb3_contrib")

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_masked_vs_sb3_contrib.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_masked_vs_sb3_contrib", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_all_three_with_masks_on_and_consistent_ratios(tmp_path, capsys):
    bench = load_bench()
    out_path = tmp_path / "bench.json"
    out = bench.main(["--quick", "--json", str(out_path)])

    assert json.loads(out_path.read_text()) == json.loads(json.dumps(out))
    assert [r["num_envs"] for r in out["results"]] == bench.QUICK["num_envs"]
    assert out["settings"]["mask_rules"] == ["long_only", "cooldown"]
    assert out["settings"]["positions"] == list(bench.POSITIONS) and out["settings"]["num_actions"] == 5
    for r in out["results"]:
        ours, maskable, floor = (r[k]["steps_per_s"] for k in ("ours", "maskable", "floor"))
        assert ours > 0 and maskable > 0 and floor > 0
        # --quick runs each candidate once: no ratio from a single run
        for name in ("ours_over_floor", "ours_over_maskable"):
            assert r[name] is None and r[name + "_check"]["text"] == "unreliable: 1 run < 3"
        assert r["maskable"]["vec_env"] in r["maskable"]["candidates"]
        assert r["maskable"]["steps_per_s"] == max(r["maskable"]["candidates"].values())
        assert r["batch_size"] == r["num_envs"] * r["num_steps"]
        assert r["minibatch_size"] == min(bench.QUICK["minibatch_size"], r["batch_size"])
        for k in ("ours", "maskable", "floor"):
            assert r[k]["steps"] == r["batch_size"] * bench.QUICK["iterations"]
        # the same rules are on in ours and in MaskablePPO's envs, and they did mask something
        for k in ("ours", "maskable"):
            assert set(r[k]["mask_binding"]) == {"long_only", "cooldown"}
            assert r[k]["mask_binding"]["long_only"] > 0
    first, last = out["results"][0], out["results"][-1]
    assert set(first["maskable"]["candidates"]) == {"DummyVecEnv", "SubprocVecEnv"}
    assert set(last["maskable"]["candidates"]) == {"DummyVecEnv"}
    assert out["goals"]["ours_over_floor>=0.8_at_every_N"] is None

    assert out["machine"]["torch_threads"] == 2 and "--quick" in out["command"]
    printed = capsys.readouterr().out
    assert "ours/floor" in printed and "ours/MaskablePPO" in printed
    assert "goal ours >= 80% of the floor at every N: n/a" in printed
    assert "unreliable: 1 run < 3" in printed


def test_goal_is_judged_on_reliable_ratios_only():
    bench = load_bench()
    key = "ours_over_floor>=0.8_at_every_N"
    assert bench.goals([{"ours_over_floor": 0.85}, {"ours_over_floor": 0.81}])[key]
    assert not bench.goals([{"ours_over_floor": 0.85}, {"ours_over_floor": 0.7}])[key]
    assert bench.goals([{"ours_over_floor": 0.85}, {"ours_over_floor": None}])[key] is None


def test_masked_null_env_gives_a_constant_free_mask():
    import torch

    bench = load_bench()
    cli = bench.parse_args([])
    valid = bench.floor_mask(cli)
    assert valid.tolist() == [False, False, True, True, True]  # long-only on -1, -0.5, 0, 0.5, 1
    env = bench.MaskedNullEnv(num_envs=3, obs_dim=5, valid=valid)
    env.reset()
    mask = env.action_masks()
    assert mask.shape == (3, 5) and mask.dtype == torch.bool
    assert (mask == torch.as_tensor(valid)).all()
    env.step(torch.zeros(3, dtype=torch.long))
    assert env.action_masks() is mask
    assert bench.floor_mask(bench.parse_args(["--no-long-only"])).all()


def test_aliases_and_mask_rules_from_the_command_line():
    bench = load_bench()
    cli = bench.parse_args(["--sizes", "8", "512", "--cooldown", "5", "--no-long-only"])
    assert cli.num_envs == [8, 512]
    masks = bench.mask_config(cli)
    assert masks.cooldown == 5 and not masks.long_only
    s = bench.settings_for(512, cli)
    args = bench.masked_args(s, cli, "runs")
    assert args.masks == masks and args.env.positions == bench.POSITIONS
    assert args.ppo.num_minibatches == 32 and not args.ppo.anneal_lr and args.ppo.target_kl is None
    assert np.isclose(args.ppo.learning_rate, 2.5e-4)
