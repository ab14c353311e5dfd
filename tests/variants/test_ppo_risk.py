"""ppo_risk: equality with ppo where the algorithms coincide, the drawdown bookkeeping, the constraint doing its job,
the adaptive KL coefficient, exact resume with the multiplier and PID state, evaluation and the command line."""

import dataclasses
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab import ppo, ppo_risk
from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.rollout import NonFiniteError
from sentio_lab.agents.variants import agent_obs_dim, load_trained
from sentio_lab.data import chronological_split, to_market
from sentio_lab.env import MarketArrays, TradingEnv
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import PreparedMarket
from sentio_lab.evaluation.episodes import evaluate_checkpoint, evaluate_policy
from sentio_lab.features import ObservationFeatures

TINY = dict(total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2, window=8,
            episode_length=24, track=False, progress=False, run_name="tiny", checkpoint_every=0)


@pytest.fixture()
def risk_args(tmp_path):
    """ppo_risk arguments for a unit test: 3 iterations of 8 x 16 steps, 8 quantiles."""
    return ppo_risk.Args.from_flat(**TINY, num_quantiles=8, run_dir=str(tmp_path / "runs"),
                         feature_cache_dir=str(tmp_path / "feature-cache"))


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def drawdown_env(args, market, **kwargs):
    start, stop = market.range("train")
    return TradingEnv(market.arrays, num_envs=args.ppo.num_envs, window=args.features.window,
                      episode_length=args.env.episode_length,
                      start=start, stop=stop, positions=args.env.positions, seed=args.run.seed, drawdown_obs=True,
                      costs=CostModel(fee_bps=args.env.fee_bps, slippage_bps=args.env.slippage_bps), **kwargs)


def test_help_lists_the_risk_arguments():
    out = subprocess.run([sys.executable, "-m", "sentio_lab.ppo_risk", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--num-quantiles", "--kappa", "--risk", "--cvar-alpha", "--cost-limit", "--pid-kp", "--pid-ki",
                 "--pid-kd", "--kl-penalty", "--kl-target", "--target-kl", "--resume"):
        assert flag in out


def test_the_risk_group_is_ppo_portfolios_and_checkpoints_written_before_it_still_load():
    """The critic and constraint fields are the shared RiskCriticArgs group; a checkpoint that saved them at the top
    level (before the group) routes them into it, and the scalar critic is refused in one line."""
    args = ppo_risk.Args()
    assert args.risk_critic.num_quantiles == 32 and args.risk_critic.cost_limit is None
    saved = dataclasses.asdict(ppo_risk.Args.from_flat(kappa=2.0))
    own = saved.pop("risk_critic")
    old_form = {**saved, **own, "num_quantiles": 8, "cost_limit": 0.05}
    loaded = ppo_risk.Args.from_dict(old_form)
    assert (loaded.risk_critic.num_quantiles, loaded.risk_critic.cost_limit, loaded.risk_critic.kappa) == (8, 0.05, 2.0)
    with pytest.raises(ValueError, match="--num-quantiles"):
        ppo_risk.build_agent(ppo_risk.Args.from_flat(num_quantiles=None), obs_dim=4, num_actions=3)
    with pytest.raises(ValueError, match="--num-quantiles"):  # before any data is read: this file does not exist
        ppo_risk.train(ppo_risk.Args.from_flat(num_quantiles=None, dataset="no_such_file.csv", track=False))


@pytest.mark.parametrize("clip_vloss", [False, True])
def test_one_quantile_unconstrained_update_equals_ppos_bit_for_bit(synthetic_market, clip_vloss, tmp_path):
    """One head at tau = 0.5, risk neutral, no constraint, no KL penalty: the quantile Huber loss is u^2 / (4 kappa)
    where |u| <= kappa, so with kappa = 1024 (a power of two far above any TD error here) and vf_coef = 2 kappa x
    ppo's 0.5, the loss, every gradient and so every weight equal ppo's exactly (powers of two scale floats exactly).
    With Huber's default kappa = 1 they cannot: errors beyond kappa get a linear, not a squared, loss (checked too)."""
    a = ppo.Args.from_flat(**TINY, clip_vloss=clip_vloss, run_dir=str(tmp_path / "ppo"))  # own folders: xdist
    r = ppo_risk.Args.from_flat(**TINY, clip_vloss=clip_vloss, num_quantiles=1, kappa=1024.0, vf_coef=1024.0,
                                run_dir=str(tmp_path / "risk"))
    theirs = ppo.train(a, env=drawdown_env(a, synthetic_market))
    ours = ppo_risk.train(r, env=drawdown_env(r, synthetic_market))
    ours_state = {k: v for k, v in ours.agent.state_dict().items() if k != "taus"}
    assert ours_state.keys() == theirs.agent.state_dict().keys()
    assert all(torch.equal(v, theirs.agent.state_dict()[k]) for k, v in ours_state.items())
    assert ours.history[-1]["losses/value_loss"] * 2048 == theirs.history[-1]["losses/value_loss"]
    assert ours.history[-1]["losses/approx_kl"] == theirs.history[-1]["losses/approx_kl"]

    huber = ppo_risk.train(r.replace(kappa=1.0, vf_coef=2.0), env=drawdown_env(r, synthetic_market))
    assert not weights_equal(huber.agent, ours.agent)


class Recorder:
    """Wraps an env and records every step's equity, cost and done flags."""

    def __init__(self, env):
        self.env, self.obs_dim, self.num_actions = env, env.obs_dim, env.num_actions
        self.equity, self.cost, self.done = [], [], []

    def reset(self):
        return self.env.reset()

    def step(self, action):
        out = self.env.step(action)
        info = out[4]
        self.equity.append(info["equity"].numpy().copy())
        self.cost.append(info["drawdown_cost"].numpy().copy())
        self.done.append(info["done"].numpy().copy())
        return out


def test_drawdown_costs_sum_to_each_episodes_max_drawdown_and_the_logged_mean_is_theirs(risk_args, synthetic_market):
    """Random equity paths (the policy samples; fees make losers too): for every finished episode, the per-step costs
    add up to the max drawdown worked out from its equity path by hand (float64 sums of differences: to 1e-12), and
    the history's mean episode drawdown of each iteration is the mean over exactly the episodes that ended in it."""
    args = risk_args.replace(fee_bps=20.0)
    env = Recorder(drawdown_env(args, synthetic_market))
    result = ppo_risk.train(args, env=env)
    equity, cost, done = (np.array(x) for x in (env.equity, env.cost, env.done))  # (steps, envs)
    checked, per_iteration = 0, {}
    for i in range(args.ppo.num_envs):
        begin = 0
        for t in np.flatnonzero(done[:, i]):
            path = np.r_[1.0, equity[begin : t + 1, i]]
            by_hand = float(np.max(1.0 - path / np.maximum.accumulate(path)))
            assert cost[begin : t + 1, i].sum() == pytest.approx(by_hand, rel=1e-12, abs=1e-15)
            assert np.all(cost[begin : t + 1, i] >= 0)
            per_iteration.setdefault(t // args.ppo.num_steps, []).append(by_hand)
            begin, checked = t + 1, checked + 1
    assert checked >= 8 and max(per_iteration.values(), key=len)
    for iteration, record in enumerate(result.history):
        drawdowns = per_iteration.get(iteration, [])
        assert record["risk/episodes"] == len(drawdowns)
        if drawdowns:
            assert record["risk/episode_max_drawdown"] == pytest.approx(np.mean(drawdowns), rel=1e-12)
        else:
            assert np.isnan(record["risk/episode_max_drawdown"])


def test_no_finished_episode_holds_the_multiplier(risk_args, synthetic_market):
    """Episodes of 40 steps, rollouts of 16, no staggering: iterations 1 and 2 end no episode, so the PID is not
    stepped (lambda stays 0, two skips); iteration 3 ends all of them and takes the first measurement."""
    args = risk_args.replace(episode_length=40, cost_limit=0.0, fee_bps=20.0)
    result = ppo_risk.train(args, env=drawdown_env(args, synthetic_market, stagger_starts=False))
    assert [h["risk/episodes"] for h in result.history] == [0, 0, 8]
    assert [h["risk/lambda"] for h in result.history][:2] == [0.0, 0.0]
    assert result.lagrangian.skipped == 2 and result.lagrangian.updates == 1
    assert result.history[2]["risk/lambda"] > 0  # any drawdown breaks a zero limit
    assert np.isfinite(result.history[2]["risk/cost_value"])


def test_a_cost_limit_needs_the_drawdown_cost(risk_args, synthetic_market):
    env = ppo.make_env(ppo.Args.from_flat(**TINY), synthetic_market)  # no drawdown_obs: no info["drawdown_cost"]
    with pytest.raises(ValueError, match="drawdown_obs"):
        ppo_risk.train(risk_args.replace(cost_limit=0.1), env=env)
    # without a constraint such an env still trains (nothing to measure: drawdowns are logged as NaN)
    result = ppo_risk.train(risk_args, env=env)
    assert all(np.isnan(h["risk/episode_max_drawdown"]) for h in result.history)


def test_adaptive_kl_coefficient_rises_on_overshoot_and_falls_on_undershoot(risk_args, synthetic_market):
    big = ppo_risk.train(risk_args.replace(kl_penalty=True, kl_coef=0.1, kl_target=1e-6,
                                             learning_rate=1e-2), market=synthetic_market)
    small = ppo_risk.train(risk_args.replace(kl_penalty=True, kl_coef=0.1, kl_target=10.0),
                           market=synthetic_market)
    for result, factor in ((big, 2.0), (small, 0.5)):
        coefs = [h["losses/kl_coef"] for h in result.history] + [result.kl_control.coef]
        assert coefs == pytest.approx([0.1 * factor**i for i in range(len(coefs))])
        assert all(np.isfinite(h["losses/batch_kl"]) and h["losses/kl_penalty"] >= 0 for h in result.history)
    assert all(h["losses/batch_kl"] > 1.5e-6 for h in big.history)


def test_trust_region_stops_the_epoch_loop(risk_args, synthetic_market):
    result = ppo_risk.train(risk_args.replace(target_kl=0.0, update_epochs=4), market=synthetic_market)
    assert all(h["losses/epochs"] == 1 and h["losses/updates"] == 2 for h in result.history)


def test_resume_is_bit_identical_with_multiplier_pid_and_kl_state(risk_args, synthetic_market):
    args = risk_args.replace(total_timesteps=8 * 16 * 5, cost_limit=0.005, kl_penalty=True,
                               risk="cvar", fee_bps=20.0, pid_kd=1.0)
    whole = ppo_risk.train(args, market=synthetic_market)
    part = ppo_risk.train(args.replace(run_name="split", max_iterations=2), market=synthetic_market)
    bundle = load_checkpoint(part.checkpoint_path, variant="ppo_risk")
    assert bundle["extra"]["lagrangian"]["updates"] == 2 and len(bundle["extra"]["history"]) == 2
    assert torch.serialization.get_unsafe_globals_in_checkpoint(part.checkpoint_path) == []
    resumed = ppo_risk.train(ppo_risk.Args.from_flat(resume=str(part.checkpoint_path), track=False, progress=False),
                             market=synthetic_market)
    assert resumed.finished and resumed.global_step == whole.global_step
    assert weights_equal(whole.agent, resumed.agent)
    assert resumed.lagrangian.state_dict() == whole.lagrangian.state_dict()
    assert resumed.kl_control.state_dict() == whole.kl_control.state_dict()
    assert whole.lagrangian.multiplier > 0 and whole.lagrangian.updates == 5
    # the whole run's history, across the resumption, in the CSV beside the checkpoint; equal to the uninterrupted's
    ours = pd.read_csv(ppo_risk.history_path(resumed.checkpoint_path)).drop(columns="charts/SPS")
    theirs = pd.read_csv(ppo_risk.history_path(whole.checkpoint_path)).drop(columns="charts/SPS")
    assert len(ours) == 5 and list(ours["iteration"]) == [1, 2, 3, 4, 5]
    pd.testing.assert_frame_equal(ours, theirs)
    for key in ("risk/lambda", "risk/pid_p", "risk/pid_i", "risk/pid_d", "risk/episode_max_drawdown",
                "risk/cost_value", "losses/kl_coef", "losses/approx_kl"):
        assert key in ours.columns


def _hand_cvar(quantiles: np.ndarray, alpha: float) -> np.ndarray:
    """CVaR_alpha of N equally likely quantile atoms, by hand: the mean of the quantile function over [0, alpha],
    i.e. the sorted atoms wholly below alpha at 1/N each plus the straddling atom's part, divided by alpha."""
    n = quantiles.shape[-1]
    q = np.sort(quantiles.astype(np.float64), axis=-1)
    whole = int(np.floor(alpha * n + 1e-12))
    tail = q[..., :whole].sum(-1) / n
    if whole < n:
        tail = tail + (alpha - whole / n) * q[..., whole]
    return tail / alpha


def test_cvar_value_of_a_known_quantile_vector_counts_the_straddling_atom(risk_args):
    """8 atoms at alpha = 0.3: two whole atoms (1/8 each) and 0.05 of the third, over 0.3; the heads' order does
    not matter. Neutral is the plain mean."""
    q = torch.tensor([[3.0, -2.0, 0.5, 7.0, -1.0, 2.0, 4.0, 1.0]])
    agent = ppo_risk.build_agent(risk_args.replace(risk="cvar", cvar_alpha=0.3), 4, 3)
    expected = (-2.0 / 8 + -1.0 / 8 + 0.05 * 0.5) / 0.3  # sorted: -2, -1, 0.5 (straddles), 1, ...
    assert float(agent.value_of(q)) == pytest.approx(expected, abs=1e-6)
    assert float(agent.value_of(q)) == pytest.approx(float(_hand_cvar(q.numpy(), 0.3)[0]), abs=1e-6)
    assert expected != pytest.approx((-2.0 - 1.0) / 2, abs=1e-3)  # not the two-atom mean: the third atom counts
    neutral = ppo_risk.build_agent(risk_args, 4, 3)
    assert float(neutral.value_of(q)) == pytest.approx(14.5 / 8, abs=1e-6)


def test_cvar_value_sits_below_the_mean_and_evaluation_sees_the_drawdown_state(risk_args, sp500_market, monkeypatch):
    args = risk_args.replace(risk="cvar", cvar_alpha=0.25, cost_limit=0.05)
    # record the quantiles the rollouts see (sampling calls, no action given), to recompute the logged gap by hand
    rollout_quantiles = []
    original = ppo_risk.QuantileActorCritic.get_action_and_value

    def recording(self, obs, action=None, mask=None):
        out = original(self, obs, action, mask)
        if action is None:
            rollout_quantiles.append(out[3].detach().numpy().copy())
        return out

    monkeypatch.setattr(ppo_risk.QuantileActorCritic, "get_action_and_value", recording)
    result = ppo_risk.train(args, market=sp500_market)
    steps = args.ppo.num_steps
    assert len(rollout_quantiles) == steps * len(result.history)
    for i, record in enumerate(result.history):  # logged gap = batch mean of (mean - CVaR_0.25) over 8 atoms
        q = np.stack(rollout_quantiles[i * steps : (i + 1) * steps])  # (num_steps, num_envs, N)
        hand_gap = float((q.astype(np.float64).mean(-1) - _hand_cvar(q, 0.25)).mean())
        assert record["risk/value_tail_gap"] == pytest.approx(hand_gap, abs=1e-5), i
    assert result.history[-1]["risk/value_tail_gap"] > 0
    assert ppo_risk.env_options(args, sp500_market) == {"drawdown_obs": True}
    n_features = sp500_market.arrays.features.shape[1]
    assert agent_obs_dim(args, sp500_market) == 8 * n_features + 1 + 2 == result.agent.obs_norm.mean.shape[0]
    trained = load_trained(result.checkpoint_path)
    assert weights_equal(trained.agent, result.agent) and trained.agent.cost_critic is not None
    again = evaluate_checkpoint(result.checkpoint_path, "validation")
    live = evaluate_policy(result.agent, sp500_market, window=8, positions=args.env.positions,
                           costs=ppo_risk.cost_model(args), range_name="validation",
                           env_options=ppo_risk.env_options(args, sp500_market))
    assert again.weights.equals(live.weights) and again.equity.equals(live.equity)


class NaNAfter:
    """A TradingEnv whose rewards turn NaN after ``steps`` steps."""

    def __init__(self, env, steps):
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


def test_non_finite_rewards_stop_the_run_before_an_update(risk_args, synthetic_market):
    args = risk_args.replace(checkpoint_every=1, cost_limit=0.1)
    env = NaNAfter(ppo_risk.make_env(args, synthetic_market), steps=2 * 16 + 5)
    with pytest.raises(NonFiniteError, match=r"iteration 3: the rollout produced non-finite rewards"):
        ppo_risk.train(args, market=synthetic_market, env=env)


def test_main_runs_and_a_time_budget_stops_cleanly(monkeypatch, tmp_path, capsys, risk_args, synthetic_market):
    stopped = ppo_risk.train(risk_args.replace(time_budget_s=0.0), market=synthetic_market)
    assert not stopped.finished and stopped.global_step == 8 * 16
    monkeypatch.setattr(sys, "argv", [
        "ppo_risk", "--total-timesteps", "256", "--num-envs", "8", "--num-steps", "32", "--window", "8",
        "--episode-length", "32", "--num-quantiles", "4", "--cost-limit", "0.05", "--no-track", "--run-dir",
        str(tmp_path / "cli"), "--checkpoint-every", "1",
    ])
    ppo_risk.main()
    assert "finished at step 256" in capsys.readouterr().out
    (checkpoint,) = (tmp_path / "cli").rglob("checkpoint.pt")
    assert len(pd.read_csv(ppo_risk.history_path(checkpoint))) == 1
    monkeypatch.setattr(sys, "argv", ["ppo_risk", "--resume", str(checkpoint), "--cost-limit", "0.5", "--no-track"])
    with pytest.raises(SystemExit, match="error: --resume .*cost_limit: given 0.5, checkpoint 0.05"):
        ppo_risk.main()


# --------------------------------------------------------------------------- the constraint on a synthetic market
def trending_market(n_bars: int = 4000, mu: float = 0.01, sigma: float = 0.04, seed: int = 0) -> PreparedMarket:
    """IID log returns N(mu, sigma) per bar and an uninformative (zero) feature: nothing can be timed, so the
    return-maximising policy is always long (log-optimal: mu / sigma^2 > 1), whose 32-bar episodes have a mean
    maximum drawdown of ~0.17; half a position has ~0.09, flat 0."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(mu, sigma, n_bars)))
    opens = np.r_[100.0, close[:-1]]
    frame = pd.DataFrame({"open": opens, "high": np.maximum(opens, close) * 1.001,
                          "low": np.minimum(opens, close) * 0.999, "close": close, "volume": 1e6},
                         index=pd.date_range("2000-01-03", periods=n_bars, freq="B"))
    data = to_market(frame, name="trending")
    values = np.zeros((n_bars, 1), np.float32)
    features = ObservationFeatures(values=values, names=["zero"], first_valid=0, blocks={"base": slice(0, 1)},
                                   state={})
    return PreparedMarket(data=data, splits=chronological_split(data, 0.6, 0.2), features=features,
                          arrays=MarketArrays.from_frame(data.frame, values, 0))


def greedy_episode_drawdown(agent, market: PreparedMarket, length: int, n: int = 256) -> float:
    """Mean maximum drawdown of ``n`` greedy episodes of ``length`` bars on the test range (exact: summed costs)."""
    start, stop = market.range("test")
    env = TradingEnv(market.arrays, num_envs=n, window=1, episode_length=length, start=start, stop=stop,
                     positions=(0.0, 0.5, 1.0), costs=CostModel(fee_bps=0.0, slippage_bps=0.0), drawdown_obs=True,
                     seed=5, stagger_starts=False)
    obs, total = env.reset(), torch.zeros(n, dtype=torch.float64)
    for _ in range(length):
        obs, _, _, _, info = env.step(agent.act_greedy(obs))
        total += info["drawdown_cost"]
    return float(total.mean())


@pytest.mark.slow
def test_the_constrained_agent_keeps_the_drawdown_limit_the_unconstrained_breaks(tmp_path):
    """Limit 0.07 on the mean 32-bar episode max drawdown, tolerance 0.03. On held-out test bars the greedy
    unconstrained agent is always long (mean max drawdown 0.128 there, above 0.10), the greedy constrained one stays
    under 0.10 (with this seed it goes flat: 0.0; half a position would be 0.071). In training, the stochastic
    constrained policy's measured drawdown over the last 10 iterations also stays within limit + tolerance (~0.08;
    the unconstrained one's ~0.13). Checked on seeds 1-3 while tuning; seed 1 runs here (~25 s on 2 shared cores)."""
    market, limit, tolerance = trending_market(), 0.07, 0.03
    args = ppo_risk.Args.from_flat(num_envs=32, num_steps=32, episode_length=32, window=1, positions=(0.0, 0.5, 1.0),
                         fee_bps=0.0, slippage_bps=0.0, total_timesteps=32 * 32 * 40, learning_rate=2e-3,
                         anneal_lr=False, ent_coef=0.0, num_quantiles=8, pid_kp=20.0, pid_ki=20.0, track=False,
                         progress=False, run_name="trend", checkpoint_every=0, run_dir=str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        free = ppo_risk.train(args, env=ppo_risk.make_env(args, market))
        bound = ppo_risk.train(args.replace(cost_limit=limit), env=ppo_risk.make_env(args, market))
    finally:
        torch.set_num_threads(threads)
    free_dd = greedy_episode_drawdown(free.agent, market, 32)
    bound_dd = greedy_episode_drawdown(bound.agent, market, 32)
    assert free_dd > limit + tolerance
    assert bound_dd <= limit + tolerance
    late = slice(-10, None)
    assert np.mean([h["risk/episode_max_drawdown"] for h in bound.history[late]]) <= limit + tolerance
    assert np.mean([h["risk/episode_max_drawdown"] for h in free.history[late]]) > limit + tolerance
    assert bound.lagrangian.updates == 40 and max(h["risk/lambda"] for h in bound.history) > 1
    assert all(h["risk/lambda"] == 0 for h in free.history)
