"""Shared timing discipline of the benchmarks: interleave, repeat, take the median, and refuse noisy ratios.

A concurrent job can corrupt one measurement (issue 18 section 3: a floor read 4,000 steps/s beside 58,589 at
the next N, and the script printed ratio 6.36, goal met). So every benchmark that prints a ratio between two
candidates (ours and its floor, a cost model and flat, ...) measures them

* **interleaved**: ``A B A B ...`` (:func:`interleave`), so a burst of outside load hits both, not one;
* **repeated**: at least :data:`MIN_REPEATS` times, summarised by the **median** (:func:`summarise`);
* with the **spread** ``(max - min) / median`` of each candidate's runs printed beside it;

and :func:`ratio` gives ``None`` (printed as ``unreliable: spread X% > limit Y%``) when either side's spread
exceeds the limit or either side has fewer than :data:`MIN_REPEATS` runs: no ratio from measurements that
disagree with themselves.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

#: Runs per candidate below which no ratio is given.
MIN_REPEATS = 3
#: Widest spread ``(max - min) / median`` of either side's runs at which a ratio is still given (25 %).
SPREAD_LIMIT = 0.25


def interleave(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Call every candidate once per round, in the given order, for ``repeats`` rounds (A B A B ...).

    Returns each candidate's results in call order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs: dict[str, list[Any]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, call in candidates.items():
            runs[name].append(call())
    return runs


def timed(call: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds ``call()`` took on ``clock``."""
    start = clock()
    call()
    return clock() - start


def summarise(values: list[float]) -> dict[str, Any]:
    """Median, min, max and spread ``(max - min) / median`` of repeated measurements (all kept under ``runs``)."""
    if not values:
        raise ValueError("no measurements to summarise")
    median = statistics.median(values)
    lo, hi = min(values), max(values)
    spread = (hi - lo) / median if median > 0 else float("inf")
    return {"median": median, "min": lo, "max": hi, "spread": spread, "n": len(values), "runs": list(values)}


def median_run(runs: list[dict], key: str = "steps_per_s") -> dict:
    """Summarise repeated runs (dicts with ``key``): the median run's fields with ``key`` set to the median,
    plus ``spread``, ``n`` and every run's ``key`` under ``all_<key>``."""
    stats = summarise([r[key] for r in runs])
    closest = min(runs, key=lambda r: abs(r[key] - stats["median"]))
    return {**closest, key: stats["median"], "spread": stats["spread"], "n": stats["n"],
            "all_" + key: stats["runs"]}


def ratio(numerator: dict, denominator: dict, key: str = "steps_per_s", limit: float = SPREAD_LIMIT,
          min_repeats: int = MIN_REPEATS) -> dict[str, Any]:
    """``numerator[key] / denominator[key]`` of two :func:`median_run` summaries, or a refusal.

    Returns ``{"ratio": float | None, "reliable": bool, "spread": worst spread, "text": printable}``; the ratio is
    ``None`` and ``text`` says why when either side's spread exceeds ``limit`` or has fewer than ``min_repeats`` runs.
    """
    spread = max(numerator["spread"], denominator["spread"])
    n = min(numerator["n"], denominator["n"])
    value = numerator[key] / denominator[key]
    if n < min_repeats:
        why = f"unreliable: {n} run{'s' if n != 1 else ''} < {min_repeats}"
    elif spread > limit:
        why = f"unreliable: spread {spread:.1%} > limit {limit:.0%}"
    else:
        return {"ratio": value, "reliable": True, "spread": spread, "text": f"{value:.2f}"}
    return {"ratio": None, "reliable": False, "spread": spread, "text": why}


def fmt_ratio(r: dict | None, width: int) -> str:
    """A :func:`ratio` result right-aligned in ``width`` (``-`` when absent)."""
    return f"{'-' if r is None else r['text']:>{width}}"
