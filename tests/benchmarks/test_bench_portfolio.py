"""Smoke test of the portfolio throughput benchmark: both envs measured on the same asset-steps, ratios consistent;
no timing assertions."""

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_portfolio.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_portfolio", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_compares_portfolio_and_single_asset_envs(tmp_path, capsys):
    bench = load_bench()
    path = tmp_path / "bench.json"
    out = bench.main(["--quick", "--json", str(path)])
    printed = capsys.readouterr().out
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    assert out["settings"]["assets"] == bench.QUICK["assets"] and "--quick" in out["command"]
    (row,) = out["results"]
    assert row["num_envs"] == 4 and row["single_num_envs"] == 4 * bench.QUICK["assets"]  # same asset-steps
    for side in ("portfolio", "single"):
        assert len(row[side + "_all"]) == 3 and row[side + "_asset_steps_per_s"] == sorted(row[side + "_all"])[1]
    check = row["ratio_check"]
    assert check["reliable"] == (max(row["portfolio_spread"], row["single_spread"]) <= 0.25)
    if check["reliable"]:
        assert math.isclose(row["ratio"], row["portfolio_asset_steps_per_s"] / row["single_asset_steps_per_s"])
    else:
        assert row["ratio"] is None and check["text"] in printed
