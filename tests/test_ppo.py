import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from sentio_lab import ppo
from sentio_lab.checkpoint import REQUIRED_KEYS, load_checkpoint
from sentio_lab.evaluate import evaluate_policy
from sentio_lab.metrics import sharpe_ratio


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_help_lists_every_argument():
    out = subprocess.run([sys.executable, "-m", "sentio_lab.ppo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--time-budget-s", "--resume", "--total-timesteps", "--fee-bps", "--track", "--no-track"):
        assert flag in out


def test_same_seed_same_weights_other_seed_differs(tiny_args, synthetic_market):
    first = ppo.train(tiny_args, market=synthetic_market)
    again = ppo.train(dataclasses.replace(tiny_args, run_name="again"), market=synthetic_market)
    other = ppo.train(dataclasses.replace(tiny_args, run_name="other", seed=2), market=synthetic_market)
    assert weights_equal(first.agent, again.agent)
    assert not weights_equal(first.agent, other.agent)
    assert first.finished and first.global_step == tiny_args.total_timesteps


def test_split_run_resumed_equals_uninterrupted(tiny_args, synthetic_market):
    whole = ppo.train(dataclasses.replace(tiny_args, total_timesteps=8 * 16 * 5), market=synthetic_market)
    part = ppo.train(dataclasses.replace(tiny_args, total_timesteps=8 * 16 * 5, run_name="split", max_iterations=2),
                     market=synthetic_market)
    assert not part.finished and part.global_step == 8 * 16 * 2
    bundle = load_checkpoint(part.checkpoint_path, variant="ppo")
    assert set(REQUIRED_KEYS) <= set(bundle)
    assert bundle["iteration"] == 2 and bundle["global_step"] == 8 * 16 * 2
    assert bundle["data_fingerprint"] == synthetic_market.data.fingerprint
    assert "obs_norm.mean" in bundle["agent"] and bundle["optimizer"]["state"]
    resumed = ppo.train(ppo.Args(resume=str(part.checkpoint_path), track=False, progress=False),
                        market=synthetic_market)
    assert resumed.finished and resumed.global_step == whole.global_step
    assert weights_equal(whole.agent, resumed.agent)
    assert resumed.history[-1]["charts/episode_log_return"] == whole.history[-1]["charts/episode_log_return"]


def test_resume_refuses_other_data(tiny_args, synthetic_market, sp500_market):
    part = ppo.train(dataclasses.replace(tiny_args, max_iterations=1), market=synthetic_market)
    with pytest.raises(ValueError, match="other data"):
        ppo.train(ppo.Args(resume=str(part.checkpoint_path), track=False, progress=False), market=sp500_market)


def test_time_budget_stops_cleanly_and_saves(tiny_args, synthetic_market):
    result = ppo.train(dataclasses.replace(tiny_args, time_budget_s=0.0), market=synthetic_market)
    assert not result.finished and result.global_step == 8 * 16
    assert load_checkpoint(result.checkpoint_path)["iteration"] == 1


def test_too_few_timesteps_is_an_error(tiny_args):
    with pytest.raises(ValueError, match="one rollout"):
        ppo.train(dataclasses.replace(tiny_args, total_timesteps=10))


def test_variants_of_the_update_run_and_log(tiny_args, synthetic_market):
    args = dataclasses.replace(tiny_args, target_kl=0.0, clip_vloss=False, norm_obs=False, anneal_lr=False,
                               checkpoint_every=1)
    result = ppo.train(args, market=synthetic_market)
    assert result.agent.obs_norm is None
    assert len(result.history) == 3
    record = result.history[-1]
    for key in ("losses/approx_kl", "losses/clipfrac", "losses/explained_variance", "charts/SPS"):
        assert np.isfinite(record[key])
    assert record["charts/learning_rate"] == args.learning_rate


def test_truncated_episodes_are_counted_and_learning_rate_anneals(tiny_args, synthetic_market):
    result = ppo.train(tiny_args, market=synthetic_market)
    # episode_length 24 < 48 steps per env: episodes finished and their log returns were recorded
    assert np.isfinite(result.history[-1]["charts/episode_log_return"])
    lrs = [h["charts/learning_rate"] for h in result.history]
    assert lrs[0] == tiny_args.learning_rate and lrs[1] < lrs[0]


def test_tracking_writes_offline_wandb_files(tiny_args, synthetic_market, tmp_path):
    ppo.train(dataclasses.replace(tiny_args, track=True, run_dir=str(tmp_path / "tracked")), market=synthetic_market)
    runs = list((tmp_path / "tracked" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_main_runs_from_the_command_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", [
        "ppo", "--total-timesteps", "256", "--num-envs", "8", "--num-steps", "32", "--window", "8",
        "--episode-length", "32", "--no-track", "--no-progress", "--run-dir", str(tmp_path),
    ])
    ppo.main()
    out = capsys.readouterr().out
    assert "finished at step 256" in out
    assert list(tmp_path.rglob("checkpoint.pt"))


def test_observation_uses_the_talib_bank_regimes_and_higher_timeframe(tiny_args):
    from sentio_lab.evaluate import evaluate_checkpoint, load_trained

    args = dataclasses.replace(tiny_args, feature_bank="talib", regimes=2, regime_restarts=1, timeframes=("W-FRI",),
                               window=2, total_timesteps=8 * 16)
    result = ppo.train(args)
    features = result.market.features
    assert set(features.blocks) == {"base", "W-FRI", "regime"}
    assert features.blocks["base"].stop - features.blocks["base"].start >= 150
    assert result.agent.obs_norm.mean.shape[0] == args.window * len(features.names) + 1
    # the checkpoint restores the same fitted pipeline: identical feature matrix, same greedy episode
    trained = load_trained(result.checkpoint_path)
    np.testing.assert_array_equal(trained.market.features.values, features.values)
    again = evaluate_checkpoint(result.checkpoint_path, "validation")
    live = evaluate_policy(result.agent, result.market, window=2, positions=args.positions,
                           costs=ppo.cost_model(args), range_name="validation")
    assert again.weights.equals(live.weights) and again.equity.equals(live.equity)


@pytest.mark.slow
def test_agent_learns_an_announced_move(synthetic_market, tmp_path):
    """Out of sample, the trained agent's Sharpe is far above a random agent's (net of costs)."""
    args = ppo.Args(total_timesteps=32 * 64 * 12, num_envs=32, num_steps=64, window=1, episode_length=64,
                    fee_bps=1.0, slippage_bps=1.0, track=False, progress=False, run_dir=str(tmp_path), seed=3)
    result = ppo.train(args, market=synthetic_market)
    trained = evaluate_policy(result.agent, synthetic_market, window=1, positions=args.positions,
                              costs=ppo.cost_model(args))
    trained_sharpe = sharpe_ratio(trained.equity.pct_change().dropna(), periods=252)

    class RandomAgent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))
            self.gen = torch.Generator().manual_seed(0)

        def act_greedy(self, obs):
            return torch.randint(0, 3, (obs.shape[0],), generator=self.gen)

    random_eval = evaluate_policy(RandomAgent(), synthetic_market, window=1, positions=args.positions,
                                  costs=ppo.cost_model(args))
    random_sharpe = sharpe_ratio(random_eval.equity.pct_change().dropna(), periods=252)
    assert trained.range_name == "test" and len(trained.weights) > 500
    assert trained_sharpe > 5.0
    assert trained_sharpe > random_sharpe + 5.0
