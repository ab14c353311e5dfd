"""Run an experiment: configurations x seeds x folds, plus the baselines, into one tidy table and path equities.

The plan (:func:`plan_experiment`) is a pure function of the experiment file: the data, the folds (purged
walk-forward or CPCV from :mod:`sentio_lab.env.splits`, gaps sized from the widest observation any agent sees)
and the cells (one per configuration x seed x fold). Each cell trains once on its fold's training segments
(features and HMM fitted there only), is evaluated greedily on the fold's test groups, and writes its folder
under ``<output>/cells/``; ``cell.json`` is written last, so a run killed at any point recomputes only the
cells that were in flight. Baselines are evaluated per fold the same way (``<output>/baselines/``).

Assembly (:func:`~sentio_lab.experiment.assembly.assemble`) reads only those files: for every backtest path it chains
the test groups'
equity curves (:func:`sentio_lab.env.splits.stitch_equity`) and computes the statistics of each (configuration,
seed, path) and each baseline path. Every cell is deterministic and runs torch on one thread, so the table
is identical whatever the number of worker processes and however often the run was interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.progress import tqdm
from sentio_lab.agents.selection import selected_weights
from sentio_lab.agents.training import anchor_span, num_actions
from sentio_lab.agents.variants import action_masking, agent_obs_dim, env_options, load_variant, observation_span
from sentio_lab.env import splits as splitting
from sentio_lab.env.costs import bars_per_day, cost_reach
from sentio_lab.env.market import PreparedMarket, prepare_fold_market, prepare_market
from sentio_lab.env.pool import PooledMarket, pool_purge_embargo, prepare_pool, prepare_pool_fold
from sentio_lab.evaluation.episodes import evaluate_policies
from sentio_lab.experiment.assembly import (
    EQUITY_FILE,
    GROUPS_FORMAT,
    RESULTS_FILE,
    assemble,
    evaluation_done,
    evaluation_folder,
)
from sentio_lab.experiment.augment import trained_fingerprint, training_market
from sentio_lab.experiment.cells import CELL_FILE, Cell, cell_done, parse_variant_args, train_cell, write_json_atomic
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
from sentio_lab.experiment.ensemble import ENSEMBLE_SEED, SeedEnsemble, ensemble_name
from sentio_lab.experiment.gate import gated_name, gated_policy, validation_gate
from sentio_lab.experiment.groups import baseline_frame, groups_frame
from sentio_lab.experiment.groups import groups_frame as _groups_frame  # noqa: F401  (capacity imports it here)
from sentio_lab.experiment.memorisation import (
    PLACEBO_DIR,
    assemble_memorisation,
    diagnosis_done,
    placebo_cells,
    write_diagnosis,
)
from sentio_lab.experiment.pool_runs import (
    assemble_instruments,
    diagnose_pool,
    members_of,
    pool_placebo_market,
    write_groups,
    write_pool_diagnosis,
)
from sentio_lab.experiment.summary import strategy_table
from sentio_lab.experiment.wandb_runs import ExperimentTracking, cell_config, log_cell, log_evaluation, log_results

#: Default home of an experiment's cells, checkpoints and tables: ``runs/experiments/<name>/`` (``runs/`` is not
#: committed). ``python -m sentio_lab.experiment`` and the evaluation notebook both default to it, so the notebook
#: reuses a finished command-line run; the report the notebook builds from it goes to ``reports/<name>/``.
RUNS_ROOT = "runs/experiments"


@dataclass(frozen=True)
class Plan:
    """Everything a run does, decided before anything trains."""

    config: ExperimentConfig
    folds: tuple[splitting.Fold, ...]
    cells: tuple[Cell, ...]
    gaps: splitting.PurgeEmbargo
    n_bars: int
    first_valid: int
    accounting: dict[str, Any]
    """window, positions and cost model shared by every agent and the baselines."""

    @property
    def placebo_cells(self) -> tuple[Cell, ...]:
        """The placebo-control cells (:func:`sentio_lab.experiment.memorisation.placebo_cells`; none when off)."""
        return placebo_cells(self.config, self.cells)


def agent_argv(config: ExperimentConfig, agent_args: Sequence[str], extra_args: Sequence[str] = ()) -> tuple[str, ...]:
    """The command line of one configuration: dataset and range, ``common_args``, its own args, ``extra_args``."""
    pool = getattr(config, "pool", None)  # a portfolio experiment has no pool: its panel is the dataset
    data = ["--pool", *pool] if pool else ["--dataset", str(config.dataset)]
    if config.data_start is not None:
        data += ["--data-start", config.data_start]
    if config.data_end is not None:
        data += ["--data-end", config.data_end]
    return (*data, *config.common_args, *agent_args, *extra_args)


def _accounting(args: Any, variant: str) -> dict[str, Any]:
    module = load_variant(variant)
    return {"window": int(args.features.window), "positions": tuple(float(p) for p in args.env.positions),
            "costs": module.cost_model(args), "fill_price": args.data.fill_price}


def plan_experiment(config: ExperimentConfig, extra_args: Sequence[str] = ()) -> Plan:
    """Folds and cells of ``config``; refuses agents whose accounting (window, positions, costs) differs."""
    parsed = [(agent, parse_variant_args(agent.variant, agent_argv(config, agent.args, extra_args)))
              for agent in config.agents]
    for agent, args in parsed:  # a run that selects on validation needs the fold's inner slice (never test bars)
        if args.run.select_on != "none" and (not config.validation_bars or config.select_every):
            raise ValueError(
                f"experiment {config.name!r}: agent {agent.name!r} selects on validation (--select-on "
                f"{args.run.select_on}): set validation_bars (the inner slice carved from each fold's training "
                "segments) and leave select_every at 0 (one selection rule per run)")
        if config.augment_paths and args.env.anchor == "vol_target":
            raise ValueError(f"experiment {config.name!r}: agent {agent.name!r}: augment_paths with --anchor "
                             "vol_target: its scale is fitted on the training segments, which would include the "
                             "bootstrapped copies; choose another anchor or set augment_paths = 0")
        if agent.gate_margin is not None and args.env.anchor is None:
            raise ValueError(f"experiment {config.name!r}: agent {agent.name!r} has gate_margin but no --anchor: the "
                             "gate falls back to the anchored benchmark; add --anchor to its args")
    accountings = {agent.name: _accounting(args, agent.variant) for agent, args in parsed}
    first_name, first = next(iter(accountings.items()))
    for name, other in accountings.items():
        if other != first:
            raise ValueError(
                f"experiment {config.name!r}: agents {first_name!r} and {name!r} differ in window, positions or "
                f"costs or fill price ({first} vs {other}); put those in common_args so every row has the same "
                "accounting"
            )
    # The gaps must cover the widest view of any agent (the longest feature span over their feature sets) and
    # the folds start after the longest warm-up, so every configuration and baseline trades the same bars.
    gap_options, first_valid, base = [], 0, None
    for agent, args in parsed:
        market = _base_market(config, load_variant(agent.variant).feature_config(args), args.data.fill_price)
        base = base or market
        if isinstance(market, PooledMarket):  # one calendar; the longest reach of any instrument
            gaps = pool_purge_embargo(market, first["window"])
        else:
            gaps = splitting.PurgeEmbargo.for_features(first["window"], market.feature_config, market.data.frame)
        # The cost inputs of a fill (spread, sigma_daily, ADV windows) read bars before the decision too: count
        # them (0 for flat costs, so flat-cost plans are unchanged), over the market's causal bars per day.
        cost_span = cost_reach(first["costs"], bars_per_day(market.data.frame.index, len(market.data.frame)))
        gaps = dataclasses.replace(gaps, cost_span=cost_span)
        # A variant whose observation reads further back than its feature window (token blocks of completed
        # higher-timeframe bars) declares how far: the span grows until the reach (window - 1 + span) covers it,
        # so the embargo and the touched-bar audit (splits.check_fold) both count it.
        # An anchored agent's benchmark weight at t (its observation and its target) reads closes t - span .. t.
        span = max([observation_span(agent.variant, args, m) or 0 for m in members_of(market).values()]
                   + [anchor_span(args, market)])
        beyond = span - gaps.observation_reach
        if beyond > 0:
            gaps = dataclasses.replace(gaps, feature_span=gaps.feature_span + beyond)
        gap_options.append(gaps)
        first_valid = max(first_valid, *(int(m.arrays.first_valid) for m in members_of(market).values()))
    gaps = max(gap_options, key=lambda g: g.embargo)
    n_bars = len(next(iter(members_of(base).values())).data.frame)  # a pool's calendar: one instrument's bars
    if config.split == "cpcv":
        folds = splitting.combinatorial_purged(n_bars, gaps, n_groups=config.n_groups,
                                               n_test_groups=config.n_test_groups, first_valid=first_valid)
    else:
        folds = splitting.walk_forward(n_bars, gaps, n_folds=config.n_groups, first_valid=first_valid,
                                       train_size=config.train_bars, expanding=config.split == "walk_forward")
    augment = f"{config.augment_paths}x{config.augment_block_mean:g}" if config.augment_paths else None
    cells = tuple(
        Cell(agent=agent.name, variant=agent.variant, args=agent_argv(config, agent.args, extra_args), seed=seed,
             fold=fold.fold, augment=augment)
        for agent in config.agents for seed in config.seeds for fold in folds
    )
    return Plan(config=config, folds=tuple(folds), cells=cells, gaps=gaps, n_bars=n_bars, first_valid=first_valid,
                accounting=first)


def _base_market(config: ExperimentConfig, feature_config: Any, fill_price: Any) -> PreparedMarket:
    """The experiment's whole market before any fold: its dataset, or the pool of its instruments on their common
    calendar (:mod:`sentio_lab.experiment.pool_runs`)."""
    if config.pool:
        return prepare_pool(config.pool, feature_config, start=config.data_start, end=config.data_end,
                            fill_price=fill_price)
    return prepare_market(config.dataset, feature_config, start=config.data_start, end=config.data_end,
                          fill_price=fill_price)


# ================================================================================================= cells
_MARKETS: dict[tuple, PreparedMarket] = {}


def fold_market(plan: Plan, fold: splitting.Fold, feature_config: Any) -> PreparedMarket:
    """The fold's market: features and HMM fitted on its training segments only; cached per process."""
    # Everything the market depends on: data and range, the fold's own segments, the validation slice, features.
    config = plan.config
    fill_price = plan.accounting.get("fill_price", "next_open")  # shared by every agent (plan_experiment)
    key = (str(config.dataset), config.pool, config.data_start, config.data_end, fold, config.validation_bars,
           repr(feature_config), fill_price)
    if key not in _MARKETS:
        _MARKETS.clear()  # one fold at a time per process keeps memory flat
        base = _base_market(config, feature_config, fill_price)
        if isinstance(base, PooledMarket):  # every instrument refitted on the fold's training dates of its own bars
            _MARKETS[key] = prepare_pool_fold(base, fold, validation_bars=config.validation_bars)
        else:
            _MARKETS[key] = prepare_fold_market(base, fold, validation_bars=config.validation_bars)
    return _MARKETS[key]


def load_cell_agent(path: Path, market: PreparedMarket, data_fingerprint: str | None = None) -> torch.nn.Module:
    """The agent saved in a cell's checkpoint, for the fold market it was trained on (greedy, eval mode);
    ``data_fingerprint``: the bars it trained on when not ``market``'s (augmented cells:
    :func:`~sentio_lab.experiment.augment.trained_fingerprint`)."""
    bundle = load_checkpoint(path, data_fingerprint=data_fingerprint or market.data.fingerprint)
    # The fold market is refitted in this process: it must be the features the agent was trained on.
    saved, refitted = (json.dumps(state, sort_keys=True, default=str)
                       for state in (bundle["feature_state"], market.features.state))
    if saved != refitted:
        raise ValueError(f"{path}: the refitted fold features differ from the ones this agent was trained on")
    module = load_variant(bundle["variant"])
    args = module.Args.from_dict(bundle["args"])
    agent = module.build_agent(args, agent_obs_dim(args, market), num_actions(args))
    agent.load_state_dict(selected_weights(bundle))  # the selected state of a run with --select-on
    return agent.eval()


def run_cell(plan: Plan, cell: Cell, output: Path, tracking: ExperimentTracking | None = None) -> dict[str, Any]:
    """Train ``cell`` on its fold's training segments (resumably, see :mod:`sentio_lab.experiment.cells`); with
    ``tracking``, as a W&B train run (:mod:`sentio_lab.experiment.wandb_runs`)."""
    folder = output / "cells" / cell.cell_id
    done = cell_done(folder)
    if done is not None:
        return done
    args = parse_variant_args(cell.variant, cell.args)
    market = fold_market(plan, plan.folds[cell.fold], load_variant(cell.variant).feature_config(args))
    market = training_market(plan, cell, market, args)
    if tracking is None:
        return train_cell(cell, market, folder, select_every=plan.config.select_every)
    with tracking.run(cell.cell_id, "train", cell_config(cell, args)) as tracker:
        record = train_cell(cell, market, folder, select_every=plan.config.select_every)
        log_cell(tracker, record, folder)
    return record


# ============================================================================= memorisation diagnostics
def run_placebo_cell(plan: Plan, cell: Cell, output: Path) -> None:
    """Train placebo ``cell`` on its fold's placebo bars (:func:`~sentio_lab.experiment.memorisation.placebo_market`)
    under ``<output>/placebo/``, then diagnose it; finished work (training, diagnosis) is not redone."""
    folder = output / PLACEBO_DIR / cell.cell_id
    args = parse_variant_args(cell.variant, cell.args)
    real = fold_market(plan, plan.folds[cell.fold], load_variant(cell.variant).feature_config(args))
    market = pool_placebo_market(real, plan.config, int(cell.placebo))
    record = cell_done(folder) or train_cell(cell, training_market(plan, cell, market, args), folder,
                                             select_every=plan.config.select_every)
    diagnose_cell(plan, cell, output, market=market, checkpoint=folder / record["checkpoint"])


def diagnose_cell(plan: Plan, cell: Cell, output: Path, *, market: PreparedMarket | None = None,
                  checkpoint: Path | None = None) -> None:
    """In-sample, validation and test diagnosis of a trained cell (default: a real cell in its fold market)."""
    if diagnosis_done(output, cell) is not None:
        return
    args = parse_variant_args(cell.variant, cell.args)
    if market is None or checkpoint is None:
        market = fold_market(plan, plan.folds[cell.fold], load_variant(cell.variant).feature_config(args))
        folder = output / "cells" / cell.cell_id
        checkpoint = folder / cell_done(folder)["checkpoint"]
    agent = load_cell_agent(checkpoint, market, trained_fingerprint(plan, cell, market))
    if isinstance(market, PooledMarket):  # per instrument, and their mean (sentio_lab.experiment.pool_runs)
        write_pool_diagnosis(output, cell, diagnose_pool(agent, market, plan.accounting,
                                                         mask_kwargs=action_masking(args),
                                                         env_options=env_options(args, market)))
        return
    write_diagnosis(output, cell, agent, market, plan.accounting, **action_masking(args),
                    env_options=env_options(args, market))


def strategy_name(agent: AgentSpec, ensemble: bool = False, gated: bool = False) -> str:
    """The results name of ``agent``'s plain, seed-ensemble or validation-gated strategy."""
    return ensemble_name(agent.name) if ensemble else gated_name(agent.name) if gated else agent.name


def evaluate_fold(plan: Plan, agent: AgentSpec, fold: splitting.Fold, output: Path,
                  tracking: ExperimentTracking | None = None, *, ensemble: bool = False, gated: bool = False) -> None:
    """Every seed of ``agent`` trained on ``fold``, greedy on each of the fold's test groups, stepped together
    (with ``tracking``, logged as a W&B evaluate run). With ``ensemble`` the seeds act as one
    :class:`~sentio_lab.experiment.ensemble.SeedEnsemble`, written as strategy ``<name>_ensemble``; with ``gated``
    each seed first passes the validation gate (:mod:`sentio_lab.experiment.gate`), written as ``<name>_gated``."""
    name = strategy_name(agent, ensemble, gated)
    folder = evaluation_folder(output, name, fold.fold)
    if _evaluation_current(folder, agent.gate_margin if gated else None) is not None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    cells = cells_of(plan, agent, fold)
    args = parse_variant_args(agent.variant, cells[0].args)
    market = fold_market(plan, fold, load_variant(agent.variant).feature_config(args))
    records = [cell_done(output / "cells" / c.cell_id) for c in cells]
    agents = [load_cell_agent(output / "cells" / c.cell_id / r["checkpoint"], market,
                              trained_fingerprint(plan, c, market))
              for c, r in zip(cells, records, strict=True)]
    acc = plan.accounting
    ranges = [f"test:{group}" for group in fold.groups]
    rule_counts: dict[str, int] = {}
    options = env_options(args, market)
    gates = {}
    if gated:  # per seed: keep the tilt only where it beat the benchmark on the fold's validation slice
        zero = options["anchor"].zero_action
        for i, cell in enumerate(cells):
            decision = validation_gate(agents[i], market, margin=float(agent.gate_margin), zero_action=zero,
                                       window=acc["window"], positions=acc["positions"], costs=acc["costs"],
                                       **action_masking(args), env_options=options)
            gates[str(cell.seed)] = decision.to_dict()
            agents[i] = gated_policy(agents[i], decision, zero)
    if ensemble:  # one strategy: the members' mean action probabilities, through the same env and code
        agents = [SeedEnsemble(agents, len(acc["positions"]))]
        cells = [dataclasses.replace(cells[0], seed=ENSEMBLE_SEED)]
    per_market = {}  # one market, or each instrument of a pool on its own market (its own features, anchor)
    for instrument, member in members_of(market).items():
        results = evaluate_policies(agents, member, ranges, window=acc["window"], positions=acc["positions"],
                                    costs=acc["costs"], rule_counts=rule_counts, **action_masking(args),
                                    env_options=options if instrument is None else env_options(args, member))
        per_market[instrument] = pd.concat([groups_frame(per_agent, fold, member).assign(seed=c.seed)
                                            for c, per_agent in zip(cells, results, strict=True)], ignore_index=True)
    groups = write_groups(folder, per_market)
    members = {str(c.seed): r.get("selected_iteration") for c, r in zip(cells_of(plan, agent, fold), records,
                                                                           strict=True)}
    record = {
        "agent": name, "fold": fold.fold, "format": GROUPS_FORMAT, "rule_counts": rule_counts,
        # an ensemble's one run holds every member: their selected iterations, by member seed
        "selected_iterations": {str(ENSEMBLE_SEED): members} if ensemble else members,
        **({"gates": gates, "gate_margin": agent.gate_margin} if gated else {}),
    }
    write_json_atomic(folder / CELL_FILE, record)
    if tracking is not None:
        log_evaluation(tracking, name, fold.fold, record, groups)


def _evaluation_current(folder: Path, gate_margin: float | None) -> dict[str, Any] | None:
    """A finished evaluation's record; a gated one only when it was gated at ``gate_margin`` (else redone)."""
    record = evaluation_done(folder)
    if record is not None and gate_margin is not None and record.get("gate_margin") != gate_margin:
        return None
    return record


def cells_of(plan: Plan, agent: AgentSpec, fold: splitting.Fold) -> list[Cell]:
    """The trained cells (one per seed) of configuration ``agent`` on ``fold``, in seed order."""
    return [c for c in plan.cells if c.agent == agent.name and c.fold == fold.fold]


def run_baselines(plan: Plan, fold: splitting.Fold, output: Path) -> None:
    """Every baseline of the plan on the fold's test groups (the random policy: the mean over its seeds)."""
    config = plan.config
    acc = plan.accounting
    agent = config.agents[0]
    args = parse_variant_args(agent.variant, agent_argv(config, agent.args))
    market = fold_market(plan, fold, load_variant(agent.variant).feature_config(args))
    kwargs = {"window": acc["window"], "positions": acc["positions"], "costs": acc["costs"]}
    for name in config.baselines:
        folder = output / "baselines" / f"{name}__fold{fold.fold:03d}"
        if evaluation_done(folder) is not None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        write_groups(folder, {instrument: baseline_frame(name, member, fold, config.random_seeds, kwargs)
                              for instrument, member in members_of(market).items()})
        write_json_atomic(folder / CELL_FILE, {"baseline": name, "fold": fold.fold, "format": GROUPS_FORMAT})


def _job(kind: str, plan: Plan, item: Any, output: str, tracking: ExperimentTracking | None = None) -> str:
    """One unit of work in a worker process (or in-process): torch on one thread, whatever the worker count."""
    torch.set_num_threads(1)
    out = Path(output)
    if kind == "train":
        run_cell(plan, item, out, tracking)
    elif kind == "placebo":
        run_placebo_cell(plan, item, out)
    elif kind == "diagnose":
        diagnose_cell(plan, item, out)
    elif kind == "evaluate":
        agent, fold, ensemble, gated = item
        evaluate_fold(plan, agent, plan.folds[fold], out, tracking, ensemble=ensemble, gated=gated)
    else:
        run_baselines(plan, plan.folds[item], out)
    return kind


def _run_jobs(jobs: list[tuple[str, Any]], plan: Plan, output: Path, pool: ProcessPoolExecutor | None, bar: Any,
              tracking: ExperimentTracking | None = None) -> None:
    if pool is None:
        threads = torch.get_num_threads()
        try:
            for kind, item in jobs:
                _job(kind, plan, item, str(output), tracking)
                bar.update(1)
        finally:
            torch.set_num_threads(threads)
        return
    futures = [pool.submit(_job, kind, plan, item, str(output), tracking) for kind, item in jobs]
    for future in as_completed(futures):
        future.result()
        bar.update(1)


def run_experiment(plan: Plan, output: str | Path, *, workers: int = 1, progress: bool = True, track: bool = False,
                   wandb_project: str = "sentio-lab", wandb_mode: str = "offline") -> pd.DataFrame:
    """Train every unfinished cell, then evaluate (all seeds of a configuration on a fold together) and run the
    baselines, in ``workers`` processes; then :func:`assemble`. Finished work is never redone.

    With ``track`` the work done now is logged to W&B (``wandb_mode``, offline by default; files under
    ``<output>/wandb``) in one group named after the experiment: see :mod:`sentio_lab.experiment.wandb_runs`.
    """
    output = Path(output)
    tracking = (ExperimentTracking(plan.config.name, str(output), wandb_project, wandb_mode)
                if track and wandb_mode != "disabled" else None)
    output.mkdir(parents=True, exist_ok=True)
    _refuse_other_cells(plan, output)
    (output / "plan.json").write_text(json.dumps(_plan_record(plan), indent=2, default=str))
    config = plan.config
    train = [("train", c) for c in plan.cells if cell_done(output / "cells" / c.cell_id) is None]
    strategies = ([(a, False, False) for a in config.agents] + [(a, True, False) for a in config.agents if a.ensemble]
                  + [(a, False, True) for a in config.agents if a.gate_margin is not None])
    evaluate = [("evaluate", (a, f.fold, ensemble, gated)) for a, ensemble, gated in strategies for f in plan.folds
                if _evaluation_current(evaluation_folder(output, strategy_name(a, ensemble, gated), f.fold),
                                       a.gate_margin if gated else None) is None]
    baselines = [("baselines", f.fold) for f in plan.folds
                 if any(evaluation_done(output / "baselines" / f"{b}__fold{f.fold:03d}") is None
                        for b in config.baselines)]
    train += [("placebo", c) for c in plan.placebo_cells if diagnosis_done(output, c) is None]
    evaluate += [("diagnose", c) for c in plan.cells if diagnosis_done(output, c) is None]
    total = len(plan.cells) + len(strategies) * len(plan.folds) + len(plan.folds)
    total += len(plan.placebo_cells) + len(plan.cells)
    bar = tqdm(total=total, initial=total - len(train) - len(evaluate) - len(baselines), unit="job",
               disable=not progress, dynamic_ncols=True, desc=config.name)
    # one pool for both stages: a spawned worker costs seconds of imports, so the evaluation reuses the trainers
    with (ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) if workers > 1
          else contextlib.nullcontext()) as pool:
        _run_jobs(train, plan, output, pool, bar, tracking)  # evaluation needs every seed of a fold trained
        _run_jobs(evaluate + baselines, plan, output, pool, bar, tracking)
    bar.close()
    assemble_memorisation(plan.cells + plan.placebo_cells, output)
    results = assemble(plan, output)
    if config.pool:
        assemble_instruments(plan, output)
    if tracking is not None:
        log_results(tracking, results, strategy_table(results),
                    [output / name for name in (RESULTS_FILE, EQUITY_FILE, "plan.json")], _plan_record(plan))
    return results


def _refuse_other_cells(plan: Plan, output: Path) -> None:
    """A finished cell is reused only when it ran the planned command line; a folder left by another configuration
    of the same experiment name (other ``extra_args`` or ``common_args``) would otherwise be mixed in silently."""
    for cell in plan.cells:
        record = cell_done(output / "cells" / cell.cell_id)
        if record is not None and record.get("command") != shlex.join(cell.args):
            raise ValueError(
                f"{output / 'cells' / cell.cell_id}: finished with other arguments ({record.get('command')!r}, "
                f"planned {shlex.join(cell.args)!r}); choose another run folder (--output-root / run_dir or --name)"
                " or delete that one")


def _plan_record(plan: Plan) -> dict[str, Any]:
    return {
        "experiment": plan.config.name, "n_trials": plan.config.n_trials, "n_bars": plan.n_bars,
        "first_valid": plan.first_valid, "purge": plan.gaps.purge, "embargo": plan.gaps.embargo,
        "folds": [dataclasses.asdict(f) for f in plan.folds], "cells": [c.cell_id for c in plan.cells],
        "accounting": {**plan.accounting, "costs": dataclasses.asdict(plan.accounting["costs"])},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ============================================================================================== assembly
