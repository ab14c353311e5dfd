"""Smoke test of the scaling benchmark: its DDP part runs at 1 and 2 processes and reports consistent figures."""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_scaling.py"


@pytest.fixture()
def bench(monkeypatch):
    # importable by name: the DDP part spawns processes that unpickle its worker function by module name
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("bench_scaling")


@pytest.mark.slow
def test_quick_ddp_part_reports_steps_per_second(tmp_path, bench):
    out = bench.main(["--part", "ddp", "--quick", "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(out, default=str))
    rows = out["ddp"]
    assert [r["processes"] for r in rows] == [1, 2] and [r["num_envs_per_process"] for r in rows] == [16, 8]
    for r in rows:
        assert r["env_steps"] == bench.QUICK["timesteps"] and r["seconds"] > 0
        assert math.isclose(r["steps_per_s"], r["env_steps"] / r["seconds"])
    # one run each (--quick): the speed-up is refused, never printed from a single noisy measurement
    assert [r["n"] for r in rows] == [1, 1] and all(r["speedup_vs_first"] is None for r in rows)
    assert rows[1]["speedup_check"]["text"] == "unreliable: 1 run < 3" and "tune" not in out


def test_ddp_rows_are_medians_of_interleaved_runs_with_a_guarded_speedup(bench, monkeypatch):
    calls = []
    fake = {1: iter([100.0, 300.0, 110.0, 105.0]), 2: iter([180.0, 190.0, 200.0, 185.0])}

    def once(world, options):
        calls.append(world)
        sps = next(fake[world])
        return {"processes": world, "env_steps": 1000, "seconds": 1000 / sps, "steps_per_s": sps,
                "num_envs_per_process": 16 // world}

    monkeypatch.setattr(bench, "_ddp_once", once)
    options = bench.parse(["--quick"])
    options.repeats = 3  # --quick sets 1
    rows = bench.bench_ddp(options)
    assert calls == [1, 2, 1, 2, 1, 2]  # interleaved
    assert [r["steps_per_s"] for r in rows] == [110.0, 190.0] and rows[1]["all_steps_per_s"] == [180.0, 190.0, 200.0]
    # K = 1 spread (300 - 100) / 110: no speed-up from it
    assert rows[1]["speedup_vs_first"] is None and "unreliable: spread 181.8%" in rows[1]["speedup_check"]["text"]
    fake = {1: iter([100.0, 104.0, 102.0]), 2: iter([180.0, 190.0, 200.0])}
    rows = bench.bench_ddp(options)
    assert math.isclose(rows[1]["speedup_vs_first"], 190.0 / 102.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only skip")
def test_cuda_part_skips_cleanly_without_a_gpu(bench):
    rows = bench.bench_ddp(bench.parse(["--device", "cuda", "--quick"]))
    assert rows == [{"skipped": "no CUDA device here: GPU figures not measured"}]
