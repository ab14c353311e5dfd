"""PPO with action masking on the batched torch trading env: one readable file, modelled on ``ppo.py``.

Run ``python -m sentio_lab.ppo_masked --help``. Everything ``ppo.py`` does (rollout, GAE, truncation bootstrap,
clipped update, checkpoints, exact resume, non-finite stops, resume rules) is done the same way here, line for
line, so that the one difference is easy to see: the policy is a categorical over the *valid* actions only.

* The env's mask rules (:class:`sentio_lab.masks.MaskConfig`: ``--masks.long-only``, ``--masks.cooldown 5``, ...)
  say which position levels the next decision may take; ``env.action_masks()`` returns them after every reset
  and step (auto-resets included).
* Invalid logits are set to the dtype's most negative finite value (:class:`sentio_lab.nets.MaskedCategorical`):
  invalid actions have probability 0, are never sampled, get no gradient, and the entropy bonus counts valid
  actions only. (Huang and Ontanon, 2022, "A Closer Look at Invalid Action Masking in Policy Gradient
  Algorithms": masking beats penalising invalid actions, and its gradient is the valid policy gradient.)
* The mask of every rollout step is stored in the buffer and reused in the update, so the old and the new
  log-probability of an action come from the same (masked) distribution: the PPO ratio is ``pi_new(a | s, m) /
  pi_old(a | s, m)``. Recomputing masks at update time could not work anyway (they depend on episode state).
* ``invalid_action`` is what the env does with an invalid action anyway ("nearest" valid level or "refuse"):
  the sampled actions are valid, so it only matters for other callers; it is recorded with the run.
* With every action valid (no rule on) the run is bit-identical to ``ppo.py`` for the same seed (tested): the
  masked distribution then has the same logits, samples, log-probabilities, entropy and gradients.
* Greedy evaluation applies the same masks (:mod:`sentio_lab.evaluate` builds the env from these arguments).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
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
from sentio_lab.market import PreparedMarket
from sentio_lab.masks import MaskConfig, MaskInputs, market_mask_inputs
from sentio_lab.nets import MLPActorCritic
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

VARIANT = "ppo_masked"


@dataclass
class Args:
    """Command-line arguments of ``python -m sentio_lab.ppo_masked``: ``ppo``'s, plus the mask rules."""

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

    # Action masks (the one addition to ppo's arguments)
    masks: MaskConfig = field(default_factory=MaskConfig)
    """mask rules over the env's state (sentio_lab.masks; every rule off by default: then this is ppo, bit for
    bit); given as --masks.<field>, e.g. --masks.long-only --masks.cooldown 5 --masks.max-abs-level 0.5"""
    invalid_action: str = "nearest"
    """what the env does with an action its masks forbid: "nearest" valid level or "refuse" (an error); the
    policy never samples one, so this only matters to other callers of the same env"""

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
    """width of the two hidden layers of actor and critic"""
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

    def __post_init__(self) -> None:
        """Accept the rules as a plain dict too: that is how a checkpoint stores them (``dataclasses.asdict``)."""
        if isinstance(self.masks, dict):
            self.masks = MaskConfig(**self.masks)
        if self.invalid_action not in ("nearest", "refuse"):
            raise ValueError(f"invalid_action must be 'nearest' or 'refuse', got {self.invalid_action!r}")


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


def mask_config(args: Args) -> MaskConfig:
    """The mask rules these arguments ask for (evaluation builds its env with the same)."""
    return args.masks


def mask_inputs(config: MaskConfig, market: PreparedMarket) -> MaskInputs | None:
    """The series the mask rules read on ``market`` (GARCH fitted on training bars only; the regime column):
    :func:`sentio_lab.masks.market_mask_inputs`, shared with the evaluation so both see the same masks."""
    return market_mask_inputs(config, market)


def make_env(args: Args, market: PreparedMarket, range_name: str = "train") -> TradingEnv:
    """Training env: ``num_envs`` random windows inside the named range.

    On a fold market (purged walk-forward / CPCV, :func:`sentio_lab.market.prepare_fold_market`) the training
    range spans test groups: episodes are then drawn from the fold's training segments only, and none crosses
    a gap between them.
    """
    return training.training_env(
        args, market, range_name, masks=mask_config(args), invalid_action=args.invalid_action,
        mask_inputs=market_mask_inputs(mask_config(args), market, training=range_name == "train"),
    )


def build_agent(args: Args, obs_dim: int, num_actions: int) -> MLPActorCritic:
    """The actor-critic of this variant (evaluation rebuilds it from a checkpoint's args)."""
    return MLPActorCritic(obs_dim, num_actions, hidden=args.hidden_size, norm_obs=args.norm_obs)


def resume_args(given: Args, saved: dict[str, Any], source: str | Path) -> Args:
    """The arguments of a resumed run (:func:`sentio_lab.training.resume_args` with :data:`RUN_CONTROL_FIELDS`)."""
    return training.resume_args(given, saved, source, RUN_CONTROL_FIELDS)


def train(args: Args, *, market: PreparedMarket | None = None, env: Any | None = None) -> TrainResult:
    """Run PPO as ``args`` say; ``market`` / ``env`` may be given to reuse prepared data (tests, benchmarks).

    An ``env`` passed in needs ``obs_dim``, ``num_actions``, ``reset()``, ``step()`` and ``action_masks()`` like
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
    # fused: one kernel for all parameters instead of ~10 small ops per tensor (measured ~3x faster step)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)

    # Rollout storage
    obs = torch.zeros((args.num_steps, args.num_envs, env.obs_dim), device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    # the valid actions of each stored decision: the update scores actions under the mask they were sampled with
    masks = torch.zeros((args.num_steps, args.num_envs, env.num_actions), dtype=torch.bool, device=device)
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
                # the env's masks after its last reset / step (auto-resets included): this decision's valid actions
                masks[step] = mask = env.action_masks().to(device)
                action, logprob, _, value = agent.get_action_and_value(norm_obs, mask=mask)
                values[step] = value
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, terminated, truncated, info = env.step(action)
            episode_return += reward
            reward = reward.to(torch.float32) * args.reward_scale
            if bool(truncated.any()):
                # The window ended, the market did not: bootstrap with the value of where we would be next.
                with torch.no_grad():
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
        b_masks = masks.reshape((-1, env.num_actions))
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # ---- optimise policy and value network
        clipfracs = []
        epochs_run = updates_run = 0
        # exactly num_minibatches per epoch: a remainder of an indivisible batch is left out (Args doc)
        used = args.num_minibatches * args.minibatch_size
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(args.batch_size, device=device)
            for minibatch, start in enumerate(range(0, used, args.minibatch_size)):
                mb_inds = b_inds[start : start + args.minibatch_size]
                # one contiguous gather per tensor (index_select is several times faster than [mb_inds])
                batch = (b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values, b_masks)
                mb_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns, mb_values, mb_masks = (
                    x.index_select(0, mb_inds) for x in batch
                )
                # the rollout's masks, not today's: old and new log-probabilities of the same masked distribution
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions, mask=mb_masks)
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
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                # one device sync for both; the optimizer must not step on a NaN / inf (it would poison the weights)
                if not bool(torch.isfinite(torch.stack((loss.detach(), grad_norm))).all()):
                    raise non_finite(iteration, (
                        f"non-finite loss or gradient at epoch {epoch + 1}, minibatch {minibatch + 1}: "
                        f"loss {loss.item()}, gradient norm {grad_norm.item()} (policy loss {pg_loss.item()}, "
                        f"value loss {v_loss.item()}, entropy {entropy_loss.item()})"
                    ))
                optimizer.step()
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
            "charts/SPS": sps,
            "charts/masked_fraction": float((~masks).float().mean()),
            "global_step": global_step,
        }
        # the env's per-rule counters (cumulative): how often each rule masked the chosen action, and bound at all
        for rule, count in _mask_counts(env, "mask_counts").items():
            record[f"masks/{rule}"] = count
        for rule, count in _mask_counts(env, "mask_binding").items():
            record[f"masks_binding/{rule}"] = count
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


def _mask_counts(env: Any, kind: str) -> dict[str, float]:
    """``env.mask_counts`` (chosen actions a rule masked) or ``env.mask_binding`` (decisions in which it masked a
    level) as ``{rule: count}`` floats for logging (empty when the env keeps none)."""
    counts = getattr(env, kind, None) or {}
    return {str(k): float(torch.as_tensor(v).sum()) for k, v in dict(counts).items()}


def main() -> None:
    """Entry point of ``python -m sentio_lab.ppo_masked``."""
    args = tyro.cli(Args)
    try:
        result = train(args)
    except (CheckpointError, NonFiniteError) as err:  # the message says it all: no traceback for the user
        raise SystemExit(f"error: {err}") from err
    status = "finished" if result.finished else "stopped early (resume with --resume)"
    print(f"{status} at step {result.global_step}; checkpoint: {result.checkpoint_path}")
    print(agent_report.training_summary(result))


if __name__ == "__main__":
    main()
