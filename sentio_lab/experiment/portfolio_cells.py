"""Run the cells of a portfolio plan (:mod:`sentio_lab.experiment.portfolio_plan`): each trained agent, seed ensemble,
placebo retrain and skfolio baseline on one fold, written to its own folder.

* **Cells** (:func:`run_portfolio_cell`): one per configuration x seed x fold. Each trains with the variant's own
  ``train`` (:func:`sentio_lab.experiment.cells.train_cell`) on the fold's market: features fitted on its training
  segments only, episodes drawn from those segments only (``PortfolioMarket.train_segments``). The trained agent then
  runs greedily on each test group (written to ``groups.parquet``) and on each training segment (the in-sample
  Sharpe: the memorisation gap); ``cell.json`` is written last, so a killed run redoes only the cells in flight.
  The evaluation env is the agent's own (:func:`agent_env`: the variant's ``make_env``, so long-short agents trade
  signed weights and anchored agents their tilt around the benchmark, with the costs they trained with).
* **Seed ensembles** (:func:`run_portfolio_ensemble`, ``ensemble = true``): the trained seeds of a configuration
  trade the mean of their target weights (:func:`~sentio_lab.experiment.portfolio_episodes.ensemble_decide`), one
  more trial.
* **Placebo** (:func:`run_portfolio_placebo_cell`, ``placebo = "stationary_bootstrap"``): every configuration
  retrained on a panel whose training segments are block-bootstrapped (:mod:`sentio_lab.experiment.portfolio_placebo`)
  and run on them like a cell (:func:`train_in_sample`); their in-sample Sharpe ratios give the memorisation floor.
* **Baselines** (:func:`run_portfolio_baselines`): each skfolio allocation refitted on the fold's training returns
  only (:class:`~sentio_lab.evaluation.portfolio_baselines.SkfolioBaseline`) runs through the same env, on the same
  test groups, with the same costs, rebalancing every ``rebalance_every`` bars.

Every cell runs torch on one thread (the caller restores its setting), so its files are identical however often
the run was interrupted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data.panel import PanelData
from sentio_lab.env import splits as splitting
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.evaluation.portfolio_baselines import SkfolioBaseline
from sentio_lab.evaluation.portfolio_report import PortfolioEpisode, record_episode
from sentio_lab.experiment.assembly import GROUPS_FILE
from sentio_lab.experiment.cells import CELL_FILE, Cell, cell_done, train_cell, write_json_atomic
from sentio_lab.experiment.config import AgentSpec
from sentio_lab.experiment.ensemble import ENSEMBLE_SEED, ensemble_name
from sentio_lab.experiment.memorisation import PLACEBO_DIR  # the single-asset runner's folder name, shared
from sentio_lab.experiment.portfolio_episodes import (
    agent_decide,
    baseline_decide,
    chained_sharpe,
    ensemble_decide,
    episode_frame,
    frame_episode,
)
from sentio_lab.experiment.portfolio_placebo import bootstrap_panel
from sentio_lab.experiment.portfolio_plan import PortfolioPlan, fold_market, plan_panel
from sentio_lab.experiment.runner import agent_argv

#: Folder of the seed ensembles' test-group evaluations, beside ``cells/``.
ENSEMBLE_DIR = "ensembles"
#: Version of the files a cell or baseline writes; other versions are redone.
PORTFOLIO_FORMAT = 1

#: ``(env, first decision bar, steps)`` of one segment, or None when fewer than 2 steps fit.
SegmentEnv = tuple[PortfolioEnv, int, int] | None


# ================================================================================================ episodes
def _decision_span(plan: PortfolioPlan, first_valid: int, segment: tuple[int, int]) -> tuple[int, int]:
    start = max(segment[0], first_valid + plan.accounting["window"] - 1)
    return start, segment[1] - 1 - start


def segment_env(plan: PortfolioPlan, arrays: Any, segment: tuple[int, int]) -> SegmentEnv:
    """A one-account env over env range ``segment`` = ``[a, b)`` and its first decision bar and steps (decisions at
    ``max(a, warm-up) .. b - 2``, the last fill and mark on ``b - 1``); None when fewer than 2 steps fit."""
    start, steps = _decision_span(plan, arrays.first_valid, segment)
    if steps < 2:
        return None
    acc = plan.accounting
    env = PortfolioEnv(arrays, num_envs=1, window=acc["window"], episode_length=steps, start=start,
                       stop=segment[1], allocation="long_only", costs=acc["costs"])
    return env, start, steps


def agent_env(plan: PortfolioPlan, module: Any, args: Any, market: Any, segment: tuple[int, int]) -> SegmentEnv:
    """:func:`segment_env` built by the variant's own ``make_env``: the agent's allocation and gross limit, its anchor
    (``anchor_for`` on the fold market) and excess reward, its costs; on the CPU, one account."""
    start, steps = _decision_span(plan, market.arrays.first_valid, segment)
    if steps < 2:
        return None
    view = dataclasses.replace(market, ranges={**market.ranges, "evaluation": tuple(segment)})
    env = module.make_env(args.replace(num_envs=1, episode_length=steps, device="cpu"), view, "evaluation")
    return env, start, steps


def _test_groups(plan: PortfolioPlan, fold: splitting.Fold, env_of: Any, decide: Any) -> pd.DataFrame:
    index = plan_panel(plan).index
    parts = []
    for group, path, segment in zip(fold.groups, fold.paths, fold.test, strict=True):
        env, start, steps = env_of(segment)  # a test group always holds its decision bars
        episode = record_episode(env, decide, start, steps)
        parts.append(episode_frame(episode, index, plan.assets).assign(group=group, path=path, start=start))
    return pd.concat(parts, ignore_index=True)


# =================================================================================================== cells
def load_cell_agent(path: Path, module: Any, args: Any, market: Any, env: PortfolioEnv) -> torch.nn.Module:
    """The agent of a cell's checkpoint for its fold market, sized for ``env`` (greedy, eval mode)."""
    bundle = load_checkpoint(path, data_fingerprint=market.data.fingerprint)
    agent = module.build_agent(args, env.obs_dim, env.action_dim)
    agent.load_state_dict(bundle["agent"])
    return agent.eval()


def _finished(folder: Path) -> dict[str, Any] | None:
    """The record of a cell finished in this format under ``folder``, else None (to be redone)."""
    done = cell_done(folder)
    return done if done is not None and done.get("format") == PORTFOLIO_FORMAT else None


@dataclass(frozen=True)
class TrainedCell:
    """A cell trained on its fold market and run greedily on its training segments (:func:`train_in_sample`)."""

    record: dict[str, Any]
    """the cell's record from :func:`~sentio_lab.experiment.cells.train_cell` (written last by the caller)"""
    fold: splitting.Fold
    env_of: Any
    """segment -> :data:`SegmentEnv`: the agent's own env (:func:`agent_env`) on the cell's fold market"""
    decide: Any
    """the trained agent's greedy ``Decide`` (:func:`~sentio_lab.experiment.portfolio_episodes.agent_decide`)"""
    in_sample: tuple[PortfolioEpisode, ...]
    """its episodes on the fold's training segments (those where 2 steps fit), in order"""

    def finish(self, folder: Path, **figures: float) -> dict[str, Any]:
        """Add the in-sample Sharpe and bars and ``figures`` to the record, write ``cell.json`` (last) and return it."""
        self.record.update(format=PORTFOLIO_FORMAT, in_sample_sharpe=chained_sharpe(list(self.in_sample)),
                           in_sample_bars=int(sum(len(e.cost) for e in self.in_sample)), **figures)
        write_json_atomic(folder / CELL_FILE, self.record)
        return self.record


def train_in_sample(plan: PortfolioPlan, cell: Cell, folder: Path, panel: PanelData | None = None) -> TrainedCell:
    """Train ``cell`` into ``folder`` on its fold's market (on ``panel``, a placebo panel, or the plan's), load the
    trained agent and run it greedily on each of the fold's training segments: what a cell and a placebo cell share.
    Sets torch to one thread."""
    torch.set_num_threads(1)
    module, args = load_variant(cell.variant), parse_variant_args(cell.variant, cell.args)
    fold = plan.folds[cell.fold]
    market = fold_market(plan, fold, module, args, panel)
    record = train_cell(cell, market, folder, write_record=False)
    args = args.replace(seed=cell.seed)

    def env_of(segment: tuple[int, int]) -> SegmentEnv:
        return agent_env(plan, module, args, market, segment)
    # sized on a test group: it always holds its decision bars (a training segment may not)
    agent = load_cell_agent(folder / record["checkpoint"], module, args, market, env_of(fold.test[0])[0])
    decide = agent_decide(agent)
    envs = [built for built in map(env_of, fold.train) if built is not None]
    in_sample = tuple(record_episode(env, decide, start, steps) for env, start, steps in envs)
    return TrainedCell(record=record, fold=fold, env_of=env_of, decide=decide, in_sample=in_sample)


def run_portfolio_cell(plan: PortfolioPlan, cell: Cell, output: Path) -> dict[str, Any]:
    """Train ``cell`` on its fold (module doc), then run it greedily on the fold's training segments and test groups
    (``groups.parquet``); finished cells are not redone."""
    folder = output / "cells" / cell.cell_id
    done = _finished(folder)
    if done is not None:
        return done
    trained = train_in_sample(plan, cell, folder)
    groups = _test_groups(plan, trained.fold, trained.env_of, trained.decide)
    groups.to_parquet(folder / GROUPS_FILE)
    out_sample = [frame_episode(g, plan.assets, int(g["start"].iloc[0])) for _, g in groups.groupby("group")]
    return trained.finish(folder, test_sharpe=chained_sharpe(out_sample))


def placebo_panel(plan: PortfolioPlan, fold: splitting.Fold, replicate: int) -> PanelData:
    """The plan's panel with ``fold``'s training segments bootstrapped with seed ``replicate``
    (:func:`sentio_lab.experiment.portfolio_placebo.bootstrap_panel`; test groups and gaps untouched)."""
    panel, _ = bootstrap_panel(plan_panel(plan), fold.train, block_mean=plan.config.placebo_block_mean,
                               seed=replicate)
    return panel


def run_portfolio_placebo_cell(plan: PortfolioPlan, cell: Cell, output: Path) -> dict[str, Any]:
    """Train placebo ``cell`` on its fold's placebo panel under ``<output>/placebo/``, then run it greedily on the
    fold's (bootstrapped) training segments: its in-sample Sharpe. Finished cells are not redone."""
    folder = output / PLACEBO_DIR / cell.cell_id
    done = _finished(folder)
    if done is not None:
        return done
    panel = placebo_panel(plan, plan.folds[cell.fold], int(cell.placebo))
    return train_in_sample(plan, cell, folder, panel).finish(folder)


def run_portfolio_ensemble(plan: PortfolioPlan, agent: AgentSpec, fold: splitting.Fold, output: Path) -> None:
    """Configuration ``agent``'s seed ensemble on ``fold``'s test groups (:func:`ensemble_decide`; the trained cells
    of every seed as members, in the configuration's own env), under ``<output>/ensembles/``; a finished ensemble
    with the same members is not redone."""
    name = ensemble_name(agent.name)
    folder = output / ENSEMBLE_DIR / f"{name}__fold{fold.fold:03d}"
    cells = [c for c in plan.cells if c.agent == agent.name and c.fold == fold.fold]
    done = _finished(folder)
    if done is not None and done.get("members") == [c.cell_id for c in cells]:
        return
    torch.set_num_threads(1)
    module, args = load_variant(agent.variant), parse_variant_args(agent.variant, cells[0].args)
    market = fold_market(plan, fold, module, args)
    stepped: list[PortfolioEnv] = []  # the env of the test group being recorded: its tilt base at each step
    def env_of(segment: tuple[int, int]) -> SegmentEnv:
        built = agent_env(plan, module, args, market, segment)
        stepped[:] = [] if built is None else [built[0]]
        return built
    env = env_of(fold.test[0])[0]
    members = []
    for cell in cells:
        record = cell_done(output / "cells" / cell.cell_id)
        members.append(load_cell_agent(output / "cells" / cell.cell_id / record["checkpoint"], module,
                                       args.replace(seed=cell.seed), market, env))
    folder.mkdir(parents=True, exist_ok=True)
    tilt_base = None if env.anchor is None else lambda: stepped[0].tilt_base()
    groups = _test_groups(plan, fold, env_of, ensemble_decide(members, tilt_base))
    groups.assign(seed=ENSEMBLE_SEED).to_parquet(folder / GROUPS_FILE)
    write_json_atomic(folder / CELL_FILE, {"ensemble": name, "fold": fold.fold, "format": PORTFOLIO_FORMAT,
                                           "members": [c.cell_id for c in cells]})


def run_portfolio_baselines(plan: PortfolioPlan, fold: splitting.Fold, output: Path) -> None:
    """Every skfolio baseline of the plan, fitted on ``fold``'s training returns only, on its test groups."""
    config = plan.config
    agent = config.agents[0]
    module, args = load_variant(agent.variant), parse_variant_args(agent.variant, agent_argv(config, agent.args))  # type: ignore[arg-type]
    arrays = fold_market(plan, fold, module, args).arrays
    rows = splitting.fit_rows(fold.train, plan.n_bars)
    for name in config.baselines:
        folder = output / "baselines" / f"{name}__fold{fold.fold:03d}"
        if _finished(folder) is not None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        baseline = SkfolioBaseline(name, arrays.close, rows, lookback=config.lookback, min_returns=config.min_returns,
                                   assets=plan.assets)
        groups = _test_groups(plan, fold, lambda segment: segment_env(plan, arrays, segment),
                              baseline_decide(baseline, config.rebalance_every))
        groups.assign(seed=-1).to_parquet(folder / GROUPS_FILE)
        write_json_atomic(folder / CELL_FILE, {"baseline": name, "fold": fold.fold, "format": PORTFOLIO_FORMAT,
                                               "fallback_bars": len(baseline.fallbacks)})
