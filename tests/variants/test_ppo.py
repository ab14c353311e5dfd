import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab import ppo
from sentio_lab.agents import training
from sentio_lab.agents.checkpoint import REQUIRED_KEYS, CheckpointError, load_checkpoint, save_checkpoint
from sentio_lab.agents.rollout import NonFiniteError
from sentio_lab.agents.variants import load_trained
from sentio_lab.data import DataValidationError
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.evaluation.metrics import sharpe_ratio


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_help_lists_every_argument():
    out = subprocess.run([sys.executable, "-m", "sentio_lab.ppo", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--time-budget-s", "--resume", "--total-timesteps", "--fee-bps", "--track", "--no-track",
                 "--feature-seed", "--borrow-bps", "--data-start", "--data-end", "--stale-opens"):
        assert flag in out


def test_same_seed_same_weights_other_seed_differs(tiny_args, synthetic_market):
    first = ppo.train(tiny_args, market=synthetic_market)
    again = ppo.train(tiny_args.replace(run_name="again"), market=synthetic_market)
    other = ppo.train(tiny_args.replace(run_name="other", seed=2), market=synthetic_market)
    assert weights_equal(first.agent, again.agent)
    assert not weights_equal(first.agent, other.agent)
    assert first.finished and first.global_step == tiny_args.ppo.total_timesteps


def test_split_run_resumed_equals_uninterrupted(tiny_args, synthetic_market):
    whole = ppo.train(tiny_args.replace(total_timesteps=8 * 16 * 5), market=synthetic_market)
    part = ppo.train(tiny_args.replace(total_timesteps=8 * 16 * 5, run_name="split", max_iterations=2),
                     market=synthetic_market)
    assert not part.finished and part.global_step == 8 * 16 * 2
    bundle = load_checkpoint(part.checkpoint_path, variant="ppo")
    assert set(REQUIRED_KEYS) <= set(bundle)
    assert bundle["iteration"] == 2 and bundle["global_step"] == 8 * 16 * 2
    assert bundle["data_fingerprint"] == synthetic_market.data.fingerprint
    assert "obs_norm.mean" in bundle["agent"] and bundle["optimizer"]["state"]
    # tensors and plain python only: loads with weights_only=True and needs no allow-list at all
    assert torch.serialization.get_unsafe_globals_in_checkpoint(part.checkpoint_path) == []
    resumed = ppo.train(ppo.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False),
                        market=synthetic_market)
    assert resumed.finished and resumed.global_step == whole.global_step
    assert weights_equal(whole.agent, resumed.agent)
    assert resumed.history[-1]["charts/episode_log_return"] == whole.history[-1]["charts/episode_log_return"]


def test_resume_refuses_other_data(tiny_args, synthetic_market, sp500_market):
    part = ppo.train(tiny_args.replace(max_iterations=1), market=synthetic_market)
    with pytest.raises(ValueError, match="other data"):
        ppo.train(ppo.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False),
                  market=sp500_market)


def test_time_budget_stops_cleanly_and_saves(tiny_args, synthetic_market):
    result = ppo.train(tiny_args.replace(time_budget_s=0.0), market=synthetic_market)
    assert not result.finished and result.global_step == 8 * 16
    assert load_checkpoint(result.checkpoint_path)["iteration"] == 1


def test_too_few_timesteps_is_an_error(tiny_args):
    with pytest.raises(ValueError, match="one rollout"):
        ppo.train(tiny_args.replace(total_timesteps=10))


def test_variants_of_the_update_run_and_log(tiny_args, synthetic_market):
    args = tiny_args.replace(target_kl=0.0, clip_vloss=False, norm_obs=False, anneal_lr=False,
                               checkpoint_every=1)
    result = ppo.train(args, market=synthetic_market)
    assert result.agent.obs_norm is None
    assert len(result.history) == 3
    record = result.history[-1]
    for key in ("losses/approx_kl", "losses/clipfrac", "losses/explained_variance", "charts/SPS"):
        assert np.isfinite(record[key])
    assert record["charts/learning_rate"] == args.ppo.learning_rate


def test_truncated_episodes_are_counted_and_learning_rate_anneals(tiny_args, synthetic_market):
    result = ppo.train(tiny_args, market=synthetic_market)
    # episode_length 24 < 48 steps per env: episodes finished and their log returns were recorded
    assert np.isfinite(result.history[-1]["charts/episode_log_return"])
    lrs = [h["charts/learning_rate"] for h in result.history]
    assert lrs[0] == tiny_args.ppo.learning_rate and lrs[1] < lrs[0]


def test_tracking_writes_offline_wandb_files(tiny_args, synthetic_market, tmp_path):
    ppo.train(tiny_args.replace(track=True, run_dir=str(tmp_path / "tracked")), market=synthetic_market)
    runs = list((tmp_path / "tracked" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_main_runs_from_the_command_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", [
        "ppo", "--total-timesteps", "256", "--num-envs", "8", "--num-steps", "32", "--window", "8",
        "--episode-length", "32", "--no-track", "--run-dir", str(tmp_path),
    ])
    ppo.main()
    out = capsys.readouterr().out
    assert "finished at step 256" in out
    assert "data quality of sp500" in out and "stale-open stretches" in out  # printed before training
    (checkpoint,) = tmp_path.rglob("checkpoint.pt")
    quality = load_checkpoint(checkpoint)["data_quality"]  # saved with the run
    assert quality["source"] == "sp500" and quality["stale_stretches"] == [] and quality["default_start_used"]
    # resuming with a changed experiment argument: a one-line error naming it, not a traceback
    monkeypatch.setattr(sys, "argv", ["ppo", "--resume", str(checkpoint), "--gamma", "0.5", "--no-track"])
    with pytest.raises(SystemExit, match="error: --resume .*gamma: given 0.5, checkpoint 0.99"):
        ppo.main()


def test_observation_uses_the_talib_bank_regimes_and_higher_timeframe(tiny_args):
    from sentio_lab.evaluation.episodes import evaluate_checkpoint

    args = tiny_args.replace(feature_bank="talib", regimes=2, regime_restarts=1, timeframes=("W-FRI",),
                               window=2, total_timesteps=8 * 16)
    result = ppo.train(args)
    features = result.market.features
    assert set(features.blocks) == {"base", "W-FRI", "regime"}
    assert features.blocks["base"].stop - features.blocks["base"].start >= 150
    assert result.agent.obs_norm.mean.shape[0] == args.features.window * len(features.names) + 1
    # the checkpoint restores the same fitted pipeline: identical feature matrix, same greedy episode
    assert torch.serialization.get_unsafe_globals_in_checkpoint(result.checkpoint_path) == []  # HMM state too
    trained = load_trained(result.checkpoint_path)
    np.testing.assert_array_equal(trained.market.features.values, features.values)
    again = evaluate_checkpoint(result.checkpoint_path, "validation")
    live = evaluate_policy(result.agent, result.market, window=2, positions=args.env.positions,
                           costs=ppo.cost_model(args), range_name="validation")
    assert again.weights.equals(live.weights) and again.equity.equals(live.equity)


def test_resume_refuses_changed_experiment_arguments_and_names_them(tiny_args, synthetic_market):
    part = ppo.train(tiny_args.replace(max_iterations=1), market=synthetic_market)
    resume = dict(resume=str(part.checkpoint_path), track=False, progress=False)
    with pytest.raises(CheckpointError) as refused:
        ppo.train(ppo.Args.from_flat(**resume, learning_rate=1e-3, gamma=0.9, positions=(0.0, 1.0)),
                  market=synthetic_market)
    message = str(refused.value)
    assert "learning_rate: given 0.001, checkpoint 0.00025" in message
    assert "gamma: given 0.9, checkpoint 0.99" in message
    assert "positions: given (0.0, 1.0), checkpoint (-1.0, 0.0, 1.0)" in message
    assert "window" not in message  # left at its default (32): taken from the checkpoint (8), no conflict
    # the checkpoint's own values may be repeated, run control may change, defaults are filled from the checkpoint
    resumed = ppo.train(ppo.Args.from_flat(**resume, num_envs=8, window=32, max_iterations=1), market=synthetic_market)
    assert resumed.args.features.window == 8 and resumed.args.ppo.num_envs == 8 and resumed.global_step == 8 * 16 * 2


def test_cuda_checkpoint_resumes_on_a_cpu_machine_with_a_warning(tiny_args, synthetic_market, monkeypatch):
    """Faked without a GPU: the bundle says cuda and carries a CUDA-sized generator state the CPU cannot take."""
    part = ppo.train(tiny_args.replace(max_iterations=1), market=synthetic_market)
    bundle = load_checkpoint(part.checkpoint_path)
    bundle["args"]["run"]["device"] = "cuda"
    bundle["extra"]["device"] = "cuda"
    bundle["env_state"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox state is 16 bytes
    bundle["rng"]["torch_cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    del bundle["format_version"]
    cuda_path = save_checkpoint(part.checkpoint_path.with_name("cuda.pt"), bundle)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="trained on cuda, continuing on cpu.*bit-identical.*only on the same"):
        resumed = ppo.train(ppo.Args.from_flat(resume=str(cuda_path), track=False, progress=False),
                            market=synthetic_market)
    assert resumed.finished and resumed.global_step == tiny_args.ppo.total_timesteps
    assert resumed.args.run.device == "cpu" and next(resumed.agent.parameters()).device.type == "cpu"
    assert load_checkpoint(cuda_path)["extra"]["device"] == "cpu"  # the run now continues on cpu


class NaNAfter:
    """A TradingEnv whose rewards turn NaN after ``steps`` steps (a corrupted market, a numerical blow-up)."""

    def __init__(self, env, steps: int):
        self.env, self.steps_left = env, steps
        self.obs_dim, self.num_actions = env.obs_dim, env.num_actions

    def reset(self):
        return self.env.reset()

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps_left -= 1
        if self.steps_left < 0:
            reward = torch.full_like(reward, float("nan"))
        return obs, reward, terminated, truncated, info

    def state_dict(self):
        return self.env.state_dict()


def test_non_finite_rewards_stop_the_run_and_keep_the_last_good_checkpoint(tiny_args, synthetic_market):
    args = tiny_args.replace(checkpoint_every=1)  # 3 iterations of 16 steps: saves after 1 and 2
    env = NaNAfter(ppo.make_env(args, synthetic_market), steps=2 * 16 + 5)
    with pytest.raises(NonFiniteError, match=r"iteration 3: the rollout produced non-finite rewards") as err:
        ppo.train(args, market=synthetic_market, env=env)
    path = Path(args.run.run_dir) / args.run.run_name / "checkpoint.pt"
    assert f"{path} (iteration 2), is left as it was" in str(err.value)
    kept = load_checkpoint(path)
    assert kept["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in kept["agent"].values())


def test_non_finite_loss_stops_before_the_optimizer_steps(tiny_args, synthetic_market, monkeypatch):
    calls = {"n": 0}
    real_value_loss = ppo.value_loss

    def value_loss_nan_in_iteration_2(*args, **kwargs):
        calls["n"] += 1
        loss = real_value_loss(*args, **kwargs)
        # tiny_args: 2 epochs x 2 minibatches per iteration; the 5th call is iteration 2's first minibatch
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(ppo, "value_loss", value_loss_nan_in_iteration_2)
    args = tiny_args.replace(checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=r"iteration 2: non-finite loss or gradient at epoch 1, minibatch 1"):
        ppo.train(args, market=synthetic_market)
    kept = load_checkpoint(Path(args.run.run_dir) / args.run.run_name / "checkpoint.pt")
    assert kept["iteration"] == 1 and all(torch.isfinite(v).all() for v in kept["agent"].values())


@pytest.mark.parametrize("num_minibatches", [0, 8 * 16 + 1])
def test_minibatch_count_outside_the_batch_is_a_clear_error(tiny_args, num_minibatches):
    with pytest.raises(ValueError, match=f"--num-minibatches {num_minibatches} must be in \\[1, batch_size=128\\]"):
        ppo.train(tiny_args.replace(num_minibatches=num_minibatches))


def test_indivisible_batch_runs_exactly_num_minibatches(tiny_args, synthetic_market):
    """129 = 2 x 64 + 1: a CleanRL-style remainder minibatch of one sample would normalise its advantage to NaN."""
    args = tiny_args.replace(num_envs=3, num_steps=43, total_timesteps=129 * 2, num_minibatches=2)
    result = ppo.train(args, market=synthetic_market)
    assert result.args.ppo.minibatch_size == 64
    assert [h["losses/updates"] for h in result.history] == [2 * args.ppo.update_epochs] * 2
    assert all(torch.isfinite(v).all() for v in result.agent.state_dict().values())


def test_policy_seed_leaves_the_features_alone():
    """--seed varies the policy only; the HMM fit (seed-sensitive with one restart) follows --feature-seed."""
    small = dict(dataset="nasdaq", data_start="2010-01-01", data_end="2011-12-31", regimes=3, regime_restarts=1,
                 feature_cache_dir=None, episode_length=128)  # 504 bars: too few for the default 256-step episodes
    one, two = (ppo.market_for(ppo.Args.from_flat(**small, seed=seed)) for seed in (1, 2))
    other_features = ppo.market_for(ppo.Args.from_flat(**small, seed=1, feature_seed=1))
    assert "regime:p0" in one.features.names and len(one.data.frame) < 600
    np.testing.assert_array_equal(one.features.values, two.features.values)
    assert not np.array_equal(one.features.values, other_features.features.values)  # the seed does reach the HMM
    assert ppo.feature_config(ppo.Args.from_flat(seed=5, feature_seed=7)).seed == 7


def test_borrow_cost_reaches_the_env(tiny_args, synthetic_market):
    args = tiny_args.replace(borrow_bps=150.0)
    assert ppo.cost_model(args).borrow_bps == 150.0
    assert ppo.make_env(args, synthetic_market).costs.borrow_bps == 150.0


def test_data_range_and_stale_open_policy_reach_training_and_evaluation(tiny_args):
    """sp500 opens are stale before 2013-05-10: refused by default, loaded knowingly with stale_opens="allow"."""
    stale = dict(dataset="sp500", data_start="2012-06-01", data_end="2014-06-30", feature_cache_dir=None)
    with pytest.raises(DataValidationError, match="stale"):
        ppo.market_for(ppo.Args.from_flat(**stale))
    args = tiny_args.replace(**stale, stale_opens="allow", window=4, total_timesteps=8 * 16)
    with pytest.warns(UserWarning, match="stale"):
        result = ppo.train(args)
    index = result.market.data.frame.index
    assert index[0] >= pd.Timestamp("2012-06-01") and index[-1] <= pd.Timestamp("2014-06-30")
    assert index[0] < pd.Timestamp("2013-05-10")  # the default start would have cut this stretch
    with pytest.warns(UserWarning, match="stale"):
        trained = load_trained(result.checkpoint_path)  # same range and policy, or the fingerprint would differ
    assert trained.market.data.fingerprint == result.market.data.fingerprint
    assert trained.market.data.frame.index.equals(index)


def test_progress_bar_shows_n_a_until_an_episode_ends():
    assert training.progress_postfix(12345.6, []) == {"sps": "12,346", "ret": "n/a"}
    assert training.progress_postfix(10.0, [0.01, 0.03]) == {"sps": "10", "ret": "+0.0200"}


class RandomAgent(torch.nn.Module):
    """Uniformly random actions from a fixed seed (the baseline a learned policy must beat)."""

    def __init__(self, num_actions: int = 3):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # evaluate_policy reads the device from a parameter
        self.num_actions = num_actions
        self.gen = torch.Generator().manual_seed(0)

    def act_greedy(self, obs):
        return torch.randint(0, self.num_actions, (obs.shape[0],), generator=self.gen)


class RuleAgent(torch.nn.Module):
    """A hand-written policy of the observation [feature, position] (window 1): oracles and myopic baselines."""

    def __init__(self, rule):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.rule = rule

    def act_greedy(self, obs):
        return torch.tensor([self.rule(float(o[0]), float(o[1])) for o in obs])


def level(sign: float, hold: float) -> int:
    """Action index (positions -1, 0, 1) of ``sign`` when it is non-zero, else of ``hold``."""
    return int(round(sign if sign != 0 else hold)) + 1


def score(evaluation, moves):
    """(annualised Sharpe, total log return, directional accuracy on the bars that move)."""
    returns = evaluation.equity.pct_change().dropna()
    sharpe = np.nan_to_num(sharpe_ratio(returns, periods=252))  # a never-trading agent has no Sharpe: 0
    held = np.sign(evaluation.weights.to_numpy())  # decided at bar start + j, held over bar start + j + 1
    over = moves[evaluation.start + 1 : evaluation.start + 1 + len(held)]
    moving = over != 0
    return sharpe, float(np.log(evaluation.equity.iloc[-1])), float(np.mean(held[moving] == over[moving]))


@pytest.mark.slow
def test_agent_learns_an_announced_move(synthetic_market, tmp_path):
    """Out of sample the agent trades the announced next-bar move almost always right, net of costs.

    Sharpe alone is a weak check here (a 66%-right agent already has Sharpe > 5): the agent must be right on
    more than 95% of the bars and keep at least 85% of the log return of the oracle that always is.
    """
    args = ppo.Args.from_flat(total_timesteps=32 * 64 * 12, num_envs=32, num_steps=64, window=1, episode_length=64,
                    fee_bps=1.0, slippage_bps=1.0, track=False, progress=False, run_dir=str(tmp_path), seed=3)
    result = ppo.train(args, market=synthetic_market)
    moves = np.r_[0.0, synthetic_market.arrays.features[:-1, 0]]  # the feature at bar t is the sign of bar t+1

    def run(agent):
        return evaluate_policy(agent, synthetic_market, window=1, positions=args.env.positions,
                               costs=ppo.cost_model(args))

    trained = run(result.agent)
    sharpe, log_return, accuracy = score(trained, moves)
    oracle_sharpe, oracle_return, oracle_accuracy = score(run(RuleAgent(lambda f, p: level(f, 0.0))), moves)
    random_sharpe, _, _ = score(run(RandomAgent()), moves)
    assert trained.range_name == "test" and len(trained.weights) > 500
    assert oracle_accuracy == 1.0 and oracle_return > 0
    assert accuracy > 0.95
    assert log_return > 0.85 * oracle_return
    assert sharpe > random_sharpe + 5.0


def delayed_market(n_bars: int = 3000, seed: int = 0, move: float = 0.01, gaps: tuple[int, ...] = (3, 4, 5)):
    """A market whose feature announces the sign of the next move, which comes 3 to 5 bars later: credit assignment.

    Bars between moves do not move. The feature at bar t is the sign of the next move after t, so it
    changes on each moving bar and then shows the coming move for the 2-4 flat bars before it. The
    position that earns a move is taken when it is announced and held through the flat bars: its reward
    arrives 3 to 5 steps after the decision. The agent sees one bar (window 1) and no clock, so it cannot
    tell when the move comes, and the costs the tests charge (30 bps a fill) exceed the one-bar expected gain
    (about 1/4 of the move): only a view over several steps justifies trading. Because the announcement stays
    visible, the value of a held position is observable, which makes the truncation bootstrap matter.
    Returns (market, moves), ``moves[t]`` the sign of bar t's move (0 on flat bars).
    """
    from sentio_lab.data import chronological_split, to_market
    from sentio_lab.env import MarketArrays
    from sentio_lab.env.market import PreparedMarket
    from sentio_lab.features import ObservationFeatures

    rng = np.random.default_rng(seed)
    moving_bars = np.cumsum(rng.choice(gaps, size=n_bars))
    moving_bars = moving_bars[moving_bars < n_bars - 1]
    signs = rng.choice([-1.0, 1.0], size=len(moving_bars))
    moves = np.zeros(n_bars)
    moves[moving_bars] = signs
    upcoming = np.searchsorted(moving_bars, np.arange(n_bars), side="right")  # index of the next move after t
    feature = np.append(signs, 0.0)[upcoming].astype(np.float32)  # 0 after the last move
    close = 100.0 * np.exp(np.cumsum(move * moves))
    opens = np.r_[100.0, close[:-1]]
    frame = pd.DataFrame(
        {"open": opens, "high": np.maximum(opens, close) * 1.001, "low": np.minimum(opens, close) * 0.999,
         "close": close, "volume": 1e6},
        index=pd.date_range("2000-01-03", periods=n_bars, freq="B"),
    )
    data = to_market(frame, name="delayed")
    values = feature[:, None]
    features = ObservationFeatures(values=values, names=["announced_sign"], first_valid=0,
                                   blocks={"base": slice(0, 1)}, state={})
    market = PreparedMarket(data=data, splits=chronological_split(data, 0.6, 0.2), features=features,
                            arrays=MarketArrays.from_frame(data.frame, values, 0))
    return market, moves


#: Short episodes (8 steps, so many positions are still open at a truncation and only the bootstrap credits
#: them), gamma 0.9 (a horizon of ~10 steps covers the 3-5 step delay), costs of 30 bps a fill.
DELAYED_ARGS = dict(total_timesteps=32 * 64 * 48, num_envs=32, num_steps=64, window=1, episode_length=8,
                    gamma=0.9, learning_rate=1e-3, fee_bps=15.0, slippage_bps=15.0, track=False, progress=False,
                    seed=1, checkpoint_every=0)


@pytest.mark.slow
def test_agent_learns_a_move_announced_bars_ahead(tmp_path):
    """Credit assignment: the reward of a position comes 3-5 steps after the decision, through flat bars.

    A correct PPO (GAE over several steps, truncations bootstrapped) learns to take the announced position
    and hold it. One-step advantages (``r - V``), a wrong-signed (or missing) truncation bootstrap and the
    same PPO with gamma 0 (myopic) do not: they end up holding one position throughout.
    """
    market, moves = delayed_market()
    args = ppo.Args.from_flat(**DELAYED_ARGS, run_dir=str(tmp_path))
    costs = ppo.cost_model(args)

    def run(agent):
        return evaluate_policy(agent, market, window=1, positions=args.env.positions, costs=costs)

    # the market is what it claims: a move follows on only ~1/4 of the bars, worth less than a fill's cost
    next_bar_moves = np.mean(moves[1:] != 0)
    assert next_bar_moves * 0.01 < costs.buy_cost_rate and next_bar_moves * 0.01 < costs.sell_cost_rate
    oracle_sharpe, oracle_return, oracle_accuracy = score(run(RuleAgent(lambda f, p: level(f, 0.0))), moves)
    random_sharpe, _, _ = score(run(RandomAgent()), moves)
    assert oracle_accuracy == 1.0 and oracle_sharpe > 4.0 and random_sharpe < 0

    myopic = ppo.train(args.replace(gamma=0.0, run_name="myopic"), market=market)
    myopic_sharpe, myopic_return, myopic_accuracy = score(run(myopic.agent), moves)
    assert myopic_accuracy < 0.7 and myopic_return < 0.3 * oracle_return

    result = ppo.train(args.replace(run_name="farsighted"), market=market)
    sharpe, log_return, accuracy = score(run(result.agent), moves)
    assert accuracy > 0.9
    assert log_return > 0.8 * oracle_return
    assert sharpe > 0.8 * oracle_sharpe
    assert sharpe > max(random_sharpe, myopic_sharpe) + 3.0
