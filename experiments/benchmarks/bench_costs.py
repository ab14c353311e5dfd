"""Env throughput under each cost model beside the flat one (issue 10): steps per second and the ratio to flat.

The workload: the batched torch env (``TradingEnv``, ``--num-envs`` episodes stepped together, CPU) and the numpy
reference env (``NumpyTradingEnv``, one episode), each stepped ``--steps`` times with random level changes on the
bundled daily market (sp500 by default), under:

* ``flat``: fee + slippage (the closed-form ``rebalance``: today's default);
* ``corwin_schultz`` / ``abdi_ranaldo``: an estimated half-spread on top;
* ``sqrt`` / ``almgren_chriss``: square-root or linear impact at ``--capital`` (Newton-solved fills);
* ``sqrt+cap``: square-root impact with a participation cap whose remainders carry.

Steps per second come from ``time.perf_counter`` around the stepping loop after a warm-up; the models are run
interleaved (flat, corwin_schultz, ..., flat, corwin_schultz, ...) ``--repeats`` times (default 3) and the median
kept; a ratio whose runs spread wider than ``_timing.SPREAD_LIMIT`` is refused (``unreliable: ...``).
One run of the script measures every model; the ratios are what it is for (the absolute
figures depend on the machine and its load, printed with them).

Run ``python experiments/benchmarks/bench_costs.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))
if str(_REPO / "experiments" / "benchmarks") not in sys.path:
    sys.path.insert(0, str(_REPO / "experiments" / "benchmarks"))

import _timing  # noqa: E402

from sentio_lab.data import load_market  # noqa: E402
from sentio_lab.env import MarketArrays, NumpyTradingEnv, TradingEnv  # noqa: E402
from sentio_lab.env.costs import CostModel  # noqa: E402

QUICK = {"steps": 30, "numpy_steps": 30, "num_envs": 8, "repeats": 3}


def cost_models(capital: float) -> dict[str, CostModel]:
    """The models compared, flat first."""
    return {
        "flat": CostModel(),
        "corwin_schultz": CostModel(spread="corwin_schultz"),
        "abdi_ranaldo": CostModel(spread="abdi_ranaldo"),
        "sqrt": CostModel(impact="sqrt", capital=capital),
        "almgren_chriss": CostModel(impact="almgren_chriss", capital=capital),
        "sqrt+cap": CostModel(impact="sqrt", capital=capital, participation=0.01, remainder="carry"),
    }


def _market(dataset: str) -> MarketArrays:
    frame = load_market(dataset).frame
    returns = np.log(frame["close"]).diff().fillna(0.0).to_numpy()[:, None]
    return MarketArrays.from_frame(frame, returns, first_valid=1)


def time_torch(market: MarketArrays, costs: CostModel, num_envs: int, steps: int) -> float:
    """Steps per second (env steps: ``num_envs`` per call) of the batched env, one run."""
    env = TradingEnv(market, num_envs=num_envs, window=8, episode_length=64, costs=costs, seed=0)
    env.reset()
    gen = torch.Generator().manual_seed(0)
    actions = torch.randint(0, env.num_actions, (steps + 5, num_envs), generator=gen)
    for a in actions[:5]:  # warm-up
        env.step(a)
    start = time.perf_counter()
    for a in actions[5:]:
        env.step(a)
    seconds = time.perf_counter() - start
    return steps * num_envs / seconds


def time_numpy(market: MarketArrays, costs: CostModel, steps: int) -> float:
    """Steps per second of the numpy reference env, one run."""
    rng = np.random.default_rng(0)
    env = NumpyTradingEnv(market, window=8, episode_length=64, costs=costs)
    env.reset(seed=0)
    actions = rng.integers(0, 3, steps)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(int(a))
        if terminated or truncated:
            env.reset()
    seconds = time.perf_counter() - start
    return steps / seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every model, print the table with ratios to flat, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="sp500")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=400, help="batched env steps per model")
    parser.add_argument("--numpy-steps", type=int, default=2000, help="numpy env steps per model")
    parser.add_argument("--capital", type=float, default=1e9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="CI-sized: a few steps, to check the script runs")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    market = _market(args.dataset)
    models = cost_models(args.capital)
    calls = {}
    for name, costs in models.items():  # interleaved: flat, cs, ..., flat, cs, ... (each torch then numpy)
        calls[name, "torch"] = lambda c=costs: {"steps_per_s": time_torch(market, c, args.num_envs, args.steps)}
        calls[name, "numpy"] = lambda c=costs: {"steps_per_s": time_numpy(market, c, args.numpy_steps)}
    runs = _timing.interleave(calls, args.repeats)
    rows = []
    for name in models:
        row: dict[str, Any] = {"model": name}
        for kind in ("torch", "numpy"):
            m = _timing.median_run(runs[name, kind])
            row[kind + "_steps_per_s"], row[kind + "_spread"] = m["steps_per_s"], m["spread"]
            row[kind + "_all_steps_per_s"] = m["all_steps_per_s"]
            row["_" + kind] = m
        rows.append(row)
    flat = rows[0]
    for row in rows:
        for kind in ("torch", "numpy"):
            check = _timing.ratio(row["_" + kind], flat["_" + kind])
            row[kind + "_ratio_to_flat"], row[kind + "_ratio_check"] = check["ratio"], check
    for row in rows:
        del row["_torch"], row["_numpy"]
    out = {
        "command": "python experiments/benchmarks/bench_costs.py "
                   + shlex.join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: getattr(args, k) for k in ("dataset", "num_envs", "steps", "numpy_steps", "capital",
                                                   "repeats", "threads")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_end": list(os.getloadavg())},
        "results": rows,
    }
    print(f"env steps/s by cost model ({args.dataset}, torch env N={args.num_envs}, numpy env 1 episode; "
          f"load average {out['machine']['load_average_end'][0]:.1f})")
    print(f"median of {args.repeats} interleaved runs; spread = (max - min) / median; ratios refused above "
          f"{_timing.SPREAD_LIMIT:.0%} spread or below {_timing.MIN_REPEATS} runs")
    print(f"{'model':16s} {'torch steps/s':>14s} {'spread':>7s} {'x flat':>32s} {'numpy steps/s':>14s} "
          f"{'spread':>7s} {'x flat':>32s}")
    for r in rows:
        print(f"{r['model']:16s} {r['torch_steps_per_s']:14.0f} {r['torch_spread']:7.0%} "
              f"{_timing.fmt_ratio(r['torch_ratio_check'], 32)} {r['numpy_steps_per_s']:14.0f} "
              f"{r['numpy_spread']:7.0%} {_timing.fmt_ratio(r['numpy_ratio_check'], 32)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
