"""Memorisation made visible: in-sample / validation / test per run, policy confidence, the placebo floor."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.variants import load_variant
from sentio_lab.evaluation.episodes import evaluate_policies
from sentio_lab.experiment.cells import parse_variant_args
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
from sentio_lab.experiment.memorisation import (
    MEMORISATION_FILE,
    PLACEBO_DIR,
    RecordingPolicy,
    diagnosis_path,
    gap_table,
    mark_noise,
    placebo_table,
)
from sentio_lab.experiment.runner import fold_market, load_cell_agent, plan_experiment, run_experiment

TINY = ("--total-timesteps", "256", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--hidden-size", "8")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("feature-cache"))
    return ExperimentConfig(
        name="tiny_placebo", dataset="nasdaq", data_end="2004-12-31", split="cpcv", n_groups=3, n_test_groups=2,
        seeds=(1,), random_seeds=2, baselines=("buy_and_hold",), validation_bars=30,
        placebo="stationary_bootstrap", placebo_block_mean=5, placebo_seeds=2,
        common_args=("--window", "4", "--episode-length", "16", "--feature-cache-dir", cache),
        agents=(AgentSpec("tiny", "ppo", TINY),),
    )


@pytest.fixture(scope="module")
def finished(config, tmp_path_factory):
    plan = plan_experiment(config)
    output = tmp_path_factory.mktemp("runs") / config.name
    results = run_experiment(plan, output, progress=False)
    return plan, output, results, pd.read_parquet(output / MEMORISATION_FILE)


def _cell_market(plan, cell):
    args = parse_variant_args(cell.variant, cell.args)
    return fold_market(plan, plan.folds[cell.fold], load_variant(cell.variant).feature_config(args))


@pytest.mark.slow  # one CI-sized CPCV run with placebo cells (~1-3 min on a shared machine)
def test_every_cell_real_and_placebo_is_diagnosed_on_every_part(finished, config):
    plan, output, _, memo = finished
    assert len(plan.cells) == 3 and len(plan.placebo_cells) == 6  # 3 folds x 1 seed; x 2 placebo replicates
    assert {c.placebo for c in plan.placebo_cells} == {0, 1}
    assert len(memo) == 3 * (3 + 6) and set(memo["part"]) == {"in_sample", "validation", "test"}
    assert (memo.groupby(["kind", "fold", "placebo"]).size() == 3).all()
    assert np.isfinite(memo[["sharpe", "max_drawdown", "turnover_per_year", "entropy"]]).all().all()
    for cell in plan.placebo_cells:
        assert (output / PLACEBO_DIR / cell.cell_id / "cell.json").exists() and diagnosis_path(output, cell).exists()


@pytest.mark.slow  # one CI-sized CPCV run with placebo cells (~1-3 min on a shared machine)
def test_decisions_are_exactly_the_parts_own_bars(finished, config):
    plan, _, _, memo = finished
    for cell in plan.cells:
        market = _cell_market(plan, cell)
        first_ok = market.arrays.first_valid + 4 - 1  # warm-up + window
        in_sample = sum(b - 1 - max(a, first_ok) for a, b in market.training_segments())
        test = sum(b - 1 - max(a, first_ok) for a, b in plan.folds[cell.fold].test)
        rows = memo[(memo["kind"] == "agent") & (memo["fold"] == cell.fold)].set_index("part")["decisions"]
        assert rows["in_sample"] == in_sample and rows["test"] == test and rows["validation"] == config.validation_bars
        assert market.range("validation")[0] >= market.training_segments()[-1][1] - 1  # training ends before it


@pytest.mark.slow  # one CI-sized CPCV run with placebo cells (~1-3 min on a shared machine)
def test_in_sample_and_test_use_the_test_groups_evaluation(finished):
    """The diagnosis's test Sharpe is the runner's own test-group evaluation chained; in sample, the same greedy
    evaluation over the training segments (the recording wrapper changes no action)."""
    plan, output, _, memo = finished
    cell = plan.cells[0]
    market = _cell_market(plan, cell)
    agent = load_cell_agent(output / "cells" / cell.cell_id / "checkpoint.pt", market)
    acc = plan.accounting
    from sentio_lab.evaluation.metrics import periods_per_year, summary_stats
    from sentio_lab.experiment.memorisation import chain, part_ranges

    view, ranges = part_ranges(market)
    ppy = periods_per_year(market.data.frame.index)
    for part in ("in_sample", "test"):
        plain = evaluate_policies([agent], view, ranges[part], window=acc["window"], positions=acc["positions"],
                                  costs=acc["costs"])[0]
        sharpe = summary_stats(chain(plain)[0], periods=ppy)["sharpe"]
        row = memo[(memo["kind"] == "agent") & (memo["fold"] == cell.fold) & (memo["part"] == part)]
        assert float(row["sharpe"].iloc[0]) == pytest.approx(sharpe, rel=1e-12)
    groups = pd.read_parquet(output / "evaluations" / f"tiny__fold{cell.fold:03d}" / "groups.parquet")
    runner_test = [g.set_index("timestamp")["equity"] for _, g in groups[groups["seed"] == cell.seed].groupby("group")]
    plain_test = evaluate_policies([agent], view, ranges["test"], window=acc["window"], positions=acc["positions"],
                                   costs=acc["costs"])[0]
    for mine, theirs in zip(sorted(plain_test, key=lambda e: e.start), runner_test, strict=True):
        np.testing.assert_array_equal(mine.equity.to_numpy(), theirs.to_numpy())


@pytest.mark.slow  # one CI-sized CPCV run with placebo cells (~1-3 min on a shared machine)
def test_placebo_bars_touch_training_rows_only_and_are_seeded(finished, config):
    plan, _, _, _ = finished
    from sentio_lab.experiment.memorisation import placebo_market

    cell = plan.cells[0]
    real = _cell_market(plan, cell)
    a, b, other = (placebo_market(real, config, j) for j in (0, 0, 1))
    pd.testing.assert_frame_equal(a.data.frame, b.data.frame)
    assert not a.data.frame.equals(other.data.frame)
    touched = np.zeros(len(real.data.frame), bool)
    for start, stop in real.training_segments():
        touched[start + 1 : stop] = True
    pd.testing.assert_frame_equal(a.data.frame[~touched], real.data.frame[~touched])
    assert (a.data.frame["close"][touched] != real.data.frame["close"][touched]).mean() > 0.9
    assert a.splits == real.splits and a.training_segments() == real.training_segments()
    assert a.data.fingerprint != real.data.fingerprint


@pytest.mark.slow  # one CI-sized CPCV run with placebo cells (~1-3 min on a shared machine)
def test_a_finished_run_redoes_no_placebo_or_diagnosis(finished):
    plan, output, results, memo = finished
    stamps = {p: p.stat().st_mtime_ns for p in (output / "diagnostics").glob("*.json")}
    stamps.update({p: p.stat().st_mtime_ns for p in (output / PLACEBO_DIR).glob("*/checkpoint.pt")})
    run_experiment(plan, output, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    pd.testing.assert_frame_equal(pd.read_parquet(output / MEMORISATION_FILE), memo)
    # a diagnosis made for another command line is redone, not reused
    path = diagnosis_path(output, plan.cells[0])
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "command": "other"}))
    run_experiment(plan, output, progress=False)
    assert json.loads(path.read_text())["command"] == record["command"]


def test_recording_policy_measures_entropy_and_greedy_probability():
    from sentio_lab.agents.nets import MLPActorCritic

    agent = MLPActorCritic(5, 3, hidden=8)
    obs = torch.randn(64, 5)
    recorder = RecordingPolicy(agent)
    assert torch.equal(recorder.act_greedy(obs), agent.act_greedy(obs))
    assert recorder.entropy[0].shape == (64,)
    np.testing.assert_allclose(recorder.entropy[0].numpy(), np.log(3), atol=0.02)  # a fresh policy: near-uniform
    assert (recorder.greedy_probability[0] < 0.5).all()
    with torch.no_grad():
        agent.actor[-1].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # confident: action 1, p = e^5 / (e^5 + 2)
    recorder = RecordingPolicy(agent)
    recorder.act_greedy(obs)
    np.testing.assert_allclose(recorder.greedy_probability[0].numpy(), np.exp(5) / (np.exp(5) + 2), rtol=0.02)
    p = np.array([np.exp(5), 1, 1]) / (np.exp(5) + 2)
    np.testing.assert_allclose(recorder.entropy[0].numpy(), -(p * np.log(p)).sum(), rtol=0.05)
    mask = torch.tensor([[True, False, True]]).expand(64, 3)  # the mask removes the confident action
    recorder = RecordingPolicy(agent)
    assert (recorder.act_greedy(obs, mask) != 1).all()
    assert (recorder.greedy_probability[0] > 0.3).all() and (recorder.entropy[0] <= np.log(2) + 1e-5).all()


def _memo(in_sample_real, in_sample_placebo):
    rows = [{"kind": "agent", "name": "a", "seed": s, "fold": 0, "placebo": -1, "part": part,
             "sharpe": sharpe - {"in_sample": 0.0, "validation": 0.5, "test": 1.0}[part], "max_drawdown": -0.1,
             "turnover_per_year": 10.0, "entropy": 0.5, "low_confidence_share": 0.25, "decisions": 100.0}
            for s, sharpe in enumerate(in_sample_real) for part in ("in_sample", "validation", "test")]
    rows += [{"kind": "placebo", "name": "a", "seed": 1, "fold": 0, "placebo": j, "part": "in_sample",
              "sharpe": sharpe, "max_drawdown": -0.2, "turnover_per_year": 5.0, "entropy": 0.4,
              "low_confidence_share": 0.1, "decisions": 100.0} for j, sharpe in enumerate(in_sample_placebo)]
    return pd.DataFrame(rows)


def test_floor_is_the_placebo_95th_percentile_and_marks_noise():
    placebo = np.arange(21) * 0.25  # 95th percentile: 4.75, exactly
    memo = _memo([1.0, 4.75, 5.0], placebo)
    floors = placebo_table(memo)
    assert floors.loc["a", "floor"] == 4.75 and floors.loc["a", "placebo_runs"] == 21
    assert floors.loc["a", "median"] == pytest.approx(2.5)
    marked = mark_noise(memo)
    assert marked["noise"].tolist() == [True, True, False]
    table = gap_table(memo)
    assert table.loc["a", "noise_share"] == pytest.approx(2 / 3)
    assert table.loc["a", "sharpe:in_sample"] == pytest.approx(4.75)
    assert table.loc["a", "sharpe:validation"] == pytest.approx(4.25)
    assert table.loc["a", "sharpe_gap"] == pytest.approx(1.0)  # in sample minus test, per run
    assert table.loc["a", "low_confidence_share:test"] == pytest.approx(0.25)
    without = gap_table(memo[memo["kind"] == "agent"])
    assert "placebo_floor" not in without.columns
    assert not mark_noise(memo[memo["kind"] == "agent"])["noise"].any()


def test_the_placebo_option_is_validated():
    agents = (AgentSpec("a", "ppo"),)
    with pytest.raises(ValueError, match="placebo 'shuffle' not in"):
        ExperimentConfig(name="x", agents=agents, placebo="shuffle")
    with pytest.raises(ValueError, match="placebo_seeds"):
        ExperimentConfig(name="x", agents=agents, placebo="stationary_bootstrap", placebo_seeds=0)
    off = ExperimentConfig(name="x", agents=agents)
    assert off.placebo is None
    from sentio_lab.experiment.cells import Cell
    from sentio_lab.experiment.memorisation import placebo_cells

    cells = (Cell("a", "ppo", (), 1, 0),)
    assert placebo_cells(off, cells) == ()
    on = dataclasses.replace(off, placebo="stationary_bootstrap", placebo_seeds=3, seeds=(4, 5))
    assert [(c.seed, c.placebo, c.cell_id) for c in placebo_cells(on, cells)] == [
        (4, 0, "a__placebo0__seed4__fold000"), (5, 1, "a__placebo1__seed5__fold000"),
        (4, 2, "a__placebo2__seed4__fold000")]


def test_the_summary_line_says_what_was_measured():
    from sentio_lab.experiment.memorisation import memorisation_summary

    memo = _memo([1.0, 4.75, 5.0], np.arange(21) * 0.25)
    line = memorisation_summary(memo)
    assert line.startswith("a: median annualised Sharpe in sample 4.75, validation 4.25, test 3.75 (gap 1.00)")
    assert "placebo floor 4.75" in line and "67% of runs are inside it (noise)" in line
    real = memo[memo["kind"] == "agent"]
    line = memorisation_summary(real[real["part"] != "validation"])
    assert "no validation slice" in line and "no placebo control" in line


def test_placebo_needs_a_fold_market_and_an_empty_part_is_nan():
    from sentio_lab.env.market import prepare_market
    from sentio_lab.experiment.memorisation import PART_STATS, part_stats, placebo_market
    from sentio_lab.features import FeatureConfig

    market = prepare_market("nasdaq", FeatureConfig(cache_dir=None), end="2003-12-31")
    config = ExperimentConfig(name="x", agents=(AgentSpec("a", "ppo"),), placebo="stationary_bootstrap")
    with pytest.raises(ValueError, match="fold market"):
        placebo_market(market, config, 0)
    empty = part_stats([], np.empty(0), np.empty(0), 252.0)
    assert set(empty) == set(PART_STATS) and all(np.isnan(v) for v in empty.values())
