"""``python -m sentio_lab.experiment``: run a named experiment file (see ``experiments/configs/*.toml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import tyro

from sentio_lab.experiment.config import load_config
from sentio_lab.experiment.gate import GATES_FILE, gate_summary
from sentio_lab.experiment.pool_runs import INSTRUMENT_RESULTS_FILE, instrument_table
from sentio_lab.experiment.portfolio_config import is_portfolio_file
from sentio_lab.experiment.portfolio_runner import run_portfolio_file
from sentio_lab.experiment.runner import RESULTS_FILE, RUNS_ROOT, plan_experiment, run_experiment
from sentio_lab.experiment.summary import strategy_table


@dataclass
class Args:
    """Command-line arguments of ``python -m sentio_lab.experiment``."""

    config: str
    """experiment TOML file, e.g. experiments/configs/sp500_cpcv.toml"""
    output_root: str = RUNS_ROOT
    """cells and tables go to <output_root>/<experiment name>/ (a rerun there resumes: finished cells are kept; the
    evaluation notebook reads the same folder, so it reports a finished run without retraining)"""
    workers: int = 1
    """worker processes (results are identical for any number: every cell is seeded and single-threaded)"""
    seeds: tuple[int, ...] | None = None
    """override the file's seeds"""
    extra_args: tuple[str, ...] = ()
    """arguments appended to every agent's command line, e.g. --extra-args --total-timesteps 8192 (CI-sized)"""
    name: str | None = None
    """override the experiment name (and so its output folder)"""
    progress: bool = True
    """show a progress bar with cells done and time left"""
    track: bool = True
    """log every cell and evaluation as a W&B run in one group named after the experiment, and the result tables
    (offline by default: files under <output>/wandb; upload later with `wandb sync`)"""
    wandb_project_name: str = "sentio-lab"
    """W&B project"""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode"""


def main(argv: list[str] | None = None) -> Path:
    """Parse arguments, run the experiment, print the per-strategy summary; returns the output folder."""
    args = tyro.cli(Args, args=argv)
    if is_portfolio_file(args.config):  # kind = "portfolio": sentio_lab.experiment.portfolio_runner
        if args.workers > 1 or args.track:
            print("portfolio experiment: --workers and --track are not supported yet: one process, no W&B")
        return run_portfolio_file(args.config, args.output_root, seeds=args.seeds, extra_args=args.extra_args,
                                  name=args.name)
    config = load_config(args.config, seeds=args.seeds, name=args.name)
    output = Path(args.output_root) / config.name
    plan = plan_experiment(config, args.extra_args)
    print(f"{config.name}: {len(plan.folds)} folds, {len(plan.cells)} cells ({config.n_trials} configurations x "
          f"{len(config.seeds)} seeds x {len(plan.folds)} folds), purge {plan.gaps.purge}, embargo {plan.gaps.embargo}")
    results = run_experiment(plan, output, workers=args.workers, progress=args.progress, track=args.track,
                             wandb_project=args.wandb_project_name, wandb_mode=args.wandb_mode)
    print(strategy_table(results, ("sharpe", "cagr", "max_drawdown")).to_string())
    if config.pool:  # per instrument: the median Sharpe over seeds and paths (instrument_results.parquet)
        per = pd.read_parquet(output / INSTRUMENT_RESULTS_FILE)
        print(instrument_table(per, ("sharpe",))["sharpe"].unstack("name").round(2).to_string())
    if (output / GATES_FILE).exists():  # validation-gated configurations: how often each fell back
        print(gate_summary(pd.read_parquet(output / GATES_FILE)))
    print(f"results: {output / RESULTS_FILE}")
    return output


if __name__ == "__main__":
    main()
