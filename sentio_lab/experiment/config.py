"""What an experiment is: a dataset, a split scheme, agents (variant + arguments), seeds and baselines.

An experiment is written as a TOML file under ``experiments/`` (see ``experiments/configs/*.toml``)::

    name = "sp500_cpcv"
    dataset = "sp500"
    split = "cpcv"            # "cpcv", "walk_forward" (expanding) or "walk_forward_rolling"
    n_groups = 6
    n_test_groups = 2
    seeds = [1, 2, 3, 4, 5]
    baselines = ["buy_and_hold", "sma_crossover", "momentum", "vol_target", "random"]

    [agents.ppo]              # one *configuration*: a variant and its command-line arguments
    variant = "ppo"
    args = ["--total-timesteps", "100000", "--episode-length", "64"]

Every ``[agents.*]`` table is one configuration, i.e. one trial for the deflated Sharpe ratio; seeds
repeat a configuration and are not extra trials. ``ensemble = true`` in a table adds that configuration's seed
ensemble (:mod:`sentio_lab.experiment.ensemble`: its trained seeds acting on their mean action probabilities) as
the strategy ``<name>_ensemble``, one more trial; ``gate_margin = 0.1`` in an anchored configuration's table adds its
validation-gated strategy ``<name>_gated`` (:mod:`sentio_lab.experiment.gate`), one more trial too. ``pool =
"sp500_20"`` (or a list of instruments) instead of ``dataset`` trains every cell on a pool of instruments
(:mod:`sentio_lab.experiment.pool_runs`). Arguments
shared by every agent (costs, window, position set) go in ``common_args`` and are checked to be equal across
agents, so that every row of a comparison has the same accounting.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from sentio_lab.experiment.ensemble import ensemble_name
from sentio_lab.experiment.gate import gated_name
from sentio_lab.experiment.placebo import PLACEBO_SCHEMES

#: Split schemes the runner knows.
SPLIT_SCHEMES: tuple[str, ...] = ("cpcv", "walk_forward", "walk_forward_rolling")
#: Baseline names the runner knows (``sentio_lab.evaluation.baselines``).
BASELINE_NAMES: tuple[str, ...] = ("buy_and_hold", "sma_crossover", "momentum", "vol_target", "random")


@dataclass(frozen=True)
class AgentSpec:
    """One configuration of one variant: its name in the results table, the variant and its arguments."""

    name: str
    variant: str
    args: tuple[str, ...] = ()
    ensemble: bool = False
    """also evaluate the seed ensemble of this configuration (``<name>_ensemble``, one more trial)"""
    gate_margin: float | None = None
    """validation-gated deviation (:mod:`sentio_lab.experiment.gate`): also evaluate ``<name>_gated``, which keeps
    the tilt on a fold only where its validation Sharpe (annualised) beats the benchmark's by more than this;
    needs ``--anchor`` and ``validation_bars`` (None: off)"""


@dataclass(frozen=True)
class ExperimentConfig:
    """A parsed experiment file (see the module docstring); every field has a documented default."""

    name: str
    """experiment name: results go to ``<output_root>/<name>/``"""
    agents: tuple[AgentSpec, ...]
    """the configurations tried (each one a trial)"""
    dataset: str = "sp500"
    """bundled dataset or path to a CSV / Parquet file (with ``pool``: set to ``"pool:<items>"``, a label)"""
    data_start: str | None = None
    """first timestamp to load (None = the dataset's default start)"""
    data_end: str | None = None
    """last timestamp to load"""
    common_args: tuple[str, ...] = ()
    """variant arguments shared by every agent and the baselines (costs, window, positions, features)"""
    split: str = "cpcv"
    """split scheme: one of SPLIT_SCHEMES"""
    n_groups: int = 6
    """CPCV: number of contiguous groups; walk-forward: number of test folds"""
    n_test_groups: int = 2
    """CPCV: groups per test set"""
    train_bars: int | None = None
    """walk-forward: bars of the (first, when expanding) training window; None: one test size"""
    validation_bars: int = 0
    """inner validation slice at the end of each training fold, for model selection (0 = none)"""
    select_every: int = 0
    """with a validation slice: compare checkpoints every this many PPO iterations and keep the best"""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """policy seeds per configuration"""
    baselines: tuple[str, ...] = BASELINE_NAMES
    """baseline policies evaluated on the same paths"""
    random_seeds: int = 5
    """seeds of the random baseline (reported as their mean)"""
    bootstrap_samples: int = 1000
    """stationary-bootstrap resamples for SPA and the A/B intervals"""
    bootstrap_seed: int = 0
    """seed of the bootstrap"""
    placebo: str | None = None
    """placebo control (:mod:`sentio_lab.experiment.placebo`): "stationary_bootstrap" trains every configuration
    again on block-bootstrapped training bars; its in-sample Sharpe ratios are the memorisation floor (None: off)"""
    placebo_block_mean: float = 5.0
    """placebo: mean block length of the stationary bootstrap, in bars"""
    placebo_seeds: int = 5
    """placebo: replicates per configuration and fold (replicate j: bootstrap seed j, policy seed seeds[j % n])"""
    augment_paths: int = 0
    """training-data augmentation (:mod:`sentio_lab.experiment.augment`): every cell also trains on this many
    stationary-block-bootstrap copies of its fold's training segments (0: off)"""
    augment_block_mean: float = 5.0
    """augmentation: mean block length of the stationary bootstrap, in bars"""
    pool: tuple[str, ...] = ()
    """pooled training (:mod:`sentio_lab.experiment.pool_runs`): instead of ``dataset``, every cell trains one
    policy on these instruments at once (``"sp500_20"``, ``"sp500_20:AAPL"``, bundled names or files, as
    ``--pool``), evaluated per instrument and as their equal-capital book (empty: off)"""

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
        gated = [a for a in self.agents if a.gate_margin is not None]
        clashes = sorted({gated_name(a.name) for a in gated} & set(names))
        if clashes:
            raise ValueError(f"experiment {self.name!r}: agent names {clashes} are taken by gated strategies; rename")
        for agent in gated:
            if isinstance(agent.gate_margin, bool) or not isinstance(agent.gate_margin, int | float) \
                    or not math.isfinite(agent.gate_margin):
                raise ValueError(f"experiment {self.name!r}: agents.{agent.name}.gate_margin must be a finite "
                                 f"number (annualised Sharpe), got {agent.gate_margin!r}")
            if not self.validation_bars:
                raise ValueError(f"experiment {self.name!r}: agents.{agent.name}.gate_margin needs a validation "
                                 "slice: set validation_bars")
        if self.augment_paths < 0 or self.augment_block_mean < 1:
            raise ValueError(f"experiment {self.name!r}: augment_paths must be >= 0 and augment_block_mean >= 1")
        if self.split not in SPLIT_SCHEMES:
            raise ValueError(f"experiment {self.name!r}: split {self.split!r} not in {SPLIT_SCHEMES}")
        unknown = sorted(set(self.baselines) - set(BASELINE_NAMES))
        if unknown:
            raise ValueError(f"experiment {self.name!r}: unknown baselines {unknown}; known {BASELINE_NAMES}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"experiment {self.name!r}: seeds must be distinct and non-empty, got {self.seeds}")
        if self.validation_bars < 0 or self.select_every < 0:
            raise ValueError(f"experiment {self.name!r}: validation_bars and select_every must be >= 0")
        if self.placebo is not None and self.placebo not in PLACEBO_SCHEMES:
            raise ValueError(f"experiment {self.name!r}: placebo {self.placebo!r} not in {PLACEBO_SCHEMES}")
        if self.placebo is not None and (self.placebo_seeds < 1 or self.placebo_block_mean < 1):
            raise ValueError(f"experiment {self.name!r}: placebo_seeds and placebo_block_mean must be >= 1")
        if self.pool:
            # the label every report prints as the data (the runner reads the pool, never this dataset)
            object.__setattr__(self, "dataset", "pool:" + ",".join(self.pool))
            if self.augment_paths:
                raise ValueError(f"experiment {self.name!r}: pool with augment_paths is not supported yet; set "
                                 "augment_paths = 0")
            if gated:
                raise ValueError(f"experiment {self.name!r}: pool with gate_margin (agents.{gated[0].name}) is not "
                                 "supported yet: the gate decides on one market's validation slice; drop gate_margin")
        if self.select_every and not self.validation_bars:
            raise ValueError(f"experiment {self.name!r}: select_every needs a validation slice (validation_bars)")

    @property
    def n_trials(self) -> int:
        """Configurations tried, each seed ensemble and gated strategy counting as one more: what the deflated
        Sharpe ratio deflates for."""
        return (len(self.agents) + sum(agent.ensemble for agent in self.agents)
                + sum(agent.gate_margin is not None for agent in self.agents))


def load_config(path: str | Path, **overrides: object) -> ExperimentConfig:
    """Read an experiment TOML file; ``overrides`` replace top-level fields (e.g. ``seeds=(1,)``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such experiment file")
    raw = tomllib.loads(path.read_text())
    agents_raw = raw.pop("agents", {})
    if not isinstance(agents_raw, dict):
        raise ValueError(f"{path}: [agents.<name>] tables expected")
    agents = []
    for name, table in agents_raw.items():
        extra = sorted(set(table) - {"variant", "args", "ensemble", "gate_margin"})
        if extra:
            raise ValueError(f"{path}: agents.{name} has unknown keys {extra} (variant, args, ensemble, gate_margin)")
        if not isinstance(table.get("ensemble", False), bool):
            raise ValueError(f"{path}: agents.{name}.ensemble must be true or false, got {table['ensemble']!r}")
        agents.append(AgentSpec(name=name, variant=table.get("variant", "ppo"), args=tuple(table.get("args", ())),
                                ensemble=table.get("ensemble", False), gate_margin=table.get("gate_margin")))
    known = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"agents"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    if "pool" in raw:
        if "dataset" in raw:
            raise ValueError(f"{path}: give dataset or pool, not both (pool names the instruments)")
        raw["pool"] = (raw["pool"],) if isinstance(raw["pool"], str) else raw["pool"]
    for key in ("seeds", "baselines", "common_args", "pool"):
        if key in raw:
            raw[key] = tuple(raw[key])
    raw.setdefault("name", path.stem)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return ExperimentConfig(agents=tuple(agents), **raw)
