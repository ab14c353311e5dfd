"""PPO with a hierarchical multi-timeframe transformer policy: one readable file, modelled on ``sentio_lab/ppo.py``.

Run ``python -m sentio_lab.ppo_transformer --help``. The algorithm is ``ppo``'s (rollout, GAE, the clipped
surrogate, truncation bootstrap, checkpoints, exact resume); what differs, and why:

* the observation carries, beside the base feature window and the position, a token block per higher timeframe
  (``--token-timeframes 4h 1D``, ``--token-counts 16 10``): the last K completed bars of that timeframe, each a
  token of its own features (:mod:`sentio_lab.features.tokens`), gathered by the env on its device.
  :func:`env_options` builds them for a market, so evaluation and the experiment runner see the same observation;
* the agent is :class:`~sentio_lab.nets.transformer.MultiTimeframeActorCritic`: a transformer encoder per timeframe
  (the base window is one, with ``window`` tokens), pooled, fused across timeframes, then actor and critic heads.
  With no token timeframes it is a single-timeframe transformer over the window, the same code;
* mixed precision (``--amp``): ``bf16`` autocast on CPU or CUDA, ``fp16`` autocast with a ``GradScaler`` on CUDA
  (an overflowing fp16 step is skipped by the scaler and counted, not an error), ``off`` for plain fp32. The
  weights, the optimizer state, logits, values and losses stay float32 (fp32 master weights); only the
  matmuls inside the trunk run in the low precision. The scaler's state is saved with the checkpoint;
* ``--compile`` routes the trunk through ``torch.compile`` (state_dict keys unchanged).

Resuming (``--resume PATH``) follows ``ppo``: run-control arguments (:data:`RUN_CONTROL_FIELDS`) from the command
line, every other argument from the checkpoint (a conflicting explicit value is refused); on CPU a resumed run
ends with the same weights as an uninterrupted one (tests/test_ppo_transformer.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro
from torch import nn, optim

from sentio_lab import agent_report, training
from sentio_lab.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from sentio_lab.costs import CostModel
from sentio_lab.env import TradingEnv
from sentio_lab.features import FeatureConfig
from sentio_lab.features.tokens import block_name, build_token_blocks, token_span, token_width
from sentio_lab.market import PreparedMarket
from sentio_lab.nets.transformer import FUSIONS, MultiTimeframeActorCritic, streams_for
from sentio_lab.observation_layout import TokenBlock, observation_dim, observation_layout
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
    TrainResult,
    cost_model_from,
    derive_sizes,
    progress_postfix,
    resolve_device,
    resume_device,
    seed_everything,
)

VARIANT = "ppo_transformer"
#: Mixed-precision modes (--amp) and their autocast dtypes.
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Args:
    """Command-line arguments of ``python -m sentio_lab.ppo_transformer``."""

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
    dataset: str = "eurusd_1h"
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
    """bars of feature history in each observation (the base timeframe's tokens)"""
    token_timeframes: tuple[str, ...] = ("4h", "1D")
    """higher timeframes whose completed bars reach the policy as token sequences (pandas offset aliases; empty =
    the base window only)"""
    token_counts: tuple[int, ...] = (16, 10)
    """tokens (last completed bars) per token timeframe, one count per entry of token_timeframes"""

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
    """width of the two hidden layers of the actor and critic heads"""
    d_model: int = 32
    """width of the transformer tokens"""
    n_heads: int = 2
    """attention heads (d_model must divide by it)"""
    n_layers: int = 1
    """transformer blocks per timeframe encoder"""
    ff_size: int = 64
    """feed-forward width inside each transformer block"""
    fusion: str = "attention"
    """cross-timeframe fusion: "attention" (the agent state queries the timeframe summaries) or "gated" """
    amp: str = "off"
    """mixed precision: "off" (fp32), "bf16" (autocast, CPU or CUDA) or "fp16" (autocast + GradScaler, CUDA only);
    weights, optimizer, logits, values and losses stay fp32"""
    compile: bool = False
    """run the network trunk through torch.compile (the first iterations pay the compilation)"""
    compile_backend: str = "inductor"
    """torch.compile backend ("inductor"; "eager" only traces, for tests)"""
    norm_obs: bool = True
    """running mean/variance normalisation of observations (statistics saved with the weights)"""

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


def feature_config(args: Args) -> FeatureConfig:
    """The feature pipeline these arguments ask for."""
    return training.feature_config_from(args)


def cost_model(args: Args) -> CostModel:
    """The cost model these arguments ask for."""
    return cost_model_from(args)


def market_for(args: Args, feature_state: dict | None = None) -> PreparedMarket:
    """The market these arguments ask for (dataset, bar range, stale-open policy, features, ranges)."""
    return training.market_from(args, feature_state)


def check_args(args: Args) -> None:
    """Reject settings that cannot run, naming the argument (before any data is loaded)."""
    if len(args.token_timeframes) != len(args.token_counts):
        raise ValueError(f"token_timeframes {args.token_timeframes} and token_counts {args.token_counts} differ in "
                         "length: give one count per timeframe")
    if args.amp not in AMP_DTYPES:
        raise ValueError(f"amp {args.amp!r} not in {tuple(AMP_DTYPES)}")
    if args.fusion not in FUSIONS:
        raise ValueError(f"fusion {args.fusion!r} not in {FUSIONS}")
    if args.amp == "fp16" and resolve_device(args.device).type != "cuda":
        raise ValueError("amp 'fp16' needs CUDA (fp16 autocast with a GradScaler); use --amp bf16 on CPU")


def env_options(args: Args, market: PreparedMarket) -> dict[str, Any]:
    """Extra env keywords of this variant: the token blocks of ``args.token_timeframes`` on ``market``."""
    if not args.token_timeframes:
        return {}
    return {"token_blocks": build_token_blocks(market, args.token_timeframes, args.token_counts)}


def observation_span(args: Args, market: PreparedMarket) -> int:
    """Base bars before bar t that this variant's observation reads beyond the feature window: the token blocks'
    reach (:func:`sentio_lab.features.tokens.token_span`). The experiment runner sizes its CPCV embargo with it."""
    return token_span(market, args.token_timeframes, args.token_counts) if args.token_timeframes else 0


def make_env(args: Args, market: PreparedMarket, range_name: str = "train") -> TradingEnv:
    """Training env: ``num_envs`` random windows inside the named range.

    On a fold market (purged walk-forward / CPCV, :func:`sentio_lab.market.prepare_fold_market`) the training
    range spans test groups: episodes are then drawn from the fold's training segments only, and none crosses
    a gap between them.
    """
    return training.training_env(args, market, range_name, **env_options(args, market))


def observation_parts(args: Args, obs_dim: int) -> dict[str, slice]:
    """The observation layout an env of ``args`` with observations ``obs_dim`` wide has (the feature count is
    what remains of ``obs_dim`` after the position and the token blocks, divided by the window)."""
    d = token_width()
    tokens = sum(k * d for k in args.token_counts)
    features, rest = divmod(obs_dim - 1 - tokens, args.window)
    if rest or features < 1:
        raise ValueError(f"obs_dim {obs_dim} does not fit window {args.window} + position + token blocks "
                         f"{dict(zip(args.token_timeframes, args.token_counts, strict=True))} of width {d}")
    shapes = [TokenBlock(block_name(rule), np.zeros((1, d), np.float32), np.zeros((1, k), np.int64))
              for rule, k in zip(args.token_timeframes, args.token_counts, strict=True)]
    layout = observation_layout(features, args.window, shapes)
    assert observation_dim(layout) == obs_dim
    return layout


def build_agent(args: Args, obs_dim: int, num_actions: int) -> MultiTimeframeActorCritic:
    """The actor-critic of this variant (evaluation rebuilds it from a checkpoint's args)."""
    layout = observation_parts(args, obs_dim)
    blocks = [(block_name(rule), k, token_width()) for rule, k in zip(args.token_timeframes, args.token_counts,
                                                                      strict=True)]
    return MultiTimeframeActorCritic(
        layout, streams_for(layout, args.window, blocks), num_actions, d_model=args.d_model, heads=args.n_heads,
        layers=args.n_layers, ff=args.ff_size, fusion=args.fusion, hidden=args.hidden_size, norm_obs=args.norm_obs,
    )


def resume_args(given: Args, saved: dict[str, Any], source: str | Path) -> Args:
    """The arguments of a resumed run (:func:`sentio_lab.training.resume_args` with :data:`RUN_CONTROL_FIELDS`)."""
    return training.resume_args(given, saved, source, RUN_CONTROL_FIELDS)


def train(args: Args, *, market: PreparedMarket | None = None, env: Any | None = None) -> TrainResult:
    """Run PPO as ``args`` say; ``market`` / ``env`` may be given to reuse prepared data (tests, benchmarks).

    An ``env`` passed in needs ``obs_dim``, ``num_actions``, ``reset()`` and ``step()`` like
    :class:`TradingEnv` (and ``state_dict()`` when checkpoints are written); without a market no
    checkpoint can be written. Raises :class:`NonFiniteError` when a reward, value, loss or gradient is
    not finite, before any update or save uses it.
    """
    bundle = None
    device_changed = False
    if args.resume:
        bundle = load_checkpoint(args.resume, variant=VARIANT)
        args = resume_args(args, bundle["args"], args.resume)
        device_changed = resume_device(args, bundle)
    else:
        args = derive_sizes(args)
    check_args(args)
    seed_everything(args.seed, args.torch_deterministic)
    device = resolve_device(args.device)

    if env is None:
        if market is None:
            market = market_for(args, bundle["feature_state"] if bundle else None)
            print(market.data.quality)  # read it before trusting fills at the next open (stale opens, zero volume, ...)
        env = make_env(args, market)
    if bundle is not None and market is not None and bundle["data_fingerprint"] != market.data.fingerprint:
        raise CheckpointError(f"--resume {args.resume}: the checkpoint was trained on other data")
    checkpoint_path = None
    if market is not None:
        checkpoint_path = Path(args.checkpoint_path or Path(args.run_dir) / args.run_name / "checkpoint.pt")

    agent = build_agent(args, env.obs_dim, env.num_actions).to(device)
    if args.compile:
        agent.set_compile(True, backend=args.compile_backend)
    # fused: one kernel for all parameters instead of ~10 small ops per tensor (measured ~3x faster step)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    # Mixed precision: autocast runs the trunk's matmuls in bf16 / fp16; parameters and Adam stay fp32. fp16 has
    # too few exponent bits for small gradients, hence the scaler (a no-op object unless amp is "fp16").
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    # Rollout storage
    obs = torch.zeros((args.num_steps, args.num_envs, env.obs_dim), device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)
    episode_return = torch.zeros(args.num_envs, dtype=torch.float64, device=device)

    global_step, start_iteration = 0, 1
    recent_returns: list[float] = []  # log returns of the last 100 finished episodes (for logging)
    if bundle is None:
        next_obs = env.reset()
        next_done = torch.zeros(args.num_envs, device=device)
    else:
        agent.load_state_dict(bundle["agent"])
        optimizer.load_state_dict(bundle["optimizer"])
        scaler.load_state_dict(bundle["scaler"])
        env_state = bundle["env_state"]
        if device_changed:
            # A CUDA generator's state does not fit a CPU generator (and back): a fresh, seeded stream instead.
            generator = torch.Generator(device=device).manual_seed(args.seed + 1_000_003 * bundle["iteration"])
            env_state = {**env_state, "generator": generator.get_state()}
        next_obs = env.load_state_dict(env_state)
        next_done = bundle["extra"]["next_done"].to(device)
        episode_return = bundle["extra"]["episode_return"].to(device)
        recent_returns = list(bundle["extra"]["recent_returns"])
        restore_rng(bundle["rng"])
        global_step, start_iteration = bundle["global_step"], bundle["iteration"] + 1
    last_saved = bundle["iteration"] if bundle is not None else None

    def save(iteration: int) -> Path | None:
        nonlocal last_saved
        if checkpoint_path is None:
            return None
        last_saved = iteration
        return save_checkpoint(checkpoint_path, {
            "variant": VARIANT,
            "args": dataclasses.asdict(args),
            "agent": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
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
                      "recent_returns": list(recent_returns), "device": device.type},
        })

    def non_finite(iteration: int, what: str) -> NonFiniteError:
        # nothing is saved: the checkpoint on disk stays the last good one, never the failed state
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
        for step in range(args.num_steps):
            global_step += args.num_envs
            with torch.no_grad():
                if agent.obs_norm is not None:
                    agent.obs_norm.update(next_obs)
                norm_obs = agent.normalise(next_obs)
                obs[step] = norm_obs
                dones[step] = next_done
                with autocast():
                    action, logprob, _, value = agent.get_action_and_value(norm_obs)
                values[step] = value
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, terminated, truncated, info = env.step(action)
            episode_return += reward
            reward = reward.to(torch.float32) * args.reward_scale
            if bool(truncated.any()):
                # The window ended, the market did not: bootstrap with the value of where we would be next.
                with torch.no_grad(), autocast():
                    final_value = agent.get_value(agent.normalise(info["final_obs"]))
                reward = bootstrap_truncated(reward, final_value, truncated, args.gamma)
            rewards[step] = reward
            done = terminated | truncated
            next_done = done.to(torch.float32)
            if bool(done.any()):
                recent_returns.extend(episode_return[done].tolist())
                recent_returns = recent_returns[-100:]
                episode_return = torch.where(done, 0.0, episode_return)

        # ---- bootstrap value and GAE
        with torch.no_grad():
            with autocast():
                next_value = agent.get_value(agent.normalise(next_obs))
            problem = describe_non_finite(rewards=rewards, values=values, next_value=next_value)
            if problem is not None:
                raise non_finite(iteration, f"the rollout produced non-finite {problem} (index: step, env)")
            gamma, gae_lambda = args.gamma, args.gae_lambda
            advantages, returns = compute_gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda)

        # ---- flatten the batch
        b_obs = obs.reshape((-1, env.obs_dim))
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # ---- optimise policy and value network
        clipfracs = []
        epochs_run = updates_run = skipped = 0
        # exactly num_minibatches per epoch: a remainder of an indivisible batch is left out (Args doc)
        used = args.num_minibatches * args.minibatch_size
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(args.batch_size, device=device)
            for minibatch, start in enumerate(range(0, used, args.minibatch_size)):
                mb_inds = b_inds[start : start + args.minibatch_size]
                # one contiguous gather per tensor (index_select is several times faster than [mb_inds])
                batch = (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values)
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns, mb_values = (
                    x.index_select(0, mb_inds) for x in batch
                )
                with autocast():  # the network's outputs are float32: the losses below are computed in fp32
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions)
                logratio = newlogprob - mb_logprobs
                ratio = logratio.exp()
                with torch.no_grad():
                    old_kl, kl = approx_kl(logratio, ratio)
                    clipfracs.append(clip_fraction(ratio, args.clip_coef).item())

                if args.norm_adv:
                    mb_advantages = normalise_advantages(mb_advantages)
                pg_loss = policy_loss(mb_advantages, ratio, args.clip_coef)
                v_loss = value_loss(newvalue, mb_returns, mb_values, args.clip_coef, args.clip_vloss)
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                # one device sync for both; the optimizer must not step on a NaN / inf (it would poison the weights)
                finite = torch.isfinite(torch.stack((loss.detach(), grad_norm)))
                if scaler.is_enabled() and bool(finite[0]) and not bool(finite[1]):
                    skipped += 1  # pragma: no cover - fp16 (CUDA): scaler.step skips it, lowers the scale
                elif not bool(finite.all()):
                    raise non_finite(iteration, (
                        f"non-finite loss or gradient at epoch {epoch + 1}, minibatch {minibatch + 1}: "
                        f"loss {loss.item()}, gradient norm {grad_norm.item()} (policy loss {pg_loss.item()}, "
                        f"value loss {v_loss.item()}, entropy {entropy_loss.item()})"
                    ))
                scaler.step(optimizer)
                scaler.update()
                updates_run += 1
            epochs_run += 1
            if kl_early_stop(kl, args.target_kl):
                break

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        elapsed = time.time() - start_time
        sps = (global_step - start_step) / max(elapsed, 1e-9)
        record = {
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/episode_log_return": float(np.mean(recent_returns)) if recent_returns else float("nan"),
            "losses/value_loss": v_loss.item(),
            "losses/policy_loss": pg_loss.item(),
            "losses/entropy": entropy_loss.item(),
            "losses/old_approx_kl": old_kl.item(),
            "losses/approx_kl": kl.item(),
            "losses/clipfrac": float(np.mean(clipfracs)),
            "losses/explained_variance": float(explained_var),
            "losses/epochs": epochs_run,
            "losses/updates": updates_run,
            "losses/skipped_updates": skipped,
            "charts/SPS": sps,
            "global_step": global_step,
        }
        history.append(record)
        tracker.log(record, step=global_step)
        progress.update(args.batch_size)
        progress.set_postfix(progress_postfix(sps, recent_returns))

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
        finished=iteration >= args.num_iterations, history=history, market=market,
    )


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo_transformer``."""
    args = tyro.cli(Args)
    try:
        result = train(args)
    except (CheckpointError, NonFiniteError, ValueError) as err:  # the message says it all: no traceback for the user
        raise SystemExit(f"error: {err}") from err
    status = "finished" if result.finished else "stopped early (resume with --resume)"
    print(f"{status} at step {result.global_step}; checkpoint: {result.checkpoint_path}")
    print(agent_report.training_summary(result))


if __name__ == "__main__":
    main()
