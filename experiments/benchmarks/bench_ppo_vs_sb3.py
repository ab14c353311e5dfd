"""Training throughput (env steps/s): ``sentio_lab.ppo`` vs Stable-Baselines3 PPO vs the compute floor.

All three train PPO on the same market (sp500, default "basic" feature bank, same window) with the same
settings: parallel episodes N, rollout length, epochs, minibatch size, a 2x64 tanh network with separate
actor and critic, Adam at a constant learning rate, no target KL, observation normalisation, CPU.

* **ours**: ``sentio_lab.ppo.train`` on the batched torch ``TradingEnv`` (built by ``ppo.make_env``);
* **SB3**: ``stable_baselines3.PPO`` on N ``NumpyTradingEnv`` (the numpy reference env of the same market)
  in a ``DummyVecEnv`` and, for small N, a ``SubprocVecEnv``; the faster of the two is reported;
* **floor**: ``sentio_lab.ppo.train`` with an injected :class:`NullEnv` whose ``step`` costs nothing, so
  what remains is the identical policy forward per step and the identical PPO update.

Timing: each run trains ``iterations + 1`` PPO iterations (one rollout of N x num_steps steps plus its
update) in a single call; the first iteration is a warm-up and the next ``iterations`` are timed, so data
loading, env and model construction and the warm-up are excluded and all three time the same number of
steps. For ours and the floor the timestamps come from the run's own ``charts/SPS`` record (elapsed time at
the end of iteration i = global_step_i / SPS_i); for SB3 from a callback at the start of each rollout to the
end of ``learn``. Steps/s = timed steps / timed seconds. With ``--repeats R`` the candidates are measured
R times (default 3), interleaved (A B A B ...), and the median of each is kept with its spread (max - min) /
median; a ratio whose runs spread wider than ``_timing.SPREAD_LIMIT`` (or number fewer than 3) is refused and
printed as ``unreliable: ...`` (``experiments/benchmarks/_timing.py``).

Choices, for the record: the minibatch is min(--minibatch-size, N x num_steps) (one minibatch per epoch when
the batch is smaller); SB3 envs are not wrapped in ``Monitor`` (the fastest SB3 set-up; ours keeps its own
episode returns); ours multiplies rewards by ``reward_scale`` and SB3 does not (no effect on the work done);
``--threads`` is set once with ``torch.set_num_threads`` and holds for all three.

Run ``python experiments/benchmarks/bench_ppo_vs_sb3.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
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

from sentio_lab import ppo  # noqa: E402
from sentio_lab.env import NumpyTradingEnv  # noqa: E402
from sentio_lab.env.market import PreparedMarket, prepare_market  # noqa: E402
from sentio_lab.features import FeatureConfig  # noqa: E402

#: Goals of the issue (2 CPU cores): ours >= 80% of the floor at every N and >= 4x SB3 at N = 512.
GOAL_OURS_OVER_FLOOR = 0.8
GOAL_OURS_OVER_SB3 = 4.0
GOAL_SB3_N = 512

QUICK = {"num_envs": [4, 8], "num_steps": 16, "update_epochs": 2, "minibatch_size": 32, "iterations": 1,
         "window": 8, "episode_length": 24, "subproc_max_envs": 4, "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` overrides the sizes with tiny ones (used by the test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-envs", type=int, nargs="+", default=[8, 64, 512], help="parallel episodes N")
    p.add_argument("--num-steps", type=int, default=128, help="rollout length (steps per episode per rollout)")
    p.add_argument("--update-epochs", type=int, default=4, help="epochs over each rollout")
    p.add_argument("--minibatch-size", type=int, default=2048,
                   help="minibatch size; min(this, N * num_steps) is used (one minibatch when the batch is smaller)")
    p.add_argument("--iterations", type=int, default=10, help="timed PPO iterations after one warm-up iteration")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of each measurement; the median is kept, ratios need >= 3 and a "
                        "narrow spread")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, the same for all three")
    p.add_argument("--learning-rate", type=float, default=2.5e-4, help="Adam learning rate (constant)")
    p.add_argument("--window", type=int, default=ppo.Args().features.window,
                   help="bars of feature history per observation")
    p.add_argument("--episode-length", type=int, default=ppo.Args().env.episode_length, help="steps per episode")
    p.add_argument("--dataset", default="sp500", help="bundled dataset name or OHLCV file")
    p.add_argument("--subproc-max-envs", type=int, default=64,
                   help="also measure SB3 with SubprocVecEnv (one process per env) for N up to this; 0 = never")
    p.add_argument("--skip", nargs="*", default=[], choices=["ours", "sb3", "floor"], help="leave these out")
    p.add_argument("--seed", type=int, default=1, help="seed of all three runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


# ------------------------------------------------------------------------------------------------ settings
def settings_for(num_envs: int, cli: argparse.Namespace) -> dict[str, int]:
    """Batch and minibatch sizes at N = ``num_envs``: minibatch = min(--minibatch-size, batch), dividing it."""
    batch = num_envs * cli.num_steps
    minibatch = min(cli.minibatch_size, batch)
    if batch % minibatch:
        raise ValueError(f"N={num_envs}: batch {batch} is not a multiple of the minibatch {minibatch}")
    return {"num_envs": num_envs, "num_steps": cli.num_steps, "batch_size": batch, "minibatch_size": minibatch,
            "num_minibatches": batch // minibatch, "update_epochs": cli.update_epochs,
            "total_timesteps": batch * (cli.iterations + 1)}


def ppo_args(s: dict[str, int], cli: argparse.Namespace, run_dir: str) -> ppo.Args:
    """Arguments of ``sentio_lab.ppo`` for one setting (constant lr, no tracking, no progress bar)."""
    return ppo.Args.from_flat(
        seed=cli.seed, device="cpu", track=False, progress=False, run_dir=run_dir, run_name="bench",
        dataset=cli.dataset, window=cli.window, episode_length=cli.episode_length,
        total_timesteps=s["total_timesteps"], learning_rate=cli.learning_rate, num_envs=s["num_envs"],
        num_steps=s["num_steps"], anneal_lr=False, num_minibatches=s["num_minibatches"],
        update_epochs=s["update_epochs"], target_kl=None, hidden_size=64, norm_obs=True, checkpoint_every=0,
    )


# ---------------------------------------------------------------------------------------------- the floor
class NullEnv:
    """An environment that costs nothing: a cycling bank of preallocated random observations.

    Same interface as :class:`sentio_lab.env.TradingEnv` as far as ``ppo.train`` uses it: zero float64
    rewards, nothing ever terminates or truncates, ``info["final_obs"]`` is the observation itself.
    """

    def __init__(self, num_envs: int, obs_dim: int, num_actions: int, bank: int = 8, seed: int = 0) -> None:
        """Draw ``bank`` random (num_envs, obs_dim) observations once."""
        generator = torch.Generator().manual_seed(seed)
        self.num_envs, self.obs_dim, self.num_actions = num_envs, obs_dim, num_actions
        self._bank = torch.randn((bank, num_envs, obs_dim), generator=generator)
        self._reward = torch.zeros(num_envs, dtype=torch.float64)
        self._false = torch.zeros(num_envs, dtype=torch.bool)
        self._i = 0

    def reset(self) -> torch.Tensor:
        """The first observation of the bank."""
        self._i = 0
        return self._bank[0]

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Ignore ``actions``; return the next bank entry, zero rewards, no episode ends."""
        self._i = (self._i + 1) % len(self._bank)
        obs = self._bank[self._i]
        return obs, self._reward, self._false, self._false, {"final_obs": obs}


# ------------------------------------------------------------------------------------------------ timing
def _timed_from_history(history: list[dict[str, float]], batch: int, iterations: int) -> dict[str, float]:
    """Steps/s over the last ``iterations`` iterations from the run's own SPS record.

    ``ppo.train`` logs ``charts/SPS = global_step / elapsed`` at the end of each iteration (a fresh run
    starts at step 0), so elapsed_i = global_step_i / SPS_i and the timed window is the difference.
    """
    if len(history) != iterations + 1:
        raise RuntimeError(f"expected {iterations + 1} logged iterations, got {len(history)}")
    first, last = history[0], history[-1]
    t0 = first["global_step"] / first["charts/SPS"]
    t1 = last["global_step"] / last["charts/SPS"]
    steps = int(last["global_step"] - first["global_step"])
    assert steps == batch * iterations
    return {"steps": steps, "seconds": t1 - t0, "steps_per_s": steps / (t1 - t0)}


def bench_ours(market: PreparedMarket, s: dict[str, int], cli: argparse.Namespace, run_dir: str) -> dict:
    """``ppo.train`` on the torch env of the market (built as ``train`` builds it; no checkpoint written)."""
    args = ppo_args(s, cli, run_dir)
    env = ppo.make_env(args, market)
    result = ppo.train(args, env=env)
    return _timed_from_history(result.history, s["batch_size"], cli.iterations)


def bench_floor(obs_dim: int, num_actions: int, s: dict[str, int], cli: argparse.Namespace, run_dir: str) -> dict:
    """``ppo.train`` with the free :class:`NullEnv`: policy forward per step + PPO update, nothing else."""
    args = ppo_args(s, cli, run_dir)
    result = ppo.train(args, env=NullEnv(s["num_envs"], obs_dim, num_actions, seed=cli.seed))
    return _timed_from_history(result.history, s["batch_size"], cli.iterations)


def run_sb3(algo: type, make_env: Callable[[], Any], s: dict[str, int], cli: argparse.Namespace, vec_env: str,
            label: str, after_learn: Callable[[Any], dict] | None = None) -> dict:
    """Train an SB3-family ``algo`` (PPO, sb3-contrib's MaskablePPO) on ``N`` envs from ``make_env`` in ``vec_env``
    ("DummyVecEnv" or "SubprocVecEnv") with our PPO's settings, timed from the second rollout to the end.

    ``after_learn(venv)`` runs before the vec env closes and its dict joins the result (e.g. env counters).
    """
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    class RolloutClock(BaseCallback):
        """Timestamps at the start of every rollout and at the end of training."""

        def __init__(self) -> None:
            super().__init__()
            self.starts: list[float] = []
            self.end = float("nan")

        def _on_rollout_start(self) -> None:
            self.starts.append(time.perf_counter())

        def _on_step(self) -> bool:
            return True

        def _on_training_end(self) -> None:
            self.end = time.perf_counter()

    fns = [make_env] * s["num_envs"]
    # fork: the workers share the parent's already-imported modules and market arrays (copy on write).
    venv = DummyVecEnv(fns) if vec_env == "DummyVecEnv" else SubprocVecEnv(fns, start_method="fork")
    venv = VecNormalize(venv, norm_obs=True, norm_reward=False)
    extra: dict = {}
    try:
        model = algo(
            "MlpPolicy", venv, learning_rate=cli.learning_rate, n_steps=s["num_steps"],
            batch_size=s["minibatch_size"], n_epochs=s["update_epochs"], gamma=0.99, gae_lambda=0.95,
            clip_range=0.2, clip_range_vf=0.2, normalize_advantage=True, ent_coef=0.01, vf_coef=0.5,
            max_grad_norm=0.5, target_kl=None, seed=cli.seed, device="cpu", verbose=0,
            policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh),
        )
        clock = RolloutClock()
        model.learn(total_timesteps=s["total_timesteps"], callback=clock)
        if after_learn is not None:
            extra = after_learn(venv)
    finally:
        venv.close()
    if len(clock.starts) != cli.iterations + 1:
        raise RuntimeError(f"{label} ran {len(clock.starts)} iterations, expected {cli.iterations + 1}")
    steps = s["batch_size"] * cli.iterations
    seconds = clock.end - clock.starts[1]
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds, **extra}


def bench_sb3(market: PreparedMarket, s: dict[str, int], cli: argparse.Namespace, vec_env: str) -> dict:
    """SB3 PPO on ``N`` numpy envs of the same market in ``vec_env`` ("DummyVecEnv" or "SubprocVecEnv")."""
    from stable_baselines3 import PPO

    start, stop = market.range("train")
    arrays, costs, positions = market.arrays, ppo.cost_model(ppo.Args.from_flat()), ppo.Args().env.positions

    def make_env() -> NumpyTradingEnv:
        return NumpyTradingEnv(arrays, window=cli.window, episode_length=cli.episode_length, start=start,
                               stop=stop, positions=positions, costs=costs)

    return run_sb3(PPO, make_env, s, cli, vec_env, "SB3")


def _best(runs: list[dict]) -> dict:
    """The median of repeated (interleaved) measurements, with its spread and all of them recorded."""
    return _timing.median_run(runs)


def set_ratio(row: dict, name: str, numerator: str, denominator: str) -> None:
    """``row[name]``: ``row[numerator] / row[denominator]`` (median steps/s) or None when the runs' spread is too
    wide or too few (``_timing.ratio``); ``row[name + "_check"]`` says which and why."""
    check = _timing.ratio(row[numerator], row[denominator])
    row[name], row[name + "_check"] = check["ratio"], check


def ratio_cell(row: dict, name: str, width: int) -> str:
    """The printed ratio (or its refusal) of :func:`set_ratio`, ``-`` when not measured."""
    return _timing.fmt_ratio(row.get(name + "_check"), width)


# ------------------------------------------------------------------------------------------------ report
def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def format_table(results: list[dict]) -> str:
    """The side-by-side table, one row per N."""
    head = (f"{'N':>5} | {'batch':>6} | {'minibatch':>9} | {'ours steps/s':>12} | {'SB3 steps/s (vec env)':>28} | "
            f"{'floor steps/s':>13} | {'ours/floor':>10} | {'ours/SB3':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        def num(key: str, r: dict = r) -> str:
            return f"{r[key]['steps_per_s']:>12,.0f}" if key in r else f"{'-':>12}"

        sb3 = f"{r['sb3']['steps_per_s']:>12,.0f} ({r['sb3']['vec_env']})" if "sb3" in r else "-"
        of, os3 = ratio_cell(r, "ours_over_floor", 10), ratio_cell(r, "ours_over_sb3", 8)
        lines.append(f"{r['num_envs']:>5} | {r['batch_size']:>6} | {r['minibatch_size']:>9} | {num('ours')} | "
                     f"{sb3:>28} | {num('floor'):>13} | {of} | {os3}")
    return "\n".join(lines)


def goals(results: list[dict]) -> dict[str, Any]:
    """Whether the issue's goals are met (None where a number is missing or unreliable)."""
    floor = [r["ours_over_floor"] for r in results if "ours_over_floor" in r]
    floor_ok = [f >= GOAL_OURS_OVER_FLOOR for f in floor] if floor and None not in floor else None
    at_goal_n = [r for r in results
                 if r["num_envs"] == GOAL_SB3_N and r.get("ours_over_sb3") is not None]
    return {
        f"ours_over_floor>={GOAL_OURS_OVER_FLOOR}_at_every_N": all(floor_ok) if floor_ok else None,
        f"ours_over_sb3>={GOAL_OURS_OVER_SB3}_at_N={GOAL_SB3_N}":
            at_goal_n[0]["ours_over_sb3"] >= GOAL_OURS_OVER_SB3 if at_goal_n else None,
    }


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return (and optionally write) the results."""
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    load_start = _load()
    print(f"command: {command}", flush=True)

    market = prepare_market(cli.dataset, FeatureConfig())
    probe = ppo.make_env(ppo_args(settings_for(cli.num_envs[0], cli), cli, "."), market)
    obs_dim, num_actions = probe.obs_dim, probe.num_actions
    print(f"market: {cli.dataset}, {market.arrays.features.shape[1]} features x window {cli.window} "
          f"-> obs_dim {obs_dim}, {num_actions} actions; train bars {market.range('train')}", flush=True)

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as run_dir:
        for n in cli.num_envs:
            s = settings_for(n, cli)
            row: dict[str, Any] = dict(s)
            measures = {}
            if "ours" not in cli.skip:
                measures["ours"] = lambda s=s: bench_ours(market, s, cli, run_dir)
            if "floor" not in cli.skip:
                measures["floor"] = lambda s=s: bench_floor(obs_dim, num_actions, s, cli, run_dir)
            if "sb3" not in cli.skip:
                for v in ["DummyVecEnv"] + (["SubprocVecEnv"] if n <= cli.subproc_max_envs else []):
                    measures[v] = lambda s=s, v=v: bench_sb3(market, s, cli, v)
            # Repeats interleave the candidates, so a burst of outside load does not hit one of them only.
            runs: dict[str, list[dict]] = _timing.interleave(measures, cli.repeats)
            for name in ("ours", "floor"):
                if name in runs:
                    row[name] = _best(runs[name])
            vec_envs = {v: _best(r) for v, r in runs.items() if v.endswith("VecEnv")}
            if vec_envs:
                fastest = max(vec_envs, key=lambda v: vec_envs[v]["steps_per_s"])
                row["sb3"] = {**vec_envs[fastest], "vec_env": fastest,
                              "candidates": {v: m["steps_per_s"] for v, m in vec_envs.items()}}
            if "ours" in row and "floor" in row:
                set_ratio(row, "ours_over_floor", "ours", "floor")
            if "ours" in row and "sb3" in row:
                set_ratio(row, "ours_over_sb3", "ours", "sb3")
            results.append(row)
            print(f"N={n}: " + ", ".join(
                f"{k} {row[k]['steps_per_s']:,.0f}" for k in ("ours", "sb3", "floor") if k in row), flush=True)

    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": _load()}
    out = {
        "command": command,
        "machine": machine,
        "timing": "steps/s over the timed iterations (after 1 warm-up iteration); ours/floor from the run's own "
                  "charts/SPS record, SB3 from rollout-start timestamps to the end of learn()",
        "settings": {"num_steps": cli.num_steps, "update_epochs": cli.update_epochs,
                     "minibatch_size_requested": cli.minibatch_size, "iterations": cli.iterations,
                     "repeats": cli.repeats, "threads": cli.threads, "learning_rate": cli.learning_rate,
                     "window": cli.window, "episode_length": cli.episode_length, "dataset": cli.dataset,
                     "obs_dim": obs_dim, "num_actions": num_actions, "network": "2x64 tanh, separate actor/critic",
                     "obs_norm": True, "quick": cli.quick},
        "results": results,
        "goals": goals(results),
    }
    print()
    print(format_table(results))
    print()
    for r in results:
        if "sb3" in r:
            cands = ", ".join(f"{v} {sps:,.0f}" for v, sps in r["sb3"]["candidates"].items())
            print(f"N={r['num_envs']}: SB3 vec env {r['sb3']['vec_env']} (measured: {cands})")
    print(f"goals: {out['goals']}")
    print(f"machine: {machine}")
    print(f"timing: {out['timing']}")
    if cli.json is not None:
        cli.json.parent.mkdir(parents=True, exist_ok=True)
        cli.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {cli.json}")
    return out


if __name__ == "__main__":
    main()
