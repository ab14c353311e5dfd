"""The scaffolding around every variant's training loop: start or resume, checkpoints, logging, stops, the CLI.

A variant's ``train`` reads top to bottom as the algorithm (rollout, advantages, update); what every variant does
the same way around it lives here once:

* :func:`start_run` -- load and check the bundle of ``--resume`` (the resume rules of
  :func:`sentio_lab.agents.training.resume_args`) or derive a fresh run's sizes, seed the generators, prepare the market
  (printing its data-quality report) and the env, and choose the checkpoint path;
* :meth:`TrainingRun.restore` -- the loop state of a fresh run or of the bundle (weights, optimizer, env, RNG,
  counters; under torchrun fresh per-rank episodes);
* :meth:`TrainingRun.save` -- one checkpoint bundle (rank 0 only);
* :meth:`TrainingRun.non_finite` -- the error that stops a run before a NaN reaches the weights, leaving the last
  good checkpoint as it was;
* :meth:`TrainingRun.log`, :meth:`TrainingRun.stop_or_checkpoint`, :meth:`TrainingRun.finish` -- W&B and the
  progress bar, the wall-clock / iteration budgets and periodic checkpoints, the final save;
* checkpoint selection (``--select-on``, :mod:`sentio_lab.agents.selection`): :meth:`TrainingRun.stop_or_checkpoint`
  scores the greedy agent on the validation range (:func:`validation_scores`) when due, keeps the best state and
  stops when patience runs out; the state travels in every checkpoint, and :meth:`TrainingRun.finish` hands back
  the selected agent;
* :func:`run_cli` -- the ``main()`` of every variant: parse with tyro, train, print one line per error.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro

from sentio_lab.agents.checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from sentio_lab.agents.progress import tqdm  # text bar under papermill (set_progress_mode)
from sentio_lab.agents.rollout import NonFiniteError, describe_non_finite
from sentio_lab.agents.selection import Selection, selection_from
from sentio_lab.agents.tracking import Tracker
from sentio_lab.agents.training import (
    TrainResult,
    cost_model_from,
    derive_sizes,
    progress_postfix,
    resolve_device,
    resume_args,
    resume_device,
    seed_everything,
)
from sentio_lab.agents.variants import action_masking, env_options
from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation import agent_report
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.evaluation.metrics import sharpe_ratio
from sentio_lab.evaluation.run_summary import log_run_outcome
from sentio_lab.features.regime import RegimeFitError
from sentio_lab.scale import distributed
from sentio_lab.scale.distributed import DistContext


@dataclass
class LoopState:
    """What the loop carries from one iteration to the next (and a checkpoint saves)."""

    next_obs: torch.Tensor
    next_done: torch.Tensor
    episode_return: torch.Tensor
    recent_returns: list[float] = field(default_factory=list)
    """log returns of the last 100 finished episodes (for logging)"""
    global_step: int = 0
    start_iteration: int = 1


@dataclass
class TrainingRun:
    """One invocation of a variant's ``train``: its arguments, device, process group, market, env and bundle."""

    variant: str
    args: Any
    device: torch.device
    ctx: DistContext
    n_envs: int
    """episodes this rank steps (``num_envs`` in one process)"""
    env: Any
    market: PreparedMarket | None
    bundle: dict[str, Any] | None
    checkpoint_path: Path | None
    fresh_envs: bool
    device_changed: bool
    last_saved: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    tracker: Any = None
    progress: Any = None
    start_time: float = 0.0
    start_step: int = 0
    elapsed: float = 0.0
    invocation_iterations: int = 0
    selection: Selection | None = None
    """checkpoint selection on validation (``--select-on``); None when off"""
    agent: Any = None
    """the agent being trained (set by :meth:`restore`): what selection scores and keeps"""

    @property
    def local_batch(self) -> int:
        """Steps of one rollout on this rank (``batch_size`` in one process)."""
        return self.args.ppo.num_steps * self.n_envs

    @property
    def minibatch_size(self) -> int:
        """Samples per minibatch on this rank (each rank shuffles and splits its own batch)."""
        size = self.local_batch // self.args.ppo.num_minibatches
        if size < 1:
            raise ValueError(f"--num-minibatches {self.args.ppo.num_minibatches} > this rank's batch of "
                             f"{self.local_batch} steps")
        return size

    def anneal_learning_rate(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """With ``anneal_lr``, set the learning rate of ``iteration`` (linear from ``learning_rate`` to 0)."""
        ppo = self.args.ppo
        if ppo.anneal_lr:
            for group in optimizer.param_groups:  # AdamW (--weight-decay) has a group without decay
                group["lr"] = (1.0 - (iteration - 1.0) / ppo.num_iterations) * ppo.learning_rate

    def minibatches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """One epoch's ``(minibatch number, sample indices)``: a fresh permutation of this rank's batch, cut into
        exactly ``num_minibatches`` (the remainder of an indivisible batch is left out, as CleanRL's floor does)."""
        size = self.minibatch_size
        b_inds = torch.randperm(self.local_batch, device=self.device)
        for minibatch, start in enumerate(range(0, self.args.ppo.num_minibatches * size, size)):
            yield minibatch, b_inds[start : start + size]

    def end_episodes(self, state: LoopState, done: torch.Tensor) -> None:
        """Bookkeeping of the episodes that ended at this step: their log returns join ``recent_returns`` (the last
        100 are kept), their running returns restart at 0."""
        if bool(done.any()):
            state.recent_returns = (state.recent_returns + state.episode_return[done].tolist())[-100:]
            state.episode_return = torch.where(done, 0.0, state.episode_return)

    def check_rollout(self, iteration: int, **tensors: torch.Tensor) -> None:
        """Stop (every rank together) when a rollout tensor holds a NaN / inf, before GAE or an update uses it."""
        problem = describe_non_finite(**tensors)
        if distributed.any_rank(problem is not None, self.ctx, self.device):
            problem = problem or "values on another rank"
            raise self.non_finite(iteration, f"the rollout produced non-finite {problem} (index: step, env)")

    def check_update(self, iteration: int, epoch: int, minibatch: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                     scaled: bool = False, **losses: torch.Tensor) -> bool:
        """Stop before the optimizer steps on a NaN / inf loss or gradient (it would poison the weights); one device
        sync for both. ``scaled`` (an fp16 ``GradScaler``): an infinite gradient of a finite loss is the scaler's
        overflow, skipped by ``scaler.step``: returns True then. ``losses`` name the parts the message shows."""
        finite = torch.isfinite(torch.stack((loss.detach(), grad_norm)))
        if scaled and bool(finite[0]) and not bool(finite[1]):
            return True  # pragma: no cover - fp16 needs CUDA
        if not bool(finite.all()):
            parts = ", ".join(f"{name.replace('_', ' ')} {value.item()}" for name, value in losses.items())
            raise self.non_finite(iteration, (
                f"non-finite loss or gradient at epoch {epoch + 1}, minibatch {minibatch + 1}: "
                f"loss {loss.item()}, gradient norm {grad_norm.item()} ({parts})"
            ))
        return False

    def restore(self, agent: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LoopState:
        """The loop state to start from: a reset env, or the bundle's weights, optimizer, env, RNG and counters.

        A bundle's env / RNG state resumes exactly only in the world size of one it was written in; otherwise
        (written by, or resumed into, several ranks) the run goes on from its weights, optimizer, normalisation and
        step counter with fresh, seeded episodes on every rank.
        """
        bundle, device = self.bundle, self.device
        self.agent = agent
        state = LoopState(next_obs=torch.zeros(0), next_done=torch.zeros(self.n_envs, device=device),
                          episode_return=torch.zeros(self.n_envs, dtype=torch.float64, device=device))
        if bundle is None or self.fresh_envs:
            state.next_obs = self.env.reset()
        if bundle is not None:
            agent.load_state_dict(bundle["agent"])
            optimizer.load_state_dict(bundle["optimizer"])
            state.global_step, state.start_iteration = bundle["global_step"], bundle["iteration"] + 1
            if self.selection is not None and bundle.get("selection") is not None:
                self.selection.load_state_dict(bundle["selection"])
                if self.selection.stopped:  # patience ran out: the run is over, a resume trains no further
                    state.start_iteration = self.args.ppo.num_iterations + 1
        if bundle is not None and not self.fresh_envs:
            env_state = bundle["env_state"]
            if self.device_changed:
                # A CUDA generator's state does not fit a CPU generator (and back): a fresh, seeded stream instead.
                seed = self.args.run.seed + 1_000_003 * bundle["iteration"]
                env_state = {**env_state, "generator": torch.Generator(device=device).manual_seed(seed).get_state()}
            state.next_obs = self.env.load_state_dict(env_state)
            extra = bundle["extra"]
            state.next_done = extra["next_done"].to(device)
            state.episode_return = extra["episode_return"].to(device)
            state.recent_returns = list(extra["recent_returns"])
            restore_rng(bundle["rng"])
        self.last_saved = bundle["iteration"] if bundle is not None else None
        if self.ctx.enabled:
            distributed.broadcast_module(agent, self.ctx)  # identical weights and statistics on every rank
            # distinct action-sampling and minibatch streams per rank (the weights were drawn with the same seed)
            torch.manual_seed(distributed.rank_seed(self.args.run.seed, self.ctx.rank)
                              + 1_000_003 * (state.start_iteration - 1))
        self.tracker = Tracker(
            self.args.tracking.track and self.ctx.is_main, project=self.args.tracking.wandb_project_name,
            run_name=self.args.run.run_name, config=self.args.config(), run_dir=self.args.run.run_dir,
            mode=self.args.tracking.wandb_mode,
        )
        ppo = self.args.ppo
        self.progress = tqdm(total=ppo.num_iterations * ppo.batch_size, initial=state.global_step, unit="step",
                             disable=not self.args.run.progress or not self.ctx.is_main, dynamic_ncols=True)
        self.start_time, self.start_step = time.time(), state.global_step
        return state

    def save(self, iteration: int, agent: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LoopState,
             extra: dict[str, Any] | None = None, **items: Any) -> Path | None:
        """Write the checkpoint bundle of ``iteration`` (rank 0 only; every rank holds the same weights); ``extra``
        joins the bundle's ``extra`` (the variant's own loop state), ``items`` its top level."""
        if self.checkpoint_path is None or not self.ctx.is_main:
            return None
        self.last_saved = iteration
        market = self.market
        return save_checkpoint(self.checkpoint_path, {
            "variant": self.variant,
            "args": dataclasses.asdict(self.args),
            "agent": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            **items,
            "feature_state": market.features.state,
            "feature_names": market.features.names,
            "rng": capture_rng(),
            "env_state": self.env.state_dict(),
            "global_step": state.global_step,
            "iteration": iteration,
            "data_fingerprint": market.data.fingerprint,
            "data_name": market.data.name,
            "data_quality": None if market.data.quality is None else market.data.quality.to_dict(),
            **({"selection": self.selection.state_dict()} if self.selection is not None else {}),
            "extra": {"next_done": state.next_done.cpu(), "episode_return": state.episode_return.cpu(),
                      "recent_returns": list(state.recent_returns), "device": self.device.type,
                      **(extra or {}), **({"world_size": self.ctx.world_size} if self.ctx.enabled else {})},
        })

    def non_finite(self, iteration: int, what: str) -> NonFiniteError:
        """The error that stops the run at ``iteration``; nothing is saved, so the checkpoint on disk stays the last
        good one, never the failed state."""
        self.progress.close()
        self.tracker.finish()
        kept = (f"the last good checkpoint, {self.checkpoint_path} (iteration {self.last_saved}), is left as it was"
                if self.last_saved is not None else "no checkpoint was written")
        return NonFiniteError(f"iteration {iteration}: {what}; stopped before using it ({kept})")

    def record(self, state: LoopState, optimizer: torch.optim.Optimizer, losses: dict[str, torch.Tensor],
               clipfracs: list[float], values: torch.Tensor, returns: torch.Tensor, epochs: int,
               updates: int) -> dict[str, float]:
        """The scalars every variant logs after an update (``losses``: name -> last minibatch's value, logged as
        ``losses/<name>``); the variant adds its own."""
        recent = state.recent_returns
        return {
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/episode_log_return": float(np.mean(recent)) if recent else float("nan"),
            **{f"losses/{name}": value.item() for name, value in losses.items()},
            "losses/clipfrac": float(np.mean(clipfracs)),
            "losses/explained_variance": explained_variance(values, returns),
            "losses/epochs": epochs,
            "losses/updates": updates,
            "charts/SPS": self.steps_per_second(state.global_step),
            "global_step": state.global_step,
        }

    def steps_per_second(self, global_step: int) -> float:
        """Env steps per second of this invocation so far (the clock the time budget reads too)."""
        self.elapsed = time.time() - self.start_time
        return (global_step - self.start_step) / max(self.elapsed, 1e-9)

    def log(self, record: dict[str, float], state: LoopState, postfix: dict[str, str] | None = None) -> None:
        """Keep ``record`` in the history, send it to W&B and move the progress bar (``postfix`` adds to the
        bar's steps/s and recent return)."""
        self.history.append(record)
        self.tracker.log(record, step=state.global_step)
        self.progress.update(self.args.ppo.batch_size)
        self.progress.set_postfix({**progress_postfix(record["charts/SPS"], state.recent_returns), **(postfix or {})})

    def stop_or_checkpoint(self, iteration: int, save: Callable[[int], Any]) -> bool:
        """True when this invocation's wall-clock or iteration budget is spent (every rank together); otherwise
        save every ``checkpoint_every`` iterations (the last iteration is saved by :meth:`finish`)."""
        run = self.args.run
        self.invocation_iterations += 1
        if self.selection is not None and self.selection.due(iteration, self.args.ppo.num_iterations):
            if self.select(iteration):
                return True
        out_of_time = run.time_budget_s is not None and self.elapsed >= run.time_budget_s
        out_of_time = distributed.any_rank(out_of_time, self.ctx, self.device)  # rank clocks differ
        out_of_iterations = run.max_iterations is not None and self.invocation_iterations >= run.max_iterations
        if out_of_time or out_of_iterations:
            return True
        if run.checkpoint_every and iteration % run.checkpoint_every == 0 and iteration < self.args.ppo.num_iterations:
            save(iteration)
        return False

    def select(self, iteration: int) -> bool:
        """Score the agent of ``iteration`` on validation and update the selection (logged as ``selection/*``,
        beside the iteration's record); True when patience has run out."""
        selection = self.selection
        scores = validation_scores(self.agent, self.args, self.market)
        stop = selection.update(iteration, scores, self.agent)
        scalars = {**{f"selection/{name}": value for name, value in scores.items()},
                   "selection/best_iteration": float(selection.best_iteration or 0)}
        if self.history:
            self.history[-1].update(scalars)
            self.tracker.log(scalars, step=int(self.history[-1]["global_step"]))
        return stop

    def finish(self, iteration: int, save: Callable[[int], Path | None], agent: torch.nn.Module, state: LoopState,
               result_type: type[TrainResult] = TrainResult, **result_items: Any) -> TrainResult:
        """Close the bar, save the last iteration, close W&B; the :class:`~sentio_lab.agents.training.TrainResult`."""
        self.progress.close()
        # a resumed run with nothing left to do (finished) leaves its checkpoint file untouched and logs no outcome
        ran = iteration >= state.start_iteration
        saved_path = save(iteration) if ran else Path(self.args.run.resume)
        selection = self.selection
        if selection is not None and selection.best_state is not None:  # the selected agent is the result
            agent.load_state_dict(selection.best_state)
            result_items.setdefault("selection", selection.summary())
        if ran:  # evaluation summary, report and checkpoint to W&B
            log_run_outcome(self.tracker, agent, self.args, self.market, saved_path)
        self.tracker.finish()
        return result_type(
            agent=agent, args=self.args, checkpoint_path=saved_path, global_step=state.global_step,
            finished=iteration >= self.args.ppo.num_iterations or (selection is not None and selection.stopped),
            history=self.history, market=self.market,
            **result_items,
        )


def start_run(
    variant: str,
    args: Any,
    *,
    market: PreparedMarket | None,
    env: Any | None,
    market_for: Callable[[Any, dict | None], PreparedMarket],
    make_env: Callable[[Any, PreparedMarket], Any],
    distributed_ok: bool = False,
    check: Callable[[Any], None] | None = None,
) -> TrainingRun:
    """Resume or start a run of ``variant``: its arguments, seeds, device, market (data quality printed) and env.

    ``distributed_ok``: the variant runs data parallel under torchrun (``ppo``); otherwise it ignores the process
    group. ``check`` rejects the run's arguments before any data is loaded (a ``ValueError`` naming the flag).
    Raises :class:`~sentio_lab.agents.checkpoint.CheckpointError` for a bundle of another variant or other data.
    """
    bundle = None
    device_changed = False
    if args.run.resume:
        bundle = load_checkpoint(args.run.resume, variant=variant)
        args = resume_args(args, bundle["args"], args.run.resume)
        device_changed = resume_device(args, bundle)
    else:
        args = derive_sizes(args)
    if check is not None:
        check(args)
    seed_everything(args.run.seed, args.run.torch_deterministic)
    device = resolve_device(args.run.device)
    # Data parallel under torchrun (sentio_lab.scale.distributed): this rank steps num_envs / world_size of the
    # episodes.
    # In a world of one every distributed.* call is the identity and n_envs == num_envs.
    ctx = distributed.context() if distributed_ok else DistContext()
    n_envs = distributed.local_envs(args.ppo.num_envs, ctx)
    fresh_envs = bundle is not None and (ctx.enabled or bundle["extra"].get("world_size", 1) > 1)
    if env is None:
        if market is None:
            market = market_for(args, bundle["feature_state"] if bundle else None)
            if ctx.is_main:  # read it before trusting fills at the next open (stale opens, ...), progress bar or not
                print(market.data.quality)
        if ctx.enabled or fresh_envs:
            resumed_at = bundle["iteration"] if bundle else 0
            env_seed = distributed.rank_seed(args.run.seed, ctx.rank) + 1_000_003 * resumed_at
            env = make_env(args.replace(num_envs=n_envs, seed=env_seed), market)
        else:
            env = make_env(args, market)
    if bundle is not None and market is not None and bundle["data_fingerprint"] != market.data.fingerprint:
        raise CheckpointError(f"--resume {args.run.resume}: the checkpoint was trained on other data")
    selection = selection_from(args.run)
    if selection is not None and (market is None or "validation" not in market.splits
                                  or len(range(*market.range("validation"))) < 2):
        raise ValueError(f"--select-on {args.run.select_on} needs a validation range: give --validation-fraction > 0 "
                         "(on a fold, the experiment's validation_bars), or --select-on none")
    checkpoint_path = None
    if market is not None:
        checkpoint_path = Path(args.run.checkpoint_path or Path(args.run.run_dir) / args.run.run_name / "checkpoint.pt")
    return TrainingRun(variant=variant, args=args, device=device, ctx=ctx, n_envs=n_envs, env=env, market=market,
                       bundle=bundle, checkpoint_path=checkpoint_path, fresh_envs=fresh_envs,
                       device_changed=device_changed, selection=selection)


def validation_scores(agent: torch.nn.Module, args: Any, market: PreparedMarket) -> dict[str, float]:
    """Every criterion of :data:`sentio_lab.agents.selection.CRITERIA` for the greedy ``agent`` over ``market``'s
    validation range, net of the run's costs, under its masks and observation options (the evaluation code of
    every report). The random generators are left exactly as they were, so scoring never changes the training
    that follows (a run with selection trains the same weights as one without)."""
    rng = capture_rng()
    was_training = agent.training
    agent.eval()  # greedy, no dropout
    try:
        evaluation = evaluate_policy(agent, market, window=args.features.window, positions=tuple(args.env.positions),
                                     costs=cost_model_from(args), range_name="validation", **action_masking(args),
                                     env_options=env_options(args, market))
    finally:
        agent.train(was_training)
        restore_rng(rng)
    equity = evaluation.equity.to_numpy(dtype=np.float64)
    returns = equity[1:] / equity[:-1] - 1.0
    sharpe = sharpe_ratio(returns) if len(returns) >= 2 else float("nan")
    return {"validation_sharpe": 0.0 if np.isnan(sharpe) else sharpe,  # an agent that never moves scores 0
            "validation_log_return": float(np.log(equity[-1] / equity[0]))}


def rollout_storage(num_steps: int, n_envs: int, obs_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Zeroed rollout buffers, (step, env) each: observations (and their width), actions, log-probabilities,
    rewards, dones and values."""
    obs = torch.zeros((num_steps, n_envs, obs_dim), device=device)
    actions = torch.zeros((num_steps, n_envs), dtype=torch.long, device=device)
    return (obs, actions, *(torch.zeros((num_steps, n_envs), device=device) for _ in range(4)))


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over a flattened batch (NaN when the returns do not vary)."""
    y_pred, y_true = values.cpu().numpy(), returns.cpu().numpy()
    var_y = np.var(y_true)
    return float(np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y)


#: Errors a user can fix from the command line (data, arguments, a refused checkpoint, a non-finite stop, an HMM fit
#: that failed on the data): printed as one line (without ``--debug``).
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, NonFiniteError, RegimeFitError, ValueError)


def run_cli(
    args_type: type,
    train: Callable[[Any], TrainResult],
    prog: str,
    argv: list[str] | None = None,
    distributed_ok: bool = False,
) -> TrainResult | None:
    """The ``main()`` of a variant: parse its ``Args`` (grouped ``--help``, choices checked up front), train, report.

    A data or argument error (:data:`USER_ERRORS`: ``ValueError`` and its subclasses from :mod:`sentio_lab.data`, a
    refused checkpoint, a non-finite stop, a failed regime fit) prints one line, ``error: <message>``, and exits
    with status 1; ``--debug`` shows the traceback instead. ``distributed_ok``: join the torchrun process group
    (``ppo``).
    """
    args = tyro.cli(args_type, args=argv, prog=prog)
    ctx = distributed.init_from_env(args.run.device) if distributed_ok else DistContext()
    try:
        result = train(args)
    except USER_ERRORS as err:
        if args.run.debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message's own layout
        raise SystemExit(f"error: {message} (--debug shows the traceback)") from err
    finally:
        if distributed_ok:
            distributed.shutdown()
    if ctx.is_main:
        status = "finished" if result.finished else "stopped early (resume with --resume)"
        print(f"{status} at step {result.global_step}; checkpoint: {result.checkpoint_path}")
        print(agent_report.training_summary(result))  # validation against buy-and-hold, never the test range
    return result
