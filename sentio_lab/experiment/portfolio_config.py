"""What a portfolio experiment is: a panel, CPCV on its dates, portfolio agents, seeds and the skfolio baselines.

Written as a TOML file with ``kind = "portfolio"`` (``experiments/configs/sp500_20_portfolio_cpcv.toml``)::

    kind = "portfolio"
    name = "sp500_20_portfolio_cpcv"
    dataset = "sp500_20"          # skfolio's 20 S&P 500 stocks, or "files" (user CSVs: ``files``, ``missing``)
    data_start = "2016-01-01"
    n_groups = 4
    n_test_groups = 2
    seeds = [1, 2, 3, 4, 5]
    baselines = ["equal_weight", "inverse_volatility", "minimum_variance", "maximum_diversification", "hrp",
                 "mean_cvar"]
    rebalance_every = 21          # the baselines' declared rebalancing frequency, in bars
    common_args = ["--window", "8", "--episode-length", "64", "--fee-bps", "2", "--slippage-bps", "2"]

    [agents.ppo_portfolio]
    variant = "ppo_portfolio"
    args = ["--total-timesteps", "2048"]

A user panel: ``dataset = "files"``, ``files = ["data/aapl.csv", "data/msft.csv", ...]`` (one OHLCV file per asset,
named by its file stem; a relative path is read from the experiment file's folder) and ``missing = "refuse"`` (a
bar absent on the common calendar is an error naming the asset and date) or ``"ffill"`` (its last close is carried
forward; every filled bar is recorded in ``plan.json`` and the report), through
:func:`sentio_lab.data.panel.load_panel`.

``ensemble = true`` in an ``[agents.*]`` table adds that configuration's seed ensemble (``<name>_ensemble``: its
trained seeds averaging their target weights at each decision;
:func:`sentio_lab.experiment.portfolio_cells.run_portfolio_ensemble`), one more trial.

The split is always CPCV over the panel's dates (one calendar for every asset). Each ``[agents.*]`` table is one
configuration (one trial for the deflated Sharpe ratio), as in :mod:`sentio_lab.experiment.config`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from sentio_lab.data.panel import MISSING_POLICIES, SP500_PANEL
from sentio_lab.evaluation.portfolio_baselines import BASELINES
from sentio_lab.experiment.config import AgentSpec
from sentio_lab.experiment.ensemble import ensemble_name
from sentio_lab.experiment.placebo import PLACEBO_SCHEMES

#: The ``kind`` key that marks a portfolio experiment file.
PORTFOLIO_KIND = "portfolio"
#: ``dataset`` of a panel of user files (``files``).
USER_PANEL = "files"


@dataclass(frozen=True)
class PortfolioExperimentConfig:
    """A parsed portfolio experiment file (module doc); every field has a documented default."""

    name: str
    """experiment name: results go to ``<output_root>/<name>/``"""
    agents: tuple[AgentSpec, ...]
    """the configurations tried (each one a trial); their variant must be a portfolio variant"""
    dataset: str = SP500_PANEL
    """the panel: ``"sp500_20"`` or ``"files"`` (:attr:`files`)"""
    files: tuple[str, ...] = ()
    """with ``dataset = "files"``: one OHLCV file per asset (the asset is the file's stem)"""
    missing: str = "refuse"
    """a user panel's missing-bar policy (:data:`sentio_lab.data.panel.MISSING_POLICIES`): ``"refuse"`` or
    ``"ffill"``"""
    data_start: str | None = None
    """first date to load (None = the panel's first)"""
    data_end: str | None = None
    """last date to load"""
    common_args: tuple[str, ...] = ()
    """variant arguments shared by every agent (window, episode length, costs); the baselines trade the same costs"""
    n_groups: int = 6
    """CPCV: contiguous groups of dates"""
    n_test_groups: int = 2
    """CPCV: groups per test set"""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """policy seeds per configuration"""
    baselines: tuple[str, ...] = BASELINES
    """skfolio baselines (:data:`sentio_lab.evaluation.portfolio_baselines.BASELINES`) on the same test groups"""
    rebalance_every: int = 21
    """bars between two rebalances of a baseline (it holds its shares in between)"""
    lookback: int = 252
    """a baseline fits on at most this many of the latest training returns"""
    min_returns: int = 60
    """fewer training returns than this before a decision bar: the baseline holds equal weights (recorded)"""
    placebo: str | None = None
    """placebo control (:mod:`sentio_lab.experiment.portfolio_placebo`): ``"stationary_bootstrap"`` retrains every
    configuration on block-bootstrapped training bars (one set of source bars for every asset); None: off"""
    placebo_block_mean: float = 5.0
    """placebo: mean block length of the stationary bootstrap, in bars"""
    placebo_seeds: int = 5
    """placebo: replicates per configuration and fold (replicate j: bootstrap seed j, policy seed seeds[j % n])"""
    bootstrap_samples: int = 1000
    """stationary-bootstrap resamples for SPA and the A/B intervals"""
    bootstrap_seed: int = 0
    """seed of the bootstrap"""

    def __post_init__(self) -> None:
        """Reject what cannot run, naming the field."""
        if not self.agents:
            raise ValueError(f"experiment {self.name!r}: no [agents.*] tables")
        names = [a.name for a in self.agents]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: agent names repeat: {names}")
        clashes = sorted({ensemble_name(a.name) for a in self.agents if a.ensemble} & set(names))
        if clashes:
            raise ValueError(f"experiment {self.name!r}: agent names {clashes} are taken by seed ensembles; rename")
        if any(a.gate_margin is not None for a in self.agents):
            raise ValueError(f"experiment {self.name!r}: gate_margin needs a validation slice, which portfolio "
                             "experiments do not carve; remove it")
        if self.dataset not in (SP500_PANEL, USER_PANEL):
            raise ValueError(f"experiment {self.name!r}: dataset {self.dataset!r}; a portfolio experiment reads "
                             f"the {SP500_PANEL!r} panel or user files (dataset = {USER_PANEL!r}, files = [...])")
        if (self.dataset == USER_PANEL) != bool(self.files):
            raise ValueError(f"experiment {self.name!r}: files = [...] goes with dataset = {USER_PANEL!r} (one file "
                             f"per asset, at least 2), got dataset {self.dataset!r} and {len(self.files)} files")
        stems = [Path(f).stem for f in self.files]
        if len(self.files) == 1 or len(set(stems)) != len(stems):
            raise ValueError(f"experiment {self.name!r}: files: need at least 2 files with distinct names (the "
                             f"asset names), got {stems}")
        if self.missing not in MISSING_POLICIES:
            raise ValueError(f"experiment {self.name!r}: missing {self.missing!r}: choose one of {MISSING_POLICIES}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown or not self.baselines:
            raise ValueError(f"experiment {self.name!r}: baselines {list(self.baselines)}: need at least one of "
                             f"{BASELINES}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"experiment {self.name!r}: seeds must be distinct and non-empty, got {self.seeds}")
        if self.placebo is not None and self.placebo not in PLACEBO_SCHEMES:
            raise ValueError(f"experiment {self.name!r}: placebo {self.placebo!r} not in {PLACEBO_SCHEMES}")
        if self.placebo is not None and (self.placebo_seeds < 1 or self.placebo_block_mean < 1):
            raise ValueError(f"experiment {self.name!r}: placebo_seeds and placebo_block_mean must be >= 1")
        if self.rebalance_every < 1 or not 2 <= self.min_returns <= self.lookback:
            raise ValueError(f"experiment {self.name!r}: need rebalance_every >= 1 and 2 <= min_returns <= lookback")

    @property
    def n_trials(self) -> int:
        """Configurations tried, each seed ensemble counting as one more: what the deflated Sharpe ratio deflates
        for."""
        return len(self.agents) + sum(agent.ensemble for agent in self.agents)


def is_portfolio_file(path: str | Path) -> bool:
    """Whether the TOML file at ``path`` declares ``kind = "portfolio"`` (False for a missing file)."""
    path = Path(path)
    return path.is_file() and tomllib.loads(Path(path).read_text()).get("kind") == PORTFOLIO_KIND


def load_portfolio_config(path: str | Path, **overrides: object) -> PortfolioExperimentConfig:
    """Read a portfolio experiment TOML file; ``overrides`` replace top-level fields (e.g. ``seeds=(1,)``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such experiment file")
    raw = tomllib.loads(path.read_text())
    if raw.pop("kind", None) != PORTFOLIO_KIND:
        raise ValueError(f"{path}: not a portfolio experiment (add kind = {PORTFOLIO_KIND!r})")
    agents = []
    for name, table in raw.pop("agents", {}).items():
        extra = sorted(set(table) - {"variant", "args", "ensemble"})
        if extra:
            raise ValueError(f"{path}: agents.{name} has unknown keys {extra} (variant, args, ensemble)")
        if not isinstance(table.get("ensemble", False), bool):
            raise ValueError(f"{path}: agents.{name}.ensemble must be true or false, got {table['ensemble']!r}")
        agents.append(AgentSpec(name=name, variant=table.get("variant", "ppo_portfolio"),
                                args=tuple(table.get("args", ())), ensemble=table.get("ensemble", False)))
    known = {f.name for f in dataclasses.fields(PortfolioExperimentConfig)} - {"agents"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    for key in ("seeds", "baselines", "common_args", "files"):
        if key in raw:
            raw[key] = tuple(raw[key])
    # a relative file is read from the experiment file's folder (the command may run from anywhere)
    raw["files"] = tuple(str(path.parent / f) if not Path(f).is_absolute() else f for f in raw.get("files", ()))
    raw.setdefault("name", path.stem)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return PortfolioExperimentConfig(agents=tuple(agents), **raw)
