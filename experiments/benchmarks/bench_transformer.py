"""Training throughput and peak memory: the MLP (``ppo``) vs the multi-timeframe transformer (``ppo_transformer``).

For every model in ``--models``, every number of parallel episodes N in ``--num-envs`` (64 / 512 / 4096 by default)
and every precision in ``--precisions`` (fp32, bf16), one PPO run of ``--iterations`` iterations (default 2) of
``--num-steps`` steps per episode is trained on ``--dataset`` (eurusd_1h) with the shared defaults of both variants
(window 16, 4 epochs x 4 minibatches; the transformer with 4h x 16 and 1D x 10 tokens, d_model 32, 2 heads,
1 block per timeframe), each in a **fresh subprocess**, so that each peak-memory figure is that run's alone.

* **steps/s**: env steps per wall-clock second of the *last* iteration (rollout and update together); the first
  iteration is the warm-up (allocations, first kernels) and is left out. From the run's own log: the elapsed time
  of iteration i is ``global_step_i / SPS_i`` (``charts/SPS`` is cumulative since the start of the run).
* **peak memory** on CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the subprocess (peak resident set size,
  the whole process: Python, torch, the market and the run), with ``rss_before_mb``, the resident size just before
  training starts, so ``peak_mb - rss_before_mb`` is what the run added. ``tracemalloc`` is not used: it sees only
  Python's allocator, not torch's tensors. On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only).
* bf16 on the MLP: ``ppo`` has no ``--amp``; its run is wrapped in ``torch.autocast("cpu", torch.bfloat16)`` so the
  matmuls run in bf16 (a throughput measurement only, not a supported training mode of ``ppo``).

Timing discipline (``_timing.py``, as the other benchmarks): at each N the candidates (model x precision) run
``--repeats`` times (default 3) **interleaved** (A B C A B C ...), each in its own subprocess; the **median** steps/s
is kept with its **spread** (max - min) / median, and the ratios (transformer / MLP at the same precision, bf16 /
fp32 of the same model: the ``--amp`` question) are refused (``unreliable: ...``) when a side's runs spread wider
than ``_timing.SPREAD_LIMIT`` or number fewer than 3. Peak memory is the median run's.

Torch runs on ``--threads`` threads (2 = the machine's cores). Run ``python experiments/benchmarks/bench_transformer.py
--help``; ``--quick`` is a smoke test (tiny sizes), not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# The script lives outside the package; make ``sentio_lab`` importable when run from any directory.
_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))
if str(_REPO / "experiments" / "benchmarks") not in sys.path:
    sys.path.insert(0, str(_REPO / "experiments" / "benchmarks"))

import _timing  # noqa: E402

MODELS = ("mlp", "transformer")
PRECISIONS = ("fp32", "bf16", "fp16")
QUICK = {"num_envs": [8], "num_steps": 4, "iterations": 2, "data_end": "2017-04-30", "episode_length": 32, "window": 8,
         "token_counts": [3, 2], "d_model": 8, "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` overrides the sizes with tiny ones (used by the test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--num-envs", type=int, nargs="+", default=[64, 512, 4096], help="parallel episodes N")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=PRECISIONS,
                   help="fp16 needs CUDA (skipped, with a note, without it)")
    p.add_argument("--num-steps", type=int, default=8, help="steps per episode per rollout")
    p.add_argument("--iterations", type=int, default=2, help="PPO iterations per run (the first is the warm-up)")
    p.add_argument("--dataset", default="eurusd_1h", help="bundled dataset (hourly: 4h and 1D tokens)")
    p.add_argument("--data-end", default=None, help="last bar to load (None: all)")
    p.add_argument("--episode-length", type=int, default=256, help="steps per training episode")
    p.add_argument("--window", type=int, default=16, help="bars of base feature history")
    p.add_argument("--token-counts", type=int, nargs=2, default=[16, 10], help="4h and 1D tokens")
    p.add_argument("--d-model", type=int, default=32, help="transformer width")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of each measurement; the median is kept, ratios need >= 3 and a "
                        "narrow spread (_timing.py)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def run_args(model: str, precision: str, num_envs: int, opts: argparse.Namespace, run_dir: str) -> Any:
    """The variant's ``Args`` of one measurement."""
    from sentio_lab import ppo, ppo_transformer

    common = dict(dataset=opts.dataset, data_end=opts.data_end, window=opts.window, num_envs=num_envs,
                  num_steps=opts.num_steps, total_timesteps=num_envs * opts.num_steps * opts.iterations,
                  episode_length=opts.episode_length, track=False, progress=False, run_dir=run_dir,
                  checkpoint_path=None, device=opts.device, feature_cache_dir=None)
    if model == "mlp":
        return ppo.Args.from_flat(timeframes=("4h", "1D"), **common)
    return ppo_transformer.Args.from_flat(token_timeframes=("4h", "1D"), token_counts=tuple(opts.token_counts),
                                d_model=opts.d_model, amp="off" if precision == "fp32" else precision, **common)


def measure_one(model: str, precision: str, num_envs: int, opts: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process (the parent runs each in a fresh subprocess)."""
    import tempfile

    from sentio_lab import ppo, ppo_transformer

    torch.set_num_threads(opts.threads)
    module = ppo if model == "mlp" else ppo_transformer
    with tempfile.TemporaryDirectory() as run_dir:
        args = run_args(model, precision, num_envs, opts, run_dir)
        market = module.market_for(args)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cuda = torch.device(opts.device).type == "cuda"
        if cuda:  # pragma: no cover - CUDA only
            torch.cuda.reset_peak_memory_stats()
        wrap = (torch.autocast("cpu", dtype=torch.bfloat16) if model == "mlp" and precision == "bf16"
                else contextlib.nullcontext())
        start = time.perf_counter()
        with wrap:
            result = module.train(args, market=market)
        wall = time.perf_counter() - start
    history = result.history
    elapsed = [r["global_step"] / r["charts/SPS"] for r in history]
    last = elapsed[-1] - (elapsed[-2] if len(elapsed) > 1 else 0.0)
    batch = num_envs * opts.num_steps
    out = {
        "model": model, "precision": precision, "num_envs": num_envs, "batch": batch,
        "steps_per_s": batch / last, "iteration_seconds": last, "wall_seconds": wall,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before,
        "parameters": sum(p.numel() for p in result.agent.parameters()),
        "finite": all(v == v for r in history for k, v in r.items() if k.startswith("losses/value")),
    }
    if cuda:  # pragma: no cover - CUDA only
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device_name"] = torch.cuda.get_device_name()
    return out


def run_subprocess(model: str, precision: str, num_envs: int, argv: list[str]) -> dict[str, Any]:
    """Run :func:`measure_one` in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", f"{model},{precision},{num_envs}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONHASHSEED": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {model} {precision} N={num_envs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise_runs(runs: dict[tuple[str, str], list[dict]]) -> list[dict[str, Any]]:
    """One row per (model, precision) of one N: the median run (:func:`_timing.median_run`: steps/s median, spread,
    every run's steps/s), and the ratios ``over_mlp`` (transformer / MLP, same precision) and ``over_fp32`` (this
    precision / fp32, same model) as :func:`_timing.ratio` checks (None when the spreads are too wide)."""
    rows = {c: {**_timing.median_run(r), "model": c[0], "precision": c[1]} for c, r in runs.items()}
    for (model, precision), row in rows.items():
        mlp, fp32 = rows.get(("mlp", precision)), rows.get((model, "fp32"))
        row["over_mlp"] = _timing.ratio(row, mlp) if model != "mlp" and mlp is not None else None
        row["over_fp32"] = _timing.ratio(row, fp32) if precision != "fp32" and fp32 is not None else None
    return list(rows.values())


def format_table(results: list[dict[str, Any]]) -> str:
    """The printed table: median steps/s, spread, memory, ratios (or their refusal)."""
    lines = [f"{'model':<12}{'precision':<10}{'N':>6}{'steps/s':>10}{'spread':>8}{'peak MB':>9}{'added MB':>9}"
             f"{'params':>8}  {'/ mlp':>34}  {'/ fp32':>34}"]
    for r in results:
        lines.append(f"{r['model']:<12}{r['precision']:<10}{r['num_envs']:>6}{r['steps_per_s']:>10,.0f}"
                     f"{r['spread']:>8.1%}{r['peak_mb']:>9.0f}{r['peak_mb'] - r['rss_before_mb']:>9.0f}"
                     f"{r['parameters']:>8}  {_timing.fmt_ratio(r['over_mlp'], 34)}  "
                     f"{_timing.fmt_ratio(r['over_fp32'], 34)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement (each in a subprocess), print a table, return (and optionally write) the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.one:
        model, precision, n = opts.one.split(",")
        print(json.dumps(measure_one(model, precision, int(n), opts)))
        return {}
    child_argv = [a for a in argv if a != "--json" and not a.endswith(".json")]
    candidates, skipped = [], []
    for model in opts.models:
        for precision in opts.precisions:
            if precision == "fp16" and torch.device(opts.device).type != "cuda":
                skipped.append(f"{model} fp16: needs CUDA (fp16 autocast + GradScaler)")
                continue
            if precision == "fp16" and model == "mlp":
                skipped.append("mlp fp16: ppo has no GradScaler path")
                continue
            candidates.append((model, precision))
    results = []
    for n in opts.num_envs:  # per N: every candidate once per round (interleaved), --repeats rounds
        calls = {c: (lambda c=c, n=n: run_subprocess(c[0], c[1], n, child_argv)) for c in candidates}
        results += summarise_runs(_timing.interleave(calls, opts.repeats))
    print(format_table(results))
    for note in skipped:
        print(f"skipped: {note}")
    out = {
        "command": shlex.join(["python", "experiments/benchmarks/bench_transformer.py", *argv]),
        "settings": {k: v for k, v in vars(opts).items() if k not in ("json", "one")},
        "results": results,
        "skipped": skipped,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": opts.threads, "load_average_end": os.getloadavg(),
                    "cuda": torch.cuda.is_available()},
        "memory_method": "ru_maxrss of a fresh subprocess per measurement (CPU); torch.cuda.max_memory_allocated "
                         "(CUDA)",
    }
    if opts.json is not None:
        opts.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
