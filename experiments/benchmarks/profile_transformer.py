"""Where one training iteration of ``ppo_transformer`` spends its time on CPU (issue 18 section 3).

Trains ``--iterations`` iterations (default 2: a warm-up and the profiled one) with ``bench_transformer.py``'s
settings (eurusd_1h, window 16, 4h x 16 and 1D x 10 tokens, d_model 32, N = 64 episodes x 8 steps, 4 epochs x 4
minibatches) and profiles the *last* iteration with ``torch.profiler`` (CPU activities). Two tables:

* **phases**: wall time of the rollout's env steps, its policy forward passes, the update's forward passes, its
  backward passes and the optimizer steps, each as a share of the profiled iteration (``record_function``
  labels around the variant's own calls, put there by wrapping them in this script: the variant is unchanged);
* **ops**: the aten operators with the largest self CPU time, as a share of all ops' self CPU time.

Run ``python experiments/benchmarks/profile_transformer.py --help``; ``--quick`` is a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from sentio_lab import ppo_transformer  # noqa: E402
from sentio_lab.agents.nets import transformer as transformer_nets  # noqa: E402

PHASES = ("env step", "policy forward (rollout)", "value forward (rollout)", "forward (update)", "backward",
          "optimizer step")
QUICK = {"num_envs": 8, "num_steps": 4, "data_end": "2017-04-30", "episode_length": 32, "window": 8,
         "token_counts": [3, 2], "d_model": 8, "top": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (``--quick``: tiny sizes, for the test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--num-steps", type=int, default=8)
    p.add_argument("--iterations", type=int, default=2, help="the last one is profiled")
    p.add_argument("--dataset", default="eurusd_1h")
    p.add_argument("--data-end", default=None)
    p.add_argument("--episode-length", type=int, default=256)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--token-counts", type=int, nargs=2, default=[16, 10])
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="rows of the op table")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def labelled(label: Any, fn: Any) -> Any:
    """``fn`` inside ``record_function(label)`` (``label`` a string, or a function of the call's arguments)."""
    def call(*a: Any, **k: Any) -> Any:
        with record_function(label(*a, **k) if callable(label) else label):
            return fn(*a, **k)
    return call


def profile_training(opts: argparse.Namespace) -> dict[str, Any]:
    """Train, profile the last iteration, return the phase and op tables."""
    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as run_dir:
        args = ppo_transformer.Args.from_flat(
            dataset=opts.dataset, data_end=opts.data_end, window=opts.window, num_envs=opts.num_envs,
            num_steps=opts.num_steps, total_timesteps=opts.num_envs * opts.num_steps * opts.iterations,
            episode_length=opts.episode_length, track=False, progress=False, run_dir=run_dir,
            checkpoint_path=None, feature_cache_dir=None, token_timeframes=("4h", "1D"),
            token_counts=tuple(opts.token_counts), d_model=opts.d_model, amp=opts.amp)
        market = ppo_transformer.market_for(args)
        env = ppo_transformer.make_env(args, market)
        batch = opts.num_envs * opts.num_steps
        state = {"steps": 0, "prof": None, "started": 0.0, "seconds": 0.0}
        stack = contextlib.ExitStack()

        real_step = env.step

        def step(action: torch.Tensor) -> Any:
            if state["steps"] == opts.num_steps * (opts.iterations - 1) and state["prof"] is None:
                # the first step of the last iteration: start profiling (the update of the previous one is done)
                state["prof"] = stack.enter_context(profile(activities=[ProfilerActivity.CPU]))
                state["started"] = time.perf_counter()
            state["steps"] += 1
            with record_function("env step"):
                return real_step(action)

        env.step = step
        net = transformer_nets.MultiTimeframeActorCritic
        patches = {
            "get_action_and_value": lambda self, obs, action=None, *a, **k: (
                "policy forward (rollout)" if action is None else "forward (update)"),
            "get_value": "value forward (rollout)",
        }
        originals = {name: getattr(net, name) for name in patches}
        real_backward, real_adam = torch.Tensor.backward, torch.optim.Adam.step
        try:
            for name, label in patches.items():
                setattr(net, name, labelled(label, originals[name]))
            torch.Tensor.backward = labelled("backward", real_backward)
            torch.optim.Adam.step = labelled("optimizer step", real_adam)
            with stack:
                ppo_transformer.train(args, market=market, env=env)
                state["seconds"] = time.perf_counter() - state["started"]
        finally:
            for name in patches:
                setattr(net, name, originals[name])
            torch.Tensor.backward, torch.optim.Adam.step = real_backward, real_adam
    prof = state["prof"]
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    op_total = sum(e.self_cpu_time_total for e in ops) / 1e6
    return {
        "iteration_seconds": state["seconds"], "batch": batch, "steps_per_s": batch / state["seconds"],
        "phases": [{"phase": k, "seconds": phases.get(k, 0.0), "share": phases.get(k, 0.0) / state["seconds"]}
                   for k in PHASES],
        "op_self_seconds": op_total,
        "ops": [{"op": e.key, "self_seconds": e.self_cpu_time_total / 1e6, "calls": e.count,
                 "share": e.self_cpu_time_total / 1e6 / op_total} for e in ops[:opts.top]],
        "settings": {k: v for k, v in vars(opts).items() if k != "json"},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Profile, print both tables, return (and optionally write) the results."""
    opts = parse_args(argv)
    out = profile_training(opts)
    print(f"profiled iteration: {out['iteration_seconds']:.2f} s for {out['batch']} env steps "
          f"({out['steps_per_s']:,.0f} steps/s under the profiler)")
    print(f"{'phase':<28}{'seconds':>9}{'share':>8}")
    for r in out["phases"]:
        print(f"{r['phase']:<28}{r['seconds']:>9.3f}{r['share']:>8.1%}")
    print(f"\n{'op (self CPU time)':<40}{'seconds':>9}{'calls':>8}{'share':>8}")
    for r in out["ops"]:
        print(f"{r['op']:<40}{r['self_seconds']:>9.3f}{r['calls']:>8}{r['share']:>8.1%}")
    if opts.json is not None:
        opts.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
