"""Selection on a CPCV fold reads the inner validation slice carved from the fold's training segments, never a
test bar: perturbing every test bar of the fold leaves the selection (scores, chosen iteration, weights) identical,
while perturbing the slice itself changes it. And the runner end to end: refusals, records, selected weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.selection import selected_weights
from sentio_lab.agents.variants import load_variant, parse_variant_args
from sentio_lab.data import load_market
from sentio_lab.experiment.cells import train_cell
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
from sentio_lab.experiment.runner import fold_market, load_cell_agent, plan_experiment, run_experiment

TINY = ("--total-timesteps", "384", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--hidden-size", "8", "--no-anneal-lr")
SELECT = ("--select-on", "validation_sharpe", "--eval-every", "1")
VALIDATION_BARS = 40


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return load_market("nasdaq", end="2004-12-31").frame


def write(frame: pd.DataFrame, path) -> str:
    frame.to_csv(path)
    return str(path)


def config_for(dataset: str, **changes) -> ExperimentConfig:
    cache = str(Path(dataset).parent / "feature-cache")
    fields = dict(name="select_folds", dataset=dataset, split="cpcv", n_groups=4, n_test_groups=2, seeds=(1,),
                  validation_bars=VALIDATION_BARS, baselines=("buy_and_hold",), random_seeds=1,
                  common_args=("--window", "4", "--episode-length", "16", "--feature-cache-dir", cache),
                  agents=(AgentSpec("sel", "ppo", TINY + SELECT),))
    return ExperimentConfig(**{**fields, **changes})


def scaled(frame: pd.DataFrame, rows: np.ndarray, seed: int) -> pd.DataFrame:
    """``frame`` with the prices of ``rows`` moved by a random factor per bar (still valid OHLC) and other volume."""
    out = frame.copy()
    factor = np.exp(np.random.default_rng(seed).normal(0.0, 0.03, int(rows.sum())))
    for column in ("open", "high", "low", "close"):
        out.loc[rows, column] = out.loc[rows, column].to_numpy() * factor
    out.loc[rows, "volume"] = out.loc[rows, "volume"].to_numpy() * 1.7
    return out


def select_on_fold(frame: pd.DataFrame, tmp_path, name: str) -> tuple[dict, dict, object]:
    """Train the selecting cell of the fold whose test groups are 0 and 2 (training: groups 1 and 3, the slice at
    the end of group 3); its cell record, selected weights and fold market."""
    plan = plan_experiment(config_for(write(frame, tmp_path / f"{name}.csv")))
    (fold,) = [f for f in plan.folds if f.groups == (0, 2)]
    (cell,) = [c for c in plan.cells if c.fold == fold.fold]
    args = parse_variant_args(cell.variant, cell.args)
    market = fold_market(plan, fold, load_variant(cell.variant).feature_config(args))
    record = train_cell(cell, market, tmp_path / name)
    weights = selected_weights(load_checkpoint(tmp_path / name / "checkpoint.pt"))
    return record, weights, (plan, fold, market)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_test_bars_never_reach_the_inner_validation_slice(frame, tmp_path):
    record, weights, (plan, fold, market) = select_on_fold(frame, tmp_path, "real")
    start, stop = market.range("validation")
    assert stop - start == VALIDATION_BARS + 1 and stop == fold.train[-1][1]  # the end of the last training segment
    assert not fold.test_mask(plan.n_bars)[start - plan.gaps.observation_reach : stop].any()
    assert [h["iteration"] for h in record["selection_history"]] == [1, 2, 3]
    assert record["selected_iteration"] in (1, 2, 3) and record["selection_criterion"] == "validation_sharpe"

    test_rows = fold.test_mask(len(frame))
    moved, moved_weights, (_, _, moved_market) = select_on_fold(scaled(frame, test_rows, 1), tmp_path, "moved")
    test_bars = np.flatnonzero(test_rows)
    assert not np.allclose(moved_market.arrays.close[test_bars], market.arrays.close[test_bars])  # a real change
    assert moved["selection_history"] == record["selection_history"]
    assert moved["selected_iteration"] == record["selected_iteration"] and same(moved_weights, weights)

    # control: moving the slice's own bars does change the scores, so the comparison above could fail
    slice_rows = np.zeros(len(frame), dtype=bool)
    slice_rows[start + 1 : stop] = True
    control, _, _ = select_on_fold(scaled(frame, slice_rows, 2), tmp_path, "control")
    assert control["selection_history"] != record["selection_history"]


def test_the_runner_refuses_selection_without_a_slice_or_with_two_rules(tmp_path, frame):
    dataset = write(frame.iloc[:900], tmp_path / "short.csv")
    with pytest.raises(ValueError, match="agent 'sel' selects on validation .* set validation_bars"):
        plan_experiment(config_for(dataset, validation_bars=0))
    with pytest.raises(ValueError, match="leave select_every at 0"):
        plan_experiment(config_for(dataset, select_every=1))


def test_the_runner_evaluates_the_selected_agents(tmp_path, frame):
    config = config_for(write(frame.iloc[:1000], tmp_path / "wf.csv"), split="walk_forward", n_groups=2)
    plan = plan_experiment(config)
    output = tmp_path / "run"
    results = run_experiment(plan, output, progress=False)
    chosen = [json.loads(v) for v in results.loc[results["kind"] == "agent", "selected_iterations"]]
    assert chosen and all(len(c) == 2 and all(i in (1, 2, 3) for i in c) for c in chosen)
    for fold in plan.folds:
        folder = output / "cells" / f"sel__seed1__fold{fold.fold:03d}"
        record = json.loads((folder / "cell.json").read_text())
        best = max(record["selection_history"], key=lambda h: h["validation_sharpe"])
        assert record["selected_iteration"] == best["iteration"]
        bundle = load_checkpoint(folder / "checkpoint.pt")
        args = parse_variant_args("ppo", plan.cells[0].args)
        market = fold_market(plan, fold, load_variant("ppo").feature_config(args))
        agent = load_cell_agent(folder / "checkpoint.pt", market)
        assert same(agent.state_dict(), bundle["selection"]["best_state"])
        if record["selected_iteration"] != 3:
            assert not same(agent.state_dict(), bundle["agent"])
