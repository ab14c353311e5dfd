"""Time the full TA-Lib feature bank: 20 years of daily bars (sp500) and one year of hourly bars (eurusd_1h).

Targets on 2 CPU cores: sp500 < 5 s, eurusd_1h < 10 s. For each dataset the script times

* ``raw``: computing every producer of the ``"talib"`` bank on the base timeframe (no cache);
* ``observation``: ``build_observation_features`` with the talib bank end to end (validation, raw
  features, normaliser fit on the chronological training range, float32 matrix), no cache;
* ``observation+mtf+hmm``: the same plus higher timeframes and a 3-state HMM (4 restarts), to show what
  the optional blocks cost;
* ``default``: the default ``FeatureConfig()`` (the "basic" bank every PPO run uses; target < 1 s).

Each figure is the best of ``--repeat`` runs after one warm-up call (imports, TA-Lib initialisation and
data loading are excluded). It prints feature counts and the machine. Not a test: nothing is asserted.

Run ``python experiments/benchmarks/bench_features.py [--repeat 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import numpy as np  # noqa: E402

from sentio_lab.data import chronological_split, load_market  # noqa: E402
from sentio_lab.features import (  # noqa: E402
    Bars,
    FeatureConfig,
    build_observation_features,
    compute_features,
    registered_producers,
)

TARGETS_S = {"sp500": 5.0, "eurusd_1h": 10.0}
TIMEFRAMES = {"sp500": ("W-FRI",), "eurusd_1h": ("4h", "1D")}


def best_of(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(dataset: str, repeat: int) -> dict:
    market = load_market(dataset)
    frame = market.frame
    stop = chronological_split(market)["train"].stop
    producers = registered_producers("talib")
    bars = Bars.from_frame(frame)
    values, names, lookback = compute_features(bars, producers)
    usable = values[lookback:]
    informative = int(np.sum(np.ptp(usable, axis=0) > 0))
    full = FeatureConfig(bank="talib")
    mtf = FeatureConfig(bank="talib", timeframes=TIMEFRAMES[dataset], regimes=3)
    obs = build_observation_features(frame, stop, full)
    obs_mtf = build_observation_features(frame, stop, mtf)
    return {
        "dataset": dataset,
        "bars": len(frame),
        "span": f"{frame.index[0]} .. {frame.index[-1]}",
        "producers": len(producers),
        "raw_columns": len(names),
        "informative_columns": informative,
        "observation_columns": len(obs.names),
        "first_valid": obs.first_valid,
        "mtf_timeframes": list(TIMEFRAMES[dataset]),
        "mtf_columns": len(obs_mtf.names),
        "mtf_first_valid": obs_mtf.first_valid,
        "seconds": {
            "raw": best_of(lambda: compute_features(bars, producers), repeat),
            "observation": best_of(lambda: build_observation_features(frame, stop, full), repeat),
            "observation+mtf+hmm": best_of(lambda: build_observation_features(frame, stop, mtf), repeat),
            "default": best_of(lambda: build_observation_features(frame, stop), repeat),
        },
        "target_s": TARGETS_S[dataset],
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure (best is reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    info = machine()
    print(f"machine: {info}")
    results = []
    for dataset in ("sp500", "eurusd_1h"):
        r = bench(dataset, args.repeat)
        results.append(r)
        print(
            f"\n{dataset}: {r['bars']} bars ({r['span']}); {r['producers']} producers -> {r['raw_columns']} "
            f"columns ({r['informative_columns']} not constant), observation {r['observation_columns']} columns "
            f"from row {r['first_valid']}; with {r['mtf_timeframes']} + 3-state HMM: {r['mtf_columns']} "
            f"columns from row {r['mtf_first_valid']}"
        )
        for what, seconds in r["seconds"].items():
            flag = ""
            if what == "observation":
                flag = "  (target < {:.0f} s: {})".format(r["target_s"], "met" if seconds < r["target_s"] else "MISSED")
            print(f"  {what:<22} {seconds:8.3f} s{flag}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
