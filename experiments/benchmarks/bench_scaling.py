"""Scaling out: data-parallel PPO steps/s at 1..K processes, and PBT against random search at equal compute.

Two measurements (``--part ddp``, ``--part tune`` or both):

* **ddp**: ``sentio_lab.ppo.train`` on sp500 with ``--num-envs`` episodes in total, split over K = 1, 2, ...
  processes (``--processes``; gloo on CPU, torch.multiprocessing spawn, one torch thread per process). Each rank
  times its own ``train`` call after a barrier (the market is prepared before, compile / import time is not
  counted); steps/s = total env steps / the slowest rank's seconds. K = 1 is a plain single-process run.
  The process counts run ``--repeats`` times (default 3) interleaved (1 2 1 2 ...); each keeps its median steps/s
  and its spread, and the speed-up over the first count is refused (``unreliable: ...``) when a side's runs spread
  wider than ``_timing.SPREAD_LIMIT`` or number fewer than 3 (``experiments/benchmarks/_timing.py``).
  With ``--device cuda`` the same at 1 GPU per process (NCCL); without a GPU it is skipped and says so.
* **tune**: ``sentio_lab.scale.tune`` with ``--scheduler pbt`` and ``--scheduler random`` on the same population
  (same initial configurations and seeds, ``--trials`` x ``--iterations`` x ``--steps-per-iteration`` env steps
  each): the best validation Sharpe reached (last and any iteration), the champion's test figures and DSR, and
  wall seconds, each on a fresh local Ray instance with ``--ray-cpus`` CPUs (a comparison of results at equal
  compute, not of speed: run once).

Results go to ``--json`` (and stdout). Run ``python experiments/benchmarks/bench_scaling.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sentio_lab import ppo
from sentio_lab.scale import distributed

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

QUICK = {"timesteps": 2048, "num_envs": 16, "num_steps": 32, "processes": [1, 2], "trials": 2, "iterations": 2,
         "steps_per_iteration": 512, "repeats": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(options: argparse.Namespace, run_dir: str) -> ppo.Args:
    return ppo.Args.from_flat(total_timesteps=options.timesteps, num_envs=options.num_envs, num_steps=options.num_steps,
                    device=options.device, track=False, progress=False, checkpoint_every=0, run_dir=run_dir,
                    seed=1)


def _rank(rank: int, world: int, port: int, options: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init_from_env(options.device)
    try:
        args = _args(options, out)
        market = ppo.market_for(args)
        if ctx.enabled:
            dist.barrier()
        start = time.perf_counter()
        result = ppo.train(args, market=market)
        seconds = time.perf_counter() - start
        Path(out, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "steps": result.global_step}))
    finally:
        distributed.shutdown()


def _ddp_once(world: int, options: argparse.Namespace) -> dict[str, Any]:
    """One DDP run at ``world`` processes: env steps, the slowest rank's seconds, steps/s."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, _free_port(), options, out), nprocs=world, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    seconds = max(r["seconds"] for r in ranks)
    return {"processes": world, "env_steps": ranks[0]["steps"], "seconds": seconds,
            "steps_per_s": ranks[0]["steps"] / seconds, "num_envs_per_process": options.num_envs // world}


def bench_ddp(options: argparse.Namespace) -> list[dict[str, Any]]:
    """Steps/s of data-parallel PPO at each process count: the median of ``--repeats`` interleaved runs, its
    spread, and the speed-up over the first count (None, with the reason in ``speedup_check``, when unreliable)."""
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        return [{"skipped": "no CUDA device here: GPU figures not measured"}]
    calls = {world: (lambda world=world: _ddp_once(world, options)) for world in options.processes}
    runs = _timing.interleave(calls, options.repeats)
    rows = [_timing.median_run(runs[world]) for world in options.processes]
    for row in rows:
        check = _timing.ratio(row, rows[0])
        row["speedup_vs_first"], row["speedup_check"] = check["ratio"], check
    for row in rows:
        print(f"processes {row['processes']}: {row['steps_per_s']:,.0f} steps/s (spread {row['spread']:.1%}, "
              f"{row['n']} runs), speed-up {row['speedup_check']['text']}")
    return rows


def bench_tune(options: argparse.Namespace) -> dict[str, Any]:
    """PBT and random search on the same population at equal env steps."""
    import ray

    from sentio_lab.scale import tune

    results = {}
    storage = tempfile.mkdtemp(prefix="bench-tune-") if options.tune_storage is None else options.tune_storage
    for scheduler in options.schedulers:
        ray.init(num_cpus=options.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            args = tune.TuneArgs(
                variant_args=options.variant_args, scheduler=scheduler, num_trials=options.trials,
                iterations=options.iterations, steps_per_iteration=options.steps_per_iteration,
                perturbation_interval=options.perturbation_interval, quantile_fraction=options.quantile_fraction,
                storage=storage, name=f"bench_{scheduler}", seed=options.seed, synch=not options.async_pbt,
            )
            start = time.perf_counter()
            summary = tune.run_tune(args)
            summary["bench_wall_s"] = time.perf_counter() - start
        finally:
            ray.shutdown()
        results[scheduler] = summary
    results["storage"] = storage
    return results


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("ddp", "tune", "all"), default="all")
    p.add_argument("--timesteps", type=int, default=65536, help="env steps of each DDP run (all ranks together)")
    p.add_argument("--num-envs", type=int, default=64, help="parallel episodes in total (split over processes)")
    p.add_argument("--num-steps", type=int, default=128)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved DDP runs per process count (median kept)")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--steps-per-iteration", type=int, default=8192)
    p.add_argument("--perturbation-interval", type=int, default=2)
    p.add_argument("--quantile-fraction", type=float, default=0.25)
    p.add_argument("--schedulers", nargs="+", choices=("pbt", "random"), default=["pbt", "random"])
    p.add_argument("--async-pbt", action="store_true", help="asynchronous PBT (Ray's default; ours is synchronous)")
    p.add_argument("--variant-args", default="--window 16 --episode-length 128")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--tune-storage", default=None)
    p.add_argument("--quick", action="store_true", help="CI-sized settings (seconds, not minutes)")
    p.add_argument("--json", default=None, help="write the results here")
    options = p.parse_args(argv)
    if options.quick:
        for key, value in QUICK.items():
            setattr(options, key, value)
        options.variant_args = "--window 16 --episode-length 64 --num-envs 8 --num-steps 32 --hidden-size 8"
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen parts and return (and print / write) the results."""
    options = parse(argv)
    out: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv[:1], *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(), "load_average_start": list(os.getloadavg())},
        "settings": {k: v for k, v in vars(options).items() if k not in ("json",)},
    }
    if options.part in ("ddp", "all"):
        out["ddp"] = bench_ddp(options)
    if options.part in ("tune", "all"):
        out["tune"] = bench_tune(options)
    out["machine"]["load_average_end"] = list(os.getloadavg())
    text = json.dumps(out, indent=2, default=str)
    if options.json:
        Path(options.json).write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
