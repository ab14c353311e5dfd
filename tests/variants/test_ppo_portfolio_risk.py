"""ppo_portfolio's risk-aware critic (quantile critic, CVaR, drawdown constraint) and its skfolio-baseline anchor: the
defaults are the variant as before bit for bit, each piece fails when broken, and runs resume exactly."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from sentio_lab import ppo_portfolio as pp
from sentio_lab.agents.arguments import PPOArgs, RiskCriticArgs
from sentio_lab.agents.nets.portfolio import PortfolioActorCritic
from sentio_lab.agents.nets.quantile import distort
from sentio_lab.agents.portfolio_risk import DrawdownCost, PortfolioRisk
from sentio_lab.agents.variants import load_trained
from sentio_lab.data.panel import load_panel
from sentio_lab.env.portfolio_benchmarks import SkfolioBaseline, benchmark_weights
from sentio_lab.env.splits import fit_rows
from tests.data.test_panel import synthetic_frames
from tests.variants.test_ppo_portfolio import weights_equal


@pytest.fixture
def tiny(tmp_path):
    return pp.Args.from_flat(
        total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2, window=4,
        episode_length=12, progress=False, run_dir=str(tmp_path / "runs"), run_name="tiny", checkpoint_every=0,
        feature_cache_dir=None, d_model=8, ff_size=16, hidden_size=16, fee_bps=2.0,
    )


@pytest.fixture(scope="module")
def panel():
    return load_panel(synthetic_frames(3, n_bars=300))


def weight_hash(agent) -> str:
    return hashlib.sha256(b"".join(v.detach().numpy().tobytes() for v in agent.state_dict().values())).hexdigest()


#: Weights (sha256, first 16 hex) after these 3-iteration runs, computed with the same arguments on commit 21b7eff
#: (before the risk critic and the skfolio anchor existed) on ONE torch thread: the default flags must keep every
#: policy bit for bit. The thread count changes torch's reduction order, hence the pinned thread below.
BEFORE = {"dirichlet": "b3a8966139cabe76", "anchor": "9ca0444dddba9a2e", "ls": "87cd63dc3a2fdd77"}


@pytest.fixture
def one_thread():
    """One torch thread for the test (the golden hashes' setting; under xdist the workers already run one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("name", "flags"), [("dirichlet", {}), ("anchor", dict(anchor="equal_weight",
                         excess_reward=True)), ("ls", dict(long_short=True, gross_limit=1.5))])
def test_default_flags_train_the_same_weights_as_before(tmp_path, panel, name, flags, one_thread):
    args = pp.Args.from_flat(
        total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2, window=4,
        episode_length=24, progress=False, run_dir=str(tmp_path), checkpoint_every=0, feature_cache_dir=None,
        d_model=8, ff_size=16, hidden_size=16, fee_bps=2.0, run_name=name, **flags)
    result = pp.train(args, market=pp.portfolio_market(panel, args))
    assert weight_hash(result.agent)[:16] == BEFORE[name]


# --------------------------------------------------------------------------------------------- quantile critic
def synthetic_rollout(risk, agent, rewards, obs):
    """Fill ``risk``'s storage from fixed observations and rewards (no episode ends, gamma 0: returns = rewards)."""
    steps, envs = rewards.shape
    info = {"equity": torch.ones(envs, dtype=torch.float64), "done": torch.zeros(envs, dtype=torch.bool),
            "final_obs": obs[0]}
    with torch.no_grad():
        for step in range(steps):
            _, _, _, critic_out = agent.get_action_and_value(obs[step])
            risk.value(agent, step, critic_out, obs[step])
            risk.observe(agent, step, rewards[step], info, torch.zeros(envs, dtype=torch.bool), gamma=0.0)
    zeros = torch.zeros(steps, envs)
    risk.targets(agent, obs[-1], zeros, zeros[0], gamma=0.0, gae_lambda=0.95)


def test_quantile_loss_is_least_at_the_return_quantiles_and_gae_reads_their_cvar():
    torch.manual_seed(0)
    n_q, steps, envs = 8, 31, 15  # 465 returns: no level times 465 is a whole number, so each minimiser is unique
    agent = PortfolioActorCritic(2, 3, d_model=8, ff=16, hidden=32, norm_obs=False, num_quantiles=n_q, risk="cvar",
                                 cvar_alpha=0.25)
    risk = PortfolioRisk(RiskCriticArgs(num_quantiles=n_q, risk="cvar", cvar_alpha=0.25, kappa=1e-4), steps, envs,
                         "cpu")  # a small kappa: the quantile (pinball) loss, minimised at the empirical quantiles
    gen = torch.Generator().manual_seed(1)
    obs = torch.rand(steps, envs, 7, generator=gen)
    rewards = torch.empty(steps, envs).exponential_(1.0, generator=gen) - 1.0  # skewed: a long right tail
    synthetic_rollout(risk, agent, rewards, obs)
    torch.testing.assert_close(risk.batch["returns_q"], rewards.reshape(-1, 1).expand(-1, n_q))  # gamma 0: rewards
    hp, index = PPOArgs(clip_vloss=False), torch.arange(steps * envs)
    truth = torch.tensor(np.quantile(rewards.numpy(), agent.taus.numpy(), method="inverted_cdf"), dtype=torch.float32)

    def loss_at(quantiles):  # the critic's loss if it output these quantiles for every observation
        return float(risk.critic_loss(agent, quantiles.expand(steps * envs, -1), None, index, None, None, hp)[0])

    best = loss_at(truth)
    for head in range(n_q):  # each head's loss is least at its own level's quantile: move any head and it rises
        for shift in (-0.02, 0.02):
            moved = truth.clone()
            moved[head] += shift
            assert loss_at(moved) > best
    assert loss_at(truth.flip(0)) > best + 0.01  # levels reversed: a worse fit
    cvar = float(distort(truth, "cvar", 0.25))
    assert cvar < float(truth.mean()) - 0.4  # the worst quarter, far below the mean
    # the value the rollout stored for GAE is the distortion of the stored quantiles, not their mean
    with torch.no_grad():
        _, _, _, out = agent.get_action_and_value(obs[0])
        stored = risk.value(agent, 0, out, obs[0])
    torch.testing.assert_close(stored, distort(out, "cvar", 0.25))
    assert torch.equal(risk.quantiles[0], out) and bool((stored < out.mean(-1) - 1e-3).all())


def test_truncated_windows_bootstrap_each_quantile_and_the_cost():
    torch.manual_seed(0)
    agent = PortfolioActorCritic(2, 3, d_model=8, ff=16, hidden=16, norm_obs=False, num_quantiles=4,
                                 cost_critic=True)
    risk = PortfolioRisk(RiskCriticArgs(num_quantiles=4, cost_limit=0.1, cost_scale=10.0), 1, 3, "cpu")
    final = torch.rand(3, 7)
    equity = torch.tensor([1.0, 0.9, 1.1], dtype=torch.float64)
    info = {"equity": equity, "done": torch.tensor([False, True, True]), "final_obs": final}
    truncated = torch.tensor([False, True, False])
    risk.observe(agent, 0, torch.full((3,), 0.5), info, truncated, gamma=0.9)
    with torch.no_grad():
        q, c = agent.get_quantiles(final), agent.get_cost_value(final)
    torch.testing.assert_close(risk.rewards_q[0, 1], 0.5 + 0.9 * q[1])
    assert torch.equal(risk.rewards_q[0, [0, 2]], torch.full((2, 4), 0.5))  # not truncated: the reward alone
    torch.testing.assert_close(risk.costs[0], torch.tensor([0.0, 1.0 + 0.9 * float(c[1]), 0.0]))
    assert risk.finished == pytest.approx([0.1, 0.0])  # the two episodes that ended: 10 % and no drawdown


# ------------------------------------------------------------------------------------------ drawdown constraint
def test_drawdown_costs_sum_to_each_episodes_maximum_drawdown():
    path = [1.0, 1.1, 0.99, 1.05, 0.88, 1.2, 1.0]
    tracker, costs = DrawdownCost(1, "cpu"), []
    for k, value in enumerate(path):
        done = torch.tensor([k == 4])
        cost, worst = tracker.step(torch.tensor([value], dtype=torch.float64), done)
        costs.append(float(cost[0]))
    assert sum(costs[:5]) == pytest.approx(1 - 0.88 / 1.1, abs=1e-12)  # the episode ended at 0.88
    assert float(worst[0]) == pytest.approx(1 - 1.0 / 1.2, abs=1e-12) and sum(costs[5:]) == pytest.approx(1 / 6)
    assert min(costs) >= 0 and costs[1] == 0.0  # a new high costs nothing


def test_the_multiplier_trades_reward_advantage_for_cost_advantage():
    risk = PortfolioRisk(RiskCriticArgs(cost_limit=0.05, pid_kp=10.0, pid_ki=10.0), 2, 2, "cpu")
    risk.finished = [0.15, 0.05]
    record = risk.end_rollout()
    assert record["risk/lambda"] == pytest.approx(10 * 0.05 + 10 * 0.05) and risk.finished == []
    assert risk.end_rollout()["risk/lambda"] == pytest.approx(1.0)  # no episode ended: held
    risk.batch["cost_advantages"] = torch.tensor([3.0, -1.0, 2.0, 0.0])
    advantages, inds = torch.tensor([1.0, 2.0, -0.5]), torch.tensor([0, 2, 3])
    combined, hp = risk.advantages(advantages, inds, PPOArgs(norm_adv=True))
    a, c = advantages, torch.tensor([3.0, 2.0, 0.0])
    by_hand = ((a - a.mean()) / (a.std() + 1e-8) - 1.0 * (c - c.mean()) / (c.std() + 1e-8)) / 2.0
    torch.testing.assert_close(combined, by_hand)
    assert hp.norm_adv is False  # normalised here, not again in the objective
    plain = PortfolioRisk(RiskCriticArgs(num_quantiles=4), 2, 2, "cpu")
    same, hp2 = plain.advantages(advantages, inds, PPOArgs())
    assert same is advantages and hp2.norm_adv


def test_a_binding_drawdown_limit_raises_the_multiplier_and_changes_the_policy(tiny, panel):
    market = pp.portfolio_market(panel, tiny)
    tight = pp.train(tiny.replace(run_name="tight", cost_limit=0.0), market=market)
    loose = pp.train(tiny.replace(run_name="loose", cost_limit=1.0), market=market)
    assert tight.history[-1]["risk/lambda"] > 0 and tight.history[-1]["risk/episodes"] > 0
    assert all(h["risk/lambda"] == 0.0 for h in loose.history)  # never binding: lambda stays 0
    assert 0 < tight.history[-1]["risk/episode_max_drawdown"] < 0.5
    assert not weights_equal(tight.agent, loose.agent)  # only lambda differs between the two runs


def test_cvar_and_neutral_quantile_runs_differ_by_their_value_only(tiny, panel):
    market = pp.portfolio_market(panel, tiny)
    neutral = pp.train(tiny.replace(run_name="neutral", num_quantiles=8), market=market)
    cvar = pp.train(tiny.replace(run_name="cvar", num_quantiles=8, risk="cvar"), market=market)
    assert all(abs(h["risk/value_tail_gap"]) < 1e-6 for h in neutral.history)
    assert all(h["risk/value_tail_gap"] > 0 for h in cvar.history)  # GAE read the lower tail
    assert not weights_equal(neutral.agent, cvar.agent)


# ----------------------------------------------------------------------------------------------- resume, anchor
def test_risk_aware_run_on_a_drifting_skfolio_anchor_resumes_exactly(tiny, panel):
    args = tiny.replace(num_quantiles=8, risk="cvar", cost_limit=0.0, anchor="inverse_volatility",
                        anchor_rebalance=5, excess_reward=True)
    market = pp.portfolio_market(panel, args)
    full = pp.train(args, market=market)
    first = pp.train(args.replace(run_name="split", max_iterations=1), market=market)
    resumed = pp.train(pp.Args.from_flat(resume=str(first.checkpoint_path), progress=False), market=market)
    assert resumed.finished and weights_equal(resumed.agent, full.agent)  # the multiplier and peaks resumed too
    assert full.history[-1]["risk/lambda"] == resumed.history[-1]["risk/lambda"] > 0
    bundle = torch.load(full.checkpoint_path, weights_only=True)
    recorded = bundle["extra"]["anchor_benchmark"].numpy()
    assert np.array_equal(recorded, pp.anchor_for(args, market).benchmark)
    assert len({tuple(np.round(r, 9)) for r in recorded[:180]}) > 10  # a fitted series, not equal weight


def perturbed_panel(panel, from_bar, scale=1.7):
    frames = {}
    for k, (name, frame) in enumerate(panel.frames.items()):
        factor = np.ones(len(frame))
        factor[from_bar:] = np.linspace(1.0, scale + 0.3 * k, len(frame) - from_bar)
        frames[name] = frame.assign(**{c: frame[c] * factor for c in ("open", "high", "low", "close")})
    return load_panel(frames)


def test_the_anchor_fits_on_the_training_bars_only_run_and_fold(tiny, panel):
    args = tiny.replace(anchor="hrp")
    market = pp.portfolio_market(panel, args)
    train_stop = market.range("train")[1]
    other = pp.portfolio_market(perturbed_panel(panel, train_stop), args)
    fitted_on_range = pp.anchor_for(args, market).benchmark  # fitted once, compared three times (fits are slow)
    assert np.array_equal(pp.anchor_for(args, other).benchmark, fitted_on_range)
    first = market.arrays.first_valid + 3
    rows = np.arange(300) < train_stop  # the same as the runner's baseline fitted on the training range
    expected = benchmark_weights(SkfolioBaseline("hrp", market.arrays.close, rows, assets=panel.assets), first)
    assert np.array_equal(fitted_on_range, expected)
    # a fold: training segments around a test group [100, 160); moving the group's bars moves no fit
    segments = ((0, 95), (165, 300))
    fold, moved = (dataclasses.replace(m, train_segments=segments) for m in (market, pp.portfolio_market(
        perturbed_panel(panel, 100), args)))
    moved_close = moved.arrays.close.copy()
    moved_close[160:] = market.arrays.close[160:]  # only the group changes (the perturbation ran on after it)
    moved = dataclasses.replace(moved, arrays=dataclasses.replace(moved.arrays, close=moved_close))
    fitted = pp.anchor_for(args, fold).benchmark
    assert np.array_equal(pp.anchor_for(args, moved).benchmark, fitted)
    runner = SkfolioBaseline("hrp", market.arrays.close, fit_rows(segments, 300), assets=panel.assets)
    assert np.array_equal(fitted, benchmark_weights(runner, first))
    assert not np.array_equal(fitted, fitted_on_range)  # the fold's rows, not the range's


def test_a_checkpoint_records_the_fitted_benchmark_and_load_checks_it(tmp_path):
    result = pp.run_cli(pp.Args, pp.train, prog="x", argv=[
        "--total-timesteps", "32", "--num-envs", "4", "--num-steps", "8", "--num-minibatches", "1",
        "--update-epochs", "1", "--window", "4", "--episode-length", "16", "--no-progress", "--run-dir", str(tmp_path),
        "--run-name", "sp", "--checkpoint-every", "0", "--feature-cache-dir", "None", "--d-model", "8", "--ff-size",
        "8", "--hidden-size", "8", "--data-start", "2021-06-01", "--anchor", "hrp", "--anchor-rebalance", "21",
        "--num-quantiles", "4", "--cost-limit", "0.1"])
    trained = load_trained(result.checkpoint_path)
    assert weights_equal(trained.agent, result.agent) and trained.agent.cost_critic is not None
    recorded = trained.bundle["extra"]["anchor_benchmark"]
    assert recorded.shape == (len(trained.market.arrays.close), 21)
    assert torch.equal(recorded, torch.from_numpy(pp.anchor_for(trained.args, trained.market).benchmark))
    tampered = recorded.clone()
    tampered[-1] = torch.roll(tampered[-1], 1)
    with pytest.raises(ValueError, match="--anchor hrp: the benchmark refitted"):
        pp.restore_trained(trained.args, {**trained.bundle, "extra": {**trained.bundle["extra"],
                                                                       "anchor_benchmark": tampered}})


@pytest.mark.parametrize(("flags", "message"), [
    (dict(risk="cvar"), "--risk cvar needs a quantile critic"),
    (dict(num_quantiles=0), "--num-quantiles 0 must be >= 1"),
    (dict(cost_limit=-0.1), "--cost-limit -0.1 must be"),
    (dict(anchor_rebalance=5), "--anchor-rebalance 5 only acts with --anchor"),
])
def test_refusals_name_the_flag(tiny, flags, message):
    with pytest.raises(ValueError, match=message):
        pp.check_args(tiny.replace(**flags))


def test_the_network_refuses_what_it_was_not_built_with():
    agent = PortfolioActorCritic(2, 3, d_model=8, ff=16, hidden=8)
    obs = torch.rand(4, 7)
    assert agent.get_value(obs).shape == (4,)  # the scalar critic, as before
    with pytest.raises(RuntimeError, match="scalar critic"):
        agent.get_quantiles(obs)
    with pytest.raises(RuntimeError, match="no cost critic"):
        agent.get_cost_value(obs)
    with pytest.raises(ValueError, match="--risk 'tail'"):
        PortfolioActorCritic(2, 3, num_quantiles=4, risk="tail")
    with pytest.raises(ValueError, match="cvar_alpha"):
        PortfolioActorCritic(2, 3, num_quantiles=4, risk="cvar", cvar_alpha=0.0)
    quantile = PortfolioActorCritic(2, 3, d_model=8, ff=16, hidden=8, num_quantiles=5, risk="cvar", cvar_alpha=0.4)
    with torch.no_grad():
        q = quantile.get_quantiles(obs)
        assert q.shape == (4, 5) and torch.equal(quantile.get_value(obs), distort(q, "cvar", 0.4))
