import dataclasses

import numpy as np
import pandas as pd
import pytest

from sentio_lab import ppo
from sentio_lab.evaluate import evaluate_checkpoint, evaluate_policy, load_trained, load_variant


def test_unknown_variant():
    with pytest.raises(KeyError, match="unknown variant"):
        load_variant("nope")


def test_checkpoint_evaluation_equals_live_agent(tiny_args, sp500_market):
    result = ppo.train(tiny_args, market=sp500_market)
    live = evaluate_policy(result.agent, sp500_market, window=tiny_args.window, positions=tiny_args.positions,
                           costs=ppo.cost_model(tiny_args))
    restored = evaluate_checkpoint(result.checkpoint_path)
    pd.testing.assert_series_equal(live.weights, restored.weights)
    pd.testing.assert_series_equal(live.equity, restored.equity)
    test_start, test_stop = sp500_market.range("test")
    assert restored.start == test_start and restored.equity.index[-1] == sp500_market.data.frame.index[test_stop - 1]
    assert len(restored.equity) == len(restored.weights) + 1 and restored.equity.iloc[0] == 1.0
    assert set(np.unique(restored.weights)) <= set(tiny_args.positions)


def test_checkpoint_on_changed_data_is_refused(tiny_args, sp500_market, tmp_path):
    frame = sp500_market.data.frame.copy()
    csv = tmp_path / "sp500.csv"
    frame.to_csv(csv)
    args = dataclasses.replace(tiny_args, dataset=str(csv))
    result = ppo.train(args)
    trained = load_trained(result.checkpoint_path)
    assert trained.market.data.fingerprint == sp500_market.data.fingerprint
    frame.iloc[-1, frame.columns.get_loc("close")] *= 1.001
    frame.iloc[-1, frame.columns.get_loc("high")] *= 1.002
    frame.to_csv(csv)
    with pytest.raises(ValueError, match="fingerprint"):
        load_trained(result.checkpoint_path)
    # evaluating on other data is possible when asked for explicitly
    other = evaluate_checkpoint(result.checkpoint_path, dataset=csv)
    assert other.equity.iloc[0] == 1.0


def test_ruin_ends_the_evaluation_early(sp500_market):
    class AlwaysLong:
        def parameters(self):
            import torch

            yield torch.zeros(1)

        def act_greedy(self, obs):
            import torch

            return torch.full((obs.shape[0],), 1, dtype=torch.long)

    # 50x leverage on a daily index goes bust on the first big down day of the range
    evaluation = evaluate_policy(AlwaysLong(), sp500_market, window=8, positions=(0.0, 50.0),
                                 costs=ppo.cost_model(ppo.Args()), range_name="train")
    assert evaluation.ruined and evaluation.equity.iloc[-1] == 1e-12
    assert (evaluation.equity.iloc[:-1] > 1e-12).all()
    from sentio_lab.metrics import summary_stats

    stats = summary_stats(evaluation.equity, evaluation.weights)  # a ruined curve still gets its statistics
    assert stats["total_return"] == pytest.approx(-1.0)
    assert len(evaluation.weights) < sp500_market.range("train")[1] - sp500_market.range("train")[0] - 8


def test_evaluation_charges_the_checkpoints_borrow_and_old_checkpoints_none(tiny_args, sp500_market, tmp_path):
    """The cost model of an evaluation comes from the checkpoint's args, short borrow included; a checkpoint
    saved before ``borrow_bps`` existed (no such key in its args) is evaluated with no borrow."""
    from sentio_lab.checkpoint import load_checkpoint, save_checkpoint
    from sentio_lab.costs import CostModel

    if "borrow_bps" not in {f.name for f in dataclasses.fields(ppo.Args)}:
        pytest.skip("ppo.Args has no borrow_bps field yet")
    args = dataclasses.replace(tiny_args, borrow_bps=2_000.0, positions=(-1.0, 0.0, 1.0))
    result = ppo.train(args, market=sp500_market)
    restored = evaluate_checkpoint(result.checkpoint_path)
    assert restored.costs == CostModel(fee_bps=args.fee_bps, slippage_bps=args.slippage_bps, borrow_bps=2_000.0)
    live = evaluate_policy(result.agent, sp500_market, window=args.window, positions=args.positions,
                           costs=restored.costs)
    pd.testing.assert_series_equal(live.equity, restored.equity)
    free = evaluate_policy(result.agent, sp500_market, window=args.window, positions=args.positions,
                           costs=CostModel(fee_bps=args.fee_bps, slippage_bps=args.slippage_bps))
    pd.testing.assert_series_equal(free.weights, restored.weights)  # borrow is not in the observation
    if (restored.weights < 0).any():  # a short was held: it paid
        assert restored.equity.iloc[-1] < free.equity.iloc[-1]

    bundle = load_checkpoint(result.checkpoint_path)
    del bundle["args"]["borrow_bps"]
    bundle.pop("format_version", None)
    old_path = save_checkpoint(tmp_path / "old.pt", bundle)
    old = evaluate_checkpoint(old_path)
    assert old.costs.borrow_bps == 0.0
    pd.testing.assert_series_equal(old.equity, free.equity)
