"""Throughput of the portfolio env (issue 20) against the flat single-asset env on the same number of asset-steps.

The workload: skfolio's S&P 500 panel (20 stocks, daily closes, ``--start`` onwards; next-close fills, the close-only
feature bank), ``PortfolioEnv`` with ``--assets`` assets and N = ``--num-envs`` accounts (64 and 512 by default)
stepped ``--steps`` times with random long-only weights under the flat cost model; beside it ``TradingEnv`` (the
flat single-asset env) with ``N x A`` accounts on the panel's first asset, the same features per asset and the same
window, stepped as often with random levels. Both move ``N x A`` asset positions per step, so the figure compared
is **asset-steps per second** (steps x N x A / seconds) and the ratio is portfolio / single-asset.

Timing discipline (``_timing``): the two envs are run interleaved ``--repeats`` times (default 3) after a warm-up,
the median kept, and a ratio whose runs spread wider than ``_timing.SPREAD_LIMIT`` is refused (``unreliable``).
The absolute figures depend on the machine and its load (printed with them); the ratios are what it is for.

Run ``python experiments/benchmarks/bench_portfolio.py --help``.
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

from sentio_lab.data.panel import load_sp500_panel  # noqa: E402
from sentio_lab.env import MarketArrays, TradingEnv  # noqa: E402
from sentio_lab.env.portfolio import PortfolioEnv  # noqa: E402
from sentio_lab.env.portfolio_arrays import PortfolioArrays, build_portfolio_arrays  # noqa: E402

QUICK = {"num_envs": [4], "steps": 10, "repeats": 3, "assets": 3, "start": "2021-01-01"}
WINDOW, EPISODE = 8, 64


def panel_arrays(assets: int, start: str) -> PortfolioArrays:
    """The benchmark's panel arrays: the first ``assets`` stocks from ``start``, features fitted on the first half."""
    panel = load_sp500_panel(start=start)
    panel = load_sp500_panel(start=start, assets=list(panel.assets[:assets]))
    return build_portfolio_arrays(panel, train_stop=len(panel.index) // 2)[0]


def single_asset(arrays: PortfolioArrays) -> MarketArrays:
    """The panel's first asset as a single market with the same per-asset features (next-close fills)."""
    return MarketArrays(open=arrays.open[:, 0].copy(), close=arrays.close[:, 0].copy(),
                        features=np.ascontiguousarray(arrays.features[:, 0, :]), first_valid=arrays.first_valid,
                        fill_price="next_close")


def time_portfolio(arrays: PortfolioArrays, num_envs: int, steps: int) -> dict:
    """Asset-steps per second of the portfolio env, one run."""
    env = PortfolioEnv(arrays, num_envs=num_envs, window=WINDOW, episode_length=EPISODE, seed=0)
    env.reset()
    torch.manual_seed(0)
    actions = torch.distributions.Dirichlet(torch.ones(arrays.num_assets + 1, dtype=torch.float64)).sample(
        (steps + 5, num_envs))
    for a in actions[:5]:  # warm-up
        env.step(a)
    start = time.perf_counter()
    for a in actions[5:]:
        env.step(a)
    seconds = time.perf_counter() - start
    return {"asset_steps_per_s": steps * num_envs * arrays.num_assets / seconds}


def time_single(market: MarketArrays, num_envs: int, steps: int) -> dict:
    """Asset-steps per second of the flat single-asset env with ``num_envs`` accounts, one run."""
    env = TradingEnv(market, num_envs=num_envs, window=WINDOW, episode_length=EPISODE, seed=0)
    env.reset()
    gen = torch.Generator().manual_seed(0)
    actions = torch.randint(0, env.num_actions, (steps + 5, num_envs), generator=gen)
    for a in actions[:5]:
        env.step(a)
    start = time.perf_counter()
    for a in actions[5:]:
        env.step(a)
    seconds = time.perf_counter() - start
    return {"asset_steps_per_s": steps * num_envs / seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure both envs at each N, print asset-steps per second and the ratio, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=int, default=20)
    parser.add_argument("--num-envs", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--steps", type=int, default=200, help="env steps per run")
    parser.add_argument("--start", default="2010-01-01", help="first date of the panel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="CI-sized: a few steps, to check the script runs")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    arrays = panel_arrays(args.assets, args.start)
    market = single_asset(arrays)
    a = arrays.num_assets
    rows = []
    for n in args.num_envs:
        runs = _timing.interleave({
            "portfolio": lambda n=n: time_portfolio(arrays, n, args.steps),
            "single": lambda n=n: time_single(market, n * a, args.steps),
        }, args.repeats)
        portfolio = _timing.median_run(runs["portfolio"], "asset_steps_per_s")
        single = _timing.median_run(runs["single"], "asset_steps_per_s")
        check = _timing.ratio(portfolio, single, "asset_steps_per_s")
        rows.append({"num_envs": n, "assets": a, "single_num_envs": n * a,
                     "portfolio_asset_steps_per_s": portfolio["asset_steps_per_s"],
                     "portfolio_spread": portfolio["spread"],
                     "portfolio_all": portfolio["all_asset_steps_per_s"],
                     "single_asset_steps_per_s": single["asset_steps_per_s"], "single_spread": single["spread"],
                     "single_all": single["all_asset_steps_per_s"],
                     "ratio": check["ratio"], "ratio_check": check})
    out = {
        "command": "python experiments/benchmarks/bench_portfolio.py "
                   + shlex.join(argv if argv is not None else sys.argv[1:]),
        "settings": {"assets": a, "num_envs": list(args.num_envs), "steps": args.steps, "start": args.start,
                     "repeats": args.repeats, "threads": args.threads, "window": WINDOW,
                     "features_per_asset": int(arrays.features.shape[2]), "bars": len(arrays.close)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_end": list(os.getloadavg())},
        "results": rows,
    }
    print(f"asset-steps/s: PortfolioEnv (A={a}, N accounts) vs TradingEnv (N x A accounts), flat costs, window "
          f"{WINDOW}, {arrays.features.shape[2]} features per asset; load average "
          f"{out['machine']['load_average_end'][0]:.1f}")
    print(f"median of {args.repeats} interleaved runs; spread = (max - min) / median; ratios refused above "
          f"{_timing.SPREAD_LIMIT:.0%} spread or below {_timing.MIN_REPEATS} runs")
    print(f"{'N':>5s} {'portfolio':>12s} {'spread':>7s} {'single N*A':>12s} {'spread':>7s} {'ratio':>32s}")
    for r in rows:
        print(f"{r['num_envs']:5d} {r['portfolio_asset_steps_per_s']:12.0f} {r['portfolio_spread']:7.0%} "
              f"{r['single_asset_steps_per_s']:12.0f} {r['single_spread']:7.0%} "
              f"{_timing.fmt_ratio(r['ratio_check'], 32)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
