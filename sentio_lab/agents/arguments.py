"""The argument groups every PPO variant's ``Args`` is composed of, and the one way to build them from flat keywords.

A variant's ``Args`` is a dataclass of the shared groups below -- ``data``, ``features``, ``env`` (env and costs),
``ppo`` (the PPO core), ``run`` (run control) and ``tracking`` -- plus the variant's own fields at the top level
(``ppo_masked``'s ``masks`` and ``invalid_action``, ``ppo_risk``'s quantiles and constraint, ...). tyro shows each
group as a box of its own in ``--help``; the shared groups are annotated with :data:`Flat` so their flags keep
the names they had when ``Args`` was flat (``--total-timesteps``, ``--fee-bps``), while a variant's own nested
groups keep their prefix (``--masks.cooldown``). Leaf names are unique across the groups, which is what lets
:meth:`VariantArgs.from_flat` route a flat keyword to its group.

Code reads a field through its group (``args.ppo.learning_rate``, ``args.env.positions``); there is no attribute
forwarding. Programmatic construction and copies go through :meth:`VariantArgs.from_flat`,
:meth:`VariantArgs.replace` and, for checkpoints, :meth:`VariantArgs.from_dict` (which also reads the flat
``args`` dict of checkpoints written before the groups existed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import tyro

from sentio_lab.env.anchor import DEFAULT_TILTS

#: Annotation for a shared group: its flags carry no ``group.`` prefix (``--fee-bps``, not ``--env.fee-bps``).
Flat = tyro.conf.OmitArgPrefixes

Device = Literal["cpu", "cuda", "auto"]
ArgsT = TypeVar("ArgsT", bound="VariantArgs")


@dataclass
class DataArgs:
    """Data: which bars are loaded and how they are split."""

    dataset: str = "sp500"
    """bundled dataset name (sp500, nasdaq, eurusd_1h) or path to a CSV / Parquet OHLCV file"""
    data_start: str | None = None
    """first bar to load; None = the dataset's default start (sp500 starts 2013-05-10, after its stale-open
    stretches)"""
    data_end: str | None = None
    """last bar to load; None = the end of the dataset"""
    stale_opens: Literal["refuse", "allow"] = "refuse"
    """"refuse" or "allow" a range with stale opens (opens copied from the previous close; sentio_lab.data)"""
    fill_price: Literal["next_open", "next_close"] = "next_open"
    """where the order decided at the close of bar t fills: the open of bar t+1, or its close (for untrustworthy
    or absent opens: then stale opens do not matter, and close-only files load; use --feature-bank close)"""
    train_fraction: float = 0.6
    """first fraction of bars used for training (features and normalisation are fitted here only)"""
    validation_fraction: float = 0.2
    """next fraction of bars held out for validation; the rest is the test range"""
    pool: tuple[str, ...] = ()
    """train one policy on several instruments at once instead of --dataset (sentio_lab.env.pool): sp500_20
    (skfolio's 20 stocks, closes only: with --fill-price next_close and --feature-bank close or slow),
    sp500_20:TICKER, bundled datasets (sp500, nasdaq) or files; ranges are cut on their common dates, each
    instrument's features are fitted on its own training rows; () = off (docs/training.md)"""


@dataclass
class FeatureArgs:
    """Features: what the observation is built from."""

    feature_bank: Literal["basic", "talib", "close", "slow"] = "basic"
    """feature bank: "basic" (fast returns / volatility / range set), "talib" (150+ TA-Lib indicators), "close"
    (log returns and realised volatility from closes only, for close-only data) or "slow" (six regime-normalised
    multi-horizon features from closes: fewer inputs to memorise with; sentio_lab.features.slow)"""
    timeframes: tuple[str, ...] = ()
    """extra higher timeframes whose features join the observation, e.g. 4h 1D (pandas offset aliases)"""
    regimes: int = 0
    """number of HMM regimes whose filtered probabilities join the observation (0 = none)"""
    regime_restarts: int = 4
    """seeded HMM restarts (the best converged fit by likelihood is kept)"""
    feature_seed: int = 0
    """seed of the feature pipeline (HMM restarts), kept apart from --seed so seeds vary the policy only"""
    normalise: Literal["robust", "rank", "none"] = "robust"
    """feature normalisation fitted on the training range"""
    prune_corr: float | None = None
    """drop near-duplicate features whose |correlation| on the training range exceeds this"""
    feature_cache_dir: str | None = ".cache/features"
    """Parquet cache of computed features (keyed by data fingerprint and config); None = no cache"""
    window: int = 32
    """bars of feature history in each observation"""
    exogenous: tuple[str, ...] = ()
    """point-in-time alternative data joined to the observation (level and change, z-scored on the training
    range), e.g. vix credit_spread (or vix,credit_spread): bundled vix, wti, core_cpi, aaa, baa, credit_spread,
    ff_mkt_rf, ff_smb, ff_hml, ff_rf, or a CSV file.csv (date,value,released_at) / file.csv@1D (a lag); each value
    is seen from the first bar closing after its release (docs/data.md)"""


@dataclass
class EnvArgs:
    """Environment and costs: positions, fills, costs, episodes and reward."""

    positions: tuple[float, ...] = (-1.0, 0.0, 1.0)
    """target position levels the discrete actions select (fractions of equity); (0, 1) is long-only"""
    fee_bps: float = 1.0
    """fee per fill, basis points of traded notional"""
    slippage_bps: float = 1.0
    """slippage per fill, basis points of price"""
    borrow_bps: float = 0.0
    """annual borrow rate of a short, basis points of its market value (sentio_lab.env.costs)"""
    spread: Literal["none", "corwin_schultz", "abdi_ranaldo"] = "none"
    """half-spread estimated from OHLC bars <= t on top of slippage"""
    impact: Literal["none", "sqrt", "almgren_chriss"] = "none"
    """market impact: "sqrt" is Y sigma_daily sqrt(Q / ADV) (sentio_lab.env.costs)"""
    impact_y: float = 0.7
    """Y of the square-root impact law"""
    capital: float = 1e6
    """starting capital in account currency: impact and participation caps depend on the size traded"""
    adv: float | None = None
    """user-given average daily volume in currency (required for impact on FX tick volume); None = from the bars"""
    participation: float | None = None
    """at most this share of the fill bar's volume fills per bar; None = no cap"""
    remainder: Literal["cancel", "carry"] = "cancel"
    """what a capped order's unfilled part does: "carry" keeps trading to the target"""
    cap_volume: Literal["bar", "forecast"] = "bar"
    """volume the participation cap reads: "bar" (the fill bar's own, the simulated execution; never observed) or
    "forecast" (ADV from bars <= t per bar, known at the decision)"""
    episode_length: int = 256
    """steps per training episode (random windows inside the training range)"""
    reward_scale: float = 100.0
    """multiplier on the log-return reward (log returns of daily bars are ~1e-2)"""
    anchor: Literal["buy_and_hold", "sma_crossover", "momentum", "vol_target"] | None = None
    """benchmark the actions tilt around (sentio_lab.env.anchor): target = clip(benchmark weight + tilt, position
    range); None = actions are the position levels. The untrained agent's greedy action is the zero tilt"""
    tilts: tuple[float, ...] = DEFAULT_TILTS
    """with --anchor: the offsets the actions choose from (fractions of equity; must include 0)"""
    excess_reward: bool = False
    """with --anchor: reward the log return in excess of the benchmark's own (its shadow account pays the same costs)"""
    deviation_penalty: float = 0.0
    """with --anchor: c in reward -= c * (target - benchmark weight)^2 (L2 on the tilt taken)"""
    no_trade_band: float = 0.0
    """with --anchor: a target within this distance of the weight held does not trade"""
    zero_tilt_prob: float = 0.5
    """with --anchor: the untrained policy's probability of the zero tilt (its greedy action whatever the value)"""


@dataclass
class PPOArgs:
    """PPO: the algorithm's core hyperparameters (CleanRL defaults unless noted)."""

    total_timesteps: int = 200_000
    """total env steps of the whole run; with --resume, a larger value continues the run (finished or not) to it"""
    learning_rate: float = 2.5e-4
    """Adam learning rate"""
    weight_decay: float = 0.0
    """decoupled weight decay (AdamW) on the weight matrices (not biases, norms or embeddings' 1-d gains); 0 = plain
    Adam, bit for bit the optimizer of runs before this flag (sentio_lab.agents.training.make_optimizer)"""
    num_envs: int = 64
    """parallel episodes stepped together"""
    num_steps: int = 128
    """steps per episode per rollout"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0 over the run"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 4
    """minibatches per epoch, of batch_size // num_minibatches samples each; when the batch does not divide,
    the remainder (a different random few each epoch) is left out of that epoch, as CleanRL's floor does"""
    update_epochs: int = 4
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient"""
    clip_vloss: bool = True
    """clip the value loss as in the PPO paper's implementation"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    target_kl: float | None = None
    """stop the epoch loop early when the approximate KL exceeds this (None = never)"""
    hidden_size: int = 64
    """width of the two hidden layers of actor and critic"""
    norm_obs: bool = True
    """running mean/variance normalisation of observations (statistics saved with the weights)"""
    # Computed at the start of a run (sentio_lab.agents.training.derive_sizes): saved with the run, never flags.
    batch_size: tyro.conf.Suppress[int] = 0
    """(computed) num_envs * num_steps"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """(computed) batch_size // num_minibatches"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """(computed) total_timesteps // batch_size"""


@dataclass
class RunArgs:
    """Run control: seed, device, budgets, checkpoints and resuming."""

    exp_name: str = "ppo"
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of python, numpy, torch and the env's episode sampler (not of the features: see feature_seed)"""
    torch_deterministic: bool = True
    """make cuDNN deterministic, as CleanRL does (CPU runs are bit-reproducible either way; tested)"""
    device: Device = "cpu"
    """torch device for the env and the networks ("auto": cuda when available)"""
    run_dir: str = "runs"
    """where run folders (checkpoints, W&B files) are written"""
    run_name: str = ""
    """run folder name; computed as dataset__exp_name__seed__unix-time unless given"""
    progress: bool = True
    """show a progress bar with steps/s and the recent episode return"""
    time_budget_s: float | None = None
    """stop cleanly after the iteration in which this many wall-clock seconds are spent, then save"""
    max_iterations: int | None = None
    """stop cleanly after this many iterations of this invocation (the run can be resumed)"""
    checkpoint_every: int = 10
    """save a checkpoint every this many iterations (and always at the end); 0 = only at the end"""
    checkpoint_path: str | None = None
    """checkpoint file; default run_dir/<run name>/checkpoint.pt"""
    resume: str | None = None
    """continue the run saved in this checkpoint: run-control arguments come from the command line, every other
    argument from the checkpoint; one set away from its default to a value other than the checkpoint's is an
    error naming it (arguments left at their defaults are taken from the checkpoint)"""
    debug: bool = False
    """show the full traceback of an error (by default a data or argument error prints one line)"""
    select_on: Literal["none", "validation_sharpe", "validation_log_return"] = "none"
    """checkpoint selection on the validation range by this declared criterion (greedy, net of costs): the best
    agent state is kept and is the run's result; "none" = the last weights (sentio_lab.agents.selection)"""
    eval_every: int = 10
    """with --select-on: score the agent on validation every this many iterations (and after the last one)"""
    patience: int | None = None
    """with --select-on: stop after this many evaluations without a better score; None = train to the end"""


@dataclass
class TrackingArgs:
    """Tracking: Weights & Biases."""

    track: bool = True
    """log to Weights & Biases (offline by default: files under run_dir, nothing leaves the machine)"""
    wandb_project_name: str = "sentio-lab"
    """W&B project"""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode"""


@dataclass
class RiskCriticArgs:
    """Risk-aware critic: quantile critic, CVaR and the drawdown constraint, shared by ``ppo_risk`` and
    ``ppo_portfolio`` (sentio_lab.agents.portfolio_risk). The defaults switch it off; ``ppo_risk`` sets
    ``num_quantiles`` 32 and refuses None (its critic is always distributional)."""

    num_quantiles: int | None = None
    """quantile heads of a distributional critic (levels (2i + 1) / 2N); None = the scalar critic (MSE value loss;
    ppo_portfolio only: ppo_risk refuses None)"""
    kappa: float = 1.0
    """threshold of the quantile Huber loss (squared inside |u| <= kappa, linear outside), in reward units"""
    risk: Literal["neutral", "cvar"] = "neutral"
    """with --num-quantiles: the value GAE uses, "neutral" (their mean) or "cvar" (mean of the lowest cvar_alpha)"""
    cvar_alpha: float = 0.25
    """tail fraction of CVaR_alpha (with --risk cvar)"""
    cost_limit: float | None = None
    """limit on the mean episode maximum drawdown (a fraction, e.g. 0.05); None = no constraint, no cost critic"""
    cost_scale: float = 100.0
    """multiplier on the per-step drawdown cost seen by the cost critic (drawdown increments are ~1e-3)"""
    cost_vf_coef: float = 0.5
    """cost value loss coefficient"""
    pid_kp: float = 10.0
    """proportional gain of the PID Lagrangian (lambda per unit of drawdown excess)"""
    pid_ki: float = 10.0
    """integral gain of the PID Lagrangian (per iteration: a 0.01 excess held 10 iterations adds 1.0)"""
    pid_kd: float = 0.0
    """derivative gain of the PID Lagrangian (acts on a rise of the measured drawdown)"""


#: The shared groups: attribute name in a variant's ``Args`` -> group class.
GROUPS: dict[str, type] = {"data": DataArgs, "features": FeatureArgs, "env": EnvArgs, "ppo": PPOArgs,
                           "run": RunArgs, "tracking": TrackingArgs, "risk_critic": RiskCriticArgs}

#: Arguments that control one invocation rather than define the experiment: taken from the command line on
#: ``--resume``, everything else comes from the checkpoint so the resumed run is the same run (the device too: RNG
#: streams differ between CPU and CUDA, so CUDA falls back to cpu only when absent).
RUN_CONTROL_FIELDS = frozenset(
    {"track", "wandb_mode", "progress", "time_budget_s", "max_iterations", "checkpoint_every",
     "checkpoint_path", "resume", "run_dir", "debug"}
)


def saved_fields(saved: dict[str, Any], name: str) -> dict[str, Any]:
    """The dict inside a checkpoint's ``args`` that holds the flat field ``name``: its group's (nested bundles) or
    ``saved`` itself (flat bundles written before the groups, and a variant's own fields). Writing into it changes
    the bundle's argument, whichever form the bundle has."""
    for group in GROUPS:
        if isinstance(saved.get(group), dict) and name in saved[group]:
            return saved[group]
    if name in saved:
        return saved
    raise KeyError(f"checkpoint arguments hold no {name!r}")


class VariantArgs:
    """Base of every variant's ``Args``: routing between flat keywords and the nested groups.

    Subclasses are dataclasses whose fields are the shared groups of :data:`GROUPS` (under those names) and the
    variant's own fields.
    """

    @classmethod
    def routes(cls) -> dict[str, str | None]:
        """Each flat name -> the group holding it (``None`` for the variant's own top-level fields)."""
        routes: dict[str, str | None] = {}
        for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
            if spec.name in GROUPS:
                routes.update({leaf.name: spec.name for leaf in dataclasses.fields(GROUPS[spec.name])})
            else:
                routes[spec.name] = None
        return routes

    @classmethod
    def from_flat(cls: type[ArgsT], **values: Any) -> ArgsT:
        """``Args`` from flat keywords (``total_timesteps=512, fee_bps=2``), each routed to its group by name;
        an unknown name is a ``TypeError`` naming it. Groups keep the variant's defaults for what is not given."""
        return cls().replace(**values)  # type: ignore[attr-defined]

    def replace(self: ArgsT, **values: Any) -> ArgsT:
        """A copy with the given flat fields changed (routed as in :meth:`from_flat`); the groups are copied."""
        routes = type(self).routes()
        unknown = sorted(set(values) - set(routes))
        if unknown:
            raise TypeError(f"{type(self).__module__}.Args has no argument(s) {unknown}")
        per_group: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        own: dict[str, Any] = {}
        for name, value in values.items():
            group = routes[name]
            (own if group is None else per_group[group])[name] = value
        changes = {group: dataclasses.replace(getattr(self, group), **fields)
                   for group, fields in per_group.items() if hasattr(self, group)}
        return dataclasses.replace(self, **changes, **own)  # type: ignore[type-var]

    def flat(self) -> dict[str, Any]:
        """Every argument by its flat name (nested own groups such as ``masks`` stay one value)."""
        out: dict[str, Any] = {}
        for spec in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec.name)
            if spec.name in GROUPS:
                out.update({leaf.name: getattr(value, leaf.name) for leaf in dataclasses.fields(value)})
            else:
                out[spec.name] = value
        return out

    def config(self) -> dict[str, Any]:
        """:meth:`flat` with nested own groups as dicts: the W&B config (the keys the flags have, as before the
        groups, so filters on ``learning_rate`` or ``fee_bps`` keep working) and other plain records."""
        return {name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                for name, value in self.flat().items()}

    @classmethod
    def from_dict(cls: type[ArgsT], saved: dict[str, Any]) -> ArgsT:
        """``Args`` from a checkpoint's ``args`` dict: the nested form ``dataclasses.asdict`` writes, or the flat
        form of checkpoints written before the groups (each key routed to its group by name). Nested dataclass
        fields saved as dicts (``masks``) are rebuilt; an unknown key is a ``TypeError`` naming it."""
        defaults = cls()
        flat: dict[str, Any] = {}
        for name, value in saved.items():
            if name in GROUPS and isinstance(value, dict):
                flat.update(value)
            else:
                flat[name] = value
        for name, value in flat.items():
            default = getattr(defaults, name, None) if name not in GROUPS else None
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                flat[name] = type(default)(**value)
        return defaults.replace(**flat)  # type: ignore[attr-defined]



@dataclass
class SharedArgs(VariantArgs):
    """The shared groups, as a variant's ``Args`` inherits them (a variant overrides a group's defaults by
    redeclaring its field, e.g. ``run`` with its own ``exp_name``, and adds its own fields after them)."""

    data: Flat[DataArgs] = field(default_factory=DataArgs)
    features: Flat[FeatureArgs] = field(default_factory=FeatureArgs)
    env: Flat[EnvArgs] = field(default_factory=EnvArgs)
    ppo: Flat[PPOArgs] = field(default_factory=PPOArgs)
    run: Flat[RunArgs] = field(default_factory=RunArgs)
    tracking: Flat[TrackingArgs] = field(default_factory=TrackingArgs)
