"""PBT on Ray Tune: narrow mutation of bundles, exact continuation after an exploit, end to end, restore."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab import ppo
from sentio_lab.agents.arguments import RUN_CONTROL_FIELDS
from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.tracking import read_offline_run
from sentio_lab.agents.variants import VARIANTS, load_variant
from sentio_lab.evaluation import metrics
from sentio_lab.scale import tune as T

TINY = ("--num-envs 8 --num-steps 16 --hidden-size 8 --window 16 --episode-length 64 --num-minibatches 2 "
        "--update-epochs 1")
STEPS = 256  # two variant iterations per Tune iteration


def _config(tmp_path: Path, iterations: int = 3, **hps) -> dict:
    args = T.TuneArgs(variant_args=f"{TINY} --run-dir {tmp_path / 'runs'}", iterations=iterations,
                      steps_per_iteration=STEPS)
    hp = {"learning_rate": 3e-4, "ent_coef": 0.01, "clip_coef": 0.2, "gae_lambda": 0.95, **hps}
    return {"variant": "ppo", **T.base_arguments(args), "seed": 3, **hp}


@pytest.fixture(scope="module")
def market():
    args = ppo.Args.from_flat(window=16)
    return load_variant("ppo").market_for(args)


def _bundle_equal(a: dict, b: dict, skip_args: tuple[str, ...] = ()) -> None:
    for key in ("agent",):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][k][n]) for n, v in state.items())
    assert a["rng"]["python"] == b["rng"]["python"] and a["rng"]["numpy"] == b["rng"]["numpy"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["env_state"]["generator"], b["env_state"]["generator"])
    skip = set(skip_args) | RUN_CONTROL_FIELDS  # where the checkpoint is, not what it holds
    flat_a, flat_b = (ppo.Args.from_dict(bundle["args"]).flat() for bundle in (a, b))
    assert {k: v for k, v in flat_a.items() if k not in skip} == {k: v for k, v in flat_b.items() if k not in skip}


def test_apply_mutation_is_narrow_and_keeps_the_state(tmp_path, market):
    config = _config(tmp_path)
    config["argv"] = [*config["argv"], "--no-anneal-lr"]
    work = tmp_path / "a"
    work.mkdir()
    T.run_iteration("ppo", config, work, market)
    path = work / T.CHECKPOINT_FILE
    before = load_checkpoint(path)
    with pytest.raises(ValueError, match="only"):
        T.apply_mutation(path, {"learning_rate": 1e-3, "num_envs": 4})
    assert T.apply_mutation(path, {"learning_rate": 3e-4, "gae_lambda": 0.95}) == {}  # unchanged: file untouched
    changed = T.apply_mutation(path, {"learning_rate": 1e-3, "gae_lambda": 0.9, "clip_coef": 0.2})
    assert changed == {"learning_rate": (3e-4, 1e-3), "gae_lambda": (0.95, 0.9)}
    after = load_checkpoint(path)
    _bundle_equal(before, after, skip_args=("learning_rate", "gae_lambda"))
    assert after["args"]["ppo"]["learning_rate"] == 1e-3 and after["args"]["ppo"]["gae_lambda"] == 0.9
    # no annealing: the optimizer would otherwise keep stepping with the saved learning rate
    assert [g["lr"] for g in after["optimizer"]["param_groups"]] == [1e-3]
    # ppo's own --resume refuses the changed value unless the bundle was rewritten: the allowance is only here
    mine = ppo.Args.from_flat(learning_rate=5e-4, resume=str(path))
    with pytest.raises(Exception, match="learning_rate"):
        ppo.resume_args(mine, before["args"], path)


def test_exploit_continues_from_the_copied_checkpoint_exactly(tmp_path, market):
    donor, weak = tmp_path / "donor", tmp_path / "weak"
    donor.mkdir()
    weak.mkdir()
    config = _config(tmp_path, iterations=4)
    T.run_iteration("ppo", config, donor, market)
    T.run_iteration("ppo", config, donor, market)
    shutil.copy(donor / T.CHECKPOINT_FILE, weak / T.CHECKPOINT_FILE)  # what Tune's exploit hands the weak trial
    saved = load_checkpoint(weak / T.CHECKPOINT_FILE)
    donor_next = T.run_iteration("ppo", config, donor, market)
    # exploit without a change: the weak trial's next iteration is the donor's own, bit for bit
    weak_next = T.run_iteration("ppo", dict(config), weak, market)
    assert weak_next == donor_next
    _bundle_equal(load_checkpoint(donor / T.CHECKPOINT_FILE), load_checkpoint(weak / T.CHECKPOINT_FILE))
    # exploit and explore: the bundle resumed is the saved one but for the mutated fields
    explored = tmp_path / "explored"
    explored.mkdir()
    shutil.copy(weak / T.CHECKPOINT_FILE, explored / T.CHECKPOINT_FILE)
    restored = load_checkpoint(explored / T.CHECKPOINT_FILE)
    assert saved["global_step"] == 2 * STEPS and restored["global_step"] == 3 * STEPS
    loop = T.run_iteration("ppo", {**config, "ent_coef": 0.02, "clip_coef": 0.25}, explored, market)
    assert loop["mutated"] == ["clip_coef", "ent_coef"] and loop["hp_ent_coef"] == 0.02
    assert loop["global_step"] == 4 * STEPS and loop != weak_next


def _history(*per_period: float) -> pd.DataFrame:
    return pd.DataFrame({"validation_sharpe_per_period": per_period, T.METRIC: np.nan_to_num(per_period, nan=-10.0),
                         "training_iteration": range(1, len(per_period) + 1)})


def test_dsr_variance_and_n_are_over_every_scored_iteration():
    histories = [_history(0.01, -0.02, 0.05), _history(0.03, np.nan, 0.04), None, pd.DataFrame()]
    scores = T.validation_scores(histories)
    # every reported (trial, iteration), in order, the flat one (NaN) included; silent trials add nothing
    np.testing.assert_array_equal(scores, [0.01, -0.02, 0.05, 0.03, np.nan, 0.04])
    returns = pd.Series(np.random.default_rng(0).normal(0.002, 0.01, 500))
    out = T.deflation(returns, scores)
    every = [0.01, -0.02, 0.05, 0.03, 0.04]
    assert out["dsr_n_trials"] == 6 and out["dsr_flat_scores"] == 1
    assert out["dsr_sr_variance"] == pytest.approx(np.var(every, ddof=1))
    assert out["dsr"] == pytest.approx(metrics.deflated_sharpe_ratio(returns, n_trials=6,
                                                                      sr_variance=np.var(every, ddof=1)))
    # not the old set (each trial's last score only), whose variance here is ~15x smaller
    last_only = metrics.deflated_sharpe_ratio(returns, n_trials=6, trial_sharpes=[0.05, 0.04])
    assert out["dsr"] != pytest.approx(last_only)
    # undefined without two finite scores or with no spread; N is at least 2
    assert T.deflation(returns, np.array([0.01, np.nan]))["dsr"] is None
    assert T.deflation(returns, np.array([0.02, 0.02, 0.02]))["dsr"] is None
    assert T.deflation(returns, np.empty(0)) | {"dsr_trial_set": ""} == {
        "dsr": None, "dsr_n_trials": 2, "dsr_sr_variance": None, "dsr_flat_scores": 0, "dsr_trial_set": ""}


def test_summarise_writes_the_dsr_over_every_scored_iteration(tmp_path, monkeypatch):
    # summarise on stand-ins for Tune's results (no Ray run); the champion's test evaluation is faked
    folder = tmp_path / "exp"
    log = T.ScoreLog(folder / T.SCORES_FILE)

    def result(name: str, history: pd.DataFrame):
        trial = tmp_path / name
        trial.mkdir()
        (trial / T.CHECKPOINT_FILE).write_text("bundle")
        for row in history.to_dict("records"):  # what Tune hands the callback at every report
            log.on_trial_result(0, [], SimpleNamespace(trial_id=name), row | {"trial_id": name})
        last = history.iloc[-1].to_dict() | {"global_step": 3 * STEPS, "trial_id": name}
        # Tune's own history may have lost rows (it does after a PBT exploit): summarise must not read it
        return SimpleNamespace(path=str(trial), config={"seed": 1, **dict.fromkeys(T.MUTABLE, 0.1)}, error=None,
                               metrics=last, metrics_dataframe=history.tail(1),
                               checkpoint=SimpleNamespace(path=str(trial)))

    results = [result("a", _history(0.01, -0.02, 0.05)), result("b", _history(0.03, np.nan, 0.04))]
    assert list(T.score_histories(folder / T.SCORES_FILE)) == ["a", "b"] and T.score_histories(tmp_path / "no") == {}
    index = pd.date_range("2024-01-01", periods=300, freq="D")
    equity = pd.Series(np.cumprod(1 + np.random.default_rng(1).normal(0.001, 0.01, 300)), index=index)
    monkeypatch.setattr(T, "evaluate_checkpoint", lambda path, range_name: SimpleNamespace(equity=equity))
    summary = T.summarise(results, T.TuneArgs(scheduler="random"), folder, 1.0)
    assert summary["validation_scores"] == 6 and summary["configurations_scored"] == 2
    champion = json.loads((folder / "summary.json").read_text())["champion"]
    assert champion["trial"] == "a" and champion["dsr_n_trials"] == 6 and champion["dsr_flat_scores"] == 1
    assert champion["dsr_sr_variance"] == pytest.approx(np.var([0.01, -0.02, 0.05, 0.03, 0.04], ddof=1))
    expected = T.deflation(metrics.simple_returns(equity), np.array([0.01, -0.02, 0.05, 0.03, np.nan, 0.04]))
    assert champion["dsr"] == pytest.approx(expected["dsr"]) and 0 <= champion["dsr"] <= 1
    assert pd.read_csv(folder / "trials.csv")["validation_scores"].tolist() == [3, 3]

    # W&B: a train run per trial with every validation score, an evaluate run with the table and the champion
    (folder / "champion.pt").write_text("champion bundle")
    T.log_tune(results, T.TuneArgs(scheduler="random", name="exp"), folder, summary)
    runs = {run.name: run for run in map(read_offline_run, (folder / "wandb").glob("offline-run-*"))}
    assert sorted(runs) == ["exp__a", "exp__b", "exp__summary"] and {r.group for r in runs.values()} == {"exp"}
    a = runs["exp__a"]
    assert a.job_type == "train" and a.config["seed"] == 1 and a.config["learning_rate"] == 0.1
    assert [row["validation_sharpe_per_period"] for row in a.history[:3]] == [0.01, -0.02, 0.05]
    assert a.summary["validation_scores"] == 3 and a.summary["global_step"] == 3 * STEPS
    assert np.isnan(runs["exp__b"].history[1]["validation_sharpe_per_period"])  # the flat policy's score, kept
    done = runs["exp__summary"]
    assert done.job_type == "evaluate" and done.summary["trials"]["nrows"] == 2
    assert done.summary["champion/dsr"] == champion["dsr"] and done.summary["champion/trial"] == "a"
    (staged,) = done.artifacts["exp__summary-champion"]["files"].values()
    assert open(staged).read() == "champion bundle"


def test_clip_to_bounds_and_bad_inputs(tmp_path):
    clipped = T.clip_to_bounds({"gae_lambda": 1.1, "learning_rate": 1e-9, "ent_coef": 0.01, "other": 5})
    assert clipped == {"gae_lambda": 0.999, "learning_rate": 1e-5, "ent_coef": 0.01, "other": 5}
    with pytest.raises(ValueError, match="multiple"):
        T.base_arguments(T.TuneArgs(variant_args=TINY, steps_per_iteration=100))
    with pytest.raises(ValueError, match="scheduler"):
        T.make_tuner(T.TuneArgs(scheduler="bayes"))
    with pytest.raises(FileNotFoundError, match="restore"):
        T.make_tuner(T.TuneArgs(resume=True, storage=str(tmp_path), name="none"))
    base = T.base_arguments(T.TuneArgs(variant_args=f"{TINY} --dataset {Path('tests/conftest.py')}",
                                       steps_per_iteration=STEPS))
    assert Path(base["overrides"]["dataset"]).is_absolute()


# ------------------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert T.init_ray(None, None) is False  # the command reuses a running session
    yield ray
    ray.shutdown()


def _tune_args(tmp_path: Path, **kw) -> T.TuneArgs:
    fields = {"variant_args": TINY, "num_trials": 2, "iterations": 4, "steps_per_iteration": STEPS,
              "perturbation_interval": 1, "quantile_fraction": 0.5, "storage": str(tmp_path / "tune"), **kw}
    return T.TuneArgs(**fields)


@pytest.mark.slow
def test_pbt_end_to_end_on_local_ray(tmp_path, ray_session, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run_dir / caches are made absolute before the trials change directory
    Path("runs").mkdir()
    summary = T.run_tune(_tune_args(tmp_path, name="pbt", iterations=3, synch=True))
    folder = tmp_path / "tune" / "pbt"
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "ok").all()
    assert (trials["iterations"] == 3).all()
    # PBT exploited and explored (synch: every trial reaches each perturbation point): Tune's log has the steps
    explores = len((folder / "pbt_global.txt").read_text().splitlines())
    assert explores >= 1 and summary["pbt_explore_steps"] == explores
    assert summary["configurations_scored"] == 2 + explores
    champion = summary["champion"]
    assert champion["validation_sharpe"] == pytest.approx(trials["validation_sharpe"].max())
    # the DSR's set: every (trial, iteration) validation score, one per reported iteration of each trial
    assert champion["dsr_n_trials"] == summary["validation_scores"] == trials["validation_scores"].sum() == 2 * 3
    assert champion["dsr_trial_set"].startswith("every (trial, iteration)")
    assert champion["dsr"] is None or 0 <= champion["dsr"] <= 1
    assert (folder / "champion.pt").exists() and champion["test_range"].startswith("20")
    assert json.loads((folder / "summary.json").read_text())["scheduler"] == "pbt"


def _crashing_trainable(marker: str):
    def crashing(config):
        import ray.tune

        real, count = ray.tune.report, [0]

        def report(metrics, checkpoint=None):
            real(metrics, checkpoint=checkpoint)
            count[0] += 1
            if count[0] == 2 and not Path(marker).exists():
                Path(marker).write_text("crashed")
                raise RuntimeError("killed")

        ray.tune.report = report
        T.trainable(config)

    return crashing


@pytest.mark.slow
def test_random_search_killed_then_restored_through_tune(tmp_path, ray_session):
    trainable = _crashing_trainable(str(tmp_path / "crashed"))
    args = _tune_args(tmp_path, name="random", scheduler="random", num_trials=1, iterations=3,
                      evaluate_champion=False)
    first = T.run_tune(args, trainable)
    trials = pd.read_csv(tmp_path / "tune" / "random" / "trials.csv")
    assert (trials["status"] == "error").all() and (trials["global_step"] == 2 * STEPS).all()
    assert "champion" not in first
    restored = T.run_tune(_tune_args(tmp_path, name="random", scheduler="random", num_trials=1, iterations=3,
                                     resume=True, evaluate_champion=False), trainable)
    trials = pd.read_csv(tmp_path / "tune" / "random" / "trials.csv")
    assert (trials["status"] == "ok").all() and (trials["iterations"] == 3).all()
    # continued from the last checkpoint (step 512 -> 768), not restarted from zero
    assert (trials["global_step"] == 3 * STEPS).all() and restored["env_steps_total"] == 3 * STEPS
    # the score log kept the first run's two reports and added the resumed one
    assert restored["validation_scores"] == 3 and (trials["validation_scores"] == 3).all()


def test_trainable_reports_checkpoints_and_restarts_from_one(tmp_path, monkeypatch):
    # the Ray function trainable itself, in this process, with Tune's session calls replaced by recorders
    from ray import tune as ray_tune

    reports, kept = [], tmp_path / "kept"
    restored: list = [None]

    def report(metrics, checkpoint=None):
        with checkpoint.as_directory() as folder:
            target = kept / str(len(reports))
            shutil.copytree(folder, target)
        reports.append((metrics, target))

    monkeypatch.setattr(ray_tune, "report", report)
    monkeypatch.setattr(ray_tune, "get_checkpoint", lambda: restored[0])
    config = {**_config(tmp_path, iterations=2), "threads": 1}
    T.trainable(config)
    assert [m["global_step"] for m, _ in reports] == [STEPS, 2 * STEPS] and reports[-1][0]["finished"]
    assert reports[0][0]["mutated"] == "" and set(reports[0][0]) >= {T.METRIC, "hp_learning_rate"}
    # a restart from the first checkpoint (what an exploit or Tuner.restore hands over) goes on from step 256
    restored[0] = ray_tune.Checkpoint.from_directory(str(reports[0][1]))
    T.trainable({**config, "learning_rate": 5e-4})
    assert reports[-1][0]["global_step"] == 2 * STEPS and reports[-1][0]["mutated"] == "learning_rate"
    assert reports[-1][0][T.METRIC] != reports[1][0][T.METRIC]


def test_main_reports_errors_without_a_traceback(monkeypatch):
    monkeypatch.setattr("sys.argv", ["sentio_lab.scale.tune", f"--variant-args={TINY}", "--steps-per-iteration", "100"])
    with pytest.raises(SystemExit, match="error: steps_per_iteration=100"):
        T.main()


# ppo_transformer works the same way (checked by hand) but prepares its token blocks for minutes on this machine;
# ppo_portfolio's Tune metric (a single-asset validation Sharpe) has no portfolio form yet
@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"ppo_transformer", "ppo_portfolio"}))
def test_every_registered_variant_trains_in_iterations_and_takes_a_mutation(tmp_path, variant):
    args = T.TuneArgs(variant=variant, variant_args=f"{TINY} --run-dir {tmp_path / 'runs'}", iterations=2,
                      steps_per_iteration=STEPS)
    config = {"variant": variant, **T.base_arguments(args), "seed": 3, "learning_rate": 3e-4, "ent_coef": 0.01,
              "clip_coef": 0.2, "gae_lambda": 0.95}
    module = load_variant(variant)
    market = module.market_for(T.trial_args(variant, config, tmp_path / T.CHECKPOINT_FILE))
    first = T.run_iteration(variant, config, tmp_path, market)
    second = T.run_iteration(variant, {**config, "ent_coef": 0.02}, tmp_path, market)
    assert (first["global_step"], second["global_step"]) == (STEPS, 2 * STEPS) and second["finished"]
    assert second["mutated"] == ["ent_coef"] and np.isfinite(second[T.METRIC])
    assert load_checkpoint(tmp_path / T.CHECKPOINT_FILE)["variant"] == variant
