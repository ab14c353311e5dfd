"""Smoke test of the cost-model benchmark: every model measured, ratios to flat consistent; no timing assertions."""

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_costs.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_costs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_every_model_beside_flat(tmp_path, capsys):
    bench = load_bench()
    path = tmp_path / "bench.json"
    out = bench.main(["--quick", "--json", str(path)])
    printed = capsys.readouterr().out
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    names = [r["model"] for r in out["results"]]
    assert names == list(bench.cost_models(1e9)) and names[0] == "flat"
    flat = out["results"][0]
    for r in out["results"]:
        assert r["torch_steps_per_s"] > 0 and r["numpy_steps_per_s"] > 0
        for kind in ("torch", "numpy"):
            # three interleaved runs, the median kept; a ratio only where both spreads are within the limit
            assert len(r[kind + "_all_steps_per_s"]) == 3
            assert r[kind + "_steps_per_s"] == sorted(r[kind + "_all_steps_per_s"])[1]
            check, ratio = r[kind + "_ratio_check"], r[kind + "_ratio_to_flat"]
            reliable = max(r[kind + "_spread"], flat[kind + "_spread"]) <= 0.25
            assert check["reliable"] == reliable
            if reliable:
                assert math.isclose(ratio, r[kind + "_steps_per_s"] / flat[kind + "_steps_per_s"])
            else:
                assert ratio is None and check["text"].startswith("unreliable: spread") and check["text"] in printed
    assert out["settings"]["num_envs"] == bench.QUICK["num_envs"] and "--quick" in out["command"]
    assert "x flat" in printed and "sqrt+cap" in printed
