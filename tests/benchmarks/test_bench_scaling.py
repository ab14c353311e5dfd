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
    assert rows[0]["speedup_vs_first"] == 1.0 and "tune" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only skip")
def test_cuda_part_skips_cleanly_without_a_gpu(bench):
    rows = bench.bench_ddp(bench.parse(["--device", "cuda", "--quick"]))
    assert rows == [{"skipped": "no CUDA device here: GPU figures not measured"}]
