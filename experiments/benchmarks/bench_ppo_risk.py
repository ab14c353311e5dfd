"""Training throughput (env steps/s) of ``sentio_lab.ppo_risk`` beside ``sentio_lab.ppo`` and their compute floors.

All runs train on the same market (sp500, default "basic" feature bank, same window), same settings (parallel
episodes N, rollout length, epochs, minibatch size, 2x64 tanh actor and critic, Adam at a constant learning rate,
observation normalisation, CPU):

* **ppo**: ``sentio_lab.ppo.train`` on its torch ``TradingEnv``;
* **risk**: ``sentio_lab.ppo_risk.train`` risk-neutral with ``--num-quantiles`` heads (default 32, the variant's);
* **risk_full**: the same with the drawdown constraint (cost critic, PID multiplier), ``--risk cvar`` and the
  adaptive KL penalty (one more full-batch policy forward per iteration): everything on;
* **floor** / **risk_floor** / **risk_full_floor**: the same three trainers with an injected env whose ``step``
  costs nothing (``bench_ppo_vs_sb3.NullEnv``; for ppo_risk one that also reports a zero drawdown cost), so what
  remains is the policy forward per step and the update: ``X / X_floor`` is how close the env keeps X to its own
  compute, ``risk / ppo`` what the quantile critic (and the rest) cost on top of ppo.

Timing as in ``bench_ppo_vs_sb3.py``: ``iterations + 1`` iterations in one call, the first a warm-up, steps/s over
the rest from the run's own ``charts/SPS`` record; ``--repeats R`` (default 3) keeps the median of R interleaved runs
and refuses a ratio whose runs spread too wide (``_timing.py``).
Run ``python experiments/benchmarks/bench_ppo_risk.py --help``.
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

import torch

# The script lives outside the package; make ``sentio_lab`` importable when run from any directory.
_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from sentio_lab import ppo, ppo_risk  # noqa: E402
from sentio_lab.env.market import prepare_market  # noqa: E402
from sentio_lab.features import FeatureConfig  # noqa: E402


def _load_sibling() -> Any:
    """``bench_ppo_vs_sb3.py`` as a module (experiments/ is not a package): its settings, floor and timing."""
    spec = importlib.util.spec_from_file_location("bench_ppo_vs_sb3", _HERE / "bench_ppo_vs_sb3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


base = _load_sibling()
settings_for, machine_info, timed_from_history = base.settings_for, base.machine_info, base._timed_from_history

QUICK = {**base.QUICK, "num_envs": [4], "num_quantiles": 4}
CANDIDATES = ("ppo", "risk", "risk_full")


class NullCostEnv(base.NullEnv):
    """``NullEnv`` that also reports a zero ``drawdown_cost`` (what ppo_risk's constraint reads)."""

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """As ``NullEnv.step``, with ``info["drawdown_cost"]`` zeros."""
        out = super().step(actions)
        out[4]["drawdown_cost"] = self._reward
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` overrides the sizes with tiny ones (used by the test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-envs", type=int, nargs="+", default=[8, 64, 512], help="parallel episodes N")
    p.add_argument("--num-steps", type=int, default=128, help="rollout length (steps per episode per rollout)")
    p.add_argument("--update-epochs", type=int, default=4, help="epochs over each rollout")
    p.add_argument("--minibatch-size", type=int, default=2048,
                   help="minibatch size; min(this, N * num_steps) is used")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations after one warm-up iteration")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of each measurement; the median is kept, ratios need >= 3 and a "
                        "narrow spread")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, the same for all")
    p.add_argument("--learning-rate", type=float, default=2.5e-4, help="Adam learning rate (constant)")
    p.add_argument("--window", type=int, default=ppo.Args().features.window,
                   help="bars of feature history per observation")
    p.add_argument("--episode-length", type=int, default=ppo.Args().env.episode_length, help="steps per episode")
    p.add_argument("--num-quantiles", type=int, default=ppo_risk.Args().risk_critic.num_quantiles,
                   help="quantile heads")
    p.add_argument("--dataset", default="sp500", help="bundled dataset name or OHLCV file")
    p.add_argument("--seed", type=int, default=1, help="seed of every run")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def run_args(name: str, s: dict[str, int], cli: argparse.Namespace, run_dir: str) -> ppo.Args | ppo_risk.Args:
    """The trainer arguments of candidate ``name`` at setting ``s`` (no tracking, no progress, no checkpoints)."""
    common = dict(
        seed=cli.seed, device="cpu", track=False, progress=False, run_dir=run_dir, run_name="bench",
        dataset=cli.dataset, window=cli.window, episode_length=cli.episode_length,
        total_timesteps=s["total_timesteps"], learning_rate=cli.learning_rate, num_envs=s["num_envs"],
        num_steps=s["num_steps"], anneal_lr=False, num_minibatches=s["num_minibatches"],
        update_epochs=s["update_epochs"], target_kl=None, hidden_size=64, norm_obs=True, checkpoint_every=0,
    )
    if name == "ppo":
        return ppo.Args.from_flat(**common)
    risk = dict(num_quantiles=cli.num_quantiles)
    if name == "risk_full":
        risk.update(cost_limit=0.05, risk="cvar", kl_penalty=True)
    return ppo_risk.Args.from_flat(**common, **risk)


def measure(name: str, floor: bool, market: Any, s: dict[str, int], cli: argparse.Namespace, run_dir: str) -> dict:
    """Train candidate ``name`` on the market's env (or on the free env with ``floor``) and time it."""
    args = run_args(name, s, cli, run_dir)
    module = ppo if name == "ppo" else ppo_risk
    env = module.make_env(args, market)
    if floor:
        env = (base.NullEnv if name == "ppo" else NullCostEnv)(s["num_envs"], env.obs_dim, env.num_actions,
                                                               seed=cli.seed)
    result = module.train(args, env=env)
    return timed_from_history(result.history, s["batch_size"], cli.iterations)


def format_table(results: list[dict]) -> str:
    """One row per N: steps/s of each candidate and its floor, and the ratios."""
    head = (f"{'N':>5} | " + " | ".join(f"{c + ' steps/s':>18} | {c + '/floor':>14}" for c in CANDIDATES)
            + f" | {'risk/ppo':>8} | {'risk_full/ppo':>13}")
    lines = [head, "-" * len(head)]
    for r in results:
        cells = " | ".join(f"{r[c]['steps_per_s']:>18,.0f} | {base.ratio_cell(r, c + '_over_floor', 14)}"
                           for c in CANDIDATES)
        lines.append(f"{r['num_envs']:>5} | {cells} | {base.ratio_cell(r, 'risk_over_ppo', 8)} | "
                     f"{base.ratio_cell(r, 'risk_full_over_ppo', 13)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return (and optionally write) the results."""
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    load_start = base._load()
    print(f"command: {command}", flush=True)
    market = prepare_market(cli.dataset, FeatureConfig())
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ppo_risk_") as run_dir:
        for n in cli.num_envs:
            s = settings_for(n, cli)
            row: dict[str, Any] = dict(s)
            calls = {(c, f): (lambda c=c, f=f, s=s: measure(c, f, market, s, cli, run_dir))
                     for c in CANDIDATES for f in (False, True)}
            # interleaved, so a burst of outside load does not hit one of them only
            runs: dict[tuple[str, bool], list[dict]] = base._timing.interleave(calls, cli.repeats)
            for (name, floor), measured in runs.items():
                row[name + ("_floor" if floor else "")] = base._best(measured)
            for c in CANDIDATES:
                base.set_ratio(row, c + "_over_floor", c, c + "_floor")
            base.set_ratio(row, "risk_over_ppo", "risk", "ppo")
            base.set_ratio(row, "risk_full_over_ppo", "risk_full", "ppo")
            results.append(row)
            print(f"N={n}: " + ", ".join(f"{c} {row[c]['steps_per_s']:,.0f}" for c in CANDIDATES), flush=True)
    out = {
        "command": command,
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": base._load()},
        "timing": "steps/s over the timed iterations (after 1 warm-up iteration), from each run's charts/SPS record",
        "settings": {"num_steps": cli.num_steps, "update_epochs": cli.update_epochs,
                     "minibatch_size_requested": cli.minibatch_size, "iterations": cli.iterations,
                     "repeats": cli.repeats, "threads": cli.threads, "learning_rate": cli.learning_rate,
                     "window": cli.window, "episode_length": cli.episode_length, "dataset": cli.dataset,
                     "num_quantiles": cli.num_quantiles, "quick": cli.quick,
                     "risk_full": "cost limit 0.05 (cost critic + PID), CVaR_0.25, adaptive KL penalty"},
        "results": results,
    }
    print()
    print(format_table(results))
    if cli.json is not None:
        cli.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
