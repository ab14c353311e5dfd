"""Benchmark-anchored portfolio env: the projection onto the simplex, the zero tilt is the benchmark bit for bit, the
excess reward is net of the benchmark's own costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentio_lab.data.panel import load_panel
from sentio_lab.env.costs import CostModel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_anchor import PortfolioAnchor, equal_weight_benchmark, project_to_simplex
from sentio_lab.env.portfolio_arrays import asset_weights, build_portfolio_arrays
from sentio_lab.env.portfolio_benchmarks import SkfolioBaseline, benchmark_weights
from sentio_lab.evaluation.portfolio_baselines import run_baseline
from tests.data.test_panel import synthetic_frames

#: Costs on every trade, from the bars (a half-spread estimate and square-root impact): the shadow must pay them too.
COSTS = CostModel(fee_bps=3.0, slippage_bps=2.0, spread="corwin_schultz", impact="sqrt", capital=1e7)


@pytest.fixture(scope="module")
def arrays():
    arrays, _ = build_portfolio_arrays(load_panel(synthetic_frames(3, n_bars=200)), train_stop=150)
    return arrays


def random_benchmark(n_bars, num_assets, seed=0):
    """Weights that change every bar, cash included, with awkward floats (no exact binary fractions)."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(num_assets + 1), size=n_bars)
    return weights / weights.sum(1, keepdims=True)


def kkt_holds(v: torch.Tensor, w: torch.Tensor) -> bool:
    """``w`` is the Euclidean projection of ``v`` onto the simplex iff w >= 0, sum w = 1 and ``v - w`` is one constant
    ``theta`` on the support, ``v <= theta`` off it (the optimality conditions of the projection)."""
    ok = bool((w >= 0).all()) and torch.allclose(w.sum(-1), torch.ones(len(w), dtype=w.dtype), atol=1e-12)
    for vi, wi in zip(v, w, strict=True):
        support = wi > 0
        theta = (vi - wi)[support]
        ok &= bool(theta.max() - theta.min() < 1e-12) and bool((vi[~support] <= theta[0] + 1e-12).all())
    return ok


def test_projection_satisfies_the_optimality_conditions_and_keeps_simplex_rows():
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(200, 5, generator=gen, dtype=torch.float64) * 0.7,
                   torch.randn(20, 5, generator=gen, dtype=torch.float64) * 0.01 - 3.0,  # all negative
                   torch.randn(20, 5, generator=gen, dtype=torch.float64) + 4.0])  # all far above
    w = project_to_simplex(v)
    assert kkt_holds(v, w)
    assert ((w == 0).any(-1)).float().mean() > 0.3  # corners and faces are reached: the clamp is exercised
    shift = torch.randn(len(v), 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(project_to_simplex(v + shift), w, rtol=0, atol=1e-12)  # a constant does not move it
    on = torch.tensor(random_benchmark(50, 4), dtype=torch.float64)
    assert torch.equal(project_to_simplex(on), on)  # already on the simplex: returned as it is, not recomputed
    assert torch.equal(project_to_simplex(on + 0.0), on)


def run(env, actions_at, starts, steps):
    env.reset(starts)
    out = []
    for _ in range(steps):
        _, reward, terminated, truncated, info = env.step(actions_at(env.t))
        out.append((reward, info))
    return out


@pytest.mark.parametrize("benchmark", ["equal_weight", "random"])
def test_zero_tilt_reproduces_the_benchmark_through_the_env_bit_for_bit(arrays, benchmark):
    n, a = len(arrays.close), arrays.num_assets
    weights = equal_weight_benchmark(n, a) if benchmark == "equal_weight" else random_benchmark(n, a)
    kwargs = dict(num_envs=4, window=4, episode_length=20, costs=COSTS, seed=3)
    anchored = PortfolioEnv(arrays, anchor=PortfolioAnchor(weights, excess_reward=True), **kwargs)
    plain = PortfolioEnv(arrays, **kwargs)
    starts = [30, 60, 97, 140]
    zero = run(anchored, lambda t: torch.zeros(4, a + 1), starts, 45)  # 45 steps: two random restarts each
    bench = run(plain, lambda t: torch.tensor(weights)[t], starts, 45)
    for (excess, info), (_, ref) in zip(zero, bench, strict=True):
        assert torch.equal(info["equity"], ref["equity"]) and torch.equal(info["weights"], ref["weights"])
        assert torch.equal(info["cost"], ref["cost"]) and torch.equal(info["benchmark_equity"], ref["equity"])
        assert torch.equal(excess, torch.zeros_like(excess))
    assert float(torch.stack([ref["cost"] for _, ref in bench]).min()) > 0  # every step paid costs
    assert len({round(float(ref["equity"][0]), 12) for _, ref in bench}) > 30  # the equity moves


def test_excess_reward_is_the_log_return_over_the_benchmarks_net_of_its_own_costs(arrays):
    n, a = len(arrays.close), arrays.num_assets
    weights = random_benchmark(n, a, seed=1)
    kwargs = dict(num_envs=3, window=4, episode_length=100, costs=COSTS, seed=0)
    tilt = torch.tensor([[0.3, -0.2, 0.1, 0.0], [-1.0, 0.5, 0.5, 0.2], [0.0, 0.0, 0.0, 0.4]], dtype=torch.float64)
    anchored = PortfolioEnv(arrays, anchor=PortfolioAnchor(weights, excess_reward=True), **kwargs)
    agent = PortfolioEnv(arrays, **kwargs)  # the agent's targets, stepped by hand
    shadow = PortfolioEnv(arrays, **kwargs)  # the benchmark as a policy: what the shadow account must be
    starts = [30, 50, 90]
    tilted = run(anchored, lambda t: tilt, starts, 30)
    by_hand = run(agent, lambda t: project_to_simplex(torch.tensor(weights)[t] + tilt), starts, 30)
    bench = run(shadow, lambda t: torch.tensor(weights)[t], starts, 30)
    for (excess, info), (reward, mine), (bench_reward, ref) in zip(tilted, by_hand, bench, strict=True):
        torch.testing.assert_close(info["equity"], mine["equity"], rtol=0, atol=1e-13)
        torch.testing.assert_close(info["benchmark_equity"], ref["equity"], rtol=0, atol=1e-13)
        torch.testing.assert_close(excess, reward - bench_reward, rtol=0, atol=1e-13)
    assert abs(float(tilted[-1][0].sum())) > 1e-4  # the tilts do earn a different return
    # without excess_reward the reward is the agent's own log return and the info has no benchmark
    own = PortfolioEnv(arrays, anchor=PortfolioAnchor(weights), **kwargs)
    first = run(own, lambda t: tilt, starts, 1)[0]
    assert torch.equal(first[0], by_hand[0][0]) and "benchmark_equity" not in first[1]


def test_shadow_accounts_resume_and_reset_with_the_episodes(arrays):
    n, a = len(arrays.close), arrays.num_assets
    anchor = PortfolioAnchor(random_benchmark(n, a, seed=2), excess_reward=True)
    kwargs = dict(num_envs=2, window=4, episode_length=6, costs=COSTS, seed=5, stagger_starts=False)
    tilt = torch.full((2, a + 1), 0.1, dtype=torch.float64)
    tilt[:, 0] = 0.5
    env = PortfolioEnv(arrays, anchor=anchor, **kwargs)
    env.reset()
    for _ in range(4):
        env.step(tilt)
    state = env.state_dict()
    assert not torch.equal(state["benchmark_equity"], torch.ones(2, dtype=torch.float64))
    copy = PortfolioEnv(arrays, anchor=anchor, **kwargs)
    copy.load_state_dict(state)
    restarted = False
    for _ in range(5):  # across the end of the episode (6 steps): both accounts restart at equity 1
        r1, r2 = (e.step(tilt)[1] for e in (env, copy))
        assert torch.equal(r1, r2)
        if bool(env.steps.eq(0).all()):  # the step that ended the episodes: the shadow restarts all cash
            assert torch.equal(env.shadow.equity, torch.ones(2, dtype=torch.float64))
            assert torch.equal(env.shadow.shares, torch.zeros_like(env.shadow.shares))
            restarted = True
    assert restarted
    assert torch.equal(env.shadow.equity, copy.shadow.equity) and bool((env.steps < 4).all())
    assert bool((env.shadow.equity != state["benchmark_equity"]).all())


def test_anchor_inputs_are_checked_naming_the_bar(arrays):
    n, a = len(arrays.close), arrays.num_assets
    with pytest.raises(ValueError, match="float64"):
        PortfolioAnchor(np.ones((n, a + 1), dtype=np.float32))
    bad = equal_weight_benchmark(n, a)
    bad[7] = [0.5, 0.6, -0.1, 0.0]
    with pytest.raises(ValueError, match=r"bars \[7\]"):
        PortfolioAnchor(bad)
    with pytest.raises(ValueError, match="must be >= 1"):
        equal_weight_benchmark(0, 3)
    anchor = PortfolioAnchor(equal_weight_benchmark(n, a))
    with pytest.raises(ValueError, match="long_only"):
        PortfolioEnv(arrays, window=4, episode_length=10, allocation="long_short", anchor=anchor)
    with pytest.raises(ValueError, match=r"the env needs \(200, 4\)"):
        PortfolioEnv(arrays, window=4, episode_length=10, anchor=PortfolioAnchor(equal_weight_benchmark(n, a + 1)))
    env = PortfolioEnv(arrays, num_envs=2, window=4, episode_length=10, anchor=anchor)
    env.reset()
    with pytest.raises(ValueError, match="tilts of width 4"):
        env.step(torch.zeros(2, 3))


# ------------------------------------------------------------------ a skfolio benchmark, re-targeted every k steps
def fitted(arrays, name="inverse_volatility", train_stop=150):
    rows = np.arange(len(arrays.close)) < train_stop
    baseline = SkfolioBaseline(name, arrays.close, rows, lookback=80, min_returns=20)
    return baseline, benchmark_weights(baseline, first_bar=3)


@pytest.mark.parametrize(("name", "every"), [("inverse_volatility", 5), ("minimum_variance", 7), ("hrp", 1)])
def test_zero_tilt_is_the_runners_baseline_at_its_frequency_bit_for_bit(arrays, name, every):
    baseline, weights = fitted(arrays, name)
    a = arrays.num_assets
    kwargs = dict(num_envs=4, window=4, episode_length=40, costs=COSTS, seed=3)
    anchored = PortfolioEnv(arrays, anchor=PortfolioAnchor(weights, name=name, rebalance_every=every), **kwargs)
    starts = [30, 60, 97, 140]  # 140: the test bars after 150 hold the last training fit
    zero = run(anchored, lambda t: torch.zeros(4, a + 1), starts, 35)
    ref = run_baseline(PortfolioEnv(arrays, **kwargs), baseline, starts, 35, rebalance_every=every)
    shadowed = PortfolioEnv(arrays, anchor=PortfolioAnchor(weights, True, name, every), **kwargs)  # a shadow for k=1
    excess = run(shadowed, lambda t: torch.zeros(4, a + 1), starts, 35)
    for k, (reward, info) in enumerate(zero):
        assert np.array_equal(info["equity"].numpy(), ref["equity"][k])
        assert np.array_equal(info["cost"].numpy(), ref["cost"][k])
        assert np.array_equal(reward.numpy(), ref["reward"][k])
        assert np.array_equal(excess[k][1]["benchmark_equity"].numpy(), ref["equity"][k])  # the shadow: the baseline
        assert np.array_equal(excess[k][1]["equity"].numpy(), ref["equity"][k]) and bool((excess[k][0] == 0).all())
        if every > 1:
            assert torch.equal(info["benchmark_equity"], info["equity"])
    assert (ref["cost"][::every] > 0).all() and (ref["cost"][1:every].sum() == 0 if every > 1 else True)
    assert len({tuple(np.round(w, 9)) for w in weights[30:150, :-1]}) > 20  # refitted along the training bars


def test_between_retargets_the_tilt_is_around_the_benchmarks_drift(arrays):
    baseline, weights = fitted(arrays)
    a, every = arrays.num_assets, 4
    kwargs = dict(num_envs=2, window=4, episode_length=30, costs=COSTS, seed=1)
    env = PortfolioEnv(arrays, anchor=PortfolioAnchor(weights, excess_reward=True, rebalance_every=every), **kwargs)
    tilt = torch.tensor([[0.2, -0.1, 0.0, 0.05], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # env 1: zero tilt
    starts = [40, 120]
    env.reset(starts)
    ref = run_baseline(PortfolioEnv(arrays, **kwargs), baseline, starts, 25, rebalance_every=every)
    for k in range(25):
        t = env.t.clone()
        drifted = asset_weights(env.shadow.cash, env.shadow.shares, env.close.index_select(0, t))
        base = torch.tensor(weights)[t] if k % every == 0 else drifted
        _, excess, _, _, info = env.step(tilt)
        expected = project_to_simplex(base + tilt)[0, :a]  # tilted around b_t on re-targets, else around the drift
        torch.testing.assert_close(info["weights"][0], expected, rtol=0, atol=1e-15)
        assert np.array_equal(info["equity"][1].numpy(), ref["equity"][k, 1])  # the zero tilt holds with it
        assert np.array_equal(info["benchmark_equity"].numpy(), ref["equity"][k])  # the shadow is the baseline
        if k % every:
            assert not torch.allclose(drifted[0], torch.tensor(weights)[t[0]], atol=1e-4)  # it did drift
            assert float(info["cost"][1]) == 0.0 and float(info["cost"][0]) > 0.0
    assert float(excess[1]) == 0.0 and float(excess[0]) != 0.0


def test_a_zero_tilt_after_a_tilt_trades_to_the_drift_like_a_tiny_tilt_and_reports_held_weights(arrays):
    _, weights = fitted(arrays)
    a, every = arrays.num_assets, 5
    env = PortfolioEnv(arrays, num_envs=3, window=4, episode_length=30, costs=COSTS, seed=2,
                       anchor=PortfolioAnchor(weights, rebalance_every=every))
    env.reset([50, 50, 50])
    tilt = torch.tensor([0.3, -0.2, 0.1, -0.05], dtype=torch.float64)
    env.step(torch.stack([tilt, tilt, 0 * tilt]))  # a re-target: envs 0 and 1 tilt away, env 2 is the benchmark
    later = torch.zeros(3, a + 1, dtype=torch.float64)
    later[1] += 1e-12  # then env 0: a tilt of exactly zero, env 1: of 1e-12, env 2: zero (it *is* the benchmark)
    for k in range(1, every):
        drifted = asset_weights(env.shadow.cash, env.shadow.shares, env.close.index_select(0, env.t))
        price = env.fill.index_select(0, env.t + 1)
        _, _, _, _, info = env.step(later)
        torch.testing.assert_close(info["weights"][0], info["weights"][1], rtol=0, atol=1e-9)  # continuity
        torch.testing.assert_close(info["weights"][0], drifted[0, :a], rtol=0, atol=1e-12)  # P(d_t) = d_t
        if k == 1:  # the zero tilt trades from its own book to the benchmark's drift
            assert float(info["cost"][0]) > 0.0
        held = asset_weights(env.cash, env.shares, price)[:, :a]  # env 2 holds with the benchmark: what it holds
        assert float(info["cost"][2]) == 0.0 and torch.equal(info["weights"][2], held[2])
        assert not torch.equal(info["weights"][2], drifted[2, :a])  # (at the fill prices, not bar t's close)
    # a caller's hold (here at a re-target) reports the weights held at the fill prices, not the ignored targets
    price = env.fill.index_select(0, env.t + 1)
    targets = project_to_simplex(torch.tensor(weights)[env.t] + later)
    _, _, _, _, info = env.step(later, hold=torch.tensor([False, True, False]))
    held = asset_weights(env.cash, env.shares, price)[:, :a]
    assert torch.equal(info["weights"][1], held[1]) and float(info["cost"][1]) == 0.0
    assert not torch.allclose(info["weights"][1], targets[1, :a], atol=1e-4)
    with pytest.raises(ValueError, match="tilt_base: the env has no anchor"):
        PortfolioEnv(arrays, num_envs=1, window=4, episode_length=10).tilt_base()


def test_a_callers_hold_never_cancels_the_benchmarks_retarget(arrays):
    _, weights = fitted(arrays)
    a = arrays.num_assets
    for every in (1, 4):
        env = PortfolioEnv(arrays, num_envs=2, window=4, episode_length=20, costs=COSTS, seed=2,
                           anchor=PortfolioAnchor(weights, excess_reward=True, rebalance_every=every))
        env.reset([60, 60])
        zero = torch.zeros(2, a + 1, dtype=torch.float64)
        for _ in range(9):  # env 0 holds at every step, re-targets included; env 1 never holds
            _, excess, _, _, info = env.step(zero, hold=torch.tensor([True, False]))
            assert torch.equal(info["benchmark_equity"][0], info["benchmark_equity"][1])  # the same benchmark
            assert float(info["cost"][0]) == 0.0 and float(info["equity"][0]) == 1.0  # the agent stayed in cash
        assert float(info["benchmark_equity"][0]) != 1.0 and float(excess[1]) == 0.0


def test_random_starts_retarget_on_each_episodes_first_step_and_resume(arrays):
    _, weights = fitted(arrays)
    a = arrays.num_assets
    anchor = PortfolioAnchor(weights, rebalance_every=5)
    kwargs = dict(num_envs=3, window=4, episode_length=7, costs=COSTS, seed=4)  # staggered: mid-episode clocks
    env, copy = PortfolioEnv(arrays, anchor=anchor, **kwargs), PortfolioEnv(arrays, anchor=anchor, **kwargs)
    env.reset()
    assert bool((env.steps > 0).any()) and bool((env.shadow.age == 0).all())
    zero = torch.zeros(3, a + 1)
    for _ in range(12):
        fresh, retarget = env.shadow.age == 0, env.shadow.age % 5 == 0
        _, _, _, _, info = env.step(zero)
        assert bool((info["cost"][fresh] > 0).all())  # every episode's first step buys the benchmark
        assert bool((info["cost"][~retarget] == 0).all()) and bool((info["cost"][retarget] > 0).all())
    copy.load_state_dict(env.state_dict())
    for _ in range(6):
        assert torch.equal(env.step(zero)[4]["equity"], copy.step(zero)[4]["equity"])  # the clock resumed too
    with pytest.raises(ValueError, match="--anchor-rebalance 0"):
        PortfolioAnchor(weights, rebalance_every=0)


def test_the_fitted_benchmark_reads_training_returns_up_to_each_bar_only(arrays):
    _, weights = fitted(arrays)
    close = arrays.close.copy()
    close[150:] *= np.linspace(0.5, 2.0, len(close) - 150)[:, None] ** np.arange(1, arrays.num_assets + 1)
    rows = np.arange(len(close)) < 150
    moved = benchmark_weights(SkfolioBaseline("inverse_volatility", close, rows, lookback=80, min_returns=20), 3)
    assert np.array_equal(moved, weights)  # validation / test bars never move the training fit
    later = arrays.close.copy()
    later[101:] *= 1.0 + 0.3 * np.sin(np.arange(len(later) - 101))[:, None]
    changed = benchmark_weights(SkfolioBaseline("inverse_volatility", later, rows, lookback=80, min_returns=20), 3)
    assert np.array_equal(changed[:101], weights[:101])  # bar t reads returns <= t only
    assert not np.allclose(changed[101:150], weights[101:150])  # (and the perturbation was big enough to see)
    with pytest.raises(ValueError, match="first_bar 999"):
        benchmark_weights(SkfolioBaseline("hrp", close, rows), 999)
