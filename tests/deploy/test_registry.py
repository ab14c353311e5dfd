"""The model registry (issue 21 s2) on a SQLite file in tmp_path: register with tags and artifacts, the champion gate
(refusals name the failed condition), aliases, retire, resolve, the command line and W&B artifacts."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab import ppo
from sentio_lab.deploy import registry
from sentio_lab.deploy.export import BundleError, export_bundle, load_bundle
from sentio_lab.deploy.registry import (
    PromotionRefused,
    list_versions,
    main,
    model_version,
    promote,
    register,
    resolve,
    retire,
)
from sentio_lab.deploy.verdict import Gate, Verdict, verdict_from_checkpoint, verdict_from_experiment
from sentio_lab.evaluation.metrics import summary_stats

GOOD = Verdict(median_sharpe=1.2, dsr=0.9, pbo=0.1, spa_p_value=0.01, spa_reverse_p_value=0.7,
               benchmark="buy_and_hold", source="test: good", placebo_gap=0.8)
#: Worse than its benchmark by the reverse SPA test and DSR below 0.5.
BAD = Verdict(median_sharpe=-0.5, dsr=0.2, pbo=0.6, spa_p_value=0.9, spa_reverse_p_value=0.01,
              benchmark="buy_and_hold", source="test: bad")
#: Passes SPA, fails only the DSR.
LOW_DSR = Verdict(median_sharpe=0.3, dsr=0.4, pbo=math.nan, spa_p_value=0.3, spa_reverse_p_value=0.5,
                  benchmark="buy_and_hold", source="test: low dsr")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny ppo checkpoint, its bundle, a report folder and an empty registry URI (shared: MLflow is slow)."""
    folder = tmp_path_factory.mktemp("registry")
    args = ppo.Args.from_flat(total_timesteps=8 * 16, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=1,
                              window=8, episode_length=24, hidden_size=8, track=False, progress=False,
                              checkpoint_every=0, run_name="tiny", run_dir=str(folder / "runs"),
                              feature_cache_dir=str(folder / "cache"))
    with torch.random.fork_rng():
        checkpoint = ppo.train(args).checkpoint_path
    bundle = export_bundle(checkpoint, folder / "bundle")
    report = folder / "report"
    report.mkdir()
    (report / "report.html").write_text("<p>report</p>")
    return {"checkpoint": checkpoint, "bundle": bundle, "report": report,
            "uri": f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}", "folder": folder}


@pytest.fixture(scope="module")
def versions(setup):
    """Versions 1 (good verdict), 2 (bad) and 3 (low DSR, registered as challenger) of model "m"."""
    uri = setup["uri"]
    made = [register(setup["bundle"], "m", verdict=GOOD, report=setup["report"], registry_uri=uri),
            register(setup["bundle"], "m", verdict=BAD, report=setup["report"] / "report.html", registry_uri=uri),
            register(setup["bundle"], "m", verdict=LOW_DSR, report=setup["report"], registry_uri=uri,
                     alias="challenger")]
    return [str(v.version) for v in made]


def test_a_version_is_tagged_and_carries_bundle_report_and_verdict(setup, versions):
    version = model_version("m", versions[0], registry_uri=setup["uri"])
    bundle = load_bundle(setup["bundle"])
    tags = version.tags
    assert tags["variant"] == "ppo" and tags["data_fingerprint"] == bundle.data_fingerprint
    assert tags["feature_state_hash"] == bundle.config["feature_state_hash"]
    assert tags["git_commit"] == bundle.config["code_version"]["git_commit"] and len(tags["git_commit"]) == 40
    assert tags["status"] == "registered" and "wandb_run_id" not in tags
    assert Verdict.from_tags(tags) == GOOD
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=setup["uri"])
    listed = {a.path for a in client.list_artifacts(version.run_id)}
    assert listed == {"bundle", "report", "verdict.json"}
    assert {a.path for a in client.list_artifacts(version.run_id, "bundle")} >= {
        "bundle/model.onnx", "bundle/checkpoint.pt", "bundle/manifest.json", "bundle/config.json"}
    assert version.source.endswith("/bundle")


def test_the_gate_refuses_a_worse_version_naming_each_failed_condition(setup, versions):
    uri = setup["uri"]
    promote("m", versions[0], registry_uri=uri)
    with pytest.raises(PromotionRefused) as refused:
        promote("m", versions[1], registry_uri=uri)
    message = str(refused.value)
    assert "SPA: worse than its benchmark buy_and_hold (reverse SPA p = 0.010 < 0.05)" in message
    assert "DSR 0.200 is not above 0.5" in message
    with pytest.raises(PromotionRefused) as refused:
        promote("m", versions[2], registry_uri=uri)
    assert "DSR 0.400 is not above 0.5" in str(refused.value) and "SPA" not in str(refused.value)
    assert str(model_version("m", "champion", registry_uri=uri).version) == versions[0]  # the champion stayed
    # the gate is configurable: a lower DSR bar lets version 3 through, extra conditions can be declared
    with pytest.raises(PromotionRefused, match=r"PBO nan is not below 0.5"):
        promote("m", versions[2], gate=Gate(min_dsr=0.3, max_pbo=0.5), registry_uri=uri)
    promoted = promote("m", versions[2], gate=Gate(min_dsr=0.3), registry_uri=uri)
    assert "champion" in promoted.aliases
    promote("m", versions[0], registry_uri=uri)  # back


def test_gate_conditions():
    assert Gate().failures(GOOD) == []
    # not beating the benchmark (SPA p = 0.3) is not being worse than it (reverse p = 0.5): only the DSR fails
    assert Gate().failures(LOW_DSR) == ["DSR 0.400 is not above 0.5"]
    missing = Verdict(median_sharpe=1.0, dsr=math.nan, pbo=math.nan, spa_p_value=math.nan,
                      spa_reverse_p_value=math.nan, benchmark="", source="")
    assert Gate().failures(missing) == ["SPA: no SPA result in the verdict", "DSR nan is not above 0.5"]
    assert Gate(spa_alpha=None, min_dsr=None).failures(BAD) == []
    assert Gate(min_sharpe=0.0).failures(BAD)[-1] == "median Sharpe -0.500 is not above 0.0"
    at_bar = dict(GOOD.__dict__, dsr=0.5, spa_reverse_p_value=0.05)
    assert Gate().failures(Verdict(**at_bar)) == ["DSR 0.500 is not above 0.5"]  # DSR strictly above, p at alpha ok


def test_aliases_and_resolve(setup, versions):
    uri, cache = setup["uri"], setup["folder"] / "downloads"
    promote("m", versions[0], registry_uri=uri)  # its own champion: no reliance on another test's order or worker
    champion = resolve("models:/m@champion", registry_uri=uri, cache=cache)
    assert champion == cache / "m" / versions[0] / "bundle"
    assert load_bundle(champion).manifest == load_bundle(setup["bundle"]).manifest
    challenger = resolve("models:/m@challenger", registry_uri=uri, cache=cache)
    assert challenger.parent.name == versions[2]
    assert resolve(f"models:/m/{versions[1]}", registry_uri=uri, cache=cache).parent.name == versions[1]
    assert resolve(setup["checkpoint"]) == Path(setup["checkpoint"])
    assert resolve(str(setup["bundle"])) == Path(setup["bundle"])
    # a damaged download is fetched again; a damaged registry copy is refused
    (champion / "model.onnx").write_bytes(b"garbage")
    again = resolve("models:/m@champion", registry_uri=uri, cache=cache)
    assert load_bundle(again).manifest == load_bundle(setup["bundle"]).manifest
    with pytest.raises(LookupError, match="no alias 'nobody'"):
        resolve("models:/m@nobody", registry_uri=uri, cache=cache)
    with pytest.raises(LookupError, match="no version '99'"):
        resolve("models:/m/99", registry_uri=uri, cache=cache)
    with pytest.raises(LookupError, match="'unknown'"):
        resolve("models:/unknown@champion", registry_uri=uri, cache=cache)
    with pytest.raises(ValueError, match="not a model URI"):
        resolve("models:/m", registry_uri=uri)
    with pytest.raises(FileNotFoundError, match="no such model bundle"):
        resolve(setup["folder"] / "missing")


def test_a_damaged_registry_bundle_is_refused(setup):
    uri = setup["uri"]
    version = register(setup["bundle"], "damaged", verdict=GOOD, report=setup["report"], registry_uri=uri)
    stored = Path(version.source.removeprefix("file://"))
    data = bytearray((stored / "checkpoint.pt").read_bytes())
    data[100] ^= 0xFF
    (stored / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checkpoint\.pt does not match its manifest"):
        resolve("models:/damaged/1", registry_uri=uri, cache=setup["folder"] / "downloads")


def test_retire(setup, versions):
    uri = setup["uri"]
    retired = retire("m", versions[2], registry_uri=uri)
    assert retired.aliases == [] and retired.tags["status"] == "retired"
    with pytest.raises(LookupError, match="challenger"):
        model_version("m", "challenger", registry_uri=uri)
    with pytest.raises(PromotionRefused, match="retired"):
        promote("m", versions[2], "challenger", registry_uri=uri)
    assert [str(v.version) for v in list_versions("m", registry_uri=uri)] == versions


def test_retiring_the_champion_leaves_none(setup):
    uri = setup["uri"]
    register(setup["bundle"], "solo", verdict=GOOD, report=setup["report"], registry_uri=uri)
    promote("solo", 1, registry_uri=uri)
    assert resolve("models:/solo@champion", registry_uri=uri, cache=setup["folder"] / "downloads").is_dir()
    retire("solo", 1, registry_uri=uri)
    with pytest.raises(LookupError, match="no alias 'champion'"):
        resolve("models:/solo@champion", registry_uri=uri)


def test_register_arguments_are_checked(setup):
    with pytest.raises(ValueError, match="promote to champion"):
        register(setup["bundle"], "m", verdict=GOOD, alias="champion", registry_uri=setup["uri"])
    with pytest.raises(ValueError, match="alias 'best'"):
        promote("m", 1, "best", registry_uri=setup["uri"])
    with pytest.raises(FileNotFoundError, match="no such report"):
        register(setup["bundle"], "m", verdict=GOOD, report=setup["folder"] / "nothing", registry_uri=setup["uri"])


def test_command_line(setup, versions, capsys):
    uri = setup["uri"]
    promote("m", versions[0], registry_uri=uri)  # its own champion: no reliance on another test's order or worker
    main(["--registry-uri", uri, "list", "m"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith(f"m v{versions[0]} [champion] registered ppo: median Sharpe 1.20")
    main(["--registry-uri", uri, "show", "m", "champion"])
    out = capsys.readouterr().out
    assert "verdict.dsr: 0.9" in out and "feature_state_hash:" in out and "source: " in out
    with pytest.raises(SystemExit) as exit_:
        main(["--registry-uri", uri, "promote", "m", versions[1]])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: m version 2 not promoted to champion: SPA: worse") and err.count("\n") == 1
    # the gate's flags: with both conditions off version 2 goes through
    main(["--registry-uri", uri, "promote", "m", versions[1], "--spa-alpha", "-1", "--min-dsr", "-1"])
    assert capsys.readouterr().out.startswith(f"promoted m v{versions[1]} [champion]")
    main(["--registry-uri", uri, "promote", "m", versions[0]])
    capsys.readouterr()
    main(["--registry-uri", uri, "promote", "m", versions[1], "--alias", "challenger"])  # no gate for challenger
    assert "[challenger]" in capsys.readouterr().out
    main(["--registry-uri", uri, "retire", "m", versions[1]])
    assert "retired" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--registry-uri", uri, "show", "m", "42"])
    assert "no version '42'" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_register_as_a_subprocess(setup, tmp_path, capsys):
    verdict = tmp_path / "verdict.json"
    verdict.write_text(json.dumps({**GOOD.__dict__, "source": "a file"}))
    uri = setup["uri"]
    done = subprocess.run([sys.executable, "-m", "sentio_lab.deploy.registry", "--registry-uri", uri, "register",
                           str(setup["bundle"]), "cli", "--verdict", str(verdict), "--report", str(setup["report"]),
                           "--challenger"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("registered cli v1 [challenger] registered ppo")
    main(["--registry-uri", uri, "list", "cli"])
    assert capsys.readouterr().out.startswith("cli v1 [challenger] registered ppo: median Sharpe 1.20")


def test_verdict_files(tmp_path):
    path = tmp_path / "verdict.json"
    path.write_text(json.dumps({"median_sharpe": 1.0, "dsr": 0.7, "pbo": None, "spa_p_value": 0.02,
                                "spa_reverse_p_value": 0.9, "benchmark": "buy_and_hold"}))
    verdict = Verdict.from_json(path)
    assert math.isnan(verdict.pbo) and verdict.source == str(path) and verdict.placebo_gap is None
    assert Verdict.from_tags(verdict.to_tags()).dsr == 0.7
    path.write_text(json.dumps({"median_sharpe": 1.0, "sharp": 2.0}))
    with pytest.raises(ValueError, match=r"unknown verdict field\(s\) \['sharp'\]"):
        Verdict.from_json(path)


# ------------------------------------------------------------------------------------------ verdict sources
BARS = pd.bdate_range("2015-01-02", periods=500)


def experiment_folder(folder: Path, edge: float, placebo: bool = False) -> Path:
    """An experiment's results / equity files: agent "a" with a daily ``edge`` over the market, 2 seeds x 3 paths,
    against buy-and-hold; with ``placebo`` a memorisation table whose placebo in-sample Sharpe is about 0."""
    rng = np.random.default_rng(0)
    market = rng.normal(0.0003, 0.01, len(BARS))
    curves, results, memo = [], [], []
    for name, kind, seeds in (("a", "agent", (1, 2)), ("buy_and_hold", "baseline", (-1,))):
        for seed in seeds:
            for path in range(3):
                rets = market + (edge + rng.normal(0, 0.001, len(BARS)) if kind == "agent" else 0.0)
                rets[0] = 0.0
                equity = pd.Series(np.cumprod(1 + rets), index=BARS)
                curves.append(pd.DataFrame({"name": name, "seed": seed, "path": path, "timestamp": BARS,
                                            "equity": equity.to_numpy()}))
                stats = summary_stats(equity, pd.Series(1.0, index=BARS[:-1]))
                results.append({"kind": kind, "name": name, "seed": seed, "path": path, "n_trials": 1, **stats})
                if kind == "agent":
                    for run_kind, sharpe in (("agent", 2.0 + path), ("placebo", 0.1 * path)):
                        for part in ("in_sample", "validation", "test"):
                            memo.append({"kind": run_kind, "name": "a", "seed": seed, "fold": path, "part": part,
                                         "sharpe": sharpe, "max_drawdown": -0.1, "turnover_per_year": 1.0,
                                         "entropy": 0.5, "low_confidence_share": 0.1, "decisions": 100})
    folder.mkdir()
    pd.concat(curves, ignore_index=True).to_parquet(folder / "equity.parquet")
    pd.DataFrame(results).to_parquet(folder / "results.parquet")
    if placebo:
        pd.DataFrame(memo).to_parquet(folder / "memorisation.parquet")
    return folder


def test_verdict_from_an_experiment_passes_or_fails_the_gate(tmp_path):
    from sentio_lab.experiment.memorisation import FLOOR_QUANTILE

    strong = verdict_from_experiment(experiment_folder(tmp_path / "strong", 0.002, placebo=True), reps=200)
    weak = verdict_from_experiment(experiment_folder(tmp_path / "weak", -0.003), "a", reps=200)
    assert strong.benchmark == "buy_and_hold" and "strong" in strong.source
    assert strong.dsr > 0.9 and strong.spa_p_value < 0.05 and strong.spa_reverse_p_value > 0.5
    assert Gate().failures(strong) == []
    assert weak.spa_reverse_p_value < 0.05 and weak.dsr < 0.5 and weak.median_sharpe < 0 < strong.median_sharpe
    assert [f.split(" ")[0] for f in Gate().failures(weak)] == ["SPA:", "DSR"]
    # placebo gap: median in-sample Sharpe (3.0) minus the placebo floor (95th percentile of 0, 0.1, 0.2 twice)
    floor = float(np.quantile([0.0, 0.1, 0.2] * 2, FLOOR_QUANTILE))
    assert strong.placebo_gap == pytest.approx(3.0 - floor) and weak.placebo_gap is None
    assert math.isnan(strong.pbo)  # one configuration: no PBO
    with pytest.raises(FileNotFoundError, match="no results.parquet"):
        verdict_from_experiment(tmp_path)
    two = shutil.copytree(tmp_path / "weak", tmp_path / "two")
    for name in ("results.parquet", "equity.parquet"):  # a second configuration "b": the caller must pick one
        frame = pd.read_parquet(two / name)
        pd.concat([frame, frame[frame["name"] == "a"].assign(name="b")]).to_parquet(two / name)
    with pytest.raises(ValueError, match=r"2 agent configurations \['a', 'b'\]; name one \(--agent\)"):
        verdict_from_experiment(two)
    assert verdict_from_experiment(two, "b", reps=200).spa_reverse_p_value < 0.05


def test_verdict_from_a_checkpoint_is_its_test_range_against_buy_and_hold(setup):
    from sentio_lab.evaluation.episodes import evaluate_checkpoint
    from sentio_lab.evaluation.metrics import probabilistic_sharpe_ratio

    verdict = verdict_from_checkpoint(setup["checkpoint"], reps=200)
    evaluation = evaluate_checkpoint(setup["checkpoint"], "test")
    assert verdict.median_sharpe == pytest.approx(evaluation.summary["sharpe"])
    returns = np.log(evaluation.equity).diff().dropna().to_numpy()
    assert verdict.dsr == pytest.approx(probabilistic_sharpe_ratio(returns, 0.0))
    assert 0 <= verdict.spa_p_value <= 1 and 0 <= verdict.spa_reverse_p_value <= 1
    assert math.isnan(verdict.pbo) and verdict.benchmark == "buy_and_hold" and "one path" in verdict.source


@pytest.mark.slow
def test_register_a_checkpoint_with_its_own_verdict_and_report_tracked_in_wandb(setup, tmp_path, monkeypatch):
    from sentio_lab.agents.tracking import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    version = register(setup["checkpoint"], "tracked", registry_uri=setup["uri"], track=True,
                       wandb_dir=tmp_path / "wandb")
    assert Verdict.from_tags(version.tags).benchmark == "buy_and_hold"  # verdict_from_checkpoint
    run_id = version.tags["wandb_run_id"]
    (folder,) = (tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{run_id}")
    staged = folder / "files" / "artifacts" if (folder / "files" / "artifacts").exists() else folder / "artifacts"
    assert (staged / "tracked-checkpoint" / "checkpoint.pt").read_bytes() == Path(setup["checkpoint"]).read_bytes()
    assert (staged / "tracked-report" / "report" / "report.html").is_file()  # the evaluate report, written here
    assert read_offline_run(folder).run_id == run_id
    from mlflow import MlflowClient

    report = {a.path for a in MlflowClient(tracking_uri=setup["uri"]).list_artifacts(version.run_id, "report")}
    assert "report/report.html" in report and "report/stats.csv" in report


def test_default_registry_location(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert registry.default_registry_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert registry.default_registry_uri() == "http://localhost:5000"
    assert registry._local_dir("http://localhost:5000") == tmp_path / "runs" / "mlflow"
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_the_default_gate_refuses_a_single_path_verdict():
    # review finding: a checkpoint's one test path (DSR = PSR(0), no PBO) must not make a champion by default
    one_path = Verdict(median_sharpe=0.05, dsr=0.51, pbo=math.nan, spa_p_value=0.9, spa_reverse_p_value=0.4,
                       benchmark="buy_and_hold", source="checkpoint /x/checkpoint.pt on its test range")
    assert Gate().failures(one_path) == [
        "the verdict is one checkpoint's single test path: register it with --verdict <experiment folder> "
        "(CPCV paths x seeds)"]
    assert Gate(allow_single_path=True).failures(one_path) == []
