"""Risk-aware PPO on the batched torch trading env: one readable file, modelled on ``ppo.py``.

Run ``python -m sentio_lab.ppo_risk --help``. Everything ``ppo.py`` does (rollout, GAE, truncation bootstrap,
clipped surrogate, checkpoints, exact resume, non-finite guards) is done here the same way; on top of it:

* **distributional critic** (:mod:`sentio_lab.nets.quantile`): ``num_quantiles`` quantile heads trained with
  the quantile Huber loss (Dabney et al., 2018). Each head regresses on per-quantile lambda-returns
  ``R^j_t = r_t + gamma (1 - d) ((1 - lambda) theta_j(s_{t+1}) + lambda R^j_{t+1})`` (with lambda = 0 this is
  QR-DQN's target ``r + gamma theta_j(s')``), every head against every target sample. The scalar value GAE
  uses is a risk distortion of the quantiles (``--risk neutral``: their mean; ``--risk cvar``: CVaR_alpha, the
  mean of the lowest ``cvar_alpha`` fraction). A truncated episode is bootstrapped as in ``ppo``: the reward
  gets ``gamma V(final obs)`` with the *distorted* V, each quantile target ``gamma theta_j(final obs)``.
  The CVaR advantage is a risk-shaped advantage (the actor prefers actions whose worst-tail value is high);
  it is not an exact CVaR policy gradient of the episode return, and the report says so.
* **drawdown constraint** (``--cost-limit``; Stooke, Achiam and Abbeel, 2020): the env runs with
  ``drawdown_obs`` (:func:`env_options`: ``D_t, M_t`` join the observation, ``info["drawdown_cost"]`` is
  ``M_{t+1} - M_t``, summing to the episode's maximum drawdown). A cost critic learns the cost to go; its
  advantage ``A_c`` comes from its own GAE on ``cost_scale * cost``, *with the reward's gamma and lambda*:
  episodes are random windows and the observation does not say how many steps a window has left, so an
  undiscounted cost to go would not be a function of the observation, while a discounted one is (and the
  same horizon keeps ``A_r`` and ``A_c`` comparable). Truncated windows bootstrap the cost like the reward
  (the market, and the drawdown, go on). What the constraint bounds is measured exactly and undiscounted:
  the mean maximum drawdown of the episodes that finished in the rollout; a
  :class:`~sentio_lab.constraints.PIDLagrangian` turns its excess over the limit into the multiplier lambda
  (held as it was when no episode finished in an iteration), and the actor's advantage is
  ``(A_r - lambda A_c) / (1 + lambda)`` (both normalised per minibatch first when ``norm_adv``).
* **adaptive KL penalty** (``--kl-penalty``, PPO paper): ``+ beta KL(old || new)`` in the loss, beta doubled /
  halved after each update when the full-batch KL is above 1.5 x / below 1 / 1.5 x ``kl_target``
  (:class:`~sentio_lab.constraints.AdaptiveKL`); and **trust-region early stopping** (``--target-kl``): the
  epoch loop stops once the approximate KL exceeds it (:func:`sentio_lab.rollout.kl_early_stop`).
* a per-iteration history (``history.csv`` beside the checkpoint, and in the checkpoint): lambda and its P, I
  and D terms, the measured episode drawdown against the limit, the cost value, beta and the approximate KL.

The multiplier, the PID state and beta are saved in the checkpoint; a resumed run continues bit-identically.
With one quantile, ``--risk neutral``, no constraint, no KL penalty and ``kappa`` a power of two larger than
every TD error, ``vf_coef = 2 kappa`` times ppo's gives *exactly* ppo's update on the same batch (the quantile
Huber loss at tau = 0.5 is ``u^2 / (4 kappa)`` there; powers of two scale floats exactly): tested.
The quantile loss is the mean over the quantile heads, not Dabney's sum: the same minimiser, but the loss
(and its share of the global gradient-norm clip, which actor and critic share) does not grow with N.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import tyro
from torch import nn, optim

from sentio_lab import agent_report, training
from sentio_lab.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from sentio_lab.constraints import AdaptiveKL, PIDLagrangian
from sentio_lab.costs import CostModel
from sentio_lab.env import TradingEnv
from sentio_lab.features import FeatureConfig
from sentio_lab.market import PreparedMarket
from sentio_lab.nets.quantile import QuantileActorCritic, quantile_huber
from sentio_lab.progress import tqdm  # text bar under papermill (set_progress_mode)
from sentio_lab.rollout import (
    NonFiniteError,
    approx_kl,
    bootstrap_truncated,
    clip_fraction,
    compute_gae,
    describe_non_finite,
    kl_early_stop,
    normalise_advantages,
    policy_loss,
    value_loss,
)
from sentio_lab.tracking import Tracker
from sentio_lab.training import (
    cost_model_from,
    derive_sizes,
    progress_postfix,
    resolve_device,
    resume_device,
    seed_everything,
)

VARIANT = "ppo_risk"


@dataclass
class Args:
    """Command-line arguments of ``python -m sentio_lab.ppo_risk``."""

    exp_name: str = VARIANT
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of python, numpy, torch and the env's episode sampler (not of the features: see feature_seed)"""
    torch_deterministic: bool = True
    """make cuDNN deterministic, as CleanRL does (CPU runs are bit-reproducible either way; tested)"""
    device: str = "cpu"
    """torch device for the env and the networks: "cpu", "cuda" or "auto" (cuda when available)"""
    track: bool = True
    """log to Weights & Biases (offline by default: files under run_dir, nothing leaves the machine)"""
    wandb_project_name: str = "sentio-lab"
    """W&B project"""
    wandb_mode: str = "offline"
    """W&B mode: "offline", "online" or "disabled" """
    run_dir: str = "runs"
    """where run folders (checkpoints, W&B files) are written"""
    progress: bool = True
    """show a progress bar with steps/s and the recent episode return"""

    # Data and features
    dataset: str = "sp500"
    """bundled dataset name (sp500, nasdaq, eurusd_1h) or path to a CSV / Parquet OHLCV file"""
    data_start: str | None = None
    """first bar to load; None = the dataset's default start (sp500 starts 2013-05-10, after its stale-open
    stretches)"""
    data_end: str | None = None
    """last bar to load; None = the end of the dataset"""
    stale_opens: str = "refuse"
    """"refuse" or "allow" a range with stale opens (opens copied from the previous close; sentio_lab.data)"""
    train_fraction: float = 0.6
    """first fraction of bars used for training (features and normalisation are fitted here only)"""
    validation_fraction: float = 0.2
    """next fraction of bars held out for validation; the rest is the test range"""
    feature_bank: str = "basic"
    """feature bank: "basic" (fast returns / volatility / range set) or "talib" (150+ TA-Lib indicators)"""
    timeframes: tuple[str, ...] = ()
    """extra higher timeframes whose features join the observation, e.g. 4h 1D (pandas offset aliases)"""
    regimes: int = 0
    """number of HMM regimes whose filtered probabilities join the observation (0 = none)"""
    regime_restarts: int = 4
    """seeded HMM restarts (the best converged fit by likelihood is kept)"""
    feature_seed: int = 0
    """seed of the feature pipeline (HMM restarts), kept apart from --seed so seeds vary the policy only"""
    normalise: str = "robust"
    """feature normalisation fitted on the training range: "robust", "rank" or "none" """
    prune_corr: float | None = None
    """drop near-duplicate features whose |correlation| on the training range exceeds this"""
    feature_cache_dir: str | None = ".cache/features"
    """Parquet cache of computed features (keyed by data fingerprint and config); None = no cache"""
    window: int = 32
    """bars of feature history in each observation"""

    # Environment
    positions: tuple[float, ...] = (-1.0, 0.0, 1.0)
    """target position levels the discrete actions select (fractions of equity); (0, 1) is long-only"""
    fee_bps: float = 1.0
    """fee per fill, basis points of traded notional"""
    slippage_bps: float = 1.0
    """slippage per fill, basis points of price"""
    borrow_bps: float = 0.0
    """annual borrow rate of a short, basis points of its market value (sentio_lab.costs)"""
    spread: str = "none"
    """half-spread estimated from OHLC bars <= t on top of slippage: "none", "corwin_schultz", "abdi_ranaldo" """
    impact: str = "none"
    """market impact: "none", "sqrt" (Y sigma_daily sqrt(Q / ADV)) or "almgren_chriss" (sentio_lab.costs)"""
    impact_y: float = 0.7
    """Y of the square-root impact law"""
    capital: float = 1e6
    """starting capital in account currency: impact and participation caps depend on the size traded"""
    adv: float | None = None
    """user-given average daily volume in currency (required for impact on FX tick volume); None = from the bars"""
    participation: float | None = None
    """at most this share of the fill bar's volume fills per bar; None = no cap"""
    remainder: str = "cancel"
    """what a capped order's unfilled part does: "cancel" or "carry" (keeps trading to the target)"""
    cap_volume: str = "bar"
    """volume the participation cap reads: "bar" (the fill bar's own, the simulated execution; never observed) or
    "forecast" (ADV from bars <= t per bar, known at the decision)"""
    episode_length: int = 256
    """steps per training episode (random windows inside the training range)"""
    reward_scale: float = 100.0
    """multiplier on the log-return reward (log returns of daily bars are ~1e-2)"""

    # Algorithm (CleanRL defaults unless noted)
    total_timesteps: int = 200_000
    """total env steps of the whole run; with --resume, a larger value continues the run (finished or not) to it"""
    learning_rate: float = 2.5e-4
    """Adam learning rate"""
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
    clip_vloss: bool = False
    """clip the quantile (and cost) value loss as ppo does: per head, max of the losses of the new quantiles and of
    the rollout's quantiles moved by at most clip_coef. Off by default (ppo's default is on): the clipped branch
    doubles the (batch, N, N) quantile loss that dominates the update, and value clipping did not help in
    Andrychowicz et al. (2021, "What matters in on-policy RL")"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """quantile value loss coefficient (ppo's 0.5 MSE equals this loss at one quantile with vf_coef 2 kappa x ppo's)"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    target_kl: float | None = None
    """trust region: stop the epoch loop early when the approximate KL exceeds this (None = never)"""
    hidden_size: int = 64
    """width of the two hidden layers of actor and critic"""
    norm_obs: bool = True
    """running mean/variance normalisation of observations (statistics saved with the weights)"""


    # Risk (this variant)
    num_quantiles: int = 32
    """quantile heads of the distributional critic (levels (2i + 1) / 2N)"""
    kappa: float = 1.0
    """threshold of the quantile Huber loss (squared inside |u| <= kappa, linear outside), in reward units"""
    risk: Literal["neutral", "cvar"] = "neutral"
    """value GAE uses: "neutral" (mean of the quantiles) or "cvar" (mean of the lowest cvar_alpha fraction)"""
    cvar_alpha: float = 0.25
    """tail fraction of CVaR_alpha (used with --risk cvar)"""
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
    kl_penalty: bool = False
    """add an adaptive KL penalty beta KL(old || new) to the loss (PPO paper)"""
    kl_coef: float = 0.2
    """initial beta of the KL penalty"""
    kl_target: float = 0.01
    """KL the adaptive beta steers towards (x2 above 1.5 target, /2 below target / 1.5)"""

    # Run control (not part of the experiment: may differ between a run and its resumption)
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

    # Filled in at run time
    batch_size: int = 0
    """(computed) num_envs * num_steps"""
    minibatch_size: int = 0
    """(computed) batch_size // num_minibatches"""
    num_iterations: int = 0
    """(computed) total_timesteps // batch_size"""
    run_name: str = ""
    """(computed unless given) dataset__exp_name__seed__unix-time"""


#: Arguments that control one invocation rather than define the experiment (taken from the command
#: line on --resume; everything else comes from the checkpoint so the resumed run is the same run --
#: the device too: RNG streams differ between CPU and CUDA, so CUDA falls back to cpu only when absent).
RUN_CONTROL_FIELDS = frozenset(
    {"track", "wandb_mode", "progress", "time_budget_s", "max_iterations", "checkpoint_every",
     "checkpoint_path", "resume", "run_dir"}
)



@dataclass
class TrainResult(training.TrainResult):
    """:class:`sentio_lab.training.TrainResult` plus the constraint's controllers; ``history`` holds this
    invocation's iterations (the whole run's are in ``history.csv`` and the checkpoint)."""

    lagrangian: PIDLagrangian | None = None
    kl_control: AdaptiveKL | None = None


def feature_config(args: Args) -> FeatureConfig:
    """The feature pipeline these arguments ask for."""
    return training.feature_config_from(args)


def cost_model(args: Args) -> CostModel:
    """The cost model these arguments ask for."""
    return cost_model_from(args)


def market_for(args: Args, feature_state: dict | None = None) -> PreparedMarket:
    """The market these arguments ask for (dataset, bar range, stale-open policy, features, ranges)."""
    return training.market_from(args, feature_state)


def env_options(args: Args, market: PreparedMarket) -> dict[str, Any]:
    """Extra env keywords of this variant (for training, evaluation and the runner): the drawdown state
    ``(D_t, M_t)`` joins the observation and the env reports the per-step drawdown cost."""
    return {"drawdown_obs": True}


def make_env(args: Args, market: PreparedMarket, range_name: str = "train") -> TradingEnv:
    """Training env: ``num_envs`` random windows inside the named range, with the drawdown state.

    On a fold market (purged walk-forward / CPCV) episodes are drawn from the fold's training segments only.
    """
    return training.training_env(args, market, range_name, **env_options(args, market))


def build_agent(args: Args, obs_dim: int, num_actions: int) -> QuantileActorCritic:
    """The actor-critic of this variant (evaluation rebuilds it from a checkpoint's args)."""
    return QuantileActorCritic(
        obs_dim, num_actions, hidden=args.hidden_size, norm_obs=args.norm_obs, num_quantiles=args.num_quantiles,
        risk=args.risk, cvar_alpha=args.cvar_alpha, cost_critic=args.cost_limit is not None,
    )


def resume_args(given: Args, saved: dict[str, Any], source: str | Path) -> Args:
    """The arguments of a resumed run (:func:`sentio_lab.training.resume_args` with :data:`RUN_CONTROL_FIELDS`)."""
    return training.resume_args(given, saved, source, RUN_CONTROL_FIELDS)


def history_path(checkpoint_path: Path) -> Path:
    """Where a run's per-iteration history is written: ``history.csv`` beside its checkpoint."""
    return checkpoint_path.with_name("history.csv")


def train(args: Args, *, market: PreparedMarket | None = None, env: Any | None = None) -> TrainResult:
    """Run risk-aware PPO as ``args`` say; ``market`` / ``env`` may be given to reuse prepared data.

    An ``env`` passed in needs ``obs_dim``, ``num_actions``, ``reset()`` and ``step()`` like
    :class:`TradingEnv` and, with ``cost_limit``, ``info["drawdown_cost"]`` (build it with
    ``drawdown_obs=True``); without a market no checkpoint is written. Raises :class:`NonFiniteError` when a
    reward, cost, value, loss or gradient is not finite, before any update or save uses it.
    """
    bundle = None
    device_changed = False
    if args.resume:
        bundle = load_checkpoint(args.resume, variant=VARIANT)
        args = resume_args(args, bundle["args"], args.resume)
        device_changed = resume_device(args, bundle)
    else:
        args = derive_sizes(args)
    seed_everything(args.seed, args.torch_deterministic)
    device = resolve_device(args.device)
    constrained = args.cost_limit is not None

    if env is None:
        if market is None:
            market = market_for(args, bundle["feature_state"] if bundle else None)
            print(market.data.quality)
        env = make_env(args, market)
    if bundle is not None and market is not None and bundle["data_fingerprint"] != market.data.fingerprint:
        raise CheckpointError(f"--resume {args.resume}: the checkpoint was trained on other data")
    checkpoint_path = None
    if market is not None:
        checkpoint_path = Path(args.checkpoint_path or Path(args.run_dir) / args.run_name / "checkpoint.pt")

    agent = build_agent(args, env.obs_dim, env.num_actions).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    lagrangian = PIDLagrangian(args.cost_limit, args.pid_kp, args.pid_ki, args.pid_kd) if constrained else None
    kl_control = AdaptiveKL(args.kl_coef, args.kl_target) if args.kl_penalty else None

    # Rollout storage: (step, env) as in ppo, plus a quantile axis for the critic
    n_q = args.num_quantiles
    obs = torch.zeros((args.num_steps, args.num_envs, env.obs_dim), device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards_q = torch.zeros((args.num_steps, args.num_envs, n_q), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)
    quantiles = torch.zeros((args.num_steps, args.num_envs, n_q), device=device)
    costs = torch.zeros((args.num_steps, args.num_envs), device=device)
    cost_values = torch.zeros((args.num_steps, args.num_envs), device=device)
    episode_return = torch.zeros(args.num_envs, dtype=torch.float64, device=device)
    episode_cost = torch.zeros(args.num_envs, dtype=torch.float64, device=device)  # sums to the max drawdown

    global_step, start_iteration = 0, 1
    recent_returns: list[float] = []  # log returns of the last 100 finished episodes (for logging)
    full_history: list[dict[str, float]] = []  # every iteration of the run, across resumptions
    if bundle is None:
        next_obs = env.reset()
        next_done = torch.zeros(args.num_envs, device=device)
    else:
        agent.load_state_dict(bundle["agent"])
        optimizer.load_state_dict(bundle["optimizer"])
        env_state = bundle["env_state"]
        if device_changed:
            generator = torch.Generator(device=device).manual_seed(args.seed + 1_000_003 * bundle["iteration"])
            env_state = {**env_state, "generator": generator.get_state()}
        next_obs = env.load_state_dict(env_state)
        extra = bundle["extra"]
        next_done = extra["next_done"].to(device)
        episode_return = extra["episode_return"].to(device)
        episode_cost = extra["episode_cost"].to(device)
        recent_returns = list(extra["recent_returns"])
        full_history = [dict(record) for record in extra["history"]]
        if lagrangian is not None:
            lagrangian.load_state_dict(extra["lagrangian"])
        if kl_control is not None:
            kl_control.load_state_dict(extra["kl_control"])
        restore_rng(bundle["rng"])
        global_step, start_iteration = bundle["global_step"], bundle["iteration"] + 1
    last_saved = bundle["iteration"] if bundle is not None else None

    def save(iteration: int) -> Path | None:
        nonlocal last_saved
        if checkpoint_path is None:
            return None
        last_saved = iteration
        path = save_checkpoint(checkpoint_path, {
            "variant": VARIANT,
            "args": dataclasses.asdict(args),
            "agent": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "feature_state": market.features.state,
            "feature_names": market.features.names,
            "rng": capture_rng(),
            "env_state": env.state_dict(),
            "global_step": global_step,
            "iteration": iteration,
            "data_fingerprint": market.data.fingerprint,
            "data_name": market.data.name,
            "data_quality": None if market.data.quality is None else market.data.quality.to_dict(),
            "extra": {"next_done": next_done.cpu(), "episode_return": episode_return.cpu(),
                      "episode_cost": episode_cost.cpu(), "recent_returns": list(recent_returns),
                      "device": device.type, "history": [dict(record) for record in full_history],
                      "lagrangian": None if lagrangian is None else lagrangian.state_dict(),
                      "kl_control": None if kl_control is None else kl_control.state_dict()},
        })
        pd.DataFrame(full_history).to_csv(history_path(path), index=False)
        return path

    def non_finite(iteration: int, what: str) -> NonFiniteError:
        progress.close()
        tracker.finish()
        kept = (f"the last good checkpoint, {checkpoint_path} (iteration {last_saved}), is left as it was"
                if last_saved is not None else "no checkpoint was written")
        return NonFiniteError(f"iteration {iteration}: {what}; stopped before using it ({kept})")

    tracker = Tracker(
        args.track, project=args.wandb_project_name, run_name=args.run_name, config=dataclasses.asdict(args),
        run_dir=args.run_dir, mode=args.wandb_mode,
    )
    history: list[dict[str, float]] = []
    progress = tqdm(total=args.num_iterations * args.batch_size, initial=global_step, unit="step",
                    disable=not args.progress, dynamic_ncols=True)
    start_time, start_step = time.time(), global_step
    iteration = start_iteration - 1
    invocation_iterations = 0
    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        # ---- rollout: num_steps steps of all num_envs episodes
        finished_drawdowns: list[float] = []  # max drawdown of each episode that ended in this rollout
        for step in range(args.num_steps):
            global_step += args.num_envs
            with torch.no_grad():
                if agent.obs_norm is not None:
                    agent.obs_norm.update(next_obs)
                norm_obs = agent.normalise(next_obs)
                obs[step] = norm_obs
                dones[step] = next_done
                action, logprob, _, step_quantiles = agent.get_action_and_value(norm_obs)
                quantiles[step] = step_quantiles
                values[step] = agent.value_of(step_quantiles)
                if constrained:
                    cost_values[step] = agent.get_cost_value(norm_obs)
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, terminated, truncated, info = env.step(action)
            episode_return += reward
            reward = reward.to(torch.float32) * args.reward_scale
            step_cost = info.get("drawdown_cost")
            if step_cost is not None:
                episode_cost += step_cost
            elif constrained:
                raise ValueError("cost_limit needs an env built with drawdown_obs=True (info['drawdown_cost'])")
            cost = (step_cost.to(torch.float32) * args.cost_scale if constrained
                    else torch.zeros_like(reward))
            reward_q = reward.unsqueeze(-1).expand(-1, n_q)
            if bool(truncated.any()):
                # The window ended, the market did not: bootstrap the distorted value, each quantile, the cost.
                with torch.no_grad():
                    final_obs = agent.normalise(info["final_obs"])
                    final_quantiles = agent.get_quantiles(final_obs)
                    reward_q = reward_q + args.gamma * final_quantiles * truncated.unsqueeze(-1)
                    reward = bootstrap_truncated(reward, agent.value_of(final_quantiles), truncated, args.gamma)
                    if constrained:
                        cost = bootstrap_truncated(cost, agent.get_cost_value(final_obs), truncated, args.gamma)
            rewards[step] = reward
            rewards_q[step] = reward_q
            costs[step] = cost
            done = terminated | truncated
            next_done = done.to(torch.float32)
            if bool(done.any()):
                recent_returns.extend(episode_return[done].tolist())
                recent_returns = recent_returns[-100:]
                episode_return = torch.where(done, 0.0, episode_return)
                if step_cost is not None:  # an env without the drawdown state has nothing to measure
                    finished_drawdowns.extend(episode_cost[done].tolist())
                    episode_cost = torch.where(done, 0.0, episode_cost)

        # ---- the multiplier: one PID step on this rollout's measured episode drawdown (held when none ended)
        mean_drawdown = float(np.mean(finished_drawdowns)) if finished_drawdowns else float("nan")
        multiplier = lagrangian.update(mean_drawdown if finished_drawdowns else None) if lagrangian else 0.0

        # ---- bootstrap value and GAE: the distorted value, each quantile (targets), the cost
        with torch.no_grad():
            next_norm = agent.normalise(next_obs)
            next_quantiles = agent.get_quantiles(next_norm)
            next_value = agent.value_of(next_quantiles)
            next_cost_value = agent.get_cost_value(next_norm) if constrained else torch.zeros_like(next_value)
            problem = describe_non_finite(rewards=rewards, values=values, next_value=next_value,
                                          quantiles=quantiles, costs=costs, cost_values=cost_values)
            if problem is not None:
                raise non_finite(iteration, f"the rollout produced non-finite {problem} (index: step, env)")
            gamma, gae_lambda = args.gamma, args.gae_lambda
            advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda)
            # per-quantile lambda-returns: (T, N, Q) targets; dones broadcast over the quantile axis
            _, returns_q = compute_gae(rewards_q, quantiles, dones.unsqueeze(-1), next_quantiles,
                                       next_done.unsqueeze(-1), gamma, gae_lambda)
            if constrained:
                cost_advantages, cost_returns = compute_gae(costs, cost_values, dones, next_cost_value, next_done,
                                                            gamma, gae_lambda)

        # ---- flatten the batch
        b_obs = obs.reshape((-1, env.obs_dim))
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)
        b_quantiles = quantiles.reshape((-1, n_q))
        b_returns_q = returns_q.reshape((-1, n_q))
        batch = [b_obs, b_actions, b_logprobs, b_advantages, b_quantiles, b_returns_q]
        if constrained:
            batch += [cost_advantages.reshape(-1), cost_returns.reshape(-1), cost_values.reshape(-1)]

        # ---- optimise policy, quantile critic and cost critic
        clipfracs = []
        epochs_run = updates_run = 0
        c_loss = kl_penalty = torch.zeros((), device=device)
        beta = kl_control.coef if kl_control is not None else 0.0
        used = args.num_minibatches * args.minibatch_size
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(args.batch_size, device=device)
            for minibatch, start in enumerate(range(0, used, args.minibatch_size)):
                mb_inds = b_inds[start : start + args.minibatch_size]
                mb = [x.index_select(0, mb_inds) for x in batch]
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_quantiles, mb_returns_q = mb[:6]
                _, newlogprob, entropy, newquantiles = agent.get_action_and_value(mb_obs, mb_actions)
                logratio = newlogprob - mb_logprobs
                ratio = logratio.exp()
                with torch.no_grad():
                    old_kl, kl = approx_kl(logratio, ratio)
                    clipfracs.append(clip_fraction(ratio, args.clip_coef).item())

                if args.norm_adv:
                    mb_advantages = normalise_advantages(mb_advantages)
                if constrained:
                    mb_cost_advantages, mb_cost_returns, mb_cost_values = mb[6:]
                    if args.norm_adv:
                        mb_cost_advantages = normalise_advantages(mb_cost_advantages)
                    # Stooke et al.: (A_r - lambda A_c) / (1 + lambda) keeps the step size bounded as lambda grows
                    mb_advantages = (mb_advantages - multiplier * mb_cost_advantages) / (1.0 + multiplier)
                pg_loss = policy_loss(mb_advantages, ratio, args.clip_coef)
                v_loss = quantile_huber(newquantiles, mb_returns_q, agent.taus, args.kappa)
                if args.clip_vloss:  # ppo's pessimistic clip, per quantile head around the rollout's quantiles
                    clipped = mb_quantiles + torch.clamp(newquantiles - mb_quantiles, -args.clip_coef, args.clip_coef)
                    v_loss = torch.max(v_loss, quantile_huber(clipped, mb_returns_q, agent.taus, args.kappa))
                v_loss = v_loss.mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                if constrained:
                    new_cost_values = agent.get_cost_value(mb_obs)
                    c_loss = value_loss(new_cost_values, mb_cost_returns, mb_cost_values, args.clip_coef,
                                        args.clip_vloss)
                    loss = loss + c_loss * args.cost_vf_coef
                if kl_control is not None:
                    kl_penalty = ((ratio - 1) - logratio).mean()  # the unbiased, non-negative estimator, with grad
                    loss = loss + beta * kl_penalty

                optimizer.zero_grad()
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                if not bool(torch.isfinite(torch.stack((loss.detach(), grad_norm))).all()):
                    raise non_finite(iteration, (
                        f"non-finite loss or gradient at epoch {epoch + 1}, minibatch {minibatch + 1}: "
                        f"loss {loss.item()}, gradient norm {grad_norm.item()} (policy loss {pg_loss.item()}, "
                        f"value loss {v_loss.item()}, cost value loss {c_loss.item()}, "
                        f"entropy {entropy_loss.item()})"
                    ))
                optimizer.step()
                updates_run += 1
            epochs_run += 1
            if kl_early_stop(kl, args.target_kl):
                break

        batch_kl = float("nan")
        if kl_control is not None:
            # the PPO paper's rule reads the KL of the whole update: old policy vs new, over the whole batch
            with torch.no_grad():
                _, new_logprobs, _, _ = agent.get_action_and_value(b_obs, b_actions)
                logratio = new_logprobs - b_logprobs
                batch_kl = approx_kl(logratio, logratio.exp())[1].item()
            kl_control.update(batch_kl)

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        elapsed = time.time() - start_time
        sps = (global_step - start_step) / max(elapsed, 1e-9)
        pid = lagrangian.state_dict() if lagrangian is not None else {}
        record = {
            "iteration": iteration,
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/episode_log_return": float(np.mean(recent_returns)) if recent_returns else float("nan"),
            "losses/value_loss": v_loss.item(),
            "losses/cost_value_loss": c_loss.item(),
            "losses/policy_loss": pg_loss.item(),
            "losses/entropy": entropy_loss.item(),
            "losses/old_approx_kl": old_kl.item(),
            "losses/approx_kl": kl.item(),
            "losses/batch_kl": batch_kl,
            "losses/kl_coef": beta,
            "losses/kl_coef_next": kl_control.coef if kl_control is not None else 0.0,
            "losses/kl_penalty": kl_penalty.item(),
            "losses/clipfrac": float(np.mean(clipfracs)),
            "losses/explained_variance": float(explained_var),
            "losses/epochs": epochs_run,
            "losses/updates": updates_run,
            "risk/episode_max_drawdown": mean_drawdown,
            "risk/episodes": len(finished_drawdowns),
            "risk/cost_limit": args.cost_limit if constrained else float("nan"),
            "risk/lambda": multiplier,
            "risk/pid_error": pid.get("error", float("nan")),
            "risk/pid_p": pid.get("p_term", float("nan")),
            "risk/pid_i": pid.get("i_term", float("nan")),
            "risk/pid_d": pid.get("d_term", float("nan")),
            "risk/pid_integral": pid.get("integral", float("nan")),
            "risk/cost_value": cost_values.mean().item() / args.cost_scale if constrained else float("nan"),
            "risk/value_tail_gap": (quantiles.mean(-1) - values).mean().item(),
            "charts/SPS": sps,
            "global_step": global_step,
        }
        history.append(record)
        full_history.append(record)
        tracker.log(record, step=global_step)
        progress.update(args.batch_size)
        postfix = progress_postfix(sps, recent_returns)
        if finished_drawdowns:
            postfix["mdd"] = f"{mean_drawdown:.3f}"
        if constrained:
            postfix["lambda"] = f"{multiplier:.2f}"
        progress.set_postfix(postfix)

        invocation_iterations += 1
        out_of_time = args.time_budget_s is not None and elapsed >= args.time_budget_s
        out_of_iterations = args.max_iterations is not None and invocation_iterations >= args.max_iterations
        if out_of_time or out_of_iterations:
            break
        if args.checkpoint_every and iteration % args.checkpoint_every == 0 and iteration < args.num_iterations:
            save(iteration)

    progress.close()
    ran = iteration >= start_iteration
    saved_path = save(iteration) if ran else Path(args.resume)  # nothing ran: file untouched
    if ran:
        tracker.log_outcome(agent, args, market, saved_path)  # evaluation summary, report and checkpoint to W&B
    tracker.finish()
    return TrainResult(
        agent=agent, args=args, checkpoint_path=saved_path, global_step=global_step,
        finished=iteration >= args.num_iterations, history=history, market=market, lagrangian=lagrangian,
        kl_control=kl_control,
    )


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo_risk``."""
    args = tyro.cli(Args)
    try:
        result = train(args)
    except (CheckpointError, NonFiniteError) as err:
        raise SystemExit(f"error: {err}") from err
    status = "finished" if result.finished else "stopped early (resume with --resume)"
    print(f"{status} at step {result.global_step}; checkpoint: {result.checkpoint_path}")
    print(agent_report.training_summary(result))


if __name__ == "__main__":
    main()
