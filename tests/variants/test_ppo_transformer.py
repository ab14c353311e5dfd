"""ppo_transformer: trains on token observations, resumes bit for bit, mixed precision stays finite, evaluation and
the variant table see the same observation, and the policy at t does not move when bars after t change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentio_lab import ppo_transformer as pt
from sentio_lab.agents.checkpoint import CheckpointError
from sentio_lab.agents.variants import agent_obs_dim, env_options, load_variant
from sentio_lab.data import chronological_split, load_market, to_market
from sentio_lab.env import MarketArrays, TradingEnv
from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation.episodes import evaluate_checkpoint, evaluate_policies, evaluate_policy
from sentio_lab.features import FeatureConfig, build_observation_features

END = "2017-03-15"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny transformer ops only lose to thread hand-offs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def args(tmp_path):
    """Three iterations of 8 x 16 steps with 4h and 1D tokens on two and a half months of EUR/USD."""
    return pt.Args.from_flat(
        dataset="eurusd_1h", data_end=END, total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2,
        update_epochs=2, window=8, episode_length=24, token_timeframes=("4h", "1D"), token_counts=(4, 3),
        d_model=16, n_heads=2, ff_size=32, hidden_size=16, track=False, progress=False,
        run_dir=str(tmp_path / "runs"), run_name="tiny", checkpoint_every=0, feature_cache_dir=None,
    )


@pytest.fixture(scope="module")
def market():
    """The tiny args' market, prepared once."""
    return pt.market_for(pt.Args.from_flat(dataset="eurusd_1h", data_end=END, feature_cache_dir=None))


def weights(agent):
    return torch.cat([p.detach().flatten() for p in agent.parameters()])


def test_help_lists_the_new_arguments(capsys):
    import tyro

    with pytest.raises(SystemExit):
        tyro.cli(pt.Args, args=["--help"])
    out = capsys.readouterr().out
    for name in ("--token-timeframes", "--token-counts", "--d-model", "--fusion", "--amp", "--compile"):
        assert name in out


def test_run_is_registered_trains_and_resumes_bit_for_bit(args, market, tmp_path):
    assert load_variant("ppo_transformer") is pt
    full = pt.train(args, market=market)
    assert full.finished and full.global_step == 8 * 16 * 3
    assert all(np.isfinite(v) for rec in full.history for k, v in rec.items() if k.startswith("losses/")
               and k != "losses/explained_variance")
    first = pt.train(args.replace(run_name="split", max_iterations=2, checkpoint_every=1), market=market)
    assert not first.finished
    resumed = pt.train(pt.Args.from_flat(resume=str(first.checkpoint_path), track=False, progress=False), market=market)
    assert resumed.finished
    assert torch.equal(weights(resumed.agent), weights(full.agent))
    # the checkpoint evaluates through the variant table with the same token observation
    evaluation = evaluate_checkpoint(full.checkpoint_path, "validation")
    direct = evaluate_policy(full.agent, market, window=args.features.window, positions=args.env.positions,
                             costs=pt.cost_model(args), range_name="validation", env_options=env_options(args, market))
    assert evaluation.weights.equals(direct.weights) and evaluation.equity.equals(direct.equity)
    batched = evaluate_policies([full.agent], market, ["validation"], window=args.features.window,
                                positions=args.env.positions,
                                costs=pt.cost_model(args), env_options=env_options(args, market))
    assert batched[0][0].weights.equals(direct.weights)
    with pytest.raises(CheckpointError, match="d_model"):
        pt.train(pt.Args.from_flat(resume=str(first.checkpoint_path), d_model=64, track=False, progress=False),
                 market=market)


def test_bf16_ci_sized_run_stays_finite_and_close_to_fp32(args, market):
    fp32 = pt.train(args.replace(checkpoint_path=None), market=market)
    bf16 = pt.train(args.replace(amp="bf16", run_name="bf16"), market=market)
    for record in bf16.history:
        for key in ("losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl"):
            assert np.isfinite(record[key]), key
        assert record["losses/skipped_updates"] == 0
    assert all(p.dtype == torch.float32 for p in bf16.agent.parameters())  # fp32 master weights
    assert torch.isfinite(weights(bf16.agent)).all()
    # same seed, same data: the first iteration's losses agree to bf16 precision (stated: 5e-2 absolute)
    assert abs(bf16.history[0]["losses/entropy"] - fp32.history[0]["losses/entropy"]) < 5e-2


def test_settings_that_cannot_run_are_refused(args, market):
    with pytest.raises(ValueError, match="needs CUDA"):
        pt.check_args(args.replace(amp="fp16"))
    with pytest.raises(ValueError, match="one count per timeframe"):
        pt.train(args.replace(token_counts=(4,)), market=market)
    with pytest.raises(ValueError, match="amp"):
        pt.check_args(args.replace(amp="int8"))
    with pytest.raises(ValueError, match="fusion"):
        pt.check_args(args.replace(fusion="sum"))
    with pytest.raises(ValueError, match="does not fit"):
        pt.build_agent(args, 1000, 3)


def test_compile_flag_and_gated_fusion_and_no_tokens_run(args, market):
    compiled = pt.train(args.replace(compile=True, compile_backend="eager", total_timesteps=128,
                                            checkpoint_path=None, fusion="gated", target_kl=0.0), market=market)
    assert compiled.history[0]["losses/epochs"] == 1  # target_kl 0: the epoch loop stops after the first
    assert compiled.finished and compiled.agent._encode is not compiled.agent.encode
    single = pt.train(args.replace(token_timeframes=(), token_counts=(), total_timesteps=128,
                                          run_name="single"), market=market)
    assert [s.name for s in single.agent.streams] == ["window"]
    assert env_options(single.args, market) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 + GradScaler needs CUDA")
def test_fp16_run_on_cuda_stays_finite(args, market):  # pragma: no cover - CUDA only
    result = pt.train(args.replace(amp="fp16", device="cuda", checkpoint_path=None), market=market)
    assert torch.isfinite(weights(result.agent)).all()
    assert all(np.isfinite(r["losses/value_loss"]) for r in result.history)


def market_of(frame, train_stop: int) -> PreparedMarket:
    """A prepared market of ``frame`` (features fitted on rows < train_stop, New York session days)."""
    config = FeatureConfig(session_close="17:00 America/New_York")
    data = to_market(frame, name="perturbed")
    features = build_observation_features(data.frame, train_stop, config)
    splits = chronological_split(data, train_stop / len(frame), 0.0)
    arrays = MarketArrays.from_frame(data.frame, features.values, features.first_valid)
    return PreparedMarket(data=data, splits=splits, features=features, arrays=arrays, feature_config=config)


def test_policy_output_at_t_ignores_bars_after_t_through_the_whole_pipeline(args):
    """Features, normalisation, token blocks, env gather, normaliser and network: change every bar after t (values,
    volumes) and the logits and value at t stay the same bit for bit."""
    frame = load_market("eurusd_1h", end=END).frame.iloc[:1200]
    train_stop = 700
    args = args.replace(token_counts=(6, 4))
    base = market_of(frame, train_stop)
    torch.manual_seed(0)
    agent = pt.build_agent(args, agent_obs_dim(args, base), 3)
    agent.eval()
    with torch.no_grad():  # non-trivial normaliser statistics
        agent.obs_norm.update(torch.randn(64, agent.obs_norm.mean.shape[0]) * 2 + 0.5)

    def outputs(market, t):
        env = TradingEnv(market.arrays, num_envs=1, window=args.features.window, episode_length=1,
                         start=t - args.features.window,
                         stop=t + 2, **env_options(args, market))
        obs = env.reset(starts=[t])
        with torch.no_grad():
            h = agent.encode(agent.normalise(obs))
            return torch.cat([agent.actor(h), agent.critic(h)], dim=1)

    rng = np.random.default_rng(3)
    for t in (800, 1001, 1150):
        changed = frame.copy()
        scale = np.exp(np.cumsum(rng.normal(0, 0.01, len(frame) - t - 1)))[:, None]
        changed.iloc[t + 1 :, :4] = changed.iloc[t + 1 :, :4].to_numpy() * scale
        changed.iloc[t + 1 :, 4] = rng.uniform(0, 1e4, len(frame) - t - 1)
        assert not np.allclose(changed.to_numpy(), frame.to_numpy())
        assert torch.equal(outputs(market_of(changed, train_stop), t), outputs(base, t)), t
    # and a change at t itself does move it (the test can fail)
    changed = frame.copy()
    changed.iloc[1150:, 3] *= 1.01
    changed.iloc[1150:, 1] = np.maximum(changed.iloc[1150:, 1], changed.iloc[1150:, 3])
    assert not torch.equal(outputs(market_of(changed, train_stop), 1150), outputs(base, 1150))


def test_non_finite_loss_stops_before_the_optimizer_steps(args, market, monkeypatch):
    from sentio_lab.agents.rollout import NonFiniteError

    monkeypatch.setattr(pt, "value_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient"):
        pt.train(args.replace(checkpoint_path=None), market=market)


def test_resume_refuses_other_data_and_main_runs_from_the_command_line(args, market, monkeypatch, tmp_path, capsys):
    first = pt.train(args.replace(max_iterations=1), market=market)
    other = pt.market_for(pt.Args.from_flat(dataset="eurusd_1h", data_end="2017-03-20", feature_cache_dir=None))
    with pytest.raises(CheckpointError, match="other data"):
        pt.train(pt.Args.from_flat(resume=str(first.checkpoint_path), track=False, progress=False), market=other)
    argv = ["ppo_transformer", "--data-end", END, "--total-timesteps", "64", "--num-envs", "4", "--num-steps", "16",
            "--window", "8", "--episode-length", "24", "--token-counts", "3", "2", "--d-model", "8", "--no-track",
            "--no-progress", "--run-dir", str(tmp_path / "cli"), "--feature-cache-dir", "None"]
    monkeypatch.setattr("sys.argv", argv)
    pt.main()
    assert "finished at step 64" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", [*argv, "--amp", "fp16"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs CUDA"):
            pt.main()


@pytest.mark.slow
def test_transformer_learns_an_announced_move(synthetic_market, tmp_path):
    """The single-timeframe transformer (window of 4 tokens) trades the announced next-bar move out of sample on more
    than 95% of the bars after 24k steps (the newest-token path; through the summary token alone it stayed at ~53%)."""
    args = pt.Args.from_flat(total_timesteps=32 * 64 * 12, num_envs=32, num_steps=64, window=4, episode_length=64,
                             fee_bps=1.0,
                   slippage_bps=1.0, token_timeframes=(), token_counts=(), d_model=16, ff_size=32, hidden_size=32,
                   track=False, progress=False, run_dir=str(tmp_path), seed=3, checkpoint_path=None)
    result = pt.train(args, market=synthetic_market)
    evaluation = evaluate_policy(result.agent, synthetic_market, window=4, positions=args.env.positions,
                                 costs=pt.cost_model(args))
    moves = np.r_[0.0, synthetic_market.arrays.features[:-1, 0]]  # the feature at bar t is the sign of bar t+1
    rows = synthetic_market.data.frame.index.get_indexer(evaluation.weights.index)
    accuracy = np.mean(np.sign(evaluation.weights.to_numpy()) == moves[rows + 1])
    assert len(rows) > 500 and accuracy > 0.95, accuracy
