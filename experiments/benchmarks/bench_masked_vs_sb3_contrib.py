"""Masked training throughput (env steps/s): ``sentio_lab.ppo_masked`` vs sb3-contrib MaskablePPO vs the floor.

The sibling of ``bench_ppo_vs_sb3.py`` for action masking. All three train PPO with the same mask rules (by
default cool-down 3 + long-only on the 5-level position set -1, -0.5, 0, 0.5, 1) on the same market (sp500,
"basic" feature bank, same window) with the same settings: parallel episodes N, rollout length, epochs,
minibatch size, a 2x64 tanh network with separate actor and critic, Adam at a constant learning rate, no target
KL, observation normalisation, CPU.

* **ours**: ``sentio_lab.ppo_masked.train`` on the batched torch ``TradingEnv`` with ``masks=MaskConfig(...)``
  (built by ``ppo_masked.make_env``); the env's ``action_masks()`` is read before every decision;
* **MaskablePPO**: ``sb3_contrib.MaskablePPO`` on N ``NumpyTradingEnv`` with the same ``MaskConfig`` in a
  ``DummyVecEnv`` and, for small N, a ``SubprocVecEnv`` (the faster is reported). The env exposes
  ``action_masks()`` itself, which MaskablePPO reads through ``VecEnv.env_method`` every step (through
  ``VecNormalize`` too), so no ``ActionMasker`` wrapper is needed;
* **floor**: ``sentio_lab.ppo_masked.train`` with :class:`MaskedNullEnv`, the sibling's free ``NullEnv`` plus a
  preallocated constant mask (the long-only pattern): what remains is the identical masked policy forward per
  step, the mask copy into the buffer and the identical masked PPO update.

Timing is the sibling's: ``iterations + 1`` PPO iterations in one call, the first a warm-up, the next
``iterations`` timed (ours and the floor from the run's own ``charts/SPS`` record, MaskablePPO from a callback
at the start of each rollout to the end of ``learn``). With ``--repeats R`` the candidates are measured R times,
interleaved, and the fastest of each is kept. The goal of issue 7: ours >= 80% of the floor at every N.

Run ``python experiments/benchmarks/bench_masked_vs_sb3_contrib.py --help``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The script lives outside the package; make ``sentio_lab`` importable when run from any directory.
_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from sentio_lab import ppo_masked  # noqa: E402
from sentio_lab.env import NumpyTradingEnv  # noqa: E402
from sentio_lab.env.market import PreparedMarket, prepare_market  # noqa: E402
from sentio_lab.env.masks import MaskConfig  # noqa: E402
from sentio_lab.features import FeatureConfig  # noqa: E402


def _load_sibling() -> Any:
    """``bench_ppo_vs_sb3.py`` as a module (experiments/ is not a package): its settings, floor and timing."""
    spec = importlib.util.spec_from_file_location("bench_ppo_vs_sb3", _HERE / "bench_ppo_vs_sb3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


base = _load_sibling()
settings_for, NullEnv, machine_info = base.settings_for, base.NullEnv, base.machine_info
GOAL_OURS_OVER_FLOOR = base.GOAL_OURS_OVER_FLOOR

POSITIONS = (-1.0, -0.5, 0.0, 0.5, 1.0)
QUICK = {**base.QUICK, "cooldown": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` overrides the sizes with tiny ones (used by the test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-envs", "--sizes", dest="num_envs", type=int, nargs="+", default=[8, 64, 512],
                   help="parallel episodes N")
    p.add_argument("--num-steps", type=int, default=128, help="rollout length (steps per episode per rollout)")
    p.add_argument("--update-epochs", type=int, default=4, help="epochs over each rollout")
    p.add_argument("--minibatch-size", type=int, default=2048,
                   help="minibatch size; min(this, N * num_steps) is used (one minibatch when the batch is smaller)")
    p.add_argument("--iterations", type=int, default=10, help="timed PPO iterations after one warm-up iteration")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of each measurement; the median is kept, ratios need >= 3 and a "
                        "narrow spread (bench_ppo_vs_sb3 / _timing)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, the same for all three")
    p.add_argument("--learning-rate", type=float, default=2.5e-4, help="Adam learning rate (constant)")
    p.add_argument("--window", type=int, default=ppo_masked.Args().features.window,
                   help="bars of feature history per obs")
    p.add_argument("--episode-length", type=int, default=ppo_masked.Args().env.episode_length, help="steps per episode")
    p.add_argument("--dataset", default="sp500", help="bundled dataset name or OHLCV file")
    p.add_argument("--positions", type=float, nargs="+", default=list(POSITIONS), help="position levels")
    p.add_argument("--cooldown", type=int, default=3, help="mask rule: minimum holding period (0 = off)")
    p.add_argument("--long-only", action=argparse.BooleanOptionalAction, default=True, help="mask rule: w >= 0")
    p.add_argument("--subproc-max-envs", type=int, default=8,
                   help="also measure MaskablePPO with SubprocVecEnv (one process per env) for N up to this; 0 = never")
    p.add_argument("--skip", nargs="*", default=[], choices=["ours", "maskable", "floor"], help="leave these out")
    p.add_argument("--seed", type=int, default=1, help="seed of all three runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def mask_config(cli: argparse.Namespace) -> MaskConfig:
    """The mask rules all three runs use."""
    return MaskConfig(long_only=cli.long_only, cooldown=cli.cooldown)


def masked_args(s: dict[str, int], cli: argparse.Namespace, run_dir: str) -> ppo_masked.Args:
    """Arguments of ``sentio_lab.ppo_masked`` for one setting (constant lr, no tracking, no progress bar)."""
    return ppo_masked.Args.from_flat(
        seed=cli.seed, device="cpu", track=False, progress=False, run_dir=run_dir, run_name="bench",
        dataset=cli.dataset, window=cli.window, episode_length=cli.episode_length, positions=tuple(cli.positions),
        masks=mask_config(cli), total_timesteps=s["total_timesteps"], learning_rate=cli.learning_rate,
        num_envs=s["num_envs"], num_steps=s["num_steps"], anneal_lr=False, num_minibatches=s["num_minibatches"],
        update_epochs=s["update_epochs"], target_kl=None, hidden_size=64, norm_obs=True, checkpoint_every=0,
    )


# ---------------------------------------------------------------------------------------------- the floor
class MaskedNullEnv(NullEnv):
    """The sibling's :class:`NullEnv` (free observations, zero rewards, no episode ends) with a free mask.

    :meth:`action_masks` returns one preallocated (num_envs, num_actions) bool tensor: ``valid`` in every row.
    """

    def __init__(self, num_envs: int, obs_dim: int, valid: np.ndarray, bank: int = 8, seed: int = 0) -> None:
        """Observations as :class:`NullEnv`; ``valid`` is the (num_actions,) bool row of every mask."""
        super().__init__(num_envs, obs_dim, len(valid), bank=bank, seed=seed)
        self._mask = torch.as_tensor(np.asarray(valid, dtype=bool)).expand(num_envs, -1).contiguous()

    def action_masks(self) -> torch.Tensor:
        """The constant mask."""
        return self._mask


def floor_mask(cli: argparse.Namespace) -> np.ndarray:
    """The floor's constant mask: the levels the position rules allow (the cool-down is state, left out)."""
    levels = np.asarray(cli.positions, dtype=np.float64)
    return levels >= 0 if cli.long_only else np.ones(len(levels), dtype=bool)


# ------------------------------------------------------------------------------------------------ timing
def bench_ours(market: PreparedMarket, s: dict[str, int], cli: argparse.Namespace, run_dir: str) -> dict:
    """``ppo_masked.train`` on the masked torch env of the market (no checkpoint written)."""
    args = masked_args(s, cli, run_dir)
    env = ppo_masked.make_env(args, market)
    result = ppo_masked.train(args, env=env)
    timed = base._timed_from_history(result.history, s["batch_size"], cli.iterations)
    return {**timed, "mask_binding": dict(env.mask_binding)}


def bench_floor(obs_dim: int, s: dict[str, int], cli: argparse.Namespace, run_dir: str) -> dict:
    """``ppo_masked.train`` with the free :class:`MaskedNullEnv`: masked forward per step + update, nothing else."""
    args = masked_args(s, cli, run_dir)
    env = MaskedNullEnv(s["num_envs"], obs_dim, floor_mask(cli), seed=cli.seed)
    result = ppo_masked.train(args, env=env)
    return base._timed_from_history(result.history, s["batch_size"], cli.iterations)


def bench_maskable(market: PreparedMarket, s: dict[str, int], cli: argparse.Namespace, vec_env: str) -> dict:
    """sb3-contrib MaskablePPO on ``N`` masked numpy envs in ``vec_env`` ("DummyVecEnv" or "SubprocVecEnv")."""
    from sb3_contrib import MaskablePPO

    start, stop = market.range("train")
    arrays, masks = market.arrays, mask_config(cli)
    costs = ppo_masked.cost_model(ppo_masked.Args.from_flat())

    def make_env() -> NumpyTradingEnv:
        return NumpyTradingEnv(arrays, window=cli.window, episode_length=cli.episode_length, start=start, stop=stop,
                               positions=tuple(cli.positions), costs=costs, masks=masks)

    def binding(venv: Any) -> dict:
        counts: dict[str, int] = {}
        for masker in venv.get_attr("masker"):
            for rule, count in masker.counts("binding").items():
                counts[rule] = counts.get(rule, 0) + count
        return {"mask_binding": counts}

    return base.run_sb3(MaskablePPO, make_env, s, cli, vec_env, "MaskablePPO", after_learn=binding)


# ------------------------------------------------------------------------------------------------ report
def format_table(results: list[dict]) -> str:
    """The side-by-side table, one row per N."""
    head = (f"{'N':>5} | {'batch':>6} | {'minibatch':>9} | {'ours steps/s':>12} | "
            f"{'MaskablePPO steps/s (vec env)':>30} | {'floor steps/s':>13} | {'ours/floor':>10} | "
            f"{'ours/MaskablePPO':>16} | {'>= 0.8 floor':>12}")
    lines = [head, "-" * len(head)]
    for r in results:
        def num(key: str, r: dict = r) -> str:
            return f"{r[key]['steps_per_s']:>12,.0f}" if key in r else f"{'-':>12}"

        mp = f"{r['maskable']['steps_per_s']:>12,.0f} ({r['maskable']['vec_env']})" if "maskable" in r else "-"
        of, om = base.ratio_cell(r, "ours_over_floor", 10), base.ratio_cell(r, "ours_over_maskable", 16)
        met = ("-" if r.get("ours_over_floor") is None
               else "yes" if r["ours_over_floor"] >= GOAL_OURS_OVER_FLOOR else "no")
        lines.append(f"{r['num_envs']:>5} | {r['batch_size']:>6} | {r['minibatch_size']:>9} | {num('ours')} | "
                     f"{mp:>30} | {num('floor'):>13} | {of} | {om} | {met:>12}")
    return "\n".join(lines)


def goals(results: list[dict]) -> dict[str, Any]:
    """Whether the issue's goal is met (None where a number is missing or unreliable)."""
    floor = [r["ours_over_floor"] for r in results if "ours_over_floor" in r]
    floor_ok = [f >= GOAL_OURS_OVER_FLOOR for f in floor] if floor and None not in floor else None
    return {f"ours_over_floor>={GOAL_OURS_OVER_FLOOR}_at_every_N": all(floor_ok) if floor_ok else None}


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return (and optionally write) the results."""
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    load_start = base._load()
    print(f"command: {command}", flush=True)

    market = prepare_market(cli.dataset, FeatureConfig())
    probe = ppo_masked.make_env(masked_args(settings_for(cli.num_envs[0], cli), cli, "."), market)
    obs_dim, num_actions = probe.obs_dim, probe.num_actions
    masks = mask_config(cli)
    print(f"market: {cli.dataset}, {market.arrays.features.shape[1]} features x window {cli.window} "
          f"-> obs_dim {obs_dim}, {num_actions} actions {tuple(cli.positions)}; mask rules "
          f"{masks.active_rules()} (cooldown {masks.cooldown}); train bars {market.range('train')}", flush=True)

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_masked_") as run_dir:
        for n in cli.num_envs:
            s = settings_for(n, cli)
            row: dict[str, Any] = dict(s)
            measures = {}
            if "ours" not in cli.skip:
                measures["ours"] = lambda s=s: bench_ours(market, s, cli, run_dir)
            if "floor" not in cli.skip:
                measures["floor"] = lambda s=s: bench_floor(obs_dim, s, cli, run_dir)
            if "maskable" not in cli.skip:
                for v in ["DummyVecEnv"] + (["SubprocVecEnv"] if n <= cli.subproc_max_envs else []):
                    measures[v] = lambda s=s, v=v: bench_maskable(market, s, cli, v)
            # Repeats interleave the candidates, so a burst of outside load does not hit one of them only.
            runs: dict[str, list[dict]] = base._timing.interleave(measures, cli.repeats)
            for name in ("ours", "floor"):
                if name in runs:
                    row[name] = base._best(runs[name])
            vec_envs = {v: base._best(r) for v, r in runs.items() if v.endswith("VecEnv")}
            if vec_envs:
                fastest = max(vec_envs, key=lambda v: vec_envs[v]["steps_per_s"])
                row["maskable"] = {**vec_envs[fastest], "vec_env": fastest,
                                   "candidates": {v: m["steps_per_s"] for v, m in vec_envs.items()}}
            if "ours" in row and "floor" in row:
                base.set_ratio(row, "ours_over_floor", "ours", "floor")
            if "ours" in row and "maskable" in row:
                base.set_ratio(row, "ours_over_maskable", "ours", "maskable")
            results.append(row)
            print(f"N={n}: " + ", ".join(
                f"{k} {row[k]['steps_per_s']:,.0f}" for k in ("ours", "maskable", "floor") if k in row), flush=True)

    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": base._load()}
    out = {
        "command": command,
        "machine": machine,
        "timing": "steps/s over the timed iterations (after 1 warm-up iteration); ours/floor from the run's own "
                  "charts/SPS record, MaskablePPO from rollout-start timestamps to the end of learn()",
        "settings": {"num_steps": cli.num_steps, "update_epochs": cli.update_epochs,
                     "minibatch_size_requested": cli.minibatch_size, "iterations": cli.iterations,
                     "repeats": cli.repeats, "threads": cli.threads, "learning_rate": cli.learning_rate,
                     "window": cli.window, "episode_length": cli.episode_length, "dataset": cli.dataset,
                     "positions": list(cli.positions), "mask_rules": list(masks.active_rules()),
                     "cooldown": masks.cooldown, "long_only": masks.long_only, "obs_dim": obs_dim,
                     "num_actions": num_actions, "network": "2x64 tanh, separate actor/critic", "obs_norm": True,
                     "quick": cli.quick},
        "results": results,
        "goals": goals(results),
    }
    print()
    print(format_table(results))
    print()
    for r in results:
        if "maskable" in r:
            cands = ", ".join(f"{v} {sps:,.0f}" for v, sps in r["maskable"]["candidates"].items())
            print(f"N={r['num_envs']}: MaskablePPO vec env {r['maskable']['vec_env']} (measured: {cands})")
        for k in ("ours", "maskable"):
            if k in r:
                print(f"N={r['num_envs']}: {k} mask rules binding (decisions where the rule masked a level): "
                      f"{r[k]['mask_binding']}")
    met = out["goals"][f"ours_over_floor>={GOAL_OURS_OVER_FLOOR}_at_every_N"]
    print(f"goal ours >= {GOAL_OURS_OVER_FLOOR:.0%} of the floor at every N: "
          f"{'n/a' if met is None else 'met' if met else 'not met'}")
    print(f"machine: {machine}")
    print(f"timing: {out['timing']}")
    if cli.json is not None:
        cli.json.parent.mkdir(parents=True, exist_ok=True)
        cli.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {cli.json}")
    return out


if __name__ == "__main__":
    main()
