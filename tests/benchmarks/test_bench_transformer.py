"""Smoke test of the transformer benchmark: structure of its output, skips and arithmetic, no timing assertions."""

import importlib.util
import json
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_transformer.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_transformer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_measurement_in_process_reports_throughput_and_memory():
    bench = load_bench()
    opts = bench.parse_args(["--quick", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        r = bench.measure_one("transformer", "bf16", 8, opts)
    finally:
        torch.set_num_threads(threads)
    assert r["batch"] == 8 * opts.num_steps and r["finite"] is True
    assert math.isclose(r["steps_per_s"], r["batch"] / r["iteration_seconds"])
    assert 0 < r["iteration_seconds"] < r["wall_seconds"]
    assert r["peak_mb"] >= r["rss_before_mb"] > 0 and r["parameters"] > 0


def test_quick_run_in_subprocesses_writes_json_and_notes_skips(tmp_path, capsys):
    bench = load_bench()
    out_path = tmp_path / "bench.json"
    out = bench.main(["--quick", "--models", "transformer", "--precisions", "fp32", "fp16", "--threads", "1",
                      "--json", str(out_path)])
    assert json.loads(out_path.read_text())["results"] == json.loads(json.dumps(out["results"]))
    [r] = out["results"]
    assert (r["model"], r["precision"], r["num_envs"]) == ("transformer", "fp32", 8)
    if not torch.cuda.is_available():
        assert out["skipped"] == ["transformer fp16: needs CUDA (fp16 autocast + GradScaler)"]
    assert "ru_maxrss" in out["memory_method"] and out["machine"]["torch_threads"] == 1
    printed = capsys.readouterr().out
    assert "steps/s" in printed and "transformer" in printed
