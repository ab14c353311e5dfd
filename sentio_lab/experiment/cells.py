"""One cell of an experiment: train one configuration with one seed on one fold, resumably.

A cell writes into its own folder: ``checkpoint.pt`` (the variant's bundle), ``best.pt`` (the checkpoint chosen
on the validation slice, when model selection is on) and, last, ``cell.json``. A cell counts as finished only
when ``cell.json`` exists, so a run killed at any point recomputes at most the cells that were in flight; those
start again from scratch, and since training is seeded they end exactly where an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sentio_lab.agents.tracking import sharing
from sentio_lab.agents.variants import action_masking, env_options, load_variant, parse_variant_args
from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.evaluation.metrics import sharpe_ratio

CELL_FILE = "cell.json"


@dataclass(frozen=True)
class Cell:
    """Identity of one training job: configuration ``agent`` (variant ``variant``), ``seed``, fold ``fold``."""

    agent: str
    variant: str
    args: tuple[str, ...]
    seed: int
    fold: int
    placebo: int | None = None
    """placebo replicate (its bootstrap seed) of a placebo-control cell; None for a cell on the real bars"""
    augment: str | None = None
    """training-data augmentation (:mod:`sentio_lab.experiment.augment`), ``"<paths>x<block mean>"``; None: off"""

    @property
    def cell_id(self) -> str:
        """Folder name of the cell: stable, readable and unique within an experiment."""
        tag = "" if self.placebo is None else f"__placebo{self.placebo}"
        tag += "" if self.augment is None else f"__aug{self.augment}"
        return f"{self.agent}{tag}__seed{self.seed}__fold{self.fold:03d}"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def cell_done(folder: Path) -> dict[str, Any] | None:
    """The record of a finished cell, or None when it has not finished."""
    path = folder / CELL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def validation_sharpe(agent: torch.nn.Module, market: PreparedMarket, args: Any, variant: str) -> float:
    """Per-period Sharpe of the greedy policy over the market's ``validation`` range (net of costs)."""
    module = load_variant(variant)
    evaluation = evaluate_policy(agent, market, window=args.features.window, positions=tuple(args.env.positions),
                                 costs=module.cost_model(args), range_name="validation", **action_masking(args),
                                 env_options=env_options(args, market))
    returns = evaluation.equity.pct_change().dropna().to_numpy()
    if len(returns) < 2 or np.std(returns) == 0:
        return 0.0
    return float(sharpe_ratio(returns))


def train_cell(
    cell: Cell, market: PreparedMarket, folder: Path, *, select_every: int = 0, write_record: bool = True
) -> dict[str, Any]:
    """Train ``cell`` on ``market``'s training segments; with ``select_every`` pick a checkpoint on validation.

    With ``write_record=False`` the caller writes ``cell.json`` itself, after work of its own (the runner
    evaluates the trained agent first, so that a finished record always has its evaluation beside it).

    Torch runs on one thread in every cell, whatever the number of worker processes, so that results do not
    depend on how the experiment was parallelised. Returns the record written to ``cell.json``.
    """
    torch.set_num_threads(1)
    module = load_variant(cell.variant)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (folder / "checkpoint.pt", folder / "best.pt"):
        stale.unlink(missing_ok=True)  # an interrupted earlier attempt: start again from scratch
    args = parse_variant_args(cell.variant, cell.args)
    args = args.replace(
        seed=cell.seed, track=sharing(), progress=False, run_dir=str(folder), run_name=cell.cell_id,
        checkpoint_path=str(folder / "checkpoint.pt"), checkpoint_every=0,
    )
    record: dict[str, Any] = {"cell": dataclasses.asdict(cell), "command": shlex.join(cell.args)}
    if not select_every:
        result = module.train(args, market=market)
        record.update(global_step=result.global_step, checkpoint="checkpoint.pt", selected_iteration=None)
        if result.selection is not None:  # the run selected on the fold's inner validation slice (--select-on)
            record.update(selected_iteration=result.selection["selected_iteration"],
                          selection_criterion=result.selection["criterion"],
                          validation_score=result.selection["best_score"],
                          stopped_early=result.selection["stopped_early"],
                          selection_history=result.selection["history"])
    else:
        # Train in chunks (exact resume makes this the same run), score each chunk's end on validation.
        best, best_iteration, history = -np.inf, None, []
        result = module.train(args.replace(max_iterations=select_every), market=market)
        while True:
            score = validation_sharpe(result.agent, market, result.args, cell.variant)
            iteration = result.global_step // result.args.ppo.batch_size
            history.append({"iteration": iteration, "validation_sharpe": score})
            if score > best:
                best, best_iteration = score, iteration
                shutil.copyfile(folder / "checkpoint.pt", folder / "best.pt")
            if result.finished:
                break
            resume_args = module.Args.from_flat(
                resume=str(folder / "checkpoint.pt"), track=sharing(), progress=False,
                max_iterations=select_every, run_dir=str(folder), checkpoint_path=str(folder / "checkpoint.pt"),
                checkpoint_every=0,
            )
            result = module.train(resume_args, market=market)
        record.update(global_step=result.global_step, checkpoint="best.pt", selected_iteration=best_iteration,
                      validation_sharpe=best, selection_history=history)
    if write_record:
        write_json_atomic(folder / CELL_FILE, record)
    return record
