"""The portfolio env (sentio_lab.env.portfolio): torch = numpy gymnasium reference to 1e-9 under every cost model,
the observation layout, no look-ahead (per-asset and cross-sectional features), weights checks and refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sentio_lab.data.panel import load_panel, load_sp500_panel
from sentio_lab.env.costs import CostModel
from sentio_lab.env.portfolio import PortfolioEnv
from sentio_lab.env.portfolio_arrays import build_portfolio_arrays, check_weights, cross_sectional_ranks
from sentio_lab.env.portfolio_reference import NumpyPortfolioEnv
from sentio_lab.features import FeatureConfig
from tests.data.test_panel import synthetic_frames

WINDOW, STEPS = 4, 30
STARTS = (60, 150, 230)
COST_MODELS = {
    "flat": CostModel(fee_bps=5.0, slippage_bps=3.0),
    "borrow": CostModel(fee_bps=2.0, slippage_bps=1.0, borrow_bps=300.0),
    "spread": CostModel(spread="corwin_schultz"),
    "sqrt_impact": CostModel(impact="sqrt", capital=5e7),
    "almgren_chriss": CostModel(impact="almgren_chriss", spread="abdi_ranaldo", capital=5e7),
    "participation": CostModel(participation=0.05, capital=5e7),
}


def ohlcv_arrays(n_assets: int = 4, seed: int = 0, **kwargs):
    panel = load_panel(synthetic_frames(n_assets, seed=seed))
    return build_portfolio_arrays(panel, FeatureConfig(bank="close"), train_stop=200, **kwargs)[0]


def random_weights(rng: np.random.Generator, n: int, a: int, allocation: str, gross: float = 1.5) -> np.ndarray:
    if allocation == "long_only":
        w = rng.dirichlet(np.full(a + 1, 0.7), size=n)
        w[rng.random(n) < 0.2, :a] = 0.0  # some all-cash steps: exact moves to flat
        return w / w.sum(1, keepdims=True)
    w = rng.normal(0, 1, (n, a))
    w[rng.random(n) < 0.2, 1] = 0.0
    return w * gross / np.abs(w).sum(1, keepdims=True) * rng.uniform(0.3, 1.0, (n, 1))


def run_both(arrays, costs, allocation, seed=0, gross=1.5, fill_price=None):
    if fill_price is not None:
        arrays = dataclasses.replace(arrays, fill_price=fill_price)
    opts = dict(window=WINDOW, episode_length=STEPS, allocation=allocation, costs=costs,
                gross_limit=gross if allocation == "long_short" else 1.0)
    env = PortfolioEnv(arrays, num_envs=len(STARTS), **opts)
    refs = [NumpyPortfolioEnv(arrays, **opts) for _ in STARTS]
    obs = env.reset(starts=list(STARTS)).numpy()
    ref_obs = np.stack([r.reset(options={"start": s})[0] for r, s in zip(refs, STARTS, strict=True)])
    np.testing.assert_allclose(obs, ref_obs, rtol=0, atol=1e-6)
    rng = np.random.default_rng(seed)
    equities, capped = [], 0
    for k in range(STEPS):
        w = random_weights(rng, len(STARTS), arrays.num_assets, allocation, gross)
        obs, reward, term, trunc, info = env.step(torch.tensor(w))
        for i, ref in enumerate(refs):
            r_obs, r_reward, r_term, r_trunc, r_info = ref.step(w[i])
            assert abs(r_info["equity"] - float(info["equity"][i])) <= 1e-9
            assert abs(r_reward - float(reward[i])) <= 1e-9 and (r_term, r_trunc) == (bool(term[i]), bool(trunc[i]))
            assert abs(r_info["cost"] - float(info["cost"][i])) <= 1e-12
            capped += int(np.sum(r_info["capped"]))
            if k < STEPS - 1:
                np.testing.assert_allclose(obs[i].numpy(), r_obs, rtol=0, atol=1e-6)
            else:  # the last step truncates: the final observation is the episode's, obs the new episode's
                np.testing.assert_allclose(info["final_obs"][i].numpy(), r_obs, rtol=0, atol=1e-6)
        equities.append(info["equity"].clone())
    return torch.stack(equities), capped


@pytest.mark.parametrize("name", list(COST_MODELS))
@pytest.mark.parametrize("allocation", ["long_only", "long_short"])
def test_torch_env_equals_numpy_reference(name, allocation):
    equity, capped = run_both(ohlcv_arrays(), COST_MODELS[name], allocation)
    assert (equity != 1.0).all() and equity.std() > 1e-3  # the paths moved
    if name == "participation":
        assert capped > 0  # the cap bound on some orders: the comparison covers capped fills


def test_next_close_fills_and_close_only_panel_match_reference():
    arrays = build_portfolio_arrays(load_sp500_panel(start="2018-01-01", end="2019-12-31",
                                                     assets=["AAPL", "JPM", "XOM"]), train_stop=200)[0]
    assert arrays.fill_price == "next_close" and arrays.high is None
    run_both(arrays, COST_MODELS["borrow"], "long_short")
    run_both(ohlcv_arrays(), COST_MODELS["sqrt_impact"], "long_only", fill_price="next_close")
    with pytest.raises(ValueError, match="asset 'AAPL': CostModel.spread='corwin_schultz' needs the bars' high"):
        PortfolioEnv(arrays, window=WINDOW, episode_length=STEPS, costs=COST_MODELS["spread"])


def test_rewards_are_log_growth_and_costs_are_charged():
    arrays = ohlcv_arrays()
    free = PortfolioEnv(arrays, num_envs=2, window=WINDOW, episode_length=STEPS, costs=CostModel(0.0, 0.0))
    paid = PortfolioEnv(arrays, num_envs=2, window=WINDOW, episode_length=STEPS, costs=COST_MODELS["flat"])
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    for env in (free, paid):
        env.reset(starts=[100, 100])
    _, r_free, *_, info_free = free.step(w)
    _, r_paid, *_, info_paid = paid.step(w)
    # cost-free: equity = sum of the weights x each asset's open-to-close growth of bar 101
    growth = arrays.close[101] / arrays.open[101]
    assert float(info_free["equity"][0]) == pytest.approx(float(np.mean(growth)), abs=1e-12)
    assert float(r_free[0]) == pytest.approx(np.log(np.mean(growth)), abs=1e-12)
    assert float(info_free["equity"][1]) == 1.0 and float(info_paid["equity"][1]) == 1.0  # all cash pays nothing
    # buying everything with 5 bp fee and 3 bp slippage costs 8 bp of the notional (to first order)
    assert float(info_paid["cost"][0]) == pytest.approx(8.0024e-4, rel=1e-3)
    assert float(info_paid["turnover"][0]) == pytest.approx(1.0, abs=1e-3)
    assert float(r_paid[0]) < float(r_free[0])
    # holding the target re-trades only the drift: far less turnover than the first fill
    _, _, *_, info = paid.step(w)
    assert 0 < float(info["turnover"][0]) < 0.05


def test_observation_layout_is_asset_major_windows_then_weights():
    arrays = ohlcv_arrays(3)
    env = PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=STEPS, costs=CostModel(0.0, 0.0))
    obs = env.reset(starts=[120])
    f = arrays.features.shape[2]
    block = WINDOW * f + 1
    assert obs.shape == (1, 3 * block + 1) and env.obs_dim == obs.shape[1]
    for a in range(3):
        np.testing.assert_array_equal(obs[0, a * block:(a + 1) * block - 1].numpy(),
                                      arrays.features[120 - WINDOW + 1:121, a, :].reshape(-1))
        assert float(obs[0, (a + 1) * block - 1]) == 0.0
    assert float(obs[0, -1]) == 1.0  # all cash
    obs, *_ = env.step(torch.tensor([[0.5, 0.0, 0.2, 0.3]], dtype=torch.float64))
    held = obs[0, [block - 1, 2 * block - 1, 3 * block - 1, 3 * block]].numpy()
    assert held.sum() == pytest.approx(1.0, abs=1e-6)
    assert held[0] == pytest.approx(0.5, abs=0.03) and held[1] == 0.0 and held[3] == pytest.approx(0.3, abs=0.01)
    # a large panel gathers windows per step instead of precomputing them: the same observations
    import sentio_lab.env.portfolio as portfolio

    small = dataclasses.replace(arrays)
    old = portfolio.WINDOW_MATRIX_MAX_BYTES
    try:
        portfolio.WINDOW_MATRIX_MAX_BYTES = 0
        gathered = PortfolioEnv(small, num_envs=1, window=WINDOW, episode_length=STEPS)
    finally:
        portfolio.WINDOW_MATRIX_MAX_BYTES = old
    assert gathered._windows is None
    np.testing.assert_array_equal(gathered.reset(starts=[120]).numpy(), env.reset(starts=[120]).numpy())


def perturbed_after(frames, t: int, seed: int):
    """The frames with every bar after position t replaced by another random path (all assets)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, frame in frames.items():
        frame = frame.copy()
        scale = np.exp(rng.normal(0, 0.05, len(frame) - t - 1))[:, None]
        frame.iloc[t + 1:, :4] = frame.iloc[t + 1:, :4].to_numpy() * scale
        frame.iloc[t + 1:, 4] = frame.iloc[t + 1:, 4].to_numpy() * rng.uniform(0.1, 3.0, len(frame) - t - 1)
        out[name] = frame
    return out


@pytest.mark.parametrize("cross_sectional", [False, True])
def test_no_lookahead_in_observations_features_or_accounts(cross_sectional):
    frames = synthetic_frames(4)
    t = 260
    base = build_portfolio_arrays(load_panel(frames), train_stop=200, cross_sectional=cross_sectional)[0]
    moved = build_portfolio_arrays(load_panel(perturbed_after(frames, t, 1)), train_stop=200,
                                   cross_sectional=cross_sectional)[0]
    np.testing.assert_array_equal(base.features[:t + 1], moved.features[:t + 1])
    assert not np.array_equal(base.features[t + 1:], moved.features[t + 1:])  # the perturbation reached them
    if cross_sectional:
        assert any(n.startswith("xs_rank:") for n in base.feature_names)
    start, steps = t - 20, 30
    for costs in (COST_MODELS["flat"], COST_MODELS["almgren_chriss"]):
        envs = [PortfolioEnv(a, num_envs=1, window=WINDOW, episode_length=steps, costs=costs) for a in (base, moved)]
        obs = [e.reset(starts=[start]) for e in envs]
        rng = np.random.default_rng(0)
        for k in range(steps):
            w = torch.tensor(random_weights(rng, 1, 4, "long_only"))
            if start + k <= t:  # observed at bar start + k <= t: identical
                np.testing.assert_array_equal(obs[0].numpy(), obs[1].numpy())
            out = [e.step(w) for e in envs]
            obs = [o[0] for o in out]
            if start + k + 1 <= t:  # marked at bar start + k + 1 <= t: identical
                assert float(out[0][4]["equity"][0]) == float(out[1][4]["equity"][0])
        assert float(out[0][4]["equity"][0]) != float(out[1][4]["equity"][0])


def test_cross_sectional_ranks_one_asset_moves_only_its_bar():
    values = np.random.default_rng(0).normal(size=(50, 5, 3)).astype(np.float32)
    ranks = cross_sectional_ranks(values)
    assert ranks.min() == -1.0 and ranks.max() == 1.0
    np.testing.assert_array_equal(np.sort(ranks[7, :, 1]), np.linspace(-1, 1, 5, dtype=np.float32))
    assert ranks[7, np.argmax(values[7, :, 1]), 1] == 1.0
    bumped = values.copy()
    bumped[30:, 2, :] += 10.0
    moved = cross_sectional_ranks(bumped)
    np.testing.assert_array_equal(moved[:30], ranks[:30])
    assert (moved[30:, 2, :] == 1.0).all()


def test_weight_checks_refuse_or_project():
    w = torch.tensor([[0.5, 0.6, -0.1]], dtype=torch.float64)
    with pytest.raises(ValueError, match="long-only target weights must be >= 0 and sum to 1"):
        check_weights(w, "long_only", 1.0, "refuse", 2)
    projected = check_weights(w, "long_only", 1.0, "project", 2)
    torch.testing.assert_close(projected, torch.tensor([[0.5, 0.6]], dtype=torch.float64) / 1.1)
    zero = check_weights(np.zeros(3), "long_only", 1.0, "project", 2)
    np.testing.assert_array_equal(zero, [0.0, 0.0])  # all zero -> all cash
    near = check_weights(np.array([0.5, 0.5, 0.00005]), "long_only", 1.0, "refuse", 2)
    assert near.sum() == pytest.approx(1.0 / 1.00005)  # within the tolerance: rescaled onto the simplex
    ls = np.array([[1.0, -1.0], [0.3, 0.2]])
    with pytest.raises(ValueError, match=r"gross exposure sum \|w\| = \[2.0\] above gross_limit 1.5"):
        check_weights(ls, "long_short", 1.5, "refuse", 2)
    np.testing.assert_allclose(check_weights(ls, "long_short", 1.5, "project", 2), [[0.75, -0.75], [0.3, 0.2]])
    torch.testing.assert_close(check_weights(torch.tensor(ls), "long_short", 1.5, "project", 2),
                               torch.tensor([[0.75, -0.75], [0.3, 0.2]], dtype=torch.float64))
    with pytest.raises(ValueError, match="width 3"):
        check_weights(np.ones(2), "long_only", 1.0, "refuse", 2)
    with pytest.raises(ValueError, match="non-finite"):
        check_weights(np.array([np.nan, 1.0]), "long_short", 1.0, "refuse", 2)


def test_env_refusals_name_the_option():
    arrays = ohlcv_arrays()
    opts = dict(window=WINDOW, episode_length=STEPS)
    with pytest.raises(ValueError, match="remainder='carry' cannot apply to a portfolio"):
        PortfolioEnv(arrays, costs=CostModel(participation=0.1, remainder="carry"), **opts)
    with pytest.raises(ValueError, match="allocation='short_only'"):
        PortfolioEnv(arrays, allocation="short_only", **opts)
    with pytest.raises(ValueError, match="gross_limit=2.0 applies to allocation='long_short' only"):
        NumpyPortfolioEnv(arrays, gross_limit=2.0, **opts)
    with pytest.raises(ValueError, match="invalid_weights='clip'"):
        PortfolioEnv(arrays, invalid_weights="clip", **opts)
    with pytest.raises(ValueError, match="gross_limit must be finite"):
        PortfolioEnv(arrays, allocation="long_short", gross_limit=0.0, **opts)
    with pytest.raises(ValueError, match="needs bar timestamps"):
        PortfolioEnv(dataclasses.replace(arrays, year_fraction=None), costs=COST_MODELS["borrow"], **opts)
    env = PortfolioEnv(arrays, num_envs=2, **opts)
    env.reset(starts=[100, 100])
    with pytest.raises(ValueError, match=r"expected float weights of shape \(2, 5\)"):
        env.step(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no valid episode start"):
        env.reset(starts=[0, 100])
    with pytest.raises(ValueError, match="2 envs"):
        env.reset(starts=[100])
    panel = load_sp500_panel(start="2019-01-01", end="2019-12-31", assets=["AAPL", "KO"])
    with pytest.raises(ValueError, match="close-only.*next close"):
        build_portfolio_arrays(panel, train_stop=150, fill_price="next_open")
    with pytest.raises(ValueError, match="bank='close'"):
        build_portfolio_arrays(panel, FeatureConfig(), train_stop=150)
    bad = np.array(arrays.close)
    bad[150, 1] = np.nan
    with pytest.raises(ValueError, match="close price of asset 'A1' at row 150"):
        dataclasses.replace(arrays, close=bad)


def test_auto_reset_seeds_and_resume():
    arrays = ohlcv_arrays()

    def run(env, n):
        rng = np.random.default_rng(1)
        out = []
        for _ in range(n):
            obs, reward, _, trunc, info = env.step(torch.tensor(random_weights(rng, 4, 4, "long_only")))
            out.append((obs.clone(), reward.clone(), trunc.clone()))
        return out

    a = PortfolioEnv(arrays, num_envs=4, window=WINDOW, episode_length=10, seed=3)
    b = PortfolioEnv(arrays, num_envs=4, window=WINDOW, episode_length=10, seed=3)
    a.reset(), b.reset()
    first, second = run(a, 25), run(b, 25)
    for x, y in zip(first, second, strict=True):
        torch.testing.assert_close(x[0], y[0], rtol=0, atol=0)
        torch.testing.assert_close(x[1], y[1], rtol=0, atol=0)
    assert sum(int(x[2].sum()) for x in first) >= 4  # every env truncated at least once (staggered, auto-reset)
    state = a.state_dict()
    more = run(a, 7)
    c = PortfolioEnv(arrays, num_envs=4, window=WINDOW, episode_length=10, seed=99)
    c.reset()
    c.load_state_dict(state)
    for x, y in zip(more, run(c, 7), strict=True):
        torch.testing.assert_close(x[1], y[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="accounts of shape"):
        PortfolioEnv(arrays, num_envs=2, window=WINDOW, episode_length=10).load_state_dict(state)
    ref = NumpyPortfolioEnv(arrays, window=WINDOW, episode_length=10)
    obs, _ = ref.reset(seed=5)
    assert ref.observation_space.contains(obs) and ref.start_low <= ref.t <= ref.start_high
    with pytest.raises(ValueError, match="outside the valid range"):
        ref.reset(options={"start": 1})


def test_long_only_never_borrows_cash():
    arrays = ohlcv_arrays()
    env = PortfolioEnv(arrays, num_envs=1, window=WINDOW, episode_length=STEPS, costs=COST_MODELS["sqrt_impact"])
    env.reset(starts=[100])
    for _ in range(10):
        env.step(torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.0]], dtype=torch.float64))
        assert float(env.cash[0]) > -1e-12 and abs(float(env.cash[0])) < 1e-9  # fully invested, after costs


def test_features_must_agree_across_assets():
    panel = load_panel(synthetic_frames(4))
    with pytest.raises(ValueError, match="asset 'A2': its features .* differ from 'A0''s"):
        build_portfolio_arrays(panel, FeatureConfig(bank="close", prune_corr=0.5), train_stop=200)
    arrays = ohlcv_arrays()
    with pytest.raises(ValueError, match="must share"):
        dataclasses.replace(arrays, open=arrays.open[:, :2])
    with pytest.raises(ValueError, match="3 asset names for 4 columns"):
        dataclasses.replace(arrays, assets=("a", "b", "c"))
    with pytest.raises(ValueError, match="fill_price='at_close'"):
        dataclasses.replace(arrays, fill_price="at_close")
    with pytest.raises(ValueError, match="first_valid=9999"):
        dataclasses.replace(arrays, first_valid=9999)
    features = arrays.features.copy()
    features[300, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite features at rows \[300\]"):
        dataclasses.replace(arrays, features=features)


def test_segment_sampler_confines_episodes():
    from sentio_lab.env.splits import SegmentEpisodeSampler

    arrays = ohlcv_arrays()
    sampler = SegmentEpisodeSampler([(40, 120), (250, 330)], WINDOW, 20, first_valid=arrays.first_valid,
                                    n_bars=len(arrays.close))
    env = PortfolioEnv(arrays, num_envs=16, window=WINDOW, episode_length=20, start_sampler=sampler, seed=1)
    env.reset()
    assert bool(sampler.contains(env.t).all())
    with pytest.raises(ValueError, match="no valid episode start"):
        env.reset(starts=[200] * 16)
    with pytest.raises(ValueError, match="sized for window"):
        PortfolioEnv(arrays, window=WINDOW + 1, episode_length=20, start_sampler=sampler)
    with pytest.raises(ValueError, match="leave the env's valid starts"):
        PortfolioEnv(arrays, window=WINDOW, episode_length=20, start=200, start_sampler=sampler)
    seen = set()
    for _ in range(60):  # auto-resets draw from the sampler too: every visited bar lies in a segment
        env.step(torch.tensor(random_weights(np.random.default_rng(0), 16, 4, "long_only")))
        seen.update(env.t.tolist())
    assert all(40 <= t <= 120 or 250 <= t <= 330 for t in seen)


def test_hold_trades_nothing_even_towards_all_cash():
    arrays = ohlcv_arrays()
    env = PortfolioEnv(arrays, num_envs=2, window=WINDOW, episode_length=STEPS, costs=COST_MODELS["participation"])
    env.reset(starts=[100, 100])
    env.step(torch.tensor([[0.3, 0.3, 0.2, 0.2, 0.0]] * 2, dtype=torch.float64))
    shares, cash = env.shares.clone(), env.cash.clone()
    all_cash = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]] * 2, dtype=torch.float64)
    *_, info = env.step(all_cash, hold=torch.tensor([True, False]))
    torch.testing.assert_close(env.shares[0], shares[0], rtol=0, atol=0)
    assert float(env.cash[0]) == float(cash[0]) and float(info["cost"][0]) == 0.0
    assert not bool(info["capped"][0].any())  # a held account placed no order
    assert float(info["cost"][1]) > 0 and bool((env.shares[1] != shares[1]).any())
