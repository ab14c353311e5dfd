"""Run a portfolio experiment: CPCV on the panel's dates x seeds x portfolio agents, plus the skfolio baselines.

The single-asset runner's shape (:mod:`sentio_lab.experiment.runner`), for a panel:

* **Plan** (:func:`plan_portfolio`): the folds are CPCV over the panel's dates, identical for every asset; the purge
  and embargo come from the longest reach over the assets of the observation (window + feature look-back) and of the
  fills' cost inputs (:class:`sentio_lab.env.splits.PurgeEmbargo`), and the folds start after the longest warm-up.
* **Cells** (:func:`run_portfolio_cell`): one per configuration x seed x fold. Each trains with the variant's own
  ``train`` (:func:`sentio_lab.experiment.cells.train_cell`) on the fold's market: features fitted on its training
  segments only, episodes drawn from those segments only (``PortfolioMarket.train_segments``). The trained agent then
  runs greedily on each test group (written to ``groups.parquet``) and on each training segment (the in-sample
  Sharpe: the memorisation gap); ``cell.json`` is written last, so a killed run redoes only the cells in flight.
  The evaluation env is the agent's own (:func:`agent_env`: the variant's ``make_env``, so long-short agents trade
  signed weights and anchored agents their tilt around the benchmark, with the costs they trained with).
* **Seed ensembles** (:func:`run_portfolio_ensemble`, ``ensemble = true``): the trained seeds of a configuration
  trade the mean of their target weights (:func:`ensemble_decide`), one more trial.
* **Placebo** (:func:`run_portfolio_placebo_cell`, ``placebo = "stationary_bootstrap"``): every configuration
  retrained on a panel whose training segments are block-bootstrapped (:mod:`sentio_lab.experiment.portfolio_placebo`);
  their in-sample Sharpe ratios (``placebo.parquet``) give the memorisation floor.
* **Baselines** (:func:`run_portfolio_baselines`): each skfolio allocation refitted on the fold's training returns
  only (:class:`~sentio_lab.evaluation.portfolio_baselines.SkfolioBaseline`) runs through the same env, on the same
  test groups, with the same costs, rebalancing every ``rebalance_every`` bars.
* **Assembly** (:func:`assemble_portfolio`): per backtest path the test groups' equity curves are chained
  (:func:`sentio_lab.env.splits.stitch_equity`) into ``results.parquet`` (the single-asset runner's columns, so
  :mod:`sentio_lab.experiment.summary` reads it unchanged) and ``equity.parquet``; ``paths.parquet`` adds the
  per-asset contributions and turnover and the concentration (:mod:`sentio_lab.evaluation.portfolio_report`).

Every cell seeds its training and runs torch on one thread, so the tables are identical however often the run
was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data.panel import PanelData, load_panel, load_sp500_panel
from sentio_lab.env import splits as splitting
from sentio_lab.env.costs import bars_per_day, cost_reach
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_arrays import build_portfolio_arrays
from sentio_lab.evaluation.metrics import summary_stats
from sentio_lab.evaluation.metrics.table import STAT_NAMES
from sentio_lab.evaluation.portfolio_baselines import SkfolioBaseline
from sentio_lab.evaluation.portfolio_report import path_tables, record_episode
from sentio_lab.experiment.assembly import EQUITY_FILE, GROUPS_FILE, RESULTS_FILE
from sentio_lab.experiment.cells import CELL_FILE, Cell, cell_done, train_cell, write_json_atomic
from sentio_lab.experiment.config import AgentSpec
from sentio_lab.experiment.ensemble import ENSEMBLE_SEED, ensemble_name
from sentio_lab.experiment.portfolio_config import USER_PANEL, PortfolioExperimentConfig, load_portfolio_config
from sentio_lab.experiment.portfolio_episodes import (
    agent_decide,
    baseline_decide,
    chained_sharpe,
    ensemble_decide,
    episode_frame,
    frame_episode,
)
from sentio_lab.experiment.portfolio_placebo import bootstrap_panel, placebo_cells
from sentio_lab.experiment.runner import agent_argv
from sentio_lab.experiment.summary import strategy_table

#: Per-path portfolio figures: contributions and turnover per asset, concentration (one row per strategy x seed x
#: path, beside ``results.parquet``).
PATHS_FILE = "paths.parquet"
#: In-sample (training segments) vs out-of-sample (test groups) Sharpe of every cell.
MEMORISATION_FILE = "memorisation.parquet"
#: Placebo cells' in-sample Sharpe (one row per configuration x replicate x fold; only with ``placebo``).
PLACEBO_FILE = "placebo.parquet"
#: Folder of the placebo cells, beside ``cells/``.
PLACEBO_DIR = "placebo"
#: Folder of the seed ensembles' test-group evaluations, beside ``cells/``.
ENSEMBLE_DIR = "ensembles"
#: Version of the files a cell or baseline writes; other versions are redone.
PORTFOLIO_FORMAT = 1


@dataclass(frozen=True)
class PortfolioPlan:
    """Everything a portfolio run does, decided before anything trains."""

    config: PortfolioExperimentConfig
    folds: tuple[splitting.Fold, ...]
    cells: tuple[Cell, ...]
    gaps: splitting.PurgeEmbargo
    n_bars: int
    first_valid: int
    accounting: dict[str, Any]
    """window, cost model and fill price shared by every agent and the baselines."""
    assets: tuple[str, ...]
    placebo_cells: tuple[Cell, ...] = ()
    """the placebo-control cells (:func:`sentio_lab.experiment.portfolio_placebo.placebo_cells`; none when off)"""
    panel: dict[str, Any] = dataclasses.field(default_factory=dict)
    """the panel's report (:meth:`sentio_lab.data.panel.PanelData.report`): assets, calendar, missing-bar policy and
    every filled bar; written to ``plan.json``."""


_PANELS: dict[tuple, PanelData] = {}


def load_experiment_panel(config: PortfolioExperimentConfig, fill_price: str = "next_close") -> PanelData:
    """The experiment's panel (cached per process): skfolio's S&P 500 stocks, or the user's ``files`` loaded by
    :func:`sentio_lab.data.panel.load_panel` with the ``missing`` policy and the agents' fill price (next-open fills
    need opens)."""
    key = (config.dataset, config.files, config.missing, config.data_start, config.data_end, fill_price)
    if key not in _PANELS:
        _PANELS.clear()
        if config.dataset == USER_PANEL:
            for file in config.files:
                if not Path(file).is_file():
                    raise FileNotFoundError(f"experiment {config.name!r}: files: {file} does not exist")
            sources = {Path(file).stem: file for file in config.files}
            _PANELS[key] = load_panel(sources, start=config.data_start, end=config.data_end,
                                      missing=config.missing, fill_price=fill_price)  # type: ignore[arg-type]
        else:
            _PANELS[key] = load_sp500_panel(start=config.data_start, end=config.data_end)
    return _PANELS[key]


def plan_panel(plan: PortfolioPlan) -> PanelData:
    """The panel ``plan`` runs on."""
    return load_experiment_panel(plan.config, plan.accounting["fill_price"])


def _accounting(module: Any, args: Any) -> dict[str, Any]:
    return {"window": int(args.features.window), "costs": module.cost_model(args), "fill_price": args.data.fill_price,
            "episode_length": int(args.env.episode_length)}


def _check_anchor_fit(config: PortfolioExperimentConfig, agent: str, args: Any) -> None:
    # a skfolio anchor is fitted with SkfolioBaseline's defaults: the report's baseline must be fitted alike
    name = getattr(args.env, "anchor", None)
    if name is None or name == "equal_weight":
        return
    fit = {f.name: f.default for f in dataclasses.fields(SkfolioBaseline) if f.name in ("lookback", "min_returns")}
    if (config.lookback, config.min_returns) != (fit["lookback"], fit["min_returns"]):
        raise ValueError(f"experiment {config.name!r}: agent {agent!r} anchors on {name!r} fitted with lookback="
                         f"{fit['lookback']}, min_returns={fit['min_returns']}, but the config's baselines use "
                         f"lookback={config.lookback}, min_returns={config.min_returns}; set those in the config")
    if args.anchor_rebalance != config.rebalance_every:
        warnings.warn(f"experiment {config.name!r}: agent {agent!r}: --anchor-rebalance {args.anchor_rebalance} "
                      f"differs from the config's rebalance_every {config.rebalance_every}: its zero tilt is not the "
                      f"baseline {name!r} of the report", stacklevel=2)


def plan_portfolio(config: PortfolioExperimentConfig, extra_args: tuple[str, ...] = ()) -> PortfolioPlan:
    """Folds and cells of ``config``; refuses non-portfolio variants and agents whose accounting differs."""
    parsed = []
    for agent in config.agents:
        module = load_variant(agent.variant)
        if not hasattr(module, "portfolio_market"):
            raise ValueError(f"experiment {config.name!r}: agent {agent.name!r} runs {agent.variant!r}, not a "
                             "portfolio variant (ppo_portfolio)")
        args = parse_variant_args(agent.variant, agent_argv(config, agent.args, extra_args))  # type: ignore[arg-type]
        module.check_args(args)  # the variant's own refusals (e.g. --excess-reward without --anchor), before training
        if args.run.select_on != "none":
            raise ValueError(f"experiment {config.name!r}: agent {agent.name!r}: --select-on needs a validation "
                             "slice, which portfolio experiments do not carve; use --select-on none")
        _check_anchor_fit(config, agent.name, args)
        parsed.append((agent, module, args))
    accountings = {agent.name: _accounting(module, args) for agent, module, args in parsed}
    first_name, first = next(iter(accountings.items()))
    for name, other in accountings.items():
        if other != first:
            raise ValueError(f"experiment {config.name!r}: agents {first_name!r} and {name!r} differ in window, "
                             f"episode length, costs or fill price ({first} vs {other}); put those in common_args")
    panel = load_experiment_panel(config, first["fill_price"])
    n_bars = len(panel.index)
    gap_options, first_valid = [], 0
    for _, module, args in parsed:
        feature_config = module.feature_config(args)
        # first_valid only (the warm-up of the raw features): the fitted normalisers of this build are not used
        arrays, _ = build_portfolio_arrays(panel, feature_config, train_stop=n_bars, fill_price=args.data.fill_price)
        first_valid = max(first_valid, arrays.first_valid)
        cost_span = cost_reach(first["costs"], bars_per_day(panel.index, n_bars))
        for asset in panel.assets:  # the longest reach over the assets (the same bank: the same span, checked)
            gaps = splitting.PurgeEmbargo.for_features(first["window"], feature_config, panel.frames[asset])
            gap_options.append(dataclasses.replace(gaps, cost_span=cost_span))
    gaps = max(gap_options, key=lambda g: g.embargo)
    folds = splitting.combinatorial_purged(n_bars, gaps, n_groups=config.n_groups, n_test_groups=config.n_test_groups,
                                           first_valid=first_valid)
    cells = tuple(Cell(agent=agent.name, variant=agent.variant, args=agent_argv(config, agent.args, extra_args),  # type: ignore[arg-type]
                       seed=seed, fold=fold.fold)
                  for agent in config.agents for seed in config.seeds for fold in folds)
    placebo = () if config.placebo is None else placebo_cells(cells, config.seeds, config.placebo_seeds)
    return PortfolioPlan(config=config, folds=tuple(folds), cells=cells, gaps=gaps, n_bars=n_bars,
                         first_valid=first_valid, accounting=first, assets=panel.assets, placebo_cells=placebo,
                         panel=panel.report())


def fold_market(plan: PortfolioPlan, fold: splitting.Fold, module: Any, args: Any, panel: PanelData | None = None
                ) -> Any:
    """The variant's market of ``fold``: features fitted on its training segments only, training episodes drawn
    from those segments only, ``test:<group>`` ranges for its test groups; on ``panel`` (a placebo panel) or the
    plan's."""
    panel = plan_panel(plan) if panel is None else panel
    rows = splitting.fit_rows(fold.train, plan.n_bars)
    arrays, states = build_portfolio_arrays(panel, module.feature_config(args), train_rows=rows,
                                            cross_sectional=bool(getattr(args, "cross_sectional", False)),
                                            fill_price=args.data.fill_price)
    ranges = {"train": (fold.train[0][0], fold.train[-1][1]),
              **{f"test:{g}": seg for g, seg in zip(fold.groups, fold.test, strict=True)}}
    info = module.PanelInfo(panel.name, module.panel_fingerprint(panel), module.PanelQuality(panel.report()))
    return module.PortfolioMarket(panel=panel, arrays=arrays, ranges=ranges, data=info,
                                  features=module.FeatureInfo(states, arrays.feature_names),
                                  train_segments=tuple(fold.train))


# ================================================================================================ episodes
def segment_env(plan: PortfolioPlan, arrays: Any, segment: tuple[int, int]) -> tuple[PortfolioEnv, int, int] | None:
    """A one-account env over env range ``segment`` = ``[a, b)`` and its first decision bar and steps (decisions at
    ``max(a, warm-up) .. b - 2``, the last fill and mark on ``b - 1``); None when fewer than 2 steps fit."""
    acc = plan.accounting
    start = max(segment[0], arrays.first_valid + acc["window"] - 1)
    steps = segment[1] - 1 - start
    if steps < 2:
        return None
    env = PortfolioEnv(arrays, num_envs=1, window=acc["window"], episode_length=steps, start=start,
                       stop=segment[1], allocation="long_only", costs=acc["costs"])
    return env, start, steps


def agent_env(plan: PortfolioPlan, module: Any, args: Any, market: Any, segment: tuple[int, int]
              ) -> tuple[PortfolioEnv, int, int] | None:
    """:func:`segment_env` built by the variant's own ``make_env``: the agent's allocation and gross limit, its anchor
    (``anchor_for`` on the fold market) and excess reward, its costs; on the CPU, one account."""
    acc = plan.accounting
    start = max(segment[0], market.arrays.first_valid + acc["window"] - 1)
    steps = segment[1] - 1 - start
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


def run_portfolio_cell(plan: PortfolioPlan, cell: Cell, output: Path) -> dict[str, Any]:
    """Train ``cell`` on its fold (module doc), then run it greedily on the fold's test groups and training
    segments; finished cells are not redone."""
    folder = output / "cells" / cell.cell_id
    done = cell_done(folder)
    if done is not None and done.get("format") == PORTFOLIO_FORMAT:
        return done
    torch.set_num_threads(1)
    module, args = load_variant(cell.variant), parse_variant_args(cell.variant, cell.args)
    fold = plan.folds[cell.fold]
    market = fold_market(plan, fold, module, args)
    record = train_cell(cell, market, folder, write_record=False)
    args = args.replace(seed=cell.seed)
    def env_of(segment: tuple[int, int]) -> tuple[PortfolioEnv, int, int] | None:
        return agent_env(plan, module, args, market, segment)
    agent = load_cell_agent(folder / record["checkpoint"], module, args, market, env_of(fold.test[0])[0])
    decide = agent_decide(agent)
    groups = _test_groups(plan, fold, env_of, decide)
    groups.to_parquet(folder / GROUPS_FILE)
    in_sample = []
    for segment in fold.train:
        built = env_of(segment)
        if built is not None:
            in_sample.append(record_episode(built[0], decide, built[1], built[2]))
    out_sample = [frame_episode(g, plan.assets, int(g["start"].iloc[0])) for _, g in groups.groupby("group")]
    record.update(format=PORTFOLIO_FORMAT, in_sample_sharpe=chained_sharpe(in_sample),
                  in_sample_bars=int(sum(len(e.cost) for e in in_sample)), test_sharpe=chained_sharpe(out_sample))
    write_json_atomic(folder / CELL_FILE, record)
    return record


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
    done = cell_done(folder)
    if done is not None and done.get("format") == PORTFOLIO_FORMAT:
        return done
    torch.set_num_threads(1)
    module, args = load_variant(cell.variant), parse_variant_args(cell.variant, cell.args)
    fold = plan.folds[cell.fold]
    market = fold_market(plan, fold, module, args, placebo_panel(plan, fold, int(cell.placebo)))
    record = train_cell(cell, market, folder, write_record=False)
    args = args.replace(seed=cell.seed)
    envs = [agent_env(plan, module, args, market, segment) for segment in fold.train]
    envs = [built for built in envs if built is not None]
    agent = load_cell_agent(folder / record["checkpoint"], module, args, market, envs[0][0])
    in_sample = [record_episode(env, agent_decide(agent), start, steps) for env, start, steps in envs]
    record.update(format=PORTFOLIO_FORMAT, in_sample_sharpe=chained_sharpe(in_sample),
                  in_sample_bars=int(sum(len(e.cost) for e in in_sample)))
    write_json_atomic(folder / CELL_FILE, record)
    return record


def run_portfolio_ensemble(plan: PortfolioPlan, agent: AgentSpec, fold: splitting.Fold, output: Path) -> None:
    """Configuration ``agent``'s seed ensemble on ``fold``'s test groups (:func:`ensemble_decide`; the trained cells
    of every seed as members, in the configuration's own env), under ``<output>/ensembles/``; a finished ensemble
    with the same members is not redone."""
    name = ensemble_name(agent.name)
    folder = output / ENSEMBLE_DIR / f"{name}__fold{fold.fold:03d}"
    cells = [c for c in plan.cells if c.agent == agent.name and c.fold == fold.fold]
    done = cell_done(folder)
    if done is not None and done.get("format") == PORTFOLIO_FORMAT and done.get("members") == [c.cell_id for c in
                                                                                                cells]:
        return
    torch.set_num_threads(1)
    module, args = load_variant(agent.variant), parse_variant_args(agent.variant, cells[0].args)
    market = fold_market(plan, fold, module, args)
    stepped: list[PortfolioEnv] = []  # the env of the test group being recorded: its tilt base at each step
    def env_of(segment: tuple[int, int]) -> tuple[PortfolioEnv, int, int] | None:
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
        done = cell_done(folder)
        if done is not None and done.get("format") == PORTFOLIO_FORMAT:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        baseline = SkfolioBaseline(name, arrays.close, rows, lookback=config.lookback, min_returns=config.min_returns,
                                   assets=plan.assets)
        groups = _test_groups(plan, fold, lambda segment: segment_env(plan, arrays, segment),
                              baseline_decide(baseline, config.rebalance_every))
        groups.assign(seed=-1).to_parquet(folder / GROUPS_FILE)
        write_json_atomic(folder / CELL_FILE, {"baseline": name, "fold": fold.fold, "format": PORTFOLIO_FORMAT,
                                               "fallback_bars": len(baseline.fallbacks)})


# ================================================================================================ assembly
def _units(plan: PortfolioPlan, output: Path) -> list[tuple[dict[str, Any], dict[int, pd.DataFrame]]]:
    """(results key, fold -> test-group frames) of every agent seed and every baseline."""
    units = []
    for agent in plan.config.agents:
        for seed in plan.config.seeds:
            frames = {c.fold: pd.read_parquet(output / "cells" / c.cell_id / GROUPS_FILE) for c in plan.cells
                      if c.agent == agent.name and c.seed == seed}
            units.append(({"kind": "agent", "name": agent.name, "variant": agent.variant, "seed": seed}, frames))
        if agent.ensemble:
            name = ensemble_name(agent.name)
            frames = {f.fold: pd.read_parquet(output / ENSEMBLE_DIR / f"{name}__fold{f.fold:03d}" / GROUPS_FILE)
                      for f in plan.folds}
            units.append(({"kind": "agent", "name": name, "variant": agent.variant, "seed": ENSEMBLE_SEED}, frames))
    for name in plan.config.baselines:
        frames = {f.fold: pd.read_parquet(output / "baselines" / f"{name}__fold{f.fold:03d}" / GROUPS_FILE)
                  for f in plan.folds}
        units.append(({"kind": "baseline", "name": name, "variant": "", "seed": -1}, frames))
    return units


def assemble_portfolio(plan: PortfolioPlan, output: str | Path) -> pd.DataFrame:
    """Chain every path of every agent seed and baseline; write ``results.parquet`` (the single-asset runner's
    columns), ``equity.parquet``, ``paths.parquet`` (per-asset figures) and ``memorisation.parquet``."""
    output = Path(output)
    paths = splitting.backtest_paths(plan.folds)
    rows, curves, extras = [], [], []
    for key, frames in _units(plan, output):
        for path, members in paths.items():
            episodes, pieces = [], []
            for fold_id, j in members:
                frame = frames[fold_id]
                group = frame[frame["group"] == plan.folds[fold_id].groups[j]]
                episodes.append(frame_episode(group, plan.assets, int(group["start"].iloc[0])))
                pieces.append(pd.Series(group["equity"].to_numpy(), index=pd.DatetimeIndex(group["timestamp"])))
            equity = splitting.stitch_equity(pieces)
            stats = summary_stats(equity)
            tables = path_tables(episodes, plan.assets, float(stats["periods_per_year"]))
            turnover = sum(v for k, v in tables.items() if k.startswith("turnover:"))
            stats.update(turnover_per_year=turnover, costs_paid=tables["costs"])
            row = {"experiment": plan.config.name, **key, "selected_iterations": "[]", "path": path,
                   "n_trials": plan.config.n_trials}
            rows.append({**row, **{name: stats[name] for name in STAT_NAMES}})
            extras.append({**key, "path": path, "total_return": float(stats["total_return"]),
                           "turnover_per_year": turnover, **tables})
            curves.append(pd.DataFrame({"name": key["name"], "seed": key["seed"], "path": path,
                                        "timestamp": equity.index, "equity": equity.to_numpy()}))
    results = pd.DataFrame(rows)
    results.to_parquet(output / RESULTS_FILE)
    pd.concat(curves, ignore_index=True).to_parquet(output / EQUITY_FILE)
    pd.DataFrame(extras).to_parquet(output / PATHS_FILE)
    memo = [{"name": c.agent, "seed": c.seed, "fold": c.fold,
             **{k: cell_done(output / "cells" / c.cell_id)[k] for k in ("in_sample_sharpe", "in_sample_bars",
                                                                         "test_sharpe")}} for c in plan.cells]
    pd.DataFrame(memo).to_parquet(output / MEMORISATION_FILE)
    if plan.placebo_cells:
        placebo = [{"name": c.agent, "replicate": c.placebo, "seed": c.seed, "fold": c.fold,
                    **{k: cell_done(output / PLACEBO_DIR / c.cell_id)[k] for k in ("in_sample_sharpe",
                                                                                   "in_sample_bars")}}
                   for c in plan.placebo_cells]
        pd.DataFrame(placebo).to_parquet(output / PLACEBO_FILE)
    else:
        (output / PLACEBO_FILE).unlink(missing_ok=True)
    return results


def run_portfolio_experiment(plan: PortfolioPlan, output: str | Path) -> pd.DataFrame:
    """Train and evaluate every unfinished cell, run the baselines on every fold, then :func:`assemble_portfolio`.
    Finished work is never redone; a folder left by other arguments is refused."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for cell in plan.cells + plan.placebo_cells:
        record = cell_done(output / ("cells" if cell.placebo is None else PLACEBO_DIR) / cell.cell_id)
        if record is not None and record.get("command") != shlex.join(cell.args):
            raise ValueError(f"{output / cell.cell_id}: finished with other arguments "
                             f"({record.get('command')!r}, planned {shlex.join(cell.args)!r}); choose another "
                             "output folder or delete that one")
    record = {"experiment": plan.config.name, "n_trials": plan.config.n_trials, "n_bars": plan.n_bars,
              "first_valid": plan.first_valid, "purge": plan.gaps.purge, "embargo": plan.gaps.embargo,
              "folds": [dataclasses.asdict(f) for f in plan.folds], "cells": [c.cell_id for c in plan.cells],
              "placebo_cells": [c.cell_id for c in plan.placebo_cells],
              "accounting": {**plan.accounting, "costs": dataclasses.asdict(plan.accounting["costs"])},
              "panel": plan.panel,
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (output / "plan.json").write_text(json.dumps(record, indent=2, default=str))
    threads = torch.get_num_threads()
    try:
        for cell in plan.cells:
            run_portfolio_cell(plan, cell, output)
        for agent in plan.config.agents:
            for fold in plan.folds:
                if agent.ensemble:
                    run_portfolio_ensemble(plan, agent, fold, output)
        for cell in plan.placebo_cells:
            run_portfolio_placebo_cell(plan, cell, output)
        for fold in plan.folds:
            run_portfolio_baselines(plan, fold, output)
    finally:
        torch.set_num_threads(threads)
    return assemble_portfolio(plan, output)


def run_portfolio_file(path: str | Path, output_root: str | Path, *, seeds: tuple[int, ...] | None = None,
                       extra_args: tuple[str, ...] = (), name: str | None = None) -> Path:
    """``python -m sentio_lab.experiment --config <portfolio file>``: plan, run, print the per-strategy medians;
    returns the output folder ``<output_root>/<name>``."""
    config = load_portfolio_config(path, seeds=seeds, name=name)
    output = Path(output_root) / config.name
    plan = plan_portfolio(config, extra_args)
    print(f"{config.name}: {len(plan.folds)} CPCV folds over {plan.n_bars} dates x {len(plan.assets)} assets, "
          f"{len(plan.cells)} cells ({len(config.agents)} configurations x {len(config.seeds)} seeds x "
          f"{len(plan.folds)} folds), {len(plan.placebo_cells)} placebo cells, {config.n_trials} trials, "
          f"purge {plan.gaps.purge}, embargo {plan.gaps.embargo}")
    results = run_portfolio_experiment(plan, output)
    print(strategy_table(results, ("sharpe", "cagr", "max_drawdown")).to_string())
    print(f"results: {output / RESULTS_FILE}")
    return output
