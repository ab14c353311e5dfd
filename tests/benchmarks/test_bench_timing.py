"""The benchmarks' shared timing discipline (experiments/benchmarks/_timing.py), with a fake clock: interleaving
order, median, spread, and the refusal of a ratio from too few or too scattered runs. No timing assertions."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks" / "_timing.py"


def load():
    spec = importlib.util.spec_from_file_location("_timing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleave_calls_a_b_a_b_and_keeps_results_per_candidate():
    timing = load()
    calls = []
    runs = timing.interleave({"a": lambda: calls.append("a") or len(calls),
                              "b": lambda: calls.append("b") or len(calls)}, repeats=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert runs == {"a": [1, 3, 5], "b": [2, 4, 6]}
    with pytest.raises(ValueError, match="repeats"):
        timing.interleave({"a": lambda: 1}, repeats=0)


def test_timed_reads_the_clock_before_and_after_the_call():
    timing = load()
    ticks = iter([10.0, 12.5])
    seen = []
    assert timing.timed(lambda: seen.append(1), clock=lambda: next(ticks)) == 2.5
    assert seen == [1]


def test_summarise_gives_median_and_spread_over_the_median():
    timing = load()
    s = timing.summarise([100.0, 80.0, 120.0, 90.0])
    assert s["median"] == 95.0 and s["min"] == 80.0 and s["max"] == 120.0 and s["n"] == 4
    assert s["spread"] == pytest.approx(40.0 / 95.0)
    assert timing.summarise([7.0])["spread"] == 0.0
    with pytest.raises(ValueError):
        timing.summarise([])


def test_median_run_keeps_the_median_not_the_fastest():
    timing = load()
    m = timing.median_run([{"steps_per_s": 10.0, "x": 1}, {"steps_per_s": 100.0, "x": 2},
                           {"steps_per_s": 12.0, "x": 3}])
    assert m["steps_per_s"] == 12.0 and m["x"] == 3 and m["n"] == 3
    assert m["all_steps_per_s"] == [10.0, 100.0, 12.0] and m["spread"] == pytest.approx(90.0 / 12.0)


def _summary(timing, values):
    return timing.median_run([{"steps_per_s": v} for v in values])


def test_ratio_is_given_for_tight_runs_and_refused_for_scattered_or_too_few():
    timing = load()
    ours, floor = _summary(timing, [60.0, 62.0, 61.0]), _summary(timing, [100.0, 101.0, 99.0])
    ok = timing.ratio(ours, floor)
    assert ok["reliable"] and ok["ratio"] == pytest.approx(0.61) and ok["text"] == "0.61"
    # the incident: one floor run hit by outside load
    corrupted = _summary(timing, [100.0, 4.0, 99.0])
    bad = timing.ratio(ours, corrupted)
    assert bad["ratio"] is None and not bad["reliable"]
    assert bad["text"] == f"unreliable: spread {96 / 99:.1%} > limit 25%"
    # either side may be the scattered one; the limit is a parameter
    assert timing.ratio(corrupted, ours)["ratio"] is None
    assert timing.ratio(ours, corrupted, limit=1.0)["ratio"] == pytest.approx(61.0 / 99.0)
    # spread exactly at the limit is still accepted
    edge = _summary(timing, [80.0, 100.0, 105.0])  # (105 - 80) / 100 = 25 %
    assert timing.ratio(edge, floor)["reliable"]
    few = timing.ratio(_summary(timing, [60.0]), _summary(timing, [100.0]))
    assert few["ratio"] is None and few["text"] == "unreliable: 1 run < 3"
    assert timing.fmt_ratio(few, 24) == "   unreliable: 1 run < 3" and timing.fmt_ratio(None, 3) == "  -"
