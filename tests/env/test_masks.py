"""Mask rules (sentio_lab.env.masks) on hand-built states, and their enforcement by both environments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentio_lab.env import MarketArrays, NumpyTradingEnv, TradingEnv
from sentio_lab.env.costs import CostModel
from sentio_lab.env.mask_inputs import MaskInputs, ewma_volatility, garch_volatility
from sentio_lab.env.masks import MaskConfig, Masker, NoValidActionError, nearest_table, nearest_valid

FIVE = (-1.0, -0.5, 0.0, 0.5, 1.0)
FLAT = 2
COSTS = CostModel(5, 3)


def market(n: int = 400, seed: int = 0, spike_at: int | None = None, regime: bool = False,
           clusters: bool = False) -> MarketArrays:
    """Random walk (1 % per bar; 6 % after ``spike_at``; with ``clusters`` 4 % in bars 40k+20 .. 40k+40 before
    the spike); feature 0 the log return, optional regime column (0.1, then 0.9 from bar n // 2)."""
    rng = np.random.default_rng(seed)
    sigma = np.full(n, 0.01)
    if clusters:
        sigma[np.arange(n) % 40 >= 20] = 0.04
    if spike_at is not None:
        sigma[spike_at:] = 0.06
    close = 100 * np.exp(np.cumsum(rng.normal(0, 1, n) * sigma))
    open_ = np.r_[close[0], close[:-1]]
    cols = [np.r_[0.0, np.diff(np.log(close))]]
    if regime:
        cols.append(np.where(np.arange(n) >= n // 2, 0.9, 0.1))
    features = np.column_stack(cols).astype(np.float32)
    return MarketArrays(open=open_, close=close, features=features, first_valid=1)


def masker(config: MaskConfig, n: int = 2, inputs: MaskInputs | None = None, torch_: bool = False, **kw) -> Masker:
    inputs = inputs or MaskInputs(vol=np.full(10, 0.01), regime_prob=np.zeros(10))
    return Masker(config, np.array(FIVE), inputs, n, device=torch.device("cpu") if torch_ else None, **kw)


def rows(m: Masker, t, level, equity=None):
    t, level = np.asarray(t), np.asarray(level)
    equity = np.ones(len(t)) if equity is None else np.asarray(equity, dtype=float)
    return m.action_masks(t, level, equity)


# ---------------------------------------------------------------------------------------- single rules
def test_position_limits_on_five_levels():
    m = masker(MaskConfig(max_abs_level=0.5))
    assert rows(m, [0, 0], [2, 4]).tolist() == [[False, True, True, True, False]] * 2
    m = masker(MaskConfig(long_only=True, max_abs_level=0.6), n=1)
    assert rows(m, [0], [2])[0].tolist() == [False, False, True, True, False] and m.names == ("max_abs_level",
                                                                                            "long_only")


def test_risk_budget_fires_on_a_volatility_spike():
    arrays = market(spike_at=200)
    vol = ewma_volatility(arrays.close, 0.9)
    assert vol[150] < 0.02 < vol[220]
    m = masker(MaskConfig(risk_budget=0.02, ewma_lambda=0.9), inputs=MaskInputs(vol=vol))
    calm, spiky = rows(m, [150, 220], [2, 2])
    assert calm.all()
    budget = 0.02 / vol[220]
    assert spiky.tolist() == [abs(w) <= budget for w in FIVE] and spiky[FLAT] and not spiky[0]


def test_drawdown_guard_latches_until_recovery():
    cfg = MaskConfig(drawdown_threshold=0.1, recover_threshold=0.02)
    m = masker(cfg, n=1)
    hold_half = [4 - 1]  # level 0.5
    path = [1.2, 1.1, 1.07, 1.1, 1.15, 1.19, 1.3]  # D: 0, .083, .108, .083, .042, .008, 0
    guard = []
    for e in path:
        m.update(np.array([False]), np.array([e]), np.array([1]))
        guard.append(bool(m.state["guard"][0]))
    assert guard == [False, False, True, True, True, False, False]
    m.update(np.array([False]), np.array([1.1]), np.array([1]))  # D = 0.154: on again
    mask = rows(m, [0], hold_half, [1.1])[0]
    assert mask.tolist() == [False, False, True, True, False]  # flat or keep 0.5; no flip, no increase


@pytest.mark.parametrize("torch_", [False, True], ids=["numpy", "torch"])
def test_drawdown_guard_turns_off_back_at_the_peak_with_the_default_recover_threshold(torch_):
    """recover_threshold = 0 (the default): the guard goes off once equity is back at its peak (D = 0), and stays off
    above it; a ``D >= recover`` test instead would latch it for the rest of the episode (D = 0 >= 0)."""
    cfg = MaskConfig(drawdown_threshold=0.1)
    assert cfg.recover_threshold == 0.0
    m = masker(cfg, n=1, torch_=torch_)
    xp = torch.tensor if torch_ else np.array
    guard, masks = [], []
    for e in [1.0, 0.85, 0.95, 1.0, 1.2, 1.3]:  # D: 0, .15, .05, 0 (the peak again), 0, 0 (new peaks)
        m.update(xp([False]), xp([e], dtype=torch.float64 if torch_ else float), xp([1]))
        guard.append(bool(m.state["guard"][0]))
        masks.append([bool(v) for v in m.action_masks(xp([0]), xp([3]), xp([e]))[0]])  # holding 0.5
    assert guard == [False, True, True, False, False, False]
    guarded, free = [False, False, True, True, False], [True] * 5  # flat or keep 0.5; no flip, no increase
    assert masks == [free, guarded, guarded, free, free, free]


def test_regime_switch_forbids_increases_only_in_the_volatile_state():
    arrays = market(regime=True)
    cfg = MaskConfig(regime_threshold=0.5, regime_column=-1)
    inputs = MaskInputs.build(cfg, arrays.close, arrays.features)
    m = masker(cfg, inputs=inputs)
    calm, volatile = rows(m, [100, 300], [1, 1])  # holding -0.5
    assert calm.all()
    assert volatile.tolist() == [False, True, True, False, False]


def test_cooldown_and_trade_limit_through_the_env():
    arrays = market()
    env = TradingEnv(arrays, num_envs=1, window=2, episode_length=40, positions=FIVE, masks=MaskConfig(cooldown=3),
                     stagger_starts=False)
    env.reset(starts=[10])
    assert env.action_masks().all()
    env.step(torch.tensor([4]))
    for _ in range(2):  # h = 1, 2 < 3: hold 1 or exit flat
        assert env.action_masks()[0].tolist() == [False, False, True, False, True]
        env.step(torch.tensor([4]))
    assert env.action_masks().all()  # h = 3

    env = TradingEnv(arrays, num_envs=1, window=2, episode_length=40, positions=FIVE, stagger_starts=False,
                     masks=MaskConfig(max_trades=2, period_bars=5))
    env.reset(starts=[10])
    masks, levels = [], []
    for a in [3, 4, 3, 3, 3, 4, 4]:
        masks.append(env.action_masks()[0].tolist())
        env.step(torch.tensor([a]))
        levels.append(env.level.item())
    assert masks[0] == masks[1] == [True] * 5
    assert masks[2] == [False, False, True, False, True]  # two trades in steps 0..4: hold 1 or exit flat
    assert levels[2] == FLAT  # 0.5 is masked; 0 and 1 are equally near: towards flat (a third trade, an exit)
    assert masks[3] == masks[4] == [False, False, True, False, False]  # hold flat
    assert levels[3] == levels[4] == FLAT
    assert masks[5] == masks[6] == [True] * 5  # steps 5..9: a new window
    assert levels[6] == 4
    assert env.mask_counts == {"max_trades": 3} and env.mask_binding == {"max_trades": 3}


def test_counts_and_nearest_mapping():
    arrays = market()
    env = TradingEnv(arrays, num_envs=1, window=2, episode_length=40, positions=FIVE, stagger_starts=False,
                     masks=MaskConfig(max_trades=1, period_bars=10, long_only=True))
    env.reset(starts=[10])
    env.step(torch.tensor([4]))  # a trade
    env.step(torch.tensor([3]))  # 0.5 masked by max_trades; valid {0, 1} are equally near: flat
    assert env.level.item() == FLAT
    env.step(torch.tensor([0]))  # -1: masked by long_only and max_trades; only flat (held) is valid
    assert env.level.item() == FLAT
    env.step(torch.tensor([2]))  # valid: counted nowhere
    assert env.mask_counts == {"long_only": 1, "max_trades": 2}
    assert env.mask_binding == {"long_only": 4, "max_trades": 3}


def test_nearest_ties_go_towards_flat():
    levels = np.array(FIVE)
    mask = np.array([[True, False, True, False, True], [False, False, True, False, True]])
    assert nearest_valid(np.array([1, 3]), mask, levels).tolist() == [FLAT, FLAT]  # -0.5: -1 and 0 tie; 0.5: tie
    t = nearest_valid(torch.tensor([1, 3]), torch.tensor(mask), torch.tensor(levels))
    assert t.tolist() == [FLAT, FLAT]
    mask = np.array([[True, False, False, False, True]] * 2)
    assert nearest_valid(np.array([1, 3]), mask, levels).tolist() == [0, 4]


@pytest.mark.parametrize("levels", [FIVE, (-1.0, -0.25, 0.0, 0.75), (0.0, 1.0, 2.0, -2.0, -1.0, 0.5, -0.5)])
def test_the_nearest_table_is_the_formula_on_every_mask_row_and_action(levels):
    """The torch Masker maps "nearest" through nearest_table: on every non-empty mask row of A levels and every
    chosen action it equals where(valid, a, nearest_valid(a)), the formula the numpy reference env applies."""
    levels_t = torch.tensor(levels, dtype=torch.float64)
    bits, table = nearest_table(levels_t)
    num_levels = len(levels)
    for code in range(1, 2**num_levels):
        row = torch.tensor([(code >> a) & 1 == 1 for a in range(num_levels)])
        assert int((row * bits).sum()) == code
        actions = torch.arange(num_levels)
        rows = row.expand(num_levels, -1)
        expected = torch.where(row[actions], actions, nearest_valid(actions, rows, levels_t))
        assert table[code].tolist() == expected.tolist(), (code, row.tolist())


def test_torch_envs_with_the_table_and_with_the_formula_take_the_same_actions(monkeypatch):
    """An env past the table's size limit maps with the formula: both give the same fills, counts and equity."""
    import sentio_lab.env.masks as masks_module

    def run():
        env = TradingEnv(market(), num_envs=4, window=2, episode_length=30, positions=FIVE, seed=3,
                         masks=MaskConfig(long_only=True, cooldown=3, max_abs_level=0.5))
        env.reset()
        g = torch.Generator().manual_seed(5)
        levels = []
        for _ in range(60):
            env.step(torch.randint(0, 5, (4,), generator=g))  # many invalid: mapped to the nearest valid
            levels.append(env.level.clone())
        return torch.stack(levels), env.equity.clone(), env.mask_counts, env.mask_binding

    with_table = run()
    monkeypatch.setattr(masks_module, "_TABLE_LEVELS", 0)
    with_formula = run()
    assert torch.equal(with_table[0], with_formula[0]) and torch.equal(with_table[1], with_formula[1])
    assert with_table[2:] == with_formula[2:] and sum(with_table[2].values()) > 0


def test_refuse_names_env_action_rule_and_changes_nothing():
    arrays = market()
    env = TradingEnv(arrays, num_envs=2, window=2, episode_length=40, positions=FIVE, invalid_action="refuse",
                     masks=MaskConfig(long_only=True, max_abs_level=0.5))
    env.reset(starts=[10, 20])
    before = env.state_dict()
    with pytest.raises(ValueError, match=r"action 0 \(level -1.0\) of env 1 is masked by rule\(s\) \['max_abs_level', "
                                         r"'long_only'\]"):
        env.step(torch.tensor([3, 0]))
    after = env.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "generator")
    env.step(torch.tensor([3, 2]))
    assert env.level.tolist() == [3, 2]
    numpy_env = NumpyTradingEnv(arrays, window=2, episode_length=40, positions=FIVE, invalid_action="refuse",
                                masks=MaskConfig(long_only=True))
    numpy_env.reset(options={"start": 10})
    with pytest.raises(ValueError, match="masked by rule.*long_only"):
        numpy_env.step(1)


def test_flat_is_always_valid_under_every_rule():
    arrays = market(spike_at=150, regime=True)
    cfg = MaskConfig(max_abs_level=0.5, long_only=True, risk_budget=0.012, drawdown_threshold=0.02,
                     regime_threshold=0.5, regime_column=-1, cooldown=4, max_trades=1, period_bars=6)
    env = TradingEnv(arrays, num_envs=16, window=2, episode_length=30, positions=FIVE, masks=cfg, seed=3)
    env.reset()
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        masks = env.action_masks()
        assert masks[:, FLAT].all()
        env.step(torch.randint(0, 5, (16,), generator=g))
    assert all(v > 0 for v in env.mask_binding.values())


def test_an_empty_row_raises_naming_rule_episode_and_state():
    cfg = MaskConfig(risk_budget=0.01, cooldown=5, flat_always=False)
    vol = np.array([0.001, 0.05, 0.05])
    for torch_ in (False, True):
        m = masker(cfg, inputs=MaskInputs(vol=vol), torch_=torch_)
        arr = torch.tensor if torch_ else np.array
        m.update(arr([True, True]), arr([1.0, 0.9]), arr([1, 1]))  # both just traded: h = 1 < 5
        ok = m.action_masks(arr([0, 0]), arr([4, 4]), arr([1.0, 0.9]))
        assert ok.tolist() == [[False, False, False, False, True]] * 2  # only hold 1 (flat not exempt)
        with pytest.raises(NoValidActionError, match=r"rule 'cooldown'.*levels \[2\].*\['risk_budget'\].*episode 1 "
                                                     r"\(env index\) at bar t=2, level 1.0, equity 0.9, drawdown 0.1"):
            m.action_masks(arr([0, 2]), arr([4, 4]), arr([1.0, 0.9]))


def test_torch_and_numpy_masks_agree_over_a_rollout():
    arrays = market(n=600, spike_at=300, regime=True)
    cfg = MaskConfig(max_abs_level=0.5, risk_budget=0.02, drawdown_threshold=0.04, recover_threshold=0.01,
                     regime_threshold=0.5, regime_column=-1, cooldown=3, max_trades=3, period_bars=7)
    starts, length = [5, 100, 250, 290, 400], 60
    env = TradingEnv(arrays, num_envs=len(starts), window=2, episode_length=length, positions=FIVE, masks=cfg,
                     costs=COSTS, stagger_starts=False)
    env.reset(starts=starts)
    refs = [NumpyTradingEnv(arrays, window=2, episode_length=length, positions=FIVE, masks=cfg, costs=COSTS)
            for _ in starts]
    for ref, s in zip(refs, starts, strict=True):
        ref.reset(options={"start": s})
    rng = np.random.default_rng(0)
    for _ in range(length - 1):
        masks = env.action_masks().numpy()
        assert np.array_equal(masks, np.stack([ref.action_masks() for ref in refs]))
        actions = rng.integers(0, 5, len(starts))
        _, _, _, _, info = env.step(torch.as_tensor(actions))
        equity = [ref.step(int(a))[4]["equity"] for ref, a in zip(refs, actions, strict=True)]
        np.testing.assert_allclose(info["equity"].numpy(), equity, rtol=1e-12)
        assert env.level.tolist() == [ref.level for ref in refs]
    torch_counts = env.mask_counts
    numpy_counts = {k: sum(ref.masker.counts()[k] for ref in refs) for k in torch_counts}
    assert torch_counts == numpy_counts and all(v > 0 for v in env.mask_binding.values())


def test_auto_reset_masks_refer_to_the_new_episode():
    arrays = market()
    env = TradingEnv(arrays, num_envs=1, window=2, episode_length=3, positions=FIVE, stagger_starts=False,
                     masks=MaskConfig(cooldown=5, drawdown_threshold=0.001))
    env.reset(starts=[10])
    for a in [4, 4, 0]:  # the last step trades, then the episode ends
        _, _, _, trunc, _ = env.step(torch.tensor([a]))
    assert trunc.item()
    assert env.action_masks().all()  # fresh episode: no cool-down, no drawdown
    assert env.masker.state["peak"].item() == 1.0 and env.masker.state["since_trade"].item() > 5


def test_state_dict_resumes_masks_exactly():
    arrays = market(spike_at=200)
    cfg = MaskConfig(risk_budget=0.02, drawdown_threshold=0.03, cooldown=3, max_trades=2, period_bars=5)

    def make(seed):
        return TradingEnv(arrays, num_envs=4, window=2, episode_length=17, positions=FIVE, masks=cfg, seed=seed)

    actions = torch.randint(0, 5, (60, 4), generator=torch.Generator().manual_seed(1))
    env = make(0)
    env.reset()
    for a in actions[:25]:
        env.step(a)
    state = env.state_dict()
    tail = []
    for a in actions[25:]:
        tail.append((env.action_masks(), env.step(a)[1]))
    resumed = make(7)
    resumed.reset()
    resumed.load_state_dict(state)
    for a, (mask, reward) in zip(actions[25:], tail, strict=True):
        assert torch.equal(resumed.action_masks(), mask)
        assert torch.equal(resumed.step(a)[1], reward)
    assert resumed.mask_counts == env.mask_counts and resumed.mask_binding == env.mask_binding
    with pytest.raises(ValueError, match="mask state lacks"):
        make(0).load_state_dict({k: v for k, v in state.items() if not k.startswith("mask:")})


def test_all_rules_off_is_the_unmasked_env():
    arrays = market()
    actions = torch.randint(0, 5, (50, 3), generator=torch.Generator().manual_seed(2))
    out = []
    for masks in (None, MaskConfig()):
        env = TradingEnv(arrays, num_envs=3, window=2, episode_length=9, positions=FIVE, masks=masks, costs=COSTS)
        env.reset()
        out.append(torch.stack([env.step(a)[1] for a in actions]))
        assert env.action_masks().all()
    assert torch.equal(out[0], out[1])


def test_garch_is_fitted_on_the_training_range_and_required_explicitly():
    arrays = market(n=600, spike_at=400, clusters=True)
    cfg = MaskConfig(risk_budget=0.02, vol_model="garch")
    with pytest.raises(ValueError, match="fit_range"):
        TradingEnv(arrays, num_envs=1, window=2, episode_length=9, masks=cfg)
    inputs = MaskInputs.build(cfg, arrays.close, arrays.features, fit_range=(0, 300))
    assert inputs.vol[379] < 0.02 < inputs.vol[450]  # 379: after 20 calm bars
    env = TradingEnv(arrays, num_envs=1, window=2, episode_length=9, masks=cfg, mask_inputs=inputs)
    env.reset(starts=[450])
    assert env.action_masks()[0].tolist() == [False, True, False]
    assert garch_volatility(arrays.close, {"mu": 0.0, "omega": 1.0, "alpha": 0.0, "beta": 0.0})[5] == 0.01


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_abs_level": 0.0}, "max_abs_level must be > 0"),
        ({"drawdown_threshold": 0.1, "recover_threshold": 0.2}, "recover_threshold < drawdown_threshold"),
        ({"max_trades": 2}, "needs period_bars"),
        ({"ewma_lambda": 1.0}, "ewma_lambda"),
        ({"regime_threshold": 1.5}, "regime_threshold"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskConfig(**kwargs)


def test_regime_rule_needs_a_source_and_invalid_action_is_checked():
    arrays = market()
    with pytest.raises(ValueError, match="regime_column"):
        TradingEnv(arrays, num_envs=1, window=2, episode_length=9, masks=MaskConfig(regime_threshold=0.5))
    with pytest.raises(ValueError, match="invalid_action"):
        TradingEnv(arrays, num_envs=1, window=2, episode_length=9, masks=MaskConfig(), invalid_action="sample")


def test_market_mask_inputs_read_the_most_volatile_regime_and_fit_garch_on_training_bars():
    from sentio_lab.env.market import prepare_market
    from sentio_lab.env.mask_inputs import fit_garch, garch_volatility, market_mask_inputs
    from sentio_lab.env.masks import MaskConfig
    from sentio_lab.features import FeatureConfig

    market = prepare_market("nasdaq", FeatureConfig(regimes=2, regime_restarts=1), end="2004-12-31")
    regime = MaskConfig(regime_threshold=0.6)
    inputs = market_mask_inputs(regime, market)
    last = market.features.blocks["regime"].stop - 1
    np.testing.assert_array_equal(inputs.regime_prob, market.arrays.features[:, last].astype(np.float64))
    assert market.features.names[last] == "regime:p1"  # the most volatile of the 2 states
    assert market_mask_inputs(MaskConfig(cooldown=3), market) is None  # the env's defaults serve the rest
    garch = market_mask_inputs(MaskConfig(risk_budget=0.01, vol_model="garch"), market)
    start, stop = market.range("train")
    expected = garch_volatility(market.arrays.close, fit_garch(market.arrays.close, (start, stop)))
    np.testing.assert_array_equal(garch.vol, expected)  # fitted on the "train" range, nothing later
    plain = prepare_market("nasdaq", FeatureConfig(), end="2004-12-31")
    with pytest.raises(ValueError, match="needs regime features"):
        market_mask_inputs(regime, plain)


def test_masks_match_an_independent_reference():
    """Every rule recomputed from scratch (pandas EWMA, drawdown latch from the equity path, hold counter, trades
    per window, regime), against NumpyTradingEnv.action_masks() over random decisions with all rules on."""
    import pandas as pd

    from sentio_lab.env import NumpyTradingEnv
    from sentio_lab.env.masks import MaskConfig

    arr = market(n=900, spike_at=500, regime=True, clusters=True, seed=5)
    cfg = MaskConfig(max_abs_level=0.9, risk_budget=0.02, ewma_lambda=0.9, drawdown_threshold=0.03,
                     recover_threshold=0.01, regime_threshold=0.5, regime_column=-1, cooldown=3, max_trades=3,
                     period_bars=7)
    r = np.r_[0.0, np.diff(np.log(arr.close))]
    vol = np.r_[0.0, np.sqrt(pd.Series(r[1:] ** 2).ewm(alpha=1 - cfg.ewma_lambda, adjust=False).mean().to_numpy())]
    prob = arr.features[:, -1].astype(float)
    levels = np.array(FIVE)

    def no_increase(wa, w):
        return wa == 0 or (np.sign(wa) == np.sign(w) and abs(wa) <= abs(w) + 1e-12)

    rng = np.random.default_rng(1)
    decisions, mismatches, masked = 0, 0, 0
    for start in (20, 200, 430, 480, 600):
        env = NumpyTradingEnv(arr, window=2, episode_length=120, positions=FIVE, masks=cfg, costs=COSTS)
        env.reset(options={"start": start})
        equity, changes, guard, k = [1.0], [], False, 0
        while True:
            t, level = env.t, env.level
            drawdown = 1 - env.equity / max(equity)
            guard = drawdown >= cfg.drawdown_threshold or (guard and drawdown > cfg.recover_threshold)
            since = (k - changes[-1]) if changes else 10**9
            window = [c for c in changes if c // cfg.period_bars == k // cfg.period_bars]
            reference = []
            for a, wa in enumerate(levels):
                ok = abs(wa) <= cfg.max_abs_level and vol[t] * abs(wa) <= cfg.risk_budget + 1e-12
                ok &= (not guard) or no_increase(wa, levels[level])
                ok &= (not prob[t] > cfg.regime_threshold) or no_increase(wa, levels[level])
                ok &= wa == 0 or a == level or since >= cfg.cooldown
                ok &= wa == 0 or a == level or len(window) < cfg.max_trades
                reference.append(bool(ok))
            got = env.action_masks().tolist()
            decisions += 1
            mismatches += got != reference
            masked += not all(reference)
            _, _, terminated, truncated, info = env.step(int(rng.integers(0, len(FIVE))))
            if env.level != level:
                changes.append(k)
            equity.append(info["equity"])
            k += 1
            if terminated or truncated:
                break
    assert decisions == 600 and masked > 300  # the rules really bind
    assert mismatches == 0


def test_a_masked_state_does_not_load_into_an_unmasked_env():
    import torch

    from sentio_lab.env import TradingEnv
    from sentio_lab.env.masks import MaskConfig

    arr = market(n=300, seed=2)
    masked = TradingEnv(arr, num_envs=2, window=2, episode_length=20, positions=FIVE, costs=COSTS,
                        masks=MaskConfig(cooldown=3))
    masked.reset()
    masked.step(torch.tensor([4, 0]))
    plain = TradingEnv(arr, num_envs=2, window=2, episode_length=20, positions=FIVE, costs=COSTS)
    with pytest.raises(ValueError, match="mask-rule state, but this env has no masks"):
        plain.load_state_dict(masked.state_dict())


def test_a_failed_step_counts_nothing_and_an_edited_mask_is_not_reused():
    # issue 18 s3: the counters commit after the step's one sync, and the masks action_masks() handed out are reused
    # by step() only while nothing changed them (here the caller edits its copy in place)
    arrays = market()
    env = TradingEnv(arrays, num_envs=1, window=2, episode_length=40, positions=FIVE, stagger_starts=False,
                     masks=MaskConfig(long_only=True))
    env.reset(starts=[10])
    env.action_masks()
    with pytest.raises(ValueError, match="outside"):
        env.step(torch.tensor([7]))  # out of range: clamped to a valid level for the masks, then refused
    assert env.mask_counts == {"long_only": 0} and env.mask_binding == {"long_only": 0}
    mask = env.action_masks()
    mask[:] = True  # the caller's edit of its copy: -1 now looks valid to it, not to the env
    env.step(torch.tensor([0]))
    assert env.level.item() == FLAT  # mapped to the nearest valid level all the same
    assert env.mask_counts == {"long_only": 1} and env.mask_binding == {"long_only": 1}
