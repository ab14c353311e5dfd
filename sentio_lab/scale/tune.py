"""Population-based training (and random search) of any registered variant on Ray Tune.

``python -m sentio_lab.scale.tune --variant ppo --variant-args="--window 16" --num-trials 4 --iterations 8`` starts
a local Ray instance (``ray.init`` inside the command: nothing to start by hand, no dashboard, usage stats off) and
runs Ray Tune's :class:`~ray.tune.schedulers.PopulationBasedTraining`; ``--address ray://host:10001`` (or ``auto``)
runs the same thing on an existing Ray cluster, whose nodes must have this package installed.

How a trial works (:func:`trainable`): the variant's own training loop (``variant.train``) runs in Tune
iterations. Every iteration continues the trial's checkpoint bundle with the variant's ``--resume`` for
``steps_per_iteration`` env steps (``--max-iterations``), scores the agent on the **validation** range (the
greedy policy's annualised Sharpe ratio, net of costs: the fitness; the test range is never read during the
search), and hands the bundle to Tune's checkpoint API (``tune.report(..., checkpoint=...)``). When PBT exploits,
Tune restarts the weak trial from the strong trial's checkpoint: the bundle is copied in whole (weights,
optimizer, observation normalisation statistics, env state and every RNG state as saved), and the explore step's
new hyperparameters are written into the copy by :func:`apply_mutation` -- the one, narrow exception to
``--resume``'s rule that a resumed run keeps its experiment arguments: only the :data:`MUTABLE` fields may change,
anything else is refused. The run then continues from there exactly as ``--resume`` would with those values.

``--scheduler random`` runs the same population (the same initial configurations, seeds and number of env steps)
without exploitation: the random-search control at equal compute. Every trial runs
``iterations * steps_per_iteration`` env steps (the learning-rate schedule, when annealed, is over that total).

Afterwards the champion (the trial with the best *last* validation score) is evaluated once on the test range
(:func:`sentio_lab.evaluation.episodes.evaluate_checkpoint`) and reported with the deflated Sharpe ratio over the
set of every validation score the search computed: one per reported (trial, iteration), recorded by our
driver-side :class:`ScoreLog` callback in ``validation_scores.jsonl``, since each is a configuration (weights +
hyperparameters) PBT ranked and could have kept. ``N`` is the size of that set and ``Var[SR_n]`` the sample
variance of its per-period Sharpe ratios (:func:`deflation`). ``summary.json`` and ``trials.csv`` are written
under the experiment folder. An interrupted experiment continues with ``--resume``
(``Tuner.restore``: unfinished and errored trials go on from their last checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import tyro
from ray.tune import Callback

from sentio_lab.agents.arguments import saved_fields
from sentio_lab.agents.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sentio_lab.agents.variants import action_masking, env_options, load_variant
from sentio_lab.evaluation import metrics
from sentio_lab.evaluation.episodes import evaluate_checkpoint, evaluate_policy

#: Hyperparameters PBT may change between iterations of a trial, with the bounds explore steps are clipped to
#: (a perturbation multiplies by 0.8 or 1.2 and could leave e.g. GAE lambda above 1).
MUTABLE: dict[str, tuple[float, float]] = {
    "learning_rate": (1e-5, 3e-3),
    "ent_coef": (0.0, 0.1),
    "clip_coef": (0.05, 0.5),
    "gae_lambda": (0.8, 0.999),
}
CHECKPOINT_FILE = "checkpoint.pt"
METRIC = "validation_sharpe"
SCORES_FILE = "validation_scores.jsonl"


@dataclass
class TuneArgs:
    """Command-line arguments of ``python -m sentio_lab.scale.tune``."""

    variant: str = "ppo"
    """registered variant (sentio_lab.agents.variants.VARIANTS) to train"""
    variant_args: str = ""
    """the variant's own arguments as on its command line, one string: --variant-args="--dataset sp500 --window 16" """
    scheduler: str = "pbt"
    """"pbt" (population-based training) or "random" (the same population without exploitation: random search)"""
    num_trials: int = 4
    """population size (trials run concurrently as CPUs allow)"""
    iterations: int = 8
    """Tune iterations per trial (each one is steps_per_iteration env steps, then a validation score)"""
    steps_per_iteration: int = 16384
    """env steps per Tune iteration (a multiple of the variant's num_envs * num_steps)"""
    perturbation_interval: int = 2
    """PBT exploits / explores every this many iterations"""
    quantile_fraction: float = 0.25
    """PBT: the bottom fraction of trials copies the top fraction (use 0.5 with 2 or 3 trials)"""
    synch: bool = True
    """PBT: wait until every trial reaches the perturbation point before exploiting (Ray's default is asynchronous,
    which never exploited in our 4-trial run on 2 CPUs: the first trials finished before the last ones started)"""
    resample_probability: float = 0.25
    """PBT: chance that an explored hyperparameter is redrawn from its prior instead of perturbed"""
    seed: int = 1
    """trial i is seeded seed + i; the initial hyperparameters are drawn with this seed too"""
    address: str | None = None
    """Ray cluster address ("auto", "ray://host:10001"); None = start a local Ray instance"""
    num_cpus: int | None = None
    """CPUs of the local Ray instance (None = all of this machine's)"""
    cpus_per_trial: float = 1.0
    """CPUs reserved per trial (also its torch threads)"""
    gpus_per_trial: float = 0.0
    """GPUs per trial (pass --variant-args="--device cuda" too)"""
    storage: str = "runs/tune"
    """where Tune keeps experiments (checkpoints, results); the experiment folder is storage/name"""
    name: str = "pbt"
    """experiment name"""
    resume: bool = False
    """continue the interrupted experiment storage/name (Tune's restore) instead of starting a new one"""
    evaluate_champion: bool = True
    """evaluate the champion once on the test range and report its DSR"""
    track: bool = True
    """log every trial and the summary as W&B runs in one group named after the experiment (offline by default:
    files under storage/name/wandb; upload later with `wandb sync`)"""
    wandb_project_name: str = "sentio-lab"
    """W&B project"""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode"""


# ------------------------------------------------------------------------------------------ the trial itself
def apply_mutation(path: str | Path, changes: dict[str, float]) -> dict[str, tuple[Any, Any]]:
    """Write PBT's explored hyperparameters into the checkpoint bundle at ``path``; returns {field: (old, new)}.

    The explicit allowance to ``--resume``'s no-changed-arguments rule: only :data:`MUTABLE` fields may change
    (anything else raises ``ValueError``). Without learning-rate annealing the optimizer's saved learning rate
    is set too (with annealing the variant recomputes it from ``learning_rate`` every iteration). Nothing else in
    the bundle moves, so the run continues from the saved weights, optimizer, normalisation, env and RNG state.
    """
    unknown = set(changes) - set(MUTABLE)
    if unknown:
        raise ValueError(f"PBT may change only {sorted(MUTABLE)}, not {sorted(unknown)}")
    bundle = load_checkpoint(path)
    saved = bundle["args"]  # nested by group, or flat (older bundles): saved_fields finds each field's dict
    changed = {k: (saved_fields(saved, k)[k], v) for k, v in changes.items() if saved_fields(saved, k)[k] != v}
    if not changed:
        return {}
    for name, (_, new) in changed.items():
        saved_fields(saved, name)[name] = new
    if "learning_rate" in changed and not saved_fields(saved, "anneal_lr")["anneal_lr"]:
        for group in bundle["optimizer"]["param_groups"]:
            group["lr"] = changed["learning_rate"][1]
    save_checkpoint(path, bundle)
    return changed


def variant_base(variant_name: str, argv: list[str] | tuple[str, ...]) -> Any:
    """The variant's ``Args`` from its command-line arguments (parsed by the variant's own tyro CLI)."""
    variant = load_variant(variant_name)
    return tyro.cli(variant.Args, args=list(argv)) if argv else variant.Args()


def trial_args(variant_name: str, config: dict[str, Any], checkpoint: Path) -> Any:
    """The variant's ``Args`` for the next Tune iteration of a trial: resume ``checkpoint`` when it exists."""
    base = variant_base(variant_name, config["argv"])
    return base.replace(
        **config["overrides"], **{k: config[k] for k in MUTABLE if k in config}, seed=config["seed"],
        checkpoint_path=str(checkpoint), resume=str(checkpoint) if checkpoint.exists() else None,
        max_iterations=config["variant_iterations"], checkpoint_every=0, track=False, progress=False,
    )


def validation_score(variant_name: str, agent: Any, args: Any, market: Any) -> dict[str, float]:
    """Fitness of an agent: its greedy validation episode net of costs, never the test range (or the variant's own)."""
    own = getattr(variant := load_variant(variant_name), "validation_equity", None)
    equity = own(agent, args, market) if own else evaluate_policy(
        agent, market, window=args.features.window, positions=tuple(args.env.positions), costs=variant.cost_model(args),
        range_name="validation", **action_masking(args), env_options=env_options(args, market)).equity
    returns = metrics.simple_returns(equity)
    per_period = metrics.sharpe_ratio(returns)
    ppy = metrics.periods_per_year(equity.index)
    # a flat policy has no Sharpe ratio; it ranks below every trading one rather than poisoning PBT's ordering
    annual = per_period * math.sqrt(ppy) if np.isfinite(per_period) else -10.0
    return {METRIC: float(annual), "validation_sharpe_per_period": float(per_period),
            "validation_total_return": float(equity.iloc[-1] - 1.0)}


def run_iteration(variant_name: str, config: dict[str, Any], work: Path, market: Any) -> dict[str, Any]:
    """One Tune iteration of a trial outside Ray: explore's changes, ``variant_iterations`` of training, a score."""
    checkpoint = work / CHECKPOINT_FILE
    mutated = {}
    if checkpoint.exists():
        mutated = apply_mutation(checkpoint, {k: config[k] for k in MUTABLE if k in config})
    args = trial_args(variant_name, config, checkpoint)
    result = load_variant(variant_name).train(args, market=market)
    return {**validation_score(variant_name, result.agent, result.args, market),
            "global_step": result.global_step, "finished": result.finished, "mutated": sorted(mutated),
            **{f"hp_{k}": float(getattr(result.args.ppo, k)) for k in MUTABLE}}


def trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: restore the bundle from Tune's checkpoint, train in iterations, report each."""
    from ray import tune

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    variant = load_variant(config["variant"])
    work = Path(tempfile.mkdtemp(prefix="sentio-trial-"))
    restored = tune.get_checkpoint()
    feature_state = None
    if restored is not None:  # a restart, an exploit (another trial's bundle) or Tuner.restore
        with restored.as_directory() as folder:
            shutil.copy(Path(folder) / CHECKPOINT_FILE, work / CHECKPOINT_FILE)
        feature_state = load_checkpoint(work / CHECKPOINT_FILE)["feature_state"]
    market = variant.market_for(trial_args(config["variant"], config, work / CHECKPOINT_FILE), feature_state)
    while True:
        report = run_iteration(config["variant"], config, work, market)
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(work / CHECKPOINT_FILE, Path(folder) / CHECKPOINT_FILE)
            tune.report({k: v for k, v in report.items() if k != "mutated"} | {"mutated": ",".join(report["mutated"])},
                        checkpoint=tune.Checkpoint.from_directory(folder))
        if report["finished"]:
            break


# ------------------------------------------------------------------------------------------ the experiment
def base_arguments(args: TuneArgs) -> dict[str, Any]:
    """What every trial shares: the variant's arguments, the total env steps, absolute paths; checked here.

    Paths are made absolute because Tune runs trials in their own working directories (and, on a cluster, on
    other machines). The variant's arguments travel as its command line and are parsed by its own CLI in the
    trial, so any variant (with nested argument types) works.
    """
    argv = shlex.split(args.variant_args)
    base = variant_base(args.variant, argv)
    batch = base.ppo.num_envs * base.ppo.num_steps
    if args.steps_per_iteration % batch:
        raise ValueError(f"steps_per_iteration={args.steps_per_iteration} is not a multiple of the variant's "
                         f"rollout, num_envs x num_steps = {batch}")
    overrides: dict[str, Any] = {"total_timesteps": args.iterations * args.steps_per_iteration,
                                 "run_dir": str(Path(base.run.run_dir).resolve())}
    if base.features.feature_cache_dir:
        overrides["feature_cache_dir"] = str(Path(base.features.feature_cache_dir).resolve())
    if Path(str(base.data.dataset)).exists():
        overrides["dataset"] = str(Path(base.data.dataset).resolve())
    return {"argv": argv, "overrides": overrides, "variant_iterations": args.steps_per_iteration // batch}


def search_space() -> dict[str, Any]:
    """Initial distributions of the mutable hyperparameters (PBT resamples from them too), log-uniform for rates."""
    from ray import tune

    return {
        "learning_rate": tune.loguniform(5e-5, 1e-3),
        "ent_coef": tune.loguniform(1e-4, 5e-2),
        "clip_coef": tune.uniform(0.1, 0.3),
        "gae_lambda": tune.uniform(0.9, 0.99),
    }


def clip_to_bounds(config: dict[str, Any]) -> dict[str, Any]:
    """PBT's custom explore: keep every mutated hyperparameter inside :data:`MUTABLE`'s bounds."""
    for key, (low, high) in MUTABLE.items():
        if key in config:
            config[key] = float(min(max(config[key], low), high))
    return config


class ScoreLog(Callback):
    """Driver-side record of every validation score: one JSON line per reported (trial, iteration).

    Why our own record rather than Tune's per-trial history (``Result.metrics_dataframe``): that history loses
    rows when PBT exploits (the weak trial's result files are restored over; in a 2-trial, 3-iteration PBT run it
    held 3 of the 6 scores). This callback sees every ``tune.report`` on the driver (so on a cluster too) and
    appends, so a ``--resume`` adds to the first run's lines.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """Append the trial's id, iteration and scores of this report."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        line = {"trial_id": trial.trial_id, "training_iteration": result.get("training_iteration"),
                METRIC: result.get(METRIC), "validation_sharpe_per_period": result.get("validation_sharpe_per_period")}
        with open(self.path, "a") as file:
            file.write(json.dumps(line) + "\n")


def score_histories(path: str | Path) -> dict[str, pd.DataFrame]:
    """:class:`ScoreLog`'s file as one table per trial id (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    table = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line])
    return {trial_id: rows.reset_index(drop=True) for trial_id, rows in table.groupby("trial_id", sort=False)}


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a local Ray instance (no dashboard, no usage stats); False if already up."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # pragma: no cover -- the tests share one session started by their fixture
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def make_tuner(args: TuneArgs, trainable_fn: Any = trainable) -> Any:
    """The Ray Tune ``Tuner`` of this experiment (new, or restored with ``args.resume``)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    if args.scheduler not in ("pbt", "random"):
        raise ValueError(f"scheduler must be 'pbt' or 'random', got {args.scheduler!r}")
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    wrapped = tune.with_resources(trainable_fn, resources)
    storage = str(Path(args.storage).resolve())
    path = Path(storage) / args.name
    if args.resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {path}")
        return tune.Tuner.restore(str(path), wrapped, resume_unfinished=True, resume_errored=True)
    (path / SCORES_FILE).unlink(missing_ok=True)  # a new experiment under this name: the old scores are not its own
    base = base_arguments(args)
    space = search_space()
    param_space = {
        "variant": args.variant, "argv": base["argv"], "overrides": base["overrides"],
        "variant_iterations": base["variant_iterations"],
        "threads": max(1, int(args.cpus_per_trial)),
        "seed": tune.grid_search([args.seed + i for i in range(args.num_trials)]),
        **space,
    }
    if args.scheduler == "pbt":
        scheduler = PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=args.perturbation_interval,
            hyperparam_mutations=space, quantile_fraction=args.quantile_fraction,
            resample_probability=args.resample_probability, custom_explore_fn=clip_to_bounds, synch=args.synch,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        wrapped, param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, num_samples=1,
                                    search_alg=BasicVariantGenerator(random_state=args.seed), reuse_actors=True),
        run_config=tune.RunConfig(name=args.name, storage_path=storage, verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                                  callbacks=[ScoreLog(path / SCORES_FILE)],
                                  stop={"training_iteration": args.iterations}),
    )


def validation_scores(histories: Any) -> np.ndarray:
    """Per-period validation Sharpe ratio of every scored (trial, iteration): the rows of every trial's history.

    ``histories`` are the trials' score tables (:func:`score_histories`: one row per ``tune.report``, kept
    across exploits and restores; ``None`` or empty for a trial that never reported). Every row counts, the
    last one of a trial as much as the earlier ones: PBT ranks the population on each of them, so each is a
    configuration the search looked at on the validation range. A flat policy's score is NaN (it has no
    Sharpe ratio) and is kept here as NaN: it was scored all the same.
    """
    scores = [history["validation_sharpe_per_period"].to_numpy(dtype=float) for history in histories
              if history is not None and not history.empty and "validation_sharpe_per_period" in history]
    return np.concatenate(scores) if scores else np.empty(0)


def deflation(returns: pd.Series, scores: np.ndarray) -> dict[str, Any]:
    """Deflated Sharpe ratio of the champion's test ``returns`` against the search's validation ``scores``.

    ``scores`` are :func:`validation_scores`. ``N`` (``dsr_n_trials``) is the number of scores, every scored
    (trial, iteration), at least 2; ``Var[SR_n]`` (``dsr_sr_variance``) is the sample variance (ddof=1) of the
    finite ones. The two sets differ only by the flat-policy scores (``dsr_flat_scores``): they count as trials
    in ``N`` (the search did try them, which can only make the deflation stricter) but have no Sharpe ratio to
    enter the variance. With fewer than 2 finite scores or zero variance the DSR is undefined (None).
    """
    scores = np.asarray(scores, dtype=float)
    finite = scores[np.isfinite(scores)]
    n_trials = max(len(scores), 2)
    variance = float(np.var(finite, ddof=1)) if len(finite) >= 2 else None
    dsr = None
    if variance is not None and variance > 0:
        dsr = float(metrics.deflated_sharpe_ratio(returns, n_trials=n_trials, sr_variance=variance))
    return {"dsr": dsr, "dsr_n_trials": n_trials, "dsr_sr_variance": variance,
            "dsr_flat_scores": int(len(scores) - len(finite)),
            "dsr_trial_set": "every (trial, iteration) validation score of the search"}


def summarise(results: Any, args: TuneArgs, folder: Path, wall_s: float) -> dict[str, Any]:
    """Write ``trials.csv`` and ``summary.json`` (champion on test once, DSR over every scored iteration)."""
    rows, logged = [], score_histories(folder / SCORES_FILE)
    for result in results:
        history = result.metrics_dataframe
        metrics_ = result.metrics or {}
        rows.append({
            "trial": os.path.basename(result.path), "seed": result.config.get("seed"),
            "status": "error" if result.error else "ok", METRIC: metrics_.get(METRIC),
            "best_validation_sharpe": None if history is None or history.empty else float(history[METRIC].max()),
            "validation_sharpe_per_period": metrics_.get("validation_sharpe_per_period"),
            "iterations": metrics_.get("training_iteration"), "global_step": metrics_.get("global_step"),
            "validation_scores": len(validation_scores([logged.get(metrics_.get("trial_id"))])),
            **{k: result.config.get(k) for k in MUTABLE},
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
        })
    table = pd.DataFrame(rows)
    scores = validation_scores(logged.values())
    # Tune's own record of PBT: one line per exploit + explore, i.e. one more configuration scored
    log = folder / "pbt_global.txt"
    explores = len(log.read_text().splitlines()) if log.exists() else 0
    configurations = len(table) + explores
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "trials.csv", index=False)
    scored = table.dropna(subset=[METRIC])
    summary: dict[str, Any] = {
        "scheduler": args.scheduler, "variant": args.variant, "num_trials": len(table),
        "iterations": args.iterations, "steps_per_iteration": args.steps_per_iteration,
        "env_steps_total": int(table["global_step"].fillna(0).sum()), "wall_s": wall_s,
        # distinct hyperparameter configurations (trials + explore steps); the DSR's N is validation_scores
        "configurations_scored": configurations, "pbt_explore_steps": explores,
        "validation_scores": int(len(scores)),
        "fitness": "validation range, greedy policy, net of costs",
        "best_validation_sharpe_last": None if scored.empty else float(scored[METRIC].max()),
        "best_validation_sharpe_any_iteration": None if scored.empty else float(table["best_validation_sharpe"].max()),
    }
    if args.evaluate_champion and not scored.empty:
        champion = scored.loc[scored[METRIC].idxmax()]
        champion_path = folder / "champion.pt"
        shutil.copy(Path(champion["checkpoint"]) / CHECKPOINT_FILE, champion_path)
        test = evaluate_checkpoint(champion_path, "test")  # the one look at the test range
        returns = metrics.simple_returns(test.equity)
        ppy = metrics.periods_per_year(test.equity.index)
        summary["champion"] = {
            "trial": champion["trial"], "validation_sharpe": float(champion[METRIC]),
            "test_sharpe": float(metrics.sharpe_ratio(returns) * math.sqrt(ppy)),
            "test_total_return": float(test.equity.iloc[-1] - 1.0),
            "test_range": f"{test.equity.index[0]:%Y-%m-%d} .. {test.equity.index[-1]:%Y-%m-%d}",
            **{k: float(champion[k]) for k in MUTABLE},
        }
        summary["champion"].update(deflation(returns, scores))
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def log_tune(results: Any, args: TuneArgs, folder: Path, summary: dict[str, Any]) -> None:
    """W&B runs of a finished search, in group ``args.name`` under ``folder/wandb``.

    One ``job_type="train"`` run per trial (``<name>__<trial>``): its seed and last hyperparameters as config,
    every validation score :class:`ScoreLog` recorded for it as history (in report order), its ``trials.csv`` row
    as summary. One ``job_type="evaluate"`` run ``<name>__summary``: ``trials.csv`` as a ``wandb.Table``,
    ``summary.json`` as summary (``champion/...`` for the champion's test figures and DSR), the champion's
    checkpoint as a ``model`` artifact and the summary files as a ``results`` artifact.
    """
    from sentio_lab.agents.tracking import Tracker

    def tracker(name: str, job_type: str, config: dict[str, Any]) -> Tracker:
        return Tracker(True, project=args.wandb_project_name, run_name=f"{args.name}__{name}", config=config,
                       run_dir=folder, mode=args.wandb_mode, group=args.name, job_type=job_type)

    histories = score_histories(folder / SCORES_FILE)
    table = pd.read_csv(folder / "trials.csv")
    search = {"variant": args.variant, "variant_args": args.variant_args, "scheduler": args.scheduler}
    for result, row in zip(results, table.to_dict("records"), strict=True):
        run = tracker(str(row["trial"]), "train", {**search, "seed": row["seed"], **{k: row[k] for k in MUTABLE}})
        history = histories.get((result.metrics or {}).get("trial_id"))
        for step, scored in enumerate([] if history is None else history.to_dict("records"), start=1):
            run.log({k: scored[k] for k in (METRIC, "validation_sharpe_per_period", "training_iteration")}, step=step)
        run.log_summary({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})
        run.finish()
    run = tracker("summary", "evaluate", {**search, "num_trials": args.num_trials, "iterations": args.iterations})
    run.log_table("trials", table)
    champion = summary.get("champion", {})
    run.log_summary({**{k: v for k, v in summary.items() if k != "champion"},
                     **{f"champion/{k}": v for k, v in champion.items()}})
    if champion and (folder / "champion.pt").exists():
        run.log_artifact(folder / "champion.pt", name=f"{run.run.id}-champion", type="model",
                         metadata={"trial": champion["trial"]})
    run.log_artifact([folder / "summary.json", folder / "trials.csv"], name=f"{run.run.id}-files", type="results")
    run.finish()


def run_tune(args: TuneArgs, trainable_fn: Any = trainable) -> dict[str, Any]:
    """Run (or resume) the experiment on Ray and summarise it; see the module docstring."""
    if not args.resume:
        base_arguments(args)  # refuse bad arguments before starting Ray
    init_ray(args.address, args.num_cpus)
    tuner = make_tuner(args, trainable_fn)
    start = time.time()
    results, folder = tuner.fit(), Path(args.storage).resolve() / args.name
    summary = summarise(results, args, folder, time.time() - start)
    if args.track and args.wandb_mode != "disabled":
        log_tune(results, args, folder, summary)
    return summary


def main() -> None:
    """Entry point of ``python -m sentio_lab.scale.tune``."""
    args = tyro.cli(TuneArgs)
    try:
        print(json.dumps(run_tune(args), indent=2, default=str))
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
