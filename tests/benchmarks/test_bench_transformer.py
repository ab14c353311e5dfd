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


def test_repeated_runs_give_the_median_its_spread_and_guarded_ratios():
    bench = load_bench()

    def run(model, precision, sps, mb=100.0):
        return {"model": model, "precision": precision, "num_envs": 8, "steps_per_s": sps, "peak_mb": mb,
                "rss_before_mb": 50.0, "parameters": 10}

    runs = {("mlp", "fp32"): [run("mlp", "fp32", v) for v in (1000.0, 1100.0, 1050.0)],
            ("transformer", "fp32"): [run("transformer", "fp32", v, mb=v / 10) for v in (200.0, 210.0, 190.0)],
            ("transformer", "bf16"): [run("transformer", "bf16", v) for v in (100.0, 300.0, 150.0)]}
    rows = {(r["model"], r["precision"]): r for r in bench.summarise_runs(runs)}
    mlp, tf, bf = rows["mlp", "fp32"], rows["transformer", "fp32"], rows["transformer", "bf16"]
    assert (mlp["steps_per_s"], tf["steps_per_s"]) == (1050.0, 200.0) and tf["peak_mb"] == 20.0  # the median run
    assert math.isclose(tf["spread"], 20 / 200) and tf["n"] == 3 and tf["all_steps_per_s"] == [200.0, 210.0, 190.0]
    assert math.isclose(tf["over_mlp"]["ratio"], 200 / 1050) and mlp["over_mlp"] is None
    # bf16's runs spread 133 %: no ratio from them, and the printed table says why
    assert bf["over_fp32"]["ratio"] is None and "unreliable: spread" in bf["over_fp32"]["text"]
    assert bf["over_mlp"] is None  # no mlp bf16 measured
    table = bench.format_table(list(rows.values()))
    assert "0.19" in table and "unreliable: spread 133.3% > limit 25%" in table
