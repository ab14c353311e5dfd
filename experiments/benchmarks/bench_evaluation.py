"""Evaluation throughput: deterministic episodes one at a time (``evaluate_policy``) vs batched (``evaluate_policies``).

The workload is ``--episodes`` evaluation episodes of ``--episode-length`` daily steps (1,000 x 252 by default)
with the default PPO network (``ppo.build_agent`` on ``ppo.Args`` defaults: 2x64 tanh actor and critic,
observation normalisation, window 32, the "basic" feature bank) on a bundled daily market (sp500 by default).
An episode is an (agent, start) pair: the start bars are spread evenly over the market's valid starts and each
becomes a named range of exactly ``episode_length`` decisions, so ``evaluate_policy`` and ``evaluate_policies``
run the same episodes. Agents are freshly initialised (seed i) and their normalisers have seen real
observations; the cost of a forward pass does not depend on what the weights are.

Measured, each in its own wall-clock window after a warm-up call:

* **serial**: ``evaluate_policy`` once per episode, the loop the batched evaluator replaces. It takes minutes, so
  by default only ``--serial-episodes`` of them (spread over the pairs of the layout with the most agents) are
  timed and the figure is *extrapolated* to all episodes (the output says so); ``--serial-episodes 0`` runs all;
* **batched AxS** for every ``--layouts`` entry ``AxS`` (A agents x S starts, A x S = episodes):
  ``evaluate_policies`` over all pairs in one call, e.g. 1x1000 (one agent, 1,000 starts) and 20x50.

The serial episodes are also compared with the batched results of the same pairs (weights and equity bit for
bit), so the speed-up is for identical output. Wall seconds come from ``time.perf_counter``. Timing discipline
(``_timing.py``, as the other benchmarks): the measurements run ``--repeats`` times (default 3) **interleaved**
(serial, batched A, batched B, serial, ...); each keeps its **median** seconds and its **spread** (max - min) /
median, and a speed-up is refused (``unreliable: ...``) when a side's runs spread wider than
``_timing.SPREAD_LIMIT`` or number fewer than 3. Goal (issue 6 section 3): the batched
evaluation of 1,000 x 252 in under 10 s on the project's 2-core machine.

Run ``python experiments/benchmarks/bench_evaluation.py --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
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

# The script lives outside the package; make ``sentio_lab`` importable when run from any directory.
_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))
if str(_REPO / "experiments" / "benchmarks") not in sys.path:
    sys.path.insert(0, str(_REPO / "experiments" / "benchmarks"))

import _timing  # noqa: E402

from sentio_lab import ppo  # noqa: E402
from sentio_lab.data import Split  # noqa: E402
from sentio_lab.env import TradingEnv  # noqa: E402
from sentio_lab.env.market import PreparedMarket, prepare_market  # noqa: E402
from sentio_lab.evaluation.episodes import Evaluation, evaluate_policies, evaluate_policy  # noqa: E402
from sentio_lab.features import FeatureConfig  # noqa: E402

#: The issue's goal: 1,000 episodes x 252 steps, batched, in under this many seconds (2 CPU cores).
GOAL_SECONDS = 10.0

QUICK = {"episodes": 12, "episode_length": 20, "layouts": ["1x12", "3x4"], "serial_episodes": 3, "window": 8,
         "hidden": 16, "repeats": 1}


def parse_layout(text: str) -> tuple[int, int]:
    """``"AxS"`` -> (agents, starts)."""
    try:
        agents, starts = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout {text!r} is not AxS (agents x starts), e.g. 20x50") from None
    if agents < 1 or starts < 1:
        raise argparse.ArgumentTypeError(f"layout {text!r}: agents and starts must be >= 1")
    return agents, starts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` overrides the sizes with tiny ones (used by the test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--episodes", type=int, default=1000, help="evaluation episodes per measurement")
    p.add_argument("--episode-length", type=int, default=252, help="decisions (env steps) per episode")
    p.add_argument("--layouts", nargs="+", default=["1x1000", "20x50"],
                   help="batched layouts AxS: A agents x S start bars, A * S = --episodes")
    p.add_argument("--serial-episodes", type=int, default=50,
                   help="episodes the one-at-a-time loop really runs (the rest is extrapolated); 0 = all of them")
    p.add_argument("--dataset", default="sp500", help="bundled dataset name or OHLCV file (daily bars)")
    p.add_argument("--window", type=int, default=ppo.Args().features.window,
                   help="bars of feature history per observation")
    p.add_argument("--hidden", type=int, default=ppo.Args().ppo.hidden_size, help="hidden units of the 2-layer MLP")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of each measurement; the median is kept, speed-ups need >= 3 runs "
                        "and a narrow spread (_timing.py)")
    p.add_argument("--device", default="cpu", help="device of the batched env and forward passes")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    try:
        args.layouts = [parse_layout(x) if isinstance(x, str) else x for x in args.layouts]
    except argparse.ArgumentTypeError as error:
        p.error(str(error))
    for agents, starts in args.layouts:
        if agents * starts != args.episodes:
            p.error(f"layout {agents}x{starts} is {agents * starts} episodes, not --episodes {args.episodes}")
    return args


# ------------------------------------------------------------------------------------------------- set-up
def episode_market(market: PreparedMarket, starts: list[int], length: int) -> tuple[PreparedMarket, list[str]]:
    """``market`` with one named range per start, ``[start, start + length + 1)``: exactly ``length`` decisions
    from ``start`` (the start must be observable, i.e. at or after the warm-up and the window)."""
    index = market.data.frame.index
    splits = dict(market.splits)
    names = []
    for s in starts:
        name = f"episode@{s}"
        splits[name] = Split(name, s, s + length + 1, index[s], index[s + length])
        names.append(name)
    return dataclasses.replace(market, splits=splits), names


def spread_starts(market: PreparedMarket, window: int, length: int, n: int) -> list[int]:
    """``n`` start bars spread evenly over the market's valid starts for ``length``-step episodes."""
    lo = market.arrays.first_valid + window - 1
    hi = len(market.arrays.close) - 1 - length
    if hi < lo:
        raise ValueError(f"the market has no room for {length}-step episodes with a {window}-bar window")
    return [int(x) for x in np.linspace(lo, hi, n).round()]


def make_agents(market: PreparedMarket, n: int, window: int, hidden: int) -> list[torch.nn.Module]:
    """``n`` default PPO networks (seed i), each normaliser updated on its own batch of real observations."""
    args = ppo.Args.from_flat(window=window, hidden_size=hidden)
    obs_dim = market.arrays.features.shape[1] * window + 1
    start, stop = market.range("train")
    agents = []
    for i in range(n):
        torch.manual_seed(i)
        agent = ppo.build_agent(args, obs_dim, len(args.env.positions))
        env = TradingEnv(market.arrays, num_envs=256, window=window, episode_length=8, start=start, stop=stop,
                         positions=args.env.positions, seed=i)
        if agent.obs_norm is not None:
            agent.obs_norm.update(env.reset())
        agent.eval()
        agents.append(agent)
    return agents


def measure_interleaved(calls: dict[str, Any], repeats: int, clock: Any = time.perf_counter,
                        ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Time every call once per round, ``repeats`` rounds (``_timing.interleave``) on ``clock``: per name the median
    seconds with spread and every run (``_timing.median_run`` on ``seconds``), and its last result."""
    last: dict[str, Any] = {}

    def timed(name: str) -> dict[str, float]:
        t0 = clock()
        last[name] = calls[name]()
        return {"seconds": clock() - t0}

    runs = _timing.interleave({name: (lambda name=name: timed(name)) for name in calls}, repeats)
    return {name: _timing.median_run(r, key="seconds") for name, r in runs.items()}, last


def _same(a: Evaluation, b: Evaluation) -> bool:
    """Bit-identical evaluations (weights, equity, their bars, start, ruin)."""
    return (a.start == b.start and a.ruined == b.ruined and a.weights.index.equals(b.weights.index)
            and a.equity.index.equals(b.equity.index) and np.array_equal(a.weights.to_numpy(), b.weights.to_numpy())
            and np.array_equal(a.equity.to_numpy(), b.equity.to_numpy()))


# ------------------------------------------------------------------------------------------------ report
def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per measurement: median wall seconds, episodes/s, steps/s, speed-up over the serial loop (or why
    none is given), spread of the runs."""
    head = (f"{'measurement':<37} | {'episodes':>8} | {'wall s':>9} | {'episodes/s':>10} | {'steps/s':>10} | "
            f"{'speed-up':>8}")
    head += f" | {'spread':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        note = " (extrapolated)" if r.get("extrapolated") else ""
        speedup = "-" if r.get("speedup_check") is None else (
            f"{r['speedup']:.1f}x" if r["speedup"] is not None else r["speedup_check"]["text"])
        lines.append(f"{r['name'] + note:<37} | {r['episodes']:>8} | {r['seconds']:>9.2f} | "
                     f"{r['episodes_per_s']:>10.1f} | {r['steps_per_s']:>10,.0f} | {speedup:>8} | "
                     f"{r['spread']:>7.1%}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return (and optionally write) the results."""
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    load_start = _load()
    print(f"command: {command}", flush=True)

    base = prepare_market(cli.dataset, FeatureConfig())
    positions, costs = tuple(ppo.Args().env.positions), ppo.cost_model(ppo.Args.from_flat())
    max_agents = max(a for a, _ in cli.layouts)
    agents = make_agents(base, max_agents, cli.window, cli.hidden)
    obs_dim = base.arrays.features.shape[1] * cli.window + 1
    print(f"market: {cli.dataset}, {len(base.arrays.close)} bars, {base.arrays.features.shape[1]} features x window "
          f"{cli.window} -> obs_dim {obs_dim}; MLP 2x{cli.hidden}; {cli.episodes} episodes x {cli.episode_length} "
          f"steps", flush=True)
    kw = dict(window=cli.window, positions=positions, costs=costs)

    # every layout's start bars, and one market holding all their episode ranges
    layout_starts = {(a, s): spread_starts(base, cli.window, cli.episode_length, s) for a, s in cli.layouts}
    all_starts = sorted({x for starts in layout_starts.values() for x in starts})
    market, _ = episode_market(base, all_starts, cli.episode_length)
    name_of = {s: f"episode@{s}" for s in all_starts}

    # warm-up: one short episode each way (imports, allocator, vmap tracing)
    evaluate_policy(agents[0], market, range_name=name_of[all_starts[0]], **kw)
    evaluate_policies(agents[:2], market, [name_of[x] for x in all_starts[:2]], device=cli.device, **kw)

    # serial: a subset of the pairs of the layout with the most agents, spread over them
    a_max, s_max = max(cli.layouts)
    pairs = [(i, x) for i in range(a_max) for x in layout_starts[(a_max, s_max)]]
    k = len(pairs) if cli.serial_episodes <= 0 else min(cli.serial_episodes, len(pairs))
    subset = [pairs[int(p)] for p in np.linspace(0, len(pairs) - 1, k).round()]

    def run_serial() -> list[Evaluation]:
        return [evaluate_policy(agents[i], market, range_name=name_of[x], **kw) for i, x in subset]

    calls: dict[str, Any] = {"serial": run_serial}
    for a, s in cli.layouts:
        names = [name_of[x] for x in layout_starts[(a, s)]]
        calls[f"batched {a}x{s}"] = lambda a=a, names=names: evaluate_policies(
            agents[:a], market, names, device=cli.device, **kw)
    timings, last = measure_interleaved(calls, cli.repeats)  # serial, batched A, batched B, serial, ...

    batched_rows = []
    for a, s in cli.layouts:
        t = timings[f"batched {a}x{s}"]
        batched_rows.append({"name": f"batched {a}x{s}", "agents": a, "starts": s, "episodes": a * s,
                             "seconds": t["seconds"], "spread": t["spread"], "runs": t["n"],
                             "all_seconds": t["all_seconds"]})
        print(f"batched {a}x{s}: {t['seconds']:.2f} s (median of {t['n']}, spread {t['spread']:.1%})", flush=True)

    serial_out: list[Evaluation] = last["serial"]
    measured = timings["serial"]["seconds"]
    column = {x: j for j, x in enumerate(layout_starts[(a_max, s_max)])}
    reference = last[f"batched {a_max}x{s_max}"]
    identical = all(_same(ev, reference[i][column[x]]) for (i, x), ev in zip(subset, serial_out, strict=True))
    extrapolated = k < cli.episodes
    serial_seconds = measured * cli.episodes / k
    print(f"serial: {k} episodes in {measured:.2f} s" + (f", extrapolated to {cli.episodes}: {serial_seconds:.1f} s"
                                                         if extrapolated else ""), flush=True)

    steps = cli.episodes * cli.episode_length
    serial_row = {"name": "serial evaluate_policy", "episodes": cli.episodes, "seconds": serial_seconds,
                  "measured_episodes": k, "measured_seconds": measured, "extrapolated": extrapolated,
                  "spread": timings["serial"]["spread"], "runs": timings["serial"]["n"],
                  "all_seconds": [x * cli.episodes / k for x in timings["serial"]["all_seconds"]]}
    rows = [serial_row] + batched_rows
    for r in rows:
        r["episodes_per_s"] = r["episodes"] / r["seconds"]
        r["steps_per_s"] = r["episodes"] * cli.episode_length / r["seconds"]
    for r in batched_rows:  # serial seconds / batched seconds, refused when either side's runs disagree
        check = _timing.ratio({"seconds": serial_seconds, "spread": serial_row["spread"], "n": serial_row["runs"]},
                              {"seconds": r["seconds"], "spread": r["spread"], "n": r["runs"]}, key="seconds")
        r["speedup"], r["speedup_check"] = check["ratio"], check
    goal_applies = cli.episodes >= 1000 and cli.episode_length >= 252
    goals = {f"batched_{r['agents']}x{r['starts']}_under_{GOAL_SECONDS:g}s": r["seconds"] < GOAL_SECONDS
             for r in batched_rows}
    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": _load()}
    out = {
        "command": command,
        "machine": machine,
        "settings": {"dataset": cli.dataset, "episodes": cli.episodes, "episode_length": cli.episode_length,
                     "steps": steps, "layouts": [f"{a}x{s}" for a, s in cli.layouts], "window": cli.window,
                     "hidden": cli.hidden, "obs_dim": obs_dim, "positions": list(positions),
                     "serial_episodes": k, "repeats": cli.repeats, "threads": cli.threads, "device": cli.device,
                     "quick": cli.quick},
        "timing": "wall seconds (time.perf_counter) of one call per measurement after a warm-up, median of "
                  "--repeats interleaved runs; serial = evaluate_policy per episode" + (
                      f", measured on {k} episodes and scaled to {cli.episodes}" if extrapolated else ""),
        "results": rows,
        "serial_identical_to_batched": identical,
        "goal": f"batched {cli.episodes} x {cli.episode_length} under {GOAL_SECONDS:g} s"
                + ("" if goal_applies else " (applies to 1,000 x 252; these sizes are smaller)"),
        "goals": goals,
    }
    print()
    print(format_table(rows))
    print()
    if extrapolated:
        print(f"serial: measured on {k} of {cli.episodes} episodes ({measured:.2f} s) and extrapolated linearly")
    print(f"serial episodes identical (bit for bit) to the batched ones: {identical}")
    for name, met in goals.items():
        print(f"goal {name}: {'met' if met else 'NOT met'}" + ("" if goal_applies else " (not the goal's sizes)"))
    print(f"machine: {machine}")
    print(f"timing: {out['timing']}")
    if cli.json is not None:
        cli.json.parent.mkdir(parents=True, exist_ok=True)
        cli.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {cli.json}")
    return out


if __name__ == "__main__":
    main()
