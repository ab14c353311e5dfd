"""Smoke test of the evaluation benchmark: structure of its output and its correctness check, no timing assertions."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "bench_evaluation.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_evaluation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_serial_and_batched_with_consistent_ratios(tmp_path, capsys):
    bench = load_bench()
    out_path = tmp_path / "bench.json"
    out = bench.main(["--quick", "--json", str(out_path)])

    assert json.loads(out_path.read_text()) == json.loads(json.dumps(out))
    q = bench.QUICK
    serial, *batched = out["results"]
    assert [r["name"] for r in batched] == [f"batched {x}" for x in q["layouts"]]
    assert all(r["episodes"] == q["episodes"] for r in out["results"])
    assert serial["measured_episodes"] == q["serial_episodes"] and serial["extrapolated"]
    assert math.isclose(serial["seconds"], serial["measured_seconds"] * q["episodes"] / q["serial_episodes"])
    for r in out["results"]:
        assert r["seconds"] > 0
        assert math.isclose(r["episodes_per_s"], r["episodes"] / r["seconds"])
        assert math.isclose(r["steps_per_s"], r["episodes"] * q["episode_length"] / r["seconds"])
    for r in batched:  # one run each (--quick): the speed-up is refused, never read off a single measurement
        assert r["speedup"] is None and r["speedup_check"]["text"] == "unreliable: 1 run < 3"
        assert r["runs"] == 1 and r["spread"] == 0.0
    assert out["serial_identical_to_batched"] is True  # the speed-up is for the same output
    assert set(out["goals"]) == {f"batched_{x}_under_10s" for x in q["layouts"]}
    assert out["settings"]["steps"] == q["episodes"] * q["episode_length"] and "--quick" in out["command"]
    assert out["machine"]["torch_threads"] == 2 and len(out["machine"]["load_average_end"]) == 3

    printed = capsys.readouterr().out
    assert "extrapolated" in printed and "speed-up" in printed and "batched 3x4" in printed
    assert "unreliable: 1 run < 3" in printed
    assert "identical (bit for bit) to the batched ones: True" in printed


def test_episode_ranges_have_exactly_the_requested_length(sp500_market):
    from sentio_lab import ppo
    from sentio_lab.evaluation.episodes import evaluate_policies

    bench = load_bench()
    starts = bench.spread_starts(sp500_market, 8, 30, 5)
    assert starts[0] == sp500_market.arrays.first_valid + 7 and starts[-1] == len(sp500_market.arrays.close) - 31
    market, names = bench.episode_market(sp500_market, starts, 30)
    agents = bench.make_agents(market, 2, 8, 16)
    results = evaluate_policies(agents, market, names, window=8, positions=ppo.Args().env.positions,
                                costs=ppo.cost_model(ppo.Args.from_flat()))
    for row in results:
        assert [e.start for e in row] == starts and all(len(e.weights) == 30 for e in row)
    assert not agents[0].obs_norm.mean.eq(agents[1].obs_norm.mean).all()  # each normaliser saw its own batch


def test_layouts_must_add_up_to_the_episodes():
    bench = load_bench()
    assert bench.parse_args([]).layouts == [(1, 1000), (20, 50)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--episodes", "100", "--layouts", "3x30"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--layouts", "20by50"])


def test_measurements_are_interleaved_and_summarised_by_their_median():
    bench = load_bench()
    calls, clock = [], iter([0.0, 1.0, 1.0, 1.5, 10.0, 13.0, 13.0, 13.4, 20.0, 22.0, 22.0, 22.6])
    timings, last = bench.measure_interleaved({"serial": lambda: calls.append("s") or len(calls),
                                               "batched": lambda: calls.append("b") or len(calls)}, repeats=3,
                                               clock=lambda: next(clock))
    assert calls == ["s", "b", "s", "b", "s", "b"] and last == {"serial": 5, "batched": 6}
    assert timings["serial"]["all_seconds"] == [1.0, 3.0, 2.0] and timings["serial"]["seconds"] == 2.0
    assert math.isclose(timings["batched"]["seconds"], 0.5) and math.isclose(timings["batched"]["spread"], 0.4)
