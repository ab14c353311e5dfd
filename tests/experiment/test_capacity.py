"""The capacity grid end to end on a CI-sized CPCV experiment: same trained agents, costs rising with capital."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab.experiment.assembly import RESULTS_FILE as RUNNER_RESULTS
from sentio_lab.experiment.capacity import (
    RESULTS_FILE,
    CapacityConfig,
    capacity_table,
    load_capacity_config,
    main,
)

pytestmark = pytest.mark.slow  # trains a tiny CPCV experiment (~1-2 min on 2 idle cores)

EXPERIMENT = """
name = "tiny_capacity_cpcv"
dataset = "nasdaq"
data_start = "2001-01-01"
data_end = "2002-12-31"
split = "cpcv"
n_groups = 4
n_test_groups = 2
seeds = [1]
baselines = ["buy_and_hold", "random"]
random_seeds = 2
common_args = ["--window", "4", "--episode-length", "16", "--feature-cache-dir", "{cache}"]

[agents.tiny]
variant = "ppo"
args = ["--total-timesteps", "256", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--hidden-size", "8"]
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("capacity")
    experiment = root / "tiny.toml"
    experiment.write_text(EXPERIMENT.replace("{cache}", str(root / "cache")))
    capacity = root / "tiny_capacity.toml"
    capacity.write_text(f'name = "tiny_capacity"\nexperiment = "{experiment}"\noutput_root = "{root / "runs"}"\n'
                        "capitals = [1e6, 1e11]\nimpact_y = [1.0]\n")
    report = root / "report"
    results = main(["--config", str(capacity), "--report", str(report)])
    return root, capacity, report, results


def test_grid_rows_and_report_files(finished):
    root, _, report, results = finished
    assert set(results["capital"].dropna()) == {1e6, 1e11} and results["capital"].isna().any()
    assert set(results["name"]) == {"tiny", "buy_and_hold", "random"}
    assert (results["sample"] == "out of sample (CPCV test groups)").all()
    # 3 paths x (1 seed + 2 baselines) per cost model, 1 + 2 x 1 cost models
    assert len(results) == 3 * 3 * 3
    for name in ("capacity.csv", "capacity_table.csv", "capacity.png"):
        assert (report / name).stat().st_size > 500, name
    table = capacity_table(results)
    assert (table["runs"] == 3).all()
    stored = pd.read_parquet(root / "runs" / "tiny_capacity" / RESULTS_FILE)
    pd.testing.assert_frame_equal(stored, results)


def test_the_base_costs_reproduce_the_experiment(finished):
    """Under the experiment's own costs the grid's evaluation is the runner's: same agents, same paths."""
    root, _, _, results = finished
    runner = pd.read_parquet(root / "runs" / "tiny_capacity_cpcv" / RUNNER_RESULTS)
    base = results[results["capital"].isna()].set_index(["name", "seed", "path"]).sort_index()
    ref = runner.set_index(["name", "seed", "path"]).sort_index()
    np.testing.assert_allclose(base["sharpe"], ref.loc[base.index, "sharpe"], rtol=1e-12)
    costs_known = base["costs_paid"].notna()
    np.testing.assert_allclose(base.loc[costs_known, "costs_paid"], ref.loc[base.index[costs_known], "costs_paid"],
                               rtol=1e-9)


def test_costs_grow_with_capital_and_y(finished):
    _, _, _, results = finished
    for name in ("buy_and_hold", "tiny"):
        rows = results[results["name"] == name]
        base, small, large = (rows[rows["capital"].isna()].sort_values("path"),
                              *(rows[rows["capital"] == c].sort_values("path") for c in (1e6, 1e11)))
        assert (small["costs_paid"].to_numpy() > base["costs_paid"].to_numpy()).all(), name
        assert (large["costs_paid"].to_numpy() > small["costs_paid"].to_numpy()).all(), name
    bh = results[results["name"] == "buy_and_hold"]
    assert (bh[bh["capital"] == 1e11].sort_values("path")["sharpe"].to_numpy()
            < bh[bh["capital"] == 1e6].sort_values("path")["sharpe"].to_numpy()).all()


def test_a_rerun_resumes_and_bad_files_are_refused(finished, tmp_path):
    root, capacity, report, results = finished
    folds = sorted((root / "runs" / "tiny_capacity" / "folds").glob("*.parquet"))
    stamps = [f.stat().st_mtime_ns for f in folds]
    again = main(["--config", str(capacity), "--workers", "2"])  # worker processes find every fold done
    assert [f.stat().st_mtime_ns for f in folds] == stamps  # nothing re-evaluated
    pd.testing.assert_frame_equal(again, results)
    bad = tmp_path / "bad.toml"
    bad.write_text('experiment = "x.toml"\ncapital = [1]\n')
    with pytest.raises(ValueError, match="unknown keys \\['capital'\\]"):
        load_capacity_config(bad)
    config = CapacityConfig(name="n", experiment="e", capitals=(1e6,), impact_y=(0.7,), adv=1e9, participation=0.1)
    models = config.cost_models(__import__("sentio_lab.env.costs", fromlist=["CostModel"]).CostModel())
    assert len(models) == 2 and np.isnan(models[0][0]) and models[1][2].adv == 1e9
    assert models[1][2].participation == 0.1 and models[1][2].impact == "sqrt"
