"""python -m sentio_lab.evaluate (issue 17 §3), the validation summary every variant prints when training ends, and
the data-quality printout that --no-progress keeps (§6)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from sentio_lab import ppo
from sentio_lab.agents.variants import load_trained
from sentio_lab.evaluate import main
from sentio_lab.evaluation import agent_report
from sentio_lab.evaluation.episodes import evaluate_checkpoint
from sentio_lab.evaluation.metrics import STAT_NAMES

TINY_ARGV = ["--total-timesteps", "384", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
             "--update-epochs", "1", "--hidden-size", "8", "--window", "8", "--episode-length", "24", "--no-track",
             "--no-progress", "--checkpoint-every", "0", "--run-name", "tiny"]


def run_main(module, argv):
    """A variant's (or the CLI's) main() with ``argv``, returning what it printed."""
    out = io.StringIO()
    with mock.patch.object(sys, "argv", [module.__name__, *argv]), contextlib.redirect_stdout(out):
        module.main()
    return out.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ppo run on sp500 from the command line, without a progress bar: (checkpoint, printed output)."""
    folder = tmp_path_factory.mktemp("cli")
    printed = run_main(ppo, [*TINY_ARGV, "--run-dir", str(folder), "--feature-cache-dir", str(folder / "cache")])
    return folder / "tiny" / "checkpoint.pt", printed


def summary_row(printed, name):
    """The numbers of ``name``'s row in a printed summary table (columns: agent_report.SUMMARY_ROWS)."""
    (line,) = [line for line in printed.splitlines() if line.startswith(name + " ")]
    return [float(x) for x in line[len(name):].split()]


def test_training_prints_the_data_quality_without_progress_and_a_validation_summary(trained):
    path, printed = trained
    assert "data quality of sp500" in printed and "stale-open stretches" in printed  # kept with --no-progress
    assert "finished at step 384" in printed
    assert re.search(r"^validation summary, \d{4}-\d\d-\d\d \.\. \d{4}-\d\d-\d\d \(\d+ decisions\)", printed, re.M)
    header = next(line for line in printed.splitlines() if "sharpe" in line)
    assert header.split() == list(agent_report.SUMMARY_ROWS)
    # the printed figures are the checkpoint's own validation statistics, and buy-and-hold's over the same bars
    evaluation = evaluate_checkpoint(path, "validation")
    expected = [evaluation.summary[k] for k in agent_report.SUMMARY_ROWS]
    assert summary_row(printed, "ppo") == pytest.approx(expected, abs=5e-5)
    held = summary_row(printed, "buy and hold")
    assert held[-1] == 1 and held[-2] > 0  # one trade: the first buy; its turnover is that one fill per year
    assert held[1] != pytest.approx(expected[1])


def test_resuming_the_finished_run_from_the_command_line_leaves_the_file(trained):
    path, _ = trained
    before = path.read_bytes()
    printed = run_main(ppo, ["--resume", str(path), "--no-track", "--no-progress"])
    assert f"finished at step 384; checkpoint: {path}" in printed
    assert path.read_bytes() == before


def test_the_cli_writes_the_demo_report_next_to_the_checkpoint(trained):
    path, _ = trained
    printed = run_main(sys.modules["sentio_lab.evaluate"], [str(path)])
    folder = path.parent / "report_test"
    assert f"report: {folder}" in printed
    for name in ("report.html", "equity.png", "drawdown.png", "stats.csv", "stats.md", "meta.json",
                 "data_quality.md"):
        assert (folder / name).stat().st_size > 0, name
    stats = pd.read_csv(folder / "stats.csv", index_col=0)
    assert list(stats.columns) == ["ppo", "buy and hold"] and tuple(stats.index) == STAT_NAMES
    evaluation = evaluate_checkpoint(path)  # the test range, as the CLI's default
    assert float(stats.loc["sharpe", "ppo"]) == pytest.approx(evaluation.summary["sharpe"], rel=1e-12)
    assert float(stats.loc["max_drawdown", "ppo"]) == pytest.approx(evaluation.summary["max_drawdown"], rel=1e-12)
    assert summary_row(printed, "ppo") == pytest.approx([evaluation.summary[k] for k in agent_report.SUMMARY_ROWS],
                                                        abs=5e-5)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["label"].startswith("test range (out of sample)") and meta["global_step"] == 384
    assert max(meta["replay_max_rel_error"].values()) < 1e-9 and meta["variant"] == "ppo"
    assert "| source | sp500 |" in (folder / "data_quality.md").read_text()


def test_buy_and_hold_is_the_demos_vectorbt_benchmark(trained):
    from sentio_lab.evaluation import backtest

    path, _ = trained
    trained_agent = load_trained(path)
    comparison = agent_report.compare_with_buy_and_hold(trained_agent.agent, trained_agent.args, trained_agent.market,
                                                        "validation")
    start, steps = comparison.agent.start, len(comparison.agent.weights)
    demo = backtest.equity(backtest.buy_and_hold(trained_agent.market.data.frame, start, steps,
                                                 ppo.cost_model(trained_agent.args)))
    assert np.allclose(demo.to_numpy(), comparison.benchmark.equity.to_numpy(), rtol=1e-9, atol=0)
    assert (comparison.benchmark.weights == 1.0).all() and comparison.benchmark.equity.index.equals(demo.index)


@pytest.mark.parametrize("range_name", ["validation", "all"])
def test_the_cli_ranges_and_output_folder(trained, tmp_path, range_name):
    path, _ = trained
    printed = run_main(sys.modules["sentio_lab.evaluate"], [str(path), "--range", range_name,
                                                            "--output", str(tmp_path / "out")])
    assert printed.startswith(f"{range_name} summary") and (tmp_path / "out" / "report.html").exists()
    market = load_trained(path).market
    equity = pd.read_csv(tmp_path / "out" / "stats.csv", index_col=0)
    first = market.range("train" if range_name == "all" else range_name)[0]
    first = max(first, market.arrays.first_valid + 8 - 1)
    assert pd.Timestamp(equity.loc["start", "ppo"]) == market.data.frame.index[first]
    last = market.range("test" if range_name == "all" else range_name)[1] - 1
    assert pd.Timestamp(equity.loc["end", "ppo"]) == market.data.frame.index[last]


def test_another_dataset_gets_its_own_folder(trained, tmp_path):
    path, _ = trained
    frame = load_trained(path).market.data.frame
    csv = tmp_path / "later.csv"
    frame.iloc[-800:].to_csv(csv)
    comparison, paths = agent_report.write_checkpoint_report(path, dataset=csv, range_name="test")
    assert paths["html"].parent == path.parent / "report_test_later" and comparison.agent.equity.iloc[0] == 1.0


@pytest.mark.parametrize("case, message", [
    ("missing", "no such checkpoint"),
    ("damaged", "damaged checkpoint"),
    ("dataset", "later.csv"),
    ("range", "invalid choice: 'train'"),
])
def test_cli_errors_are_one_line_and_a_non_zero_exit(trained, tmp_path, case, message, capsys):
    path, _ = trained
    argv = [str(path)]
    if case == "missing":
        argv = [str(tmp_path / "absent.pt")]
    elif case == "damaged":
        damaged = tmp_path / "checkpoint.pt"
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        damaged.write_bytes(bytes(raw))
        argv = [str(damaged)]
    elif case == "dataset":
        argv += ["--dataset", str(tmp_path / "later.csv")]  # no such file
    else:
        argv += ["--range", "train"]
    with pytest.raises(SystemExit) as err:
        main(argv)
    if case == "range":  # argparse's own usage error
        assert err.value.code == 2 and message in capsys.readouterr().err
        return
    text = str(err.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_the_module_runs_and_a_damaged_checkpoint_gives_no_traceback(trained, tmp_path):
    path, _ = trained
    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    done = subprocess.run([sys.executable, "-m", "sentio_lab.evaluate", str(damaged)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: {damaged}: damaged checkpoint: not a readable zip archive")
    assert not (tmp_path / "report_test").exists()


def test_the_training_summary_says_when_there_is_nothing_to_evaluate(trained, synthetic_market):
    path, _ = trained
    loaded = load_trained(path)
    assert "not available (no validation range" in agent_report.training_summary(SimpleNamespace(market=None))
    from sentio_lab.data import Split

    start = loaded.market.range("validation")[0]
    stamp = loaded.market.data.frame.index[start]
    empty = dataclasses.replace(loaded.market, splits={**loaded.market.splits,
                                                       "validation": Split("validation", start, start, stamp, stamp)})
    no_bars = SimpleNamespace(agent=loaded.agent, market=empty, args=loaded.args)
    assert agent_report.training_summary(no_bars).startswith("validation summary: not available (")
    with pytest.raises(ValueError, match="choose from"):
        agent_report.range_bars(loaded.market, "train")
    with pytest.raises(ValueError, match="range 'train'; choose from"):
        agent_report.write_checkpoint_report(path, range_name="train")
    assert agent_report.default_output(Path("a/b/ck.pt"), "all") == Path("a/b/report_all")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ppo_masked", "ppo_risk", "ppo_transformer"])
def test_every_variant_prints_the_quality_and_the_validation_summary(variant, tmp_path):
    from sentio_lab.agents.variants import load_variant

    module = load_variant(variant)
    argv = [*TINY_ARGV, "--run-dir", str(tmp_path), "--feature-cache-dir", str(tmp_path / "cache")]
    if variant == "ppo_transformer":
        argv += ["--dataset", "eurusd_1h", "--data-end", "2017-03-15", "--token-timeframes", "4h", "1D",
                 "--token-counts", "4", "3", "--d-model", "8", "--n-heads", "2", "--ff-size", "16"]
    if variant == "ppo_risk":
        argv += ["--num-quantiles", "4"]
    printed = run_main(module, argv)
    assert "data quality of" in printed and "finished at step 384" in printed
    evaluation = evaluate_checkpoint(tmp_path / "tiny" / "checkpoint.pt", "validation")
    expected = [evaluation.summary[k] for k in agent_report.SUMMARY_ROWS]
    assert summary_row(printed, variant) == pytest.approx(expected, abs=5e-5)


def test_a_ruined_agent_is_said_and_a_replay_mismatch_is_an_error(trained, monkeypatch):
    path, _ = trained
    loaded = load_trained(path)
    comparison = agent_report.compare_with_buy_and_hold(loaded.agent, loaded.args, loaded.market, "validation")
    ruined = dataclasses.replace(comparison, agent=dataclasses.replace(comparison.agent, ruined=True))
    assert "the agent's equity hit 0" in ruined.describe().splitlines()[0]
    assert "hit 0" not in comparison.describe()
    monkeypatch.setattr(agent_report, "_replay_error", lambda frame, evaluation, costs: 2e-9)
    with pytest.raises(SystemExit, match=r"^error: .*the vectorbt replay differs from the env's equity by 2\.00e-09"):
        main([str(path), "--output", str(path.parent / "mismatch")])
    assert not (path.parent / "mismatch").exists()  # nothing written from numbers that disagree


def test_a_portfolio_checkpoint_is_refused_with_where_to_evaluate_it(tmp_path):
    """The report is single-asset: a ppo_portfolio checkpoint gets one line naming the portfolio runner, not a
    confusing error from the single-asset baselines (found by a new-user run with --anchor minimum_variance)."""
    fake = SimpleNamespace(bundle={"variant": "ppo_portfolio"})
    with mock.patch.object(agent_report, "load_trained", return_value=fake):
        with pytest.raises(ValueError, match='ppo_portfolio checkpoint.*kind = "portfolio"'):
            agent_report.write_checkpoint_report(tmp_path / "checkpoint.pt")
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "checkpoint.pt")])
    assert str(exit_info.value.code).startswith("error: ") and 'kind = "portfolio"' in str(exit_info.value.code)
