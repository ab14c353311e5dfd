"""Issue 17 §5: the look-ahead and fold leaks an outside audit found, each proven closed by a perturbation.

* the token normaliser's fit set when two higher-timeframe bars close on the same base row;
* ``bars_per_day`` (it scales the cost estimators' windows) read from bars up to t only;
* the embargo counts the cost estimators' windows, and the mask volatility recursions restart per training
  segment: perturbing only test-group bars leaves every training-env input bit-identical;
* a failing HMM fit retries, or fails with a message naming the data range.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab.env import MarketArrays, fill_arrays
from sentio_lab.env.costs import CostModel, bars_per_day, cost_inputs
from sentio_lab.features.tokens import timeframe_token_block
from tests.features.test_lookahead import random_ohlcv

DAY = pd.Timedelta("1D")


# ============================================================================== 1. token normaliser fit set
def test_token_normaliser_ignores_bars_after_t_when_two_weekly_bars_close_on_one_row():
    """The issue's reproduction: daily bars, W-FRI tokens, training rows up to a Tuesday t. Re-dating only the
    bars after t to resume on a Friday ten days later (prices unchanged) makes t's week and the Friday's week
    close on the same row; no token row up to t may change."""
    frame = random_ohlcv(600, seed=5)
    tuesdays = np.flatnonzero(frame.index.dayofweek == 1)
    t = int(tuesdays[tuesdays > 400][0])
    train = np.arange(len(frame)) <= t
    stamps = frame.index.to_numpy().copy()
    friday = frame.index[t] + pd.Timedelta(days=10)
    assert friday.dayofweek == 4
    stamps[t + 1:] = pd.bdate_range(friday, periods=len(frame) - t - 1).to_numpy()
    redated = frame.copy()
    redated.index = pd.DatetimeIndex(stamps).as_unit("us").rename("timestamp")
    for rule in ("W-FRI", "W-WED"):
        block = timeframe_token_block(frame, rule, 6, train, DAY)
        other = timeframe_token_block(redated, rule, 6, train, DAY)
        np.testing.assert_array_equal(other.index[: t + 1], block.index[: t + 1])
        np.testing.assert_array_equal(other.table[other.index[: t + 1]], block.table[block.index[: t + 1]])


# ============================================================================================ 2. bars_per_day
def test_cost_inputs_up_to_t_ignore_the_spacing_of_later_bars():
    """Hourly bars; re-date only the bars after t to 2-hourly (prices unchanged): bars per day, the spread,
    sigma_daily, ADV, impact eta and the forecast fill cap up to t stay bit-identical. With a median over the
    whole index (before issue 17) bars per day went 24 -> 12 and every window at t changed length."""
    hours = pd.date_range("2021-03-01", periods=24 * 50, freq="h")
    frame = random_ohlcv(len(hours), seed=11, index=hours)
    t = 24 * 15 + 9
    stamps = frame.index.to_numpy().copy()
    stamps[t + 1:] = stamps[t] + np.arange(1, len(frame) - t) * np.timedelta64(2, "h")
    redated = frame.copy()
    redated.index = pd.DatetimeIndex(stamps).as_unit("us").rename("timestamp")
    costs = CostModel(spread="corwin_schultz", impact="sqrt", participation=0.1, cap_volume="forecast",
                      vol_window=10, adv_window=10)

    def inputs(f: pd.DataFrame):
        market = MarketArrays.from_frame(f, np.zeros((len(f), 1)))
        ci = cost_inputs(costs, market.high, market.low, market.close, market.volume, market.bars_per_day)
        half, eta, cap = fill_arrays(market, costs, first=t - 5, last=t + 1)
        return {"per_day": ci.per_day, "half": ci.half_spread, "sigma": ci.sigma, "adv": ci.adv,
                "fill_half": half, "eta": eta, "cap": cap}

    before, after = inputs(frame), inputs(redated)
    for name in before:
        np.testing.assert_array_equal(after[name][: t + 1], before[name][: t + 1], err_msg=name)
    assert before["per_day"][t] == 24.0 and after["per_day"][-1] == 12.0  # the later spacing does show, later
    assert np.isfinite(before["eta"][t]) and before["eta"][t] > 0 and np.isfinite(before["cap"][t])


def test_bars_per_day_is_the_median_of_completed_dates():
    index = pd.DatetimeIndex(["2024-01-01 10:00", "2024-01-01 11:00", "2024-01-02 09:00", "2024-01-02 10:00",
                              "2024-01-02 11:00", "2024-01-03 09:00", "2024-01-04 09:00", "2024-01-04 10:00"])
    # date 1: its bars so far (1, 2); date 2: median(2); date 3: median(2, 3); date 4: median(1, 2, 3)
    assert bars_per_day(index).tolist() == [1.0, 2.0, 2.0, 2.0, 2.0, 2.5, 2.0, 2.0]
    assert bars_per_day(None, 2).tolist() == [1.0, 1.0] and bars_per_day(pd.RangeIndex(3)).tolist() == [1.0] * 3
    # a varying bars-per-day gives each bar the window of its own value; a constant one the plain rolling window
    close = np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.01, 8)))
    from sentio_lab.env.costs import daily_volatility
    per_day = bars_per_day(index)
    sigma = daily_volatility(close, 1, per_day)
    for t in range(1, 8):
        bars = max(2, int(round(per_day[t])))
        r = np.diff(np.log(close))[max(0, t - bars): t]
        want = np.std(r, ddof=1) * np.sqrt(per_day[t]) if len(r) >= 2 else np.nan
        np.testing.assert_allclose(sigma[t], want, rtol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match="bars per day"):
        daily_volatility(close, 2, np.r_[per_day[:-1], 0.0])
    from sentio_lab.env.costs.estimators import _window_stat
    assert _window_stat(np.array([]), 3, "mean", 1).shape == (0,)
    # each window on its own: the same window anywhere gives the same bits, whatever came before it
    values = np.random.default_rng(4).normal(0, 1, 50)
    shifted = np.r_[np.random.default_rng(5).normal(0, 1e6, 30), values]
    np.testing.assert_array_equal(_window_stat(shifted, 7, "std", 2)[36:], _window_stat(values, 7, "std", 2)[6:])


# ====================================================================================== 5. HMM fit failures
def _regime_frame() -> pd.DataFrame:
    return random_ohlcv(700, seed=3, index=pd.bdate_range("1986-03-13", periods=700))


def test_hmm_restarts_that_fail_in_linear_algebra_are_retried_with_fresh_seeds(monkeypatch):
    """Every restart of the first round raises LinAlgError (as on the full msft-like file from 1986): a second
    round of fresh seeds is fitted, and the first round's failures are on record."""
    from hmmlearn.hmm import GaussianHMM

    from sentio_lab.features import regime as R

    inputs = R.regime_inputs(_regime_frame()["close"].to_numpy())
    unpatched = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 600, 2, restarts=2)
    real_fit, calls = GaussianHMM.fit, {"n": 0}

    def failing_first_round(self, X, lengths=None):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        return real_fit(self, X, lengths)

    monkeypatch.setattr(GaussianHMM, "fit", failing_first_round)
    model = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 600, 2, restarts=2)
    assert [r["converged"] for r in model.restarts[:2]] == [False, False]
    assert all("positive definite" in r["error"] for r in model.restarts[:2])
    assert any(r["converged"] for r in model.restarts[2:]) and len(model.restarts) == 4
    seeds = np.random.SeedSequence(0).generate_state(4)
    assert [r["seed"] for r in model.restarts] == seeds.tolist()
    # the first round's seeds are the ones a fit always drew: an unpatched fit is unchanged by the retry rule
    assert [r["seed"] for r in unpatched.restarts] == seeds[:2].tolist()
    assert np.isfinite(R.filtered_probabilities(model, inputs)[R.INPUT_LOOKBACK:]).all()


def test_an_hmm_that_cannot_be_fitted_fails_with_a_message_naming_the_data_range(monkeypatch):
    """Every restart of every round raises LinAlgError: one RegimeFitError naming the training rows and their
    dates, never the linear-algebra error itself."""
    from hmmlearn.hmm import GaussianHMM

    from sentio_lab.features import FeatureConfig, build_observation_features
    from sentio_lab.features.regime import RegimeFitError

    def always_fails(self, X, lengths=None):
        raise np.linalg.LinAlgError("Matrix is not positive definite")

    monkeypatch.setattr(GaussianHMM, "fit", always_fails)
    frame = _regime_frame()
    with pytest.raises(RegimeFitError) as caught:
        build_observation_features(frame, 500, FeatureConfig(regimes=2, regime_restarts=2))
    message = str(caught.value)
    assert not isinstance(caught.value, np.linalg.LinAlgError)
    assert "2-state HMM could not be fitted" in message and "4 seeded restarts" in message
    first = build_observation_features(frame, 500, FeatureConfig()).first_valid
    assert f"training rows {max(first, 10)}..500 ({frame.index[max(first, 10)]} to {frame.index[499]})" in message
    assert "--regimes" in message


def test_a_regime_state_the_filter_cannot_use_is_refused():
    from types import SimpleNamespace

    from sentio_lab.features import regime as R

    good = SimpleNamespace(startprob_=np.array([0.5, 0.5]), transmat_=np.full((2, 2), 0.5),
                           means_=np.zeros((2, 2)), covars_=np.stack([np.eye(2), np.eye(2)]))
    assert R._usable(good) is None
    bad = SimpleNamespace(**{**vars(good), "covars_": np.stack([np.eye(2), [[1.0, 2.0], [2.0, 1.0]]])})
    assert "state 1" in R._usable(bad)
    assert "non-finite" in R._usable(SimpleNamespace(**{**vars(good), "means_": np.full((2, 2), np.nan)}))
    model = R.RegimeModel(startprob=good.startprob_, transmat=good.transmat_, means=good.means_,
                          covars=bad.covars_, center=np.zeros(2), scale=np.ones(2), log_likelihood=0.0)
    with pytest.raises(ValueError, match="state 1's covariance"):
        R.filtered_probabilities(model, np.zeros((5, 2)))


# ============================================ 3 + 4. every training-env input is blind to its fold's test groups
FOLD_COMMON = ("--window", "8", "--episode-length", "48", "--positions", "-1", "-0.5", "0", "0.5", "1",
               "--num-envs", "12", "--seed", "5")
#: Impact reads sigma_daily's 480-bar window (the cost span sets the embargo); the spread alone reads 20 bars,
#: under the observation's reach of 27, so the embargo stays short -- short enough that a GARCH recursion run
#: through a test group would still show in the training bars (its memory fades below the last bit in ~480).
IMPACT = ("--impact", "sqrt", "--spread", "corwin_schultz", "--participation", "0.1", "--cap-volume", "forecast")
SPREAD = ("--spread", "corwin_schultz")
MASK_ARGS = ("--masks.risk-budget", "0.012", "--masks.drawdown-threshold", "0.02", "--masks.recover-threshold",
             "0.005", "--masks.cooldown", "3", "--masks.max-trades", "3", "--masks.period-bars", "10")
FOLD_AGENTS = {  # variant, its arguments, the shared cost arguments, the cost span they read
    "masks_ewma": ("ppo_masked", MASK_ARGS, IMPACT, 480),
    "masks_garch": ("ppo_masked", (*MASK_ARGS, "--masks.vol-model", "garch"), SPREAD, 20),
    "tokens_4h": ("ppo_transformer", ("--token-timeframes", "4h", "--token-counts", "4"), IMPACT, 480),
}


@pytest.fixture(scope="module")
def hourly_file(tmp_path_factory):
    """200 days of synthetic hourly bars with traded quantity as volume (so impact reads the ADV from the bars):
    sigma_daily's 20-day window is 480 bars, further back than any feature or token of the agents below."""
    hours = pd.date_range("2019-01-07", periods=24 * 200, freq="h")
    path = tmp_path_factory.mktemp("fold") / "hourly.csv"
    garch_ohlcv(hours).to_csv(path)
    return str(path)


def garch_ohlcv(index: pd.DatetimeIndex, seed: int = 21) -> pd.DataFrame:
    """Valid OHLCV whose returns follow a GARCH(1,1) (alpha 0.08, beta 0.9): volatility clusters, so a fitted GARCH
    has a long memory, and a recursion run through a test group would carry it into later bars."""
    rng = np.random.default_rng(seed)
    n = len(index)
    h, ret = 4e-6 / 0.02, np.empty(n)
    for t in range(n):
        ret[t] = np.sqrt(h) * rng.normal()
        h = 4e-6 + 0.08 * ret[t] ** 2 + 0.9 * h
    close = 100.0 * np.exp(np.cumsum(ret))
    open_ = np.r_[100.0, close[:-1]] * np.exp(rng.normal(0, 0.0003, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.001, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.001, n)))
    frame = pd.DataFrame({"open": open_, "high": high, "low": low, "close": close,
                          "volume": rng.lognormal(15, 0.5, n)}, index=index.as_unit("us").rename("timestamp"))
    return frame


def _rewrite_test_bars(frame: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """``frame`` with the prices and volumes of the rows in ``mask`` replaced (valid bars, same timestamps)."""
    rng = np.random.default_rng(99)
    out = frame.copy()
    k = int(mask.sum())
    o = out["open"].to_numpy()[mask] * np.exp(rng.normal(0, 0.03, k))
    c = out["close"].to_numpy()[mask] * np.exp(rng.normal(0, 0.03, k))
    out.loc[mask, "open"], out.loc[mask, "close"] = o, c
    out.loc[mask, "high"] = np.maximum(o, c) * 1.01
    out.loc[mask, "low"] = np.minimum(o, c) * 0.99
    out.loc[mask, "volume"] = rng.uniform(1e3, 1e5, k)
    return out


def _training_inputs(variant_name: str, args, market) -> dict[str, np.ndarray]:
    """Every input a training env of ``args`` on a fold ``market`` reads, over every decision it can make, and a
    rollout's observations, rewards, bootstrap observations and per-rule masks."""
    import dataclasses

    import torch

    from sentio_lab.experiment.cells import load_variant

    variant = load_variant(variant_name)
    env = variant.make_env(args, market)
    out: dict[str, np.ndarray] = {}
    # every decision bar of every training segment (episode starts lo..hi, decisions up to hi + L - 1, bootstrap hi + L)
    decisions = np.concatenate([np.arange(lo, hi + args.env.episode_length + 1) for lo, hi in env.start_sampler.bounds])
    rows = np.concatenate([np.arange(t - args.features.window + 1, t + 1) for t in decisions])
    out["features"] = market.arrays.features[rows]
    for block in getattr(env, "token_blocks", ()):
        out[block.name] = block.table[block.index[decisions]]
    half, eta, cap = env._fill_arrays
    inputs = cost_inputs(env.costs, market.arrays.high, market.arrays.low, market.arrays.close, market.arrays.volume,
                         market.arrays.bars_per_day)
    fills = decisions[decisions < len(market.arrays.close) - 1]
    read = {"half_spread": half, "eta": eta, "cap": cap, "per_day": inputs.per_day}
    if env.costs.impact != "none":  # what the cost model reads (sigma and ADV only feed impact and the cap)
        read |= {"sigma": inputs.sigma, "adv": inputs.adv}
    for name, values in read.items():
        out[name] = np.asarray(values)[fills]
    if env.masker is not None and env.masker.vol is not None:
        out["mask_vol"] = np.asarray(env.masker.vol)[decisions]
    # a rollout from the earliest starts of every segment (right after a test group), then sampled starts
    starts = [lo + 7 * i for i in range(args.ppo.num_envs // len(env.start_sampler.bounds) + 1)
              for lo, _ in env.start_sampler.bounds][: args.ppo.num_envs]
    obs = env.reset(starts=starts)
    gen = torch.Generator().manual_seed(7)
    trace = [obs]
    for _ in range(150):
        if env.masker is not None:
            for mask in env.masker.rule_masks(env.t, env.level).values():
                trace.append(mask.to(torch.float32))
            actions = torch.multinomial(env.action_masks().float(), 1, generator=gen).squeeze(1)
        else:
            actions = torch.randint(0, 5, (args.ppo.num_envs,), generator=gen)
        obs, reward, _, _, info = env.step(actions)
        trace += [obs, reward, info["final_obs"]]
    out["rollout"] = torch.cat([x.reshape(-1).double() for x in trace]).numpy()
    del dataclasses
    return out


@pytest.mark.slow
@pytest.mark.parametrize("agent", list(FOLD_AGENTS))
def test_perturbing_test_groups_leaves_every_training_env_input_bit_identical(hourly_file, agent):
    """A CPCV fold planned by the experiment runner: rewriting the prices and volumes of every test-group bar
    leaves every input of a training env bit-identical -- observations (features, tokens), masks (every rule,
    risk budget on EWMA or GARCH forecasts), cost inputs (Corwin-Schultz spread, sigma_daily, ADV, impact eta,
    the forecast fill cap) and rewards. The embargo counts sigma_daily's 480-bar window (the cost span), and the
    mask forecasts restart per training segment (checked where the embargo is short, so a recursion run through
    a test group would still show)."""
    import dataclasses

    from sentio_lab.data import load_market
    from sentio_lab.env.market import prepare_fold_market
    from sentio_lab.experiment.cells import load_variant, parse_variant_args
    from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
    from sentio_lab.experiment.runner import agent_argv, plan_experiment

    variant_name, agent_args, cost_args, cost_span = FOLD_AGENTS[agent]
    config = ExperimentConfig(name="leak_audit", agents=(AgentSpec(agent, variant_name, agent_args),),
                              dataset=hourly_file, n_groups=4, n_test_groups=2,
                              common_args=(*FOLD_COMMON, *cost_args), seeds=(1,))
    plan = plan_experiment(config)
    assert plan.gaps.cost_span == cost_span and plan.gaps.embargo == plan.gaps.reach
    assert plan.gaps.reach == (cost_span if cost_span == 480 else plan.gaps.observation_reach)
    args = parse_variant_args(variant_name, agent_argv(config, agent_args))
    feature_config = load_variant(variant_name).feature_config(args)
    data = load_market(hourly_file)
    # the fold with the most training segments after a test group
    fold = max(plan.folds, key=lambda f: sum(s > f.test[0][0] for s, _ in f.train))
    assert any(s > a for s, _ in fold.train for a, _ in fold.test)
    moved = dataclasses.replace(data, frame=_rewrite_test_bars(data.frame, fold.test_mask(len(data.frame))))
    markets = [prepare_fold_market(d, fold, feature_config=feature_config) for d in (data, moved)]
    original, perturbed = (_training_inputs(variant_name, args, m) for m in markets)
    assert original.keys() == perturbed.keys()
    for name in original:
        np.testing.assert_array_equal(perturbed[name], original[name], err_msg=f"{agent}: {name} moved")
    # controls: the perturbation is real (test-group closes moved) and the rules did fire
    assert not np.array_equal(markets[0].arrays.close, markets[1].arrays.close)
    if variant_name == "ppo_masked":
        assert np.isnan(original["mask_vol"]).sum() == 0 and "mask_vol" in original


def test_cost_reach_counts_only_the_windows_a_cost_model_reads():
    from sentio_lab.env.costs import cost_reach

    hourly = np.full(10, 24.0)
    assert cost_reach(CostModel()) == 0 and cost_reach(CostModel(fee_bps=5, slippage_bps=5), hourly) == 0
    assert cost_reach(CostModel(spread="abdi_ranaldo", spread_window=7), hourly) == 7
    assert cost_reach(CostModel(impact="sqrt", adv=1e9), hourly) == 480  # sigma: 20 days x 24 returns
    assert cost_reach(CostModel(impact="sqrt", vol_window=2, adv_window=30)) == 29  # ADV from the bars
    assert cost_reach(CostModel(participation=0.1, cap_volume="forecast", adv_window=5), hourly) == 119
    assert cost_reach(CostModel(participation=0.1, cap_volume="bar")) == 0  # the fill bar's own volume
    assert cost_reach(CostModel(impact="sqrt", vol_window=2, adv=1e9), np.array([0.5, 0.5])) == 2  # >= 2 returns


def test_the_embargo_and_the_touched_bar_audit_count_the_cost_span():
    from sentio_lab.env.splits import Fold, LeakageError, PurgeEmbargo, check_fold, touched_bars

    plain = PurgeEmbargo(window=8, feature_span=20)
    costly = PurgeEmbargo(window=8, feature_span=20, cost_span=480, extra_embargo=2)
    assert plain.reach == plain.observation_reach == 27 and plain.embargo == 27
    assert costly.observation_reach == 27 and costly.reach == 480 and costly.embargo == 482
    assert touched_bars((1000, 1100), costly)[0] == 1000 - 480
    # a training segment 100 bars after a test group: clean for the features, not for a 480-bar sigma window
    fold = Fold(0, "cpcv", ((700, 900),), ((100, 500),), (0,), (0,), 1, 27)
    check_fold(fold, plain, n_bars=1000)
    with pytest.raises(LeakageError, match="reads test bars"):
        check_fold(fold, costly, n_bars=1000)
    with pytest.raises(ValueError, match="cost_span"):
        PurgeEmbargo(window=8, feature_span=20, cost_span=-1)


def test_restarted_volatility_reads_its_own_segment_only():
    from sentio_lab.env.mask_inputs import ewma_volatility, restarted_per_segment

    close = random_ohlcv(300, seed=2)["close"].to_numpy()
    vol = restarted_per_segment(close, [(0, 100), (150, 300)], ewma_volatility)
    np.testing.assert_array_equal(vol[:100], ewma_volatility(close[:100]))
    np.testing.assert_array_equal(vol[150:], ewma_volatility(close[150:]))
    assert np.isnan(vol[100:150]).all() and vol[150] == 0.0
    with pytest.raises(ValueError, match="outside the market's 300 bars"):
        restarted_per_segment(close, [(250, 301)], ewma_volatility)


def test_a_converged_restart_the_filter_cannot_use_is_skipped(monkeypatch):
    from sentio_lab.features import regime as R

    inputs = R.regime_inputs(_regime_frame()["close"].to_numpy())
    real, calls = R._usable, {"n": 0}

    def first_unusable(model):
        calls["n"] += 1
        return "state 0's covariance is not positive definite" if calls["n"] == 1 else real(model)

    monkeypatch.setattr(R, "_usable", first_unusable)
    model = R.fit_regime_model(inputs, R.INPUT_LOOKBACK, 600, 2, restarts=2)
    assert model.restarts[0]["error"] == "state 0's covariance is not positive definite"
    assert model.restarts[1]["converged"] and len(model.restarts) == 2
