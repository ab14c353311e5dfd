"""Plan a portfolio experiment: the panel, the folds, the cells and the accounting, decided before anything trains;
and each fold's market.

* **Plan** (:func:`plan_portfolio`): the folds are CPCV over the panel's dates, identical for every asset; the purge
  and embargo come from the longest reach over the assets of the observation (window + feature look-back) and of the
  fills' cost inputs (:class:`sentio_lab.env.splits.PurgeEmbargo`), and the folds start after the longest warm-up.
  Non-portfolio variants, agents whose window, episode length, costs or fill price differ, and anchors fitted unlike
  the report's baselines are refused here.
* **Fold market** (:func:`fold_market`): the variant's market of one fold, features fitted on its training segments
  only and training episodes drawn from those segments only (``PortfolioMarket.train_segments``).

The cells that run on a plan are :mod:`sentio_lab.experiment.portfolio_cells`; the run and the assembly of its
tables :mod:`sentio_lab.experiment.portfolio_runner`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data.panel import PanelData, load_panel, load_sp500_panel
from sentio_lab.env import splits as splitting
from sentio_lab.env.costs import bars_per_day, cost_reach
from sentio_lab.env.portfolio_arrays import build_portfolio_arrays
from sentio_lab.evaluation.portfolio_baselines import SkfolioBaseline
from sentio_lab.experiment.cells import Cell
from sentio_lab.experiment.portfolio_config import USER_PANEL, PortfolioExperimentConfig
from sentio_lab.experiment.portfolio_placebo import placebo_cells
from sentio_lab.experiment.runner import agent_argv


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
