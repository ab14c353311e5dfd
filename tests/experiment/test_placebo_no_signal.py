"""On a market with nothing to learn, the default configuration's in-sample Sharpe is inside its placebo floor."""

import numpy as np
import pandas as pd
import pytest

from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
from sentio_lab.experiment.memorisation import MEMORISATION_FILE, gap_table, placebo_table
from sentio_lab.experiment.runner import plan_experiment, run_experiment


def random_walk_csv(path, n: int = 1400, seed: int = 0) -> str:
    """Daily OHLCV of a driftless random walk (1% daily volatility): no predictability at all."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(0.01 * rng.standard_normal(n)))
    open_ = np.r_[100.0, close[:-1]] * np.exp(0.002 * rng.standard_normal(n))
    high = np.maximum(open_, close) * np.exp(np.abs(0.003 * rng.standard_normal(n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(0.003 * rng.standard_normal(n)))
    frame = pd.DataFrame({"date": pd.bdate_range("2001-01-02", periods=n).strftime("%Y-%m-%d"), "open": open_,
                          "high": high, "low": low, "close": close, "volume": rng.integers(10**5, 10**6, n)})
    frame.to_csv(path, index=False)
    return str(path)


@pytest.mark.slow
def test_default_configuration_on_a_random_walk_is_inside_its_placebo_floor(tmp_path):
    config = ExperimentConfig(
        name="random_walk_placebo", dataset=random_walk_csv(tmp_path / "random_walk.csv"), split="walk_forward",
        n_groups=1, seeds=(1, 2, 3), baselines=("buy_and_hold",), placebo="stationary_bootstrap",
        placebo_block_mean=5, placebo_seeds=5,
        common_args=("--feature-cache-dir", str(tmp_path / "cache")),
        agents=(AgentSpec("default", "ppo", ("--total-timesteps", "16384")),),  # defaults, a CI-sized budget
    )
    plan = plan_experiment(config)
    run_experiment(plan, tmp_path / "run", progress=False)
    memo = pd.read_parquet(tmp_path / "run" / MEMORISATION_FILE)
    real = memo[(memo["kind"] == "agent") & (memo["part"] == "in_sample")]["sharpe"].to_numpy()
    placebo = memo[(memo["kind"] == "placebo") & (memo["part"] == "in_sample")]["sharpe"].to_numpy()
    print("real", np.round(real, 3), "placebo", np.round(np.sort(placebo), 3))
    assert len(real) == 3 and len(placebo) == 5
    floor = placebo_table(memo).loc["default", "floor"]
    assert np.quantile(placebo, 0.05) <= np.median(real) <= floor
    assert gap_table(memo).loc["default", "noise_share"] >= 2 / 3
