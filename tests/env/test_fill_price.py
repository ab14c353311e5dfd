"""Fills at the next close (``fill_price="next_close"``) in the data layer, the market and the experiment runner.

The env, the numpy reference, the vectorbt replay and the independent ledger are checked against each other in
tests/test_env.py, tests/test_backtest.py and tests/test_ledger.py (the sections "fills at the next close").
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.data import CLOSE_ONLY_OPTIONAL, DataValidationError, canonicalize, load_market
from sentio_lab.data.loading import NEXT_CLOSE_NOTE, fill_price_note
from sentio_lab.env import TradingEnv
from sentio_lab.env.market import prepare_fold_market, prepare_market
from sentio_lab.env.splits import Fold
from sentio_lab.features import FeatureConfig, registered_producers


@pytest.fixture(scope="module")
def nasdaq_frame() -> pd.DataFrame:
    return load_market("nasdaq").frame


# ------------------------------------------------------------------------------------------ stale opens
def test_a_stale_open_range_loads_for_next_close_and_is_refused_for_next_open():
    with pytest.raises(DataValidationError, match="stale opens"):
        load_market("sp500", start="1999-01-04")
    with pytest.warns(UserWarning, match="allow"):  # the old way: accepted knowingly, same-bar fills on them
        allowed = load_market("sp500", start="1999-01-04", stale_opens="allow")
    market = load_market("sp500", start="1999-01-04", fill_price="next_close")  # no refusal, no warning
    assert len(market) == 5031 and market.frame.equals(allowed.frame)
    quality = market.quality
    assert len(quality.stale_stretches) == 2  # still reported, ...
    assert NEXT_CLOSE_NOTE in quality.notes and NEXT_CLOSE_NOTE in str(quality)  # ... and why they do not matter
    assert NEXT_CLOSE_NOTE in quality.to_markdown() and not quality.accepted_stale_stretches
    assert NEXT_CLOSE_NOTE not in load_market("nasdaq").quality.notes
    assert fill_price_note("next_open") == [] and fill_price_note("next_close") == [NEXT_CLOSE_NOTE]
    with pytest.raises(ValueError, match="--fill-price"):
        load_market("nasdaq", fill_price="next_mid")


def test_prepare_market_carries_the_fill_price_into_the_arrays_and_folds():
    market = prepare_market("sp500", FeatureConfig(), start="1999-01-04", fill_price="next_close")
    assert market.arrays.fill_price == "next_close" and market.arrays.fill is market.arrays.close
    assert market.data.frame.index[0] == pd.Timestamp("1999-01-04")
    n = len(market.data)
    fold = Fold(fold=0, method="walk_forward", train=((0, n // 2),), test=((n // 2 + 5, n),), groups=(1,), paths=(0,),
                purge=1, embargo=4)
    folded = prepare_fold_market(market, fold)
    assert folded.arrays.fill_price == "next_close"  # inherited from the base market
    # the same stale range cannot be turned into a next-open market behind the rule's back
    with pytest.raises(ValueError, match="--fill-price next_close"):
        prepare_fold_market(market, fold, fill_price="next_open")
    with pytest.raises(ValueError, match="--fill-price next_close"):
        prepare_fold_market(market.data, fold, feature_config=FeatureConfig())
    ok = prepare_fold_market(market.data, fold, feature_config=FeatureConfig(), fill_price="next_close")
    assert ok.arrays.fill_price == "next_close"
    default = prepare_market("nasdaq", FeatureConfig(), start="2010", end="2012")
    assert default.arrays.fill_price == "next_open" and default.arrays.fill is default.arrays.open
    small = Fold(0, "walk_forward", ((0, 300),), ((305, 500),), (1,), (0,), 1, 4)
    assert prepare_fold_market(default, small).arrays.fill_price == "next_open"


# ------------------------------------------------------------------------------------------ close-only data
def test_canonicalize_lets_close_only_columns_be_absent_or_nan(nasdaq_frame):
    raw = nasdaq_frame.iloc[:100]
    close_only = canonicalize(raw[["close"]], optional=CLOSE_ONLY_OPTIONAL)
    assert list(close_only.columns) == ["open", "high", "low", "close", "volume"]
    assert close_only[["open", "high", "low", "volume"]].isna().all().all()  # not known, never made up
    np.testing.assert_array_equal(close_only["close"], raw["close"])
    holes = raw.copy()
    holes.iloc[3, holes.columns.get_loc("open")] = np.nan
    assert np.isnan(canonicalize(holes, optional=CLOSE_ONLY_OPTIONAL)["open"].iloc[3])
    with pytest.raises(DataValidationError, match="NaN or inf in 'open'.*--fill-price next_close"):
        canonicalize(holes)
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['open', 'high', 'low', 'volume'\].*"
                                                  "--fill-price next_close"):
        canonicalize(raw[["close"]])
    # known values are still checked: a high below the close, an infinite open, a missing close
    bad = holes.copy()
    bad.iloc[5, bad.columns.get_loc("high")] = bad["close"].iloc[5] * 0.9
    with pytest.raises(DataValidationError, match="high below"):
        canonicalize(bad, optional=CLOSE_ONLY_OPTIONAL)
    bad = holes.copy()
    bad.iloc[5, bad.columns.get_loc("open")] = np.inf
    with pytest.raises(DataValidationError, match="NaN or inf in 'open'"):
        canonicalize(bad, optional=CLOSE_ONLY_OPTIONAL)
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['close'\]"):
        canonicalize(raw[["open"]], optional=CLOSE_ONLY_OPTIONAL)
    with pytest.raises(ValueError, match="only"):
        canonicalize(raw, optional=("close",))


def test_a_close_only_csv_trains_on_next_close_fills_with_the_close_bank(tmp_path, nasdaq_frame):
    path = tmp_path / "closes.csv"
    nasdaq_frame[["close"]].iloc[:800].rename(columns={"close": "Close"}).to_csv(path, index_label="Date")
    with pytest.raises(DataValidationError, match="--fill-price next_close"):
        load_market(path)
    with pytest.raises(DataValidationError, match="--feature-bank close"):  # the basic bank reads high/low/open
        prepare_market(path, FeatureConfig(), fill_price="next_close")
    market = prepare_market(path, FeatureConfig(bank="close"), fill_price="next_close")
    assert market.features.names == ["ret_1", "ret_5", "ret_20", "rvol_5", "rvol_20"]
    assert np.isnan(market.arrays.open).all() and np.isfinite(market.arrays.features[market.arrays.first_valid:]).all()
    assert NEXT_CLOSE_NOTE in market.data.quality.notes
    start, stop = market.range("train")
    env = TradingEnv(market.arrays, num_envs=4, window=8, episode_length=64, start=start, stop=stop, seed=0)
    env.reset()
    for step in range(100):
        _, reward, _, _, info = env.step(torch.tensor([step % 3, 2, 0, 1]))
        assert torch.isfinite(reward).all() and torch.isfinite(info["equity"]).all()
    # the same closes with real opens give the same features and fills: the opens are never read
    full = prepare_market("nasdaq", FeatureConfig(bank="close"), end=str(nasdaq_frame.index[799].date()),
                          fill_price="next_close")
    np.testing.assert_array_equal(full.arrays.features, market.arrays.features)
    np.testing.assert_array_equal(full.arrays.fill, market.arrays.fill)


def test_the_close_bank_reads_closes_only(nasdaq_frame):
    names = [p.name for p in registered_producers("close")]
    assert names == ["ret_1", "ret_5", "ret_20", "rvol_5", "rvol_20"]
    assert set(names) < {p.name for p in registered_producers("basic")}
    from sentio_lab.features import Bars

    bars = Bars.from_frame(nasdaq_frame.iloc[:200])
    blind = dataclasses.replace(bars, **{c: np.full(200, np.nan) for c in ("open", "high", "low", "volume")})
    for producer in registered_producers("close"):
        for key, column in producer(bars).items():
            np.testing.assert_array_equal(producer(blind)[key], column)


# ------------------------------------------------------------------------------------- evaluation and runner
def test_evaluations_record_their_fill_price_and_the_runner_costs_read_it():
    """An evaluation on a next-close market says so, its equity is the next-close replay's, and the runner's
    per-bar cost of its fills is priced at the closes (at the opens it would differ)."""
    from sentio_lab.agents.nets import MLPActorCritic
    from sentio_lab.env.costs import CostModel
    from sentio_lab.evaluation import backtest as bt
    from sentio_lab.evaluation.baselines import evaluate_baseline
    from sentio_lab.evaluation.episodes import evaluate_policy
    from sentio_lab.experiment.runner import _groups_frame

    market = prepare_market("sp500", FeatureConfig(), start="2003-01-02", end="2008-12-31", fill_price="next_close")
    n = len(market.data)
    fold = Fold(0, "walk_forward", ((0, n // 2),), ((n // 2 + 5, n),), (1,), (0,), 1, 4)
    folded = prepare_fold_market(market, fold)
    costs = CostModel(fee_bps=10, slippage_bps=5)
    frame = folded.data.frame
    evaluation = evaluate_baseline("sma_crossover", folded, window=8, positions=(-1.0, 0.0, 1.0), costs=costs)
    assert evaluation.fill_price == "next_close"
    weights = evaluation.weights.to_numpy()
    assert len(np.unique(weights)) > 1  # it trades inside the range
    replayed = bt.equity(bt.replay(frame, evaluation.start, weights, costs, fill_price="next_close"))
    np.testing.assert_allclose(replayed.to_numpy(), evaluation.equity.to_numpy(), rtol=1e-9)
    groups = _groups_frame([evaluation], fold, folded).set_index("timestamp")["cost"]
    paid = bt.fill_costs_paid(frame, evaluation.start, weights, costs, fill_price="next_close")
    np.testing.assert_allclose(groups.loc[paid.index].to_numpy(), paid.to_numpy(), rtol=1e-12, atol=1e-15)
    at_opens = bt.fill_costs_paid(frame, evaluation.start, weights, costs)
    assert np.max(np.abs(at_opens.to_numpy() - paid.to_numpy())) > 1e-6
    agent = MLPActorCritic(8 * folded.arrays.features.shape[1] + 1, 3, hidden=8)
    greedy = evaluate_policy(agent, folded, window=8, positions=(-1.0, 0.0, 1.0), costs=costs)
    assert greedy.fill_price == "next_close"
    # a non-flat model: the runner prices the fills by their own records (bt.fills), at the closes too
    impact = CostModel(fee_bps=10, slippage_bps=5, impact="sqrt", capital=1e9)
    costly = evaluate_baseline("sma_crossover", folded, window=8, positions=(-1.0, 0.0, 1.0), costs=impact)
    groups = _groups_frame([costly], fold, folded).set_index("timestamp")["cost"]
    paid = bt.fill_costs_paid(frame, costly.start, costly.weights.to_numpy(), impact, fill_price="next_close")
    np.testing.assert_allclose(groups.loc[paid.index].to_numpy(), paid.to_numpy(), rtol=1e-12, atol=1e-15)
    assert np.max(np.abs(bt.fill_costs_paid(frame, costly.start, costly.weights.to_numpy(), impact).to_numpy()
                         - paid.to_numpy())) > 1e-6


# ------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("variant", ["ppo", "ppo_masked", "ppo_risk", "ppo_transformer"])
def test_every_variant_takes_fill_price_and_builds_its_market_with_it(variant):
    from sentio_lab.agents.training import market_from
    from sentio_lab.experiment.cells import parse_variant_args

    default = parse_variant_args(variant, ["--dataset", "nasdaq"])
    assert default.data.fill_price == "next_open"
    args = parse_variant_args(variant, ["--dataset", "sp500", "--data-start", "2004-01-02", "--data-end", "2008-12-31",
                                        "--fill-price", "next_close", "--window", "4", "--episode-length", "16"])
    assert args.data.fill_price == "next_close"
    market = market_from(args)
    assert market.arrays.fill_price == "next_close" and NEXT_CLOSE_NOTE in market.data.quality.notes
    with pytest.raises(SystemExit):
        parse_variant_args(variant, ["--fill-price", "next_mid"])


def test_a_trained_agent_is_evaluated_with_its_fill_price(tmp_path):
    from sentio_lab import ppo
    from sentio_lab.agents.checkpoint import load_checkpoint
    from sentio_lab.agents.variants import load_trained
    from sentio_lab.evaluation.episodes import evaluate_checkpoint

    args = ppo.Args.from_flat(dataset="sp500", data_start="2004-01-02", data_end="2008-12-31", fill_price="next_close",
                              window=4, episode_length=16, total_timesteps=128, num_envs=4, num_steps=32,
                              num_minibatches=2, update_epochs=1, hidden_size=8, track=False, progress=False,
                              run_dir=str(tmp_path), feature_cache_dir=None)
    result = ppo.train(args)
    path = result.checkpoint_path
    assert load_checkpoint(path)["args"]["data"]["fill_price"] == "next_close"
    trained = load_trained(path)
    assert trained.market.arrays.fill_price == "next_close" and trained.market.data.frame.index[0].year == 2004
    assert evaluate_checkpoint(path, "validation").fill_price == "next_close"
    # the command-line report replays the agent in vectorbt at the same fills (sp500 2004-2008 has stale opens: a
    # replay at the opens would differ from the env's equity, and the report refuses a replay that differs)
    from sentio_lab.evaluation.agent_report import write_checkpoint_report

    comparison, paths = write_checkpoint_report(path, range_name="validation", output=tmp_path / "report")
    assert comparison.agent.fill_price == "next_close" and paths


def test_an_experiment_fills_at_the_next_close_when_its_agents_do(tmp_path):
    from sentio_lab.experiment.cells import parse_variant_args
    from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
    from sentio_lab.experiment.runner import fold_market, plan_experiment
    from sentio_lab.ppo import feature_config

    tiny = ("--total-timesteps", "256", "--num-envs", "8", "--num-steps", "16", "--hidden-size", "8")
    config = ExperimentConfig(
        name="next_close", dataset="sp500", data_start="2003-01-02", data_end="2006-12-29", split="cpcv",
        n_groups=4, n_test_groups=2, seeds=(1,), random_seeds=1,
        common_args=("--window", "4", "--episode-length", "16", "--feature-cache-dir", str(tmp_path),
                     "--fill-price", "next_close"),
        agents=(AgentSpec("tiny", "ppo", tiny),),
    )
    plan = plan_experiment(config)  # the range holds stale opens: loads because every agent fills at the close
    assert plan.accounting["fill_price"] == "next_close"
    market = fold_market(plan, plan.folds[0], feature_config(parse_variant_args("ppo", plan.cells[0].args)))
    assert market.arrays.fill_price == "next_close"
    mixed = ExperimentConfig(**{**config.__dict__, "common_args": config.common_args[:-2], "agents": (
        AgentSpec("a", "ppo", (*tiny, "--fill-price", "next_close")), AgentSpec("b", "ppo", tiny))})
    with pytest.raises(ValueError, match="fill price"):
        plan_experiment(mixed)


def test_a_placebo_fold_market_keeps_the_fill_price():
    from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
    from sentio_lab.experiment.memorisation import placebo_market

    market = prepare_market("nasdaq", FeatureConfig(cache_dir=None), start="2010", end="2012", fill_price="next_close")
    fold = Fold(0, "walk_forward", ((0, 300),), ((305, 500),), (1,), (0,), 1, 4)
    real = prepare_fold_market(market, fold)
    config = ExperimentConfig(name="x", agents=(AgentSpec("a", "ppo"),), placebo="stationary_bootstrap")
    placebo = placebo_market(real, config, 0)
    assert real.arrays.fill_price == placebo.arrays.fill_price == "next_close"
    assert placebo.arrays.fill is placebo.arrays.close
