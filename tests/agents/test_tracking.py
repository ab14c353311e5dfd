"""W&B tracking, read back from the offline run's own ``.wandb`` file (``wandb.Api`` cannot read offline runs)."""

import dataclasses
import json
import math
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from conftest import announced_market

from sentio_lab import ppo, ppo_masked, ppo_risk, ppo_transformer, run_loop
from sentio_lab.agents.tracking import OfflineRun, Tracker, read_offline_run, run_id, shared_run, sharing
from sentio_lab.evaluation import run_summary
from sentio_lab.evaluation.baselines import evaluate_baseline
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.evaluation.metrics import summary_stats
from sentio_lab.evaluation.run_summary import log_run_outcome


@pytest.fixture(scope="module")
def small_market():
    """800 bars: 160 each in validation and test, so the end-of-training evaluation stays quick."""
    return announced_market(n_bars=800)


def test_disabled_tracker_does_nothing(tmp_path):
    tracker = Tracker(False, project="p", run_name="r", config={}, run_dir=tmp_path)
    tracker.log({"x": 1.0}, step=1)
    tracker.log_summary({"x": 1.0})
    tracker.log_table("t", pd.DataFrame({"a": [1]}))
    tracker.log_images({"i": tmp_path / "none.png"})
    assert tracker.log_artifact(tmp_path, name="a", type="t") is None
    assert log_run_outcome(tracker, None, None, None, None) == {}
    tracker.finish()
    assert tracker.directory is None and not any(tmp_path.iterdir())


def test_run_ids_are_the_run_names_made_safe():
    assert run_id("sp500__ppo__1__1733561234") == "sp500__ppo__1__1733561234"
    assert run_id("/data/my file.csv__ppo:1") == "data-my-file.csv__ppo-1"
    assert len(run_id("x" * 300)) == 128
    with pytest.raises(ValueError, match="--run-name"):
        run_id("///")


def test_offline_run_records_name_group_summary_artifacts_and_tables(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(bytes(range(256)) * 10)
    report = tmp_path / "report"
    (report / "test").mkdir(parents=True)
    (report / "test" / "stats.csv").write_text("a,b\n1,2\n")
    tracker = Tracker(True, project="p", run_name="sp500__ppo/1", config={"seed": 1}, run_dir=tmp_path / "runs",
                      group="exp", job_type="evaluate")
    for step in (1, 2):
        tracker.log({"x": float(step)}, step=step)
    values = {"a": 0.1 + 0.2, "b": np.float64(1.0) / 3.0, "c": np.int64(7), "d": float("nan"), "e": "text"}
    tracker.log_summary(values)
    staged = tracker.log_artifact(checkpoint, name="sp500__ppo/1-checkpoint", type="model")
    tracker.log_artifact([report], name="rep", type="report")
    table = pd.DataFrame({"name": ["ppo", "buy_and_hold"], "sharpe": [0.5, float("nan")],
                          "start": pd.to_datetime(["2020-01-02", "2020-01-03"])})
    tracker.log_table("results", table)
    folder = tracker.directory
    tracker.finish()

    assert folder.parent == tmp_path / "runs" / "wandb" and folder.name.endswith("-sp500__ppo-1")
    run = read_offline_run(folder)
    assert (run.run_id, run.name, run.project, run.group, run.job_type) == ("sp500__ppo-1", "sp500__ppo/1", "p",
                                                                          "exp", "evaluate")
    assert run.finished and run.config["seed"] == 1 and [row["x"] for row in run.history[:2]] == [1.0, 2.0]
    assert run.summary["a"] == 0.1 + 0.2 and run.summary["b"] == 1.0 / 3.0 and run.summary["c"] == 7
    assert run.summary["d"] is None and run.summary["e"] == "text"  # W&B's JSON has no NaN: it records null
    # the artifact files are copies inside the run folder, byte for byte
    assert staged.is_relative_to(folder)
    files = run.artifacts["sp500__ppo-1-checkpoint"]["files"]
    assert run.artifacts["sp500__ppo-1-checkpoint"]["type"] == "model" and list(files) == ["checkpoint.pt"]
    assert open(files["checkpoint.pt"], "rb").read() == checkpoint.read_bytes()
    assert open(run.artifacts["rep"]["files"]["report/test/stats.csv"]).read() == "a,b\n1,2\n"
    # the table: W&B's table file, with the frame's rows (NaN kept, dates as text)
    entry = run.summary["results"]
    assert entry["_type"] == "table-file" and entry["nrows"] == 2
    logged = json.loads((folder / "files" / entry["path"]).read_text())
    assert logged["columns"] == ["name", "sharpe", "start"]
    assert logged["data"][0] == ["ppo", 0.5, "2020-01-02 00:00:00"] and logged["data"][1][0] == "buy_and_hold"


def test_a_missing_artifact_file_is_named(tmp_path):
    tracker = Tracker(True, project="p", run_name="r", config={}, run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        tracker.log_artifact(tmp_path / "missing.pt", name="a", type="model")
    tracker.finish()


def test_trackers_inside_a_shared_run_log_into_it(tmp_path):
    assert not sharing()
    with shared_run(True, project="p", run_name="cell", config={"cell": 1}, run_dir=tmp_path, group="g",
                    job_type="train") as outer:
        assert sharing()
        inner = Tracker(True, project="other", run_name="inner", config={"lr": 0.1}, run_dir=tmp_path / "x")
        inner.log({"loss": 1.0}, step=5)
        assert log_run_outcome(inner, object(), object(), object(), tmp_path) == {}  # the owner logs the outcome
        inner.finish()
        outer.log_summary({"done": 1})
        folder = outer.directory
    assert not sharing() and outer.run is None and not (tmp_path / "x").exists()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    run = read_offline_run(folder)
    assert (run.name, run.group, run.job_type) == ("cell", "g", "train")
    assert run.config["cell"] == 1 and run.config["lr"] == 0.1 and run.summary["done"] == 1
    assert run.history[0]["loss"] == 1.0 and run.history[0]["_step"] == 5


def test_a_disabled_shared_run_shares_nothing(tmp_path):
    with shared_run(False, project="p", run_name="cell", config={}, run_dir=tmp_path) as outer:
        assert outer.run is None and not sharing()


def test_the_reader_refuses_damaged_and_foreign_files(tmp_path):
    tracker = Tracker(True, project="p", run_name="r", config={}, run_dir=tmp_path)
    tracker.log_summary({"a": 1})
    folder = tracker.directory
    tracker.finish()
    assert isinstance(read_offline_run(folder), OfflineRun)
    (path,) = folder.glob("*.wandb")
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged record"):
        read_offline_run(folder, wait_s=0)
    path.write_bytes(b"not a run file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_offline_run(folder, wait_s=0)
    with pytest.raises(FileNotFoundError, match="one .wandb file"):
        read_offline_run(tmp_path)


def _stats_csv(path):
    return pd.read_csv(path, index_col=0)


def same(logged, number):
    """A W&B summary value equals a number exactly (NaN is recorded as null)."""
    number = float(number)
    return logged is None if math.isnan(number) else logged == number


def test_a_training_run_logs_its_evaluation_report_and_checkpoint(tiny_args, small_market, tmp_path):
    synthetic_market = small_market
    args = tiny_args.replace(track=True, run_dir=str(tmp_path / "runs"), run_name="announced__ppo__1")
    result = ppo.train(args, market=synthetic_market)
    (folder,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    assert folder.name.endswith("-announced__ppo__1")
    run = read_offline_run(folder)
    assert run.name == run.run_id == "announced__ppo__1" and run.config["learning_rate"] == args.ppo.learning_rate
    report = result.checkpoint_path.parent / "report"

    # the summary holds the report's numbers exactly, agent and baselines, validation and test
    for range_name in ("validation", "test"):
        stats = _stats_csv(report / range_name / "stats.csv")
        assert list(stats.columns) == ["agent", "buy_and_hold", "sma_crossover", "momentum", "vol_target"]
        for stat in run_summary.SUMMARY_STATS:
            assert same(run.summary[f"{range_name}/{stat}"], stats.at[stat, "agent"])
            assert same(run.summary[f"{range_name}/buy_and_hold/{stat}"], stats.at[stat, "buy_and_hold"])
        assert run.summary[f"{range_name}/equity"]["_type"] == "image-file"

    # ... and the evaluation's, recomputed here from the returned agent and the baselines module
    costs = ppo.cost_model(result.args)
    for range_name in ("validation", "test"):
        agent = evaluate_policy(result.agent, synthetic_market, window=args.features.window,
                                positions=args.env.positions,
                                costs=costs, range_name=range_name)
        expected = summary_stats(agent.equity, agent.weights)
        hold = evaluate_baseline("buy_and_hold", synthetic_market, window=args.features.window,
                                 positions=args.env.positions,
                                 costs=costs, range_name=range_name)
        held = summary_stats(hold.equity, hold.weights)
        for stat in ("sharpe", "max_drawdown", "turnover_per_year", "total_return"):
            assert same(run.summary[f"{range_name}/{stat}"], expected[stat])
            assert same(run.summary[f"{range_name}/buy_and_hold/{stat}"], held[stat])
        assert run.summary[f"{range_name}/start"] == str(agent.equity.index[0])
    # the summary differs between ranges and strategies: it is not one number copied around
    assert run.summary["validation/sharpe"] != run.summary["test/sharpe"]
    assert run.summary["test/sharpe"] != run.summary["test/buy_and_hold/sharpe"]
    assert json.loads((report / "summary.json").read_text())["test/sharpe"] == run.summary["test/sharpe"]

    # artifacts: the checkpoint's and the report's bytes
    checkpoint = run.artifacts["announced__ppo__1-checkpoint"]
    assert checkpoint["type"] == "model"
    assert open(checkpoint["files"]["checkpoint.pt"], "rb").read() == result.checkpoint_path.read_bytes()
    files = run.artifacts["announced__ppo__1-report"]["files"]
    on_disk = {f"report/{p.relative_to(report)}" for p in report.rglob("*") if p.is_file()}
    assert set(files) == on_disk and "report/test/report.html" in on_disk
    for name, staged in files.items():
        assert open(staged, "rb").read() == (report.parent / name).read_bytes()


@pytest.mark.parametrize("variant", [ppo, ppo_masked, ppo_risk, ppo_transformer])
def test_every_variant_logs_its_outcome(variant, tiny_args, small_market, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run_loop, "log_run_outcome",
                        lambda tracker, *a: calls.append((tracker.run is not None, *a)) or {})
    args = variant.Args.from_flat(**{**tiny_args.flat(), "track": True, "run_dir": str(tmp_path)})
    if variant is ppo_risk:
        args = args.replace(num_quantiles=4)
    if variant is ppo_transformer:  # the base window only: the synthetic market has no token timeframes
        args = args.replace(token_timeframes=(), token_counts=(), d_model=8, n_heads=2, ff_size=16)
    result = variant.train(args, market=small_market)
    ((tracked, agent, logged_args, market, checkpoint),) = calls
    assert tracked and agent is result.agent and logged_args is result.args and market is small_market
    assert checkpoint == result.checkpoint_path


def test_a_range_or_baseline_that_cannot_run_is_skipped_and_said(small_market, tmp_path):
    synthetic_market = small_market
    args = ppo.Args.from_flat(window=8, positions=(0.0, 1.0))  # long-only: momentum's short side has no level
    agent = ppo.build_agent(args, 8 + 1, 2)
    summary = run_summary.evaluate_run(agent, args, synthetic_market, ranges=("validation", "nowhere"))
    assert summary.skipped["nowhere"] == "the market has no nowhere range"
    assert "momentum" in summary.skipped["validation/momentum"]
    assert list(summary.stats) == ["validation"] and "momentum" not in summary.stats["validation"].columns
    flat = summary.flat()
    assert flat["skipped/nowhere"] == "the market has no nowhere range" and "validation/momentum/sharpe" not in flat
    assert isinstance(flat["validation/n_trades"], int) and isinstance(flat["validation/sharpe"], float)
    paths = run_summary.write_run_report(summary, tmp_path / "report", title="t")
    assert set(paths) == {"validation"} and (tmp_path / "report" / "summary.json").exists()


def test_a_range_too_short_to_summarise_is_skipped(synthetic_market):
    short = dataclasses.replace(synthetic_market, splits={
        **synthetic_market.splits, "validation": dataclasses.replace(synthetic_market.splits["validation"],
                                                                     stop=synthetic_market.range("validation")[0] + 3)})
    args = ppo.Args.from_flat(window=8)
    summary = run_summary.evaluate_run(ppo.build_agent(args, 9, 3), args, short, ranges=("validation",))
    assert summary.skipped["validation"].startswith("2 decisions") and not summary.stats


def _record(kind: int, chunk: bytes) -> bytes:
    return struct.pack("<IHB", zlib.crc32(chunk, zlib.crc32(bytes([kind]))), len(chunk), kind) + chunk


def test_the_reader_follows_records_across_blocks_and_padding(tmp_path):
    # a hand-laid file in W&B's block format: a run record split FIRST / MIDDLE / LAST over three 32 KiB blocks,
    # a block tail too short for a header, zero padding, and no exit record (a run still being written)
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    record.run.run_id, record.run.display_name, record.run.run_group = "r", "long", "g"
    item = record.run.config.update.add()
    item.key, item.value_json = "text", json.dumps("x" * 70_000)
    raw = record.SerializeToString()
    block = 32768
    first, rest = raw[: block - 7 - 7], raw[block - 7 - 7 :]
    middle, last = rest[: block - 7], rest[block - 7 :]
    data = b":W&B" + struct.pack("<HB", 0xBEE1, 0) + _record(2, first) + _record(3, middle) + _record(4, last)

    def summary(value: str) -> bytes:
        record = wandb_internal_pb2.Record()
        entry = record.summary.update.add()
        entry.key, entry.value_json = "a", json.dumps(value)
        return _record(1, record.SerializeToString())

    # a summary record sized to end 3 bytes before the block's end: a tail too short for a header, skipped
    room = block - len(data) % block - 3
    filler = next(summary("y" * n) for n in range(room) if len(summary("y" * n)) == room)
    data += filler + b"\0" * 3 + summary("z") + b"\0" * 20  # trailing zeros read as padding
    folder = tmp_path / "offline-run-x"
    folder.mkdir()
    (folder / "run-r.wandb").write_bytes(data)
    run = read_offline_run(folder, wait_s=0.2)
    assert (run.name, run.group, run.config["text"], run.summary) == ("long", "g", "x" * 70_000, {"a": "z"})
    assert not run.finished  # no exit record: returned as it stands after the wait
    (folder / "run-r.wandb").write_bytes(data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    with pytest.raises(ValueError, match="damaged record"):  # retried until the wait ran out, then refused
        read_offline_run(folder, wait_s=0.2)


def test_logging_an_artifact_again_replaces_its_staged_files(tmp_path):
    tracker = Tracker(True, project="p", run_name="r", config={}, run_dir=tmp_path / "runs")
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"one")
    tracker.log_artifact(path, name="c", type="model")
    path.write_bytes(b"two")
    staged = tracker.log_artifact(path, name="c", type="model")
    tracker.finish()
    assert (staged / "checkpoint.pt").read_bytes() == b"two" and sorted(p.name for p in staged.iterdir()) == [
        "checkpoint.pt"]
