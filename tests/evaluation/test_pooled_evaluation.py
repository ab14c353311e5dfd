"""Pooled training and evaluation: one instrument pooled is the plain run, per-instrument = evaluate_policy alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab import ppo
from sentio_lab.agents.variants import load_trained
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import prepare_market
from sentio_lab.env.pool import PooledMarket
from sentio_lab.evaluation.agent_report import training_summary
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.evaluation.metrics import periods_per_year, sharpe_ratio
from sentio_lab.evaluation.pooled import evaluate_pool, pooled_returns
from sentio_lab.features import FeatureConfig

BARS = 600


def write_walk(folder, name: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2003-01-01", periods=BARS, name="date")
    close = 50 * np.exp(np.cumsum(rng.normal(0.0003, 0.012, BARS)))
    opens = close * np.exp(rng.normal(0, 0.004, BARS))
    frame = pd.DataFrame({"open": opens, "high": np.maximum(opens, close) * 1.003,
                          "low": np.minimum(opens, close) * 0.997, "close": close,
                          "volume": rng.uniform(1e5, 1e6, BARS)}, index=dates)
    path = folder / f"{name}.csv"
    frame.to_csv(path)
    return str(path)


@pytest.fixture()
def walks(tmp_path):
    return [write_walk(tmp_path, name, seed) for seed, name in enumerate(("x", "y"))]


def test_one_instrument_pool_is_the_plain_run_bit_for_bit(tiny_args, walks):
    """The same file as --dataset and as a pool of one: identical weights, history and features."""
    plain = ppo.train(tiny_args.replace(dataset=walks[0], run_name="plain"))
    pooled = ppo.train(tiny_args.replace(pool=(walks[0],), run_name="pooled"))
    assert isinstance(pooled.market, PooledMarket) and not isinstance(plain.market, PooledMarket)
    for (name, a), (_, b) in zip(plain.agent.state_dict().items(), pooled.agent.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    keys = ("losses/value_loss", "charts/episode_log_return")
    assert [[h[k] for k in keys] for h in plain.history] == [[h[k] for k in keys] for h in pooled.history]


def test_pooled_run_trains_evaluates_and_reloads(tiny_args, walks):
    """A two-instrument run: per instrument = evaluate_policy on that instrument prepared alone; the pooled figures
    are the mean of per-instrument Sharpes and the Sharpe of the equal-weight book; the checkpoint reloads."""
    result = ppo.train(tiny_args.replace(pool=tuple(walks), checkpoint_every=1))
    pool, args = result.market, result.args
    assert isinstance(pool, PooledMarket) and pool.instruments == tuple(walks)
    costs = CostModel(fee_bps=args.env.fee_bps, slippage_bps=args.env.slippage_bps)
    agent = result.agent.eval()
    evaluation = evaluate_pool(agent, pool, window=args.features.window, positions=tuple(args.env.positions),
                               costs=costs, range_name="validation")
    sharpes = []
    for path in walks:
        alone = prepare_market(path, FeatureConfig(cache_dir=args.features.feature_cache_dir))
        reference = evaluate_policy(agent, alone, window=args.features.window, positions=tuple(args.env.positions),
                                    costs=costs, range_name="validation")
        pd.testing.assert_series_equal(evaluation.per_instrument[path].equity, reference.equity, rtol=0, atol=0)
        pd.testing.assert_series_equal(evaluation.per_instrument[path].weights, reference.weights, rtol=0, atol=0)
        sharpes.append(float(reference.summary["sharpe"]))
    assert evaluation.mean_sharpe == pytest.approx(np.mean(np.nan_to_num(sharpes)), abs=1e-12)
    returns = [evaluation.per_instrument[p].equity.pct_change().iloc[1:] for p in walks]
    book = (returns[0] + returns[1]) / 2
    pd.testing.assert_series_equal(pooled_returns(evaluation.per_instrument), book.rename("pooled_return"))
    expected = sharpe_ratio(book.to_numpy(), periods_per_year(evaluation.per_instrument[walks[0]].equity.index))
    assert evaluation.pooled_sharpe == pytest.approx(0.0 if np.isnan(expected) else expected, abs=1e-12)
    table = evaluation.table()
    assert list(table.index[:2]) == walks and "pooled (equal-weight book)" in table.index
    assert "over 2 instrument(s)" in evaluation.describe()
    assert "over 2 instrument(s)" in training_summary(result)
    trained = load_trained(result.checkpoint_path)
    assert isinstance(trained.market, PooledMarket)
    np.testing.assert_array_equal(trained.market.arrays.features, pool.arrays.features)
    for a, b in zip(trained.agent.state_dict().values(), result.agent.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="its own instruments"):
        load_trained(result.checkpoint_path, dataset=walks[0])
    assert result.args.run.run_name == "tiny" and "pool" in ppo.training.derive_sizes(
        tiny_args.replace(pool=tuple(walks), run_name="")).run.run_name


def test_pooled_run_refuses_non_flat_costs_in_one_line(tiny_args, walks):
    with pytest.raises(SystemExit, match="error: --pool with --spread"):
        ppo.run_cli(ppo.Args, ppo.train, prog="ppo", argv=[
            "--pool", *walks, "--spread", "corwin_schultz", "--no-track", "--no-progress", "--window", "8",
            "--episode-length", "24", "--total-timesteps", "128", "--num-envs", "8", "--num-steps", "16",
            "--run-dir", tiny_args.run.run_dir])
