"""Policy (sentio_lab.deploy.policy): decisions from bar histories equal the backtest's, bar by bar, bit for bit.

The replay steps the backtest's own env (built as ``evaluate_policy`` builds it) over a real file's test range and,
at every bar, asks the policy for the decision from the bars up to that bar and the account the env holds; the
observation, the mask and the action must equal the env's and the agent's, and the weights of the whole replay
must equal ``evaluate_policy``'s.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab import ppo, ppo_masked, ppo_risk
from sentio_lab import ppo_transformer as pt
from sentio_lab.agents.variants import action_masking, env_options, load_variant
from sentio_lab.deploy.policy import NEVER_TRADED, Account, BarsError, Decision, Policy
from sentio_lab.env import TradingEnv
from sentio_lab.env.mask_inputs import market_mask_inputs
from sentio_lab.env.masks import MaskConfig
from sentio_lab.evaluation.episodes import evaluate_policy

#: sp500 from its default start to mid-2015: about 540 daily bars, a test range of about 108.
SP500_END = "2015-06-30"
TINY = dict(total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2, window=8,
            episode_length=24, track=False, progress=False, run_name="tiny", checkpoint_every=0,
            feature_cache_dir=None, data_end=SP500_END)
#: Stateless rules (long-only, EWMA risk budget) and a stateful one (cool-down: the account's since_trade).
RULES = MaskConfig(long_only=True, risk_budget=0.012, cooldown=3)


def _train(variant, tmp_path_factory, **extra):
    """A tiny trained checkpoint of ``variant`` (3 iterations of 8 x 16 steps)."""
    run_dir = tmp_path_factory.mktemp(variant.__name__.rsplit(".", 1)[-1])
    args = variant.Args.from_flat(**TINY, run_dir=str(run_dir), **extra)
    return variant.train(args).checkpoint_path


@pytest.fixture(scope="module")
def ppo_checkpoint(tmp_path_factory):
    """A tiny ``ppo`` checkpoint on sp500 (2013-05-10 .. 2015-06-30)."""
    return _train(ppo, tmp_path_factory)


@pytest.fixture(scope="module")
def ppo_policy(ppo_checkpoint):
    """Its policy."""
    return Policy.from_checkpoint(ppo_checkpoint)


def _account(env: TradingEnv) -> Account:
    """The account of env 0 as the policy takes it: the level, equity, peak, drawdown and mask state."""
    masker = env.masker
    peak = masker.state["peak"] if masker is not None else env.peak
    return Account(
        position=int(env.level[0]), equity=float(env.equity[0]), peak=float(peak[0]),
        max_drawdown=float(env.max_drawdown[0]),
        guard=bool(masker.state["guard"][0]) if masker is not None else False,
        since_trade=int(masker.state["since_trade"][0]) if masker is not None else NEVER_TRADED,
        period_trades=int(masker.state["period_trades"][0]) if masker is not None else 0,
    )


def replay(policy: Policy, range_name: str = "test") -> dict:
    """Step the backtest's env over ``range_name`` and compare the policy's decision at every bar (module doc)."""
    args, market, agent = policy.args, policy.market, policy.agent
    variant = load_variant(policy.variant)
    masking, options = action_masking(args), env_options(args, market)
    start, stop = market.range(range_name)
    window = args.features.window
    first = max(start, market.arrays.first_valid + window - 1)
    length = stop - 1 - first
    extra = {}
    if masking:
        extra = {"masks": masking["masks"], "invalid_action": masking["invalid_action"],
                 "mask_inputs": market_mask_inputs(masking["masks"], market)}
    env = TradingEnv(market.arrays, num_envs=1, window=window, episode_length=length, start=start, stop=stop,
                     positions=tuple(args.env.positions), costs=variant.cost_model(args), ruin_fraction=0.0,
                     **extra, **options)
    obs = env.reset(starts=[first])
    frame = market.data.frame
    actions, accounts, seen = [], [], []
    greedy = agent.act_greedy

    def spy(observation, mask=None):  # what the policy hands its agent: compared with the env's below
        seen.append((observation.clone(), None if mask is None else mask.clone()))
        return greedy(observation, mask)

    agent.act_greedy = spy
    try:
        with torch.no_grad():
            for k in range(length):
                t = first + k
                account = _account(env)
                decision = policy.decide(frame.iloc[: t + 1], account)
                mine, my_mask = seen.pop()
                assert torch.equal(mine, obs), f"observation differs at bar {t}"
                mask = env.action_masks() if masking else None
                assert (my_mask is None) == (mask is None) and (mask is None or torch.equal(my_mask, mask)), t
                expected = int(greedy(obs) if mask is None else greedy(obs, mask)[0])
                assert decision == Decision(expected, float(policy.levels[expected]), frame.index[t]), f"bar {t}"
                actions.append(decision.action)
                accounts.append(account)
                obs, *_ = env.step(torch.tensor([decision.action]))
    finally:
        del agent.act_greedy
    backtest = evaluate_policy(agent, market, window=window, positions=tuple(args.env.positions),
                               costs=variant.cost_model(args), range_name=range_name, env_options=options,
                               **masking)
    weights = policy.levels[np.asarray(actions)]
    assert np.array_equal(weights, backtest.weights.to_numpy()), "the replay's weights are not the backtest's"
    return {"actions": np.asarray(actions), "accounts": accounts, "first": first, "length": length}


def test_ppo_decisions_equal_the_backtest_at_every_bar_of_the_test_range(ppo_policy):
    result = replay(ppo_policy)
    assert result["length"] > 80  # the whole test range of the file, bar by bar
    assert len(set(result["actions"].tolist())) >= 2  # the decisions change, so positions feed back too


@pytest.mark.slow
def test_masked_decisions_follow_the_rules_and_the_accounts_mask_state(tmp_path_factory):
    policy = Policy.from_checkpoint(_train(ppo_masked, tmp_path_factory, masks=RULES))
    assert policy.describe()["masks"] == ["cooldown", "long_only", "risk_budget"]
    result = replay(policy)
    levels = policy.levels[result["actions"]]
    assert (levels >= 0).all()  # long-only held
    # the cool-down bound: some account had traded within 3 bars (its state reached the policy)
    assert any(a.since_trade < 3 for a in result["accounts"])
    # the same bar with a fresh account may decide otherwise: the account state is read, not assumed
    history = policy.market.data.frame.iloc[: result["first"] + 1]
    held = policy.decide(history, Account(position=2, since_trade=1))
    assert held.action == 2  # inside the cool-down only the held level is valid


@pytest.mark.slow
def test_risk_decisions_read_the_accounts_drawdown(tmp_path_factory):
    policy = Policy.from_checkpoint(_train(ppo_risk, tmp_path_factory, num_quantiles=4))
    result = replay(policy)
    assert any(a.max_drawdown > 0 for a in result["accounts"])  # the drawdown inputs were not all zero
    history = policy.market.data.frame.iloc[: result["first"] + 10]
    layout_end = policy.obs_dim
    obs = policy.observation(history, Account(equity=0.8, peak=1.0, max_drawdown=0.3))
    assert obs[layout_end - 2] == np.float32(1.0 - 0.8 / 1.0) and obs[layout_end - 1] == np.float32(0.3)


@pytest.mark.slow
def test_transformer_decisions_equal_the_backtest_with_token_blocks(tmp_path_factory):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        policy = Policy.from_checkpoint(_train(pt, tmp_path_factory, dataset="sp500", token_timeframes=("W-FRI",),
                                               token_counts=(3,),
                                               d_model=16, n_heads=2, ff_size=32, hidden_size=16))
        assert policy.token_timeframes and policy.fitted_on_history == "token standardisation"
        head = [m for m in policy.agent.actor.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.manual_seed(1)
        with torch.no_grad():  # the tiny run always goes long: a random (seeded) head makes the actions change
            torch.nn.init.normal_(head.weight, std=1.0)
            head.bias.zero_()
        result = replay(policy)
        frame = policy.market.data.frame
        train_stop = policy.market.range("train")[1]
        assert policy.min_bars == train_stop  # the token standardisation is fitted on the history's training bars
        with pytest.raises(BarsError, match=f"too few bars .* {train_stop - 1} given, at least {train_stop} needed "
                                            r"\(the training range, on which its token standardisation is fitted\)"):
            policy.decide(frame.iloc[: train_stop - 1])
        with pytest.raises(BarsError, match="fits its token standardisation on its training bars.*history from"):
            policy.decide(frame.iloc[1:])
    finally:
        torch.set_num_threads(torch_threads)
    assert result["length"] > 80 and len(set(result["actions"].tolist())) >= 2


def test_many_instruments_at_once_equal_each_alone(ppo_policy):
    frame = ppo_policy.market.data.frame
    bars = {"a": frame.iloc[:300], "b": frame.iloc[:420], "c": frame.iloc[:301]}
    accounts = {"a": Account(position=0), "c": Account(position=2)}
    together = ppo_policy.decide(bars, accounts)
    assert list(together) == ["a", "b", "c"]
    for name in bars:
        assert together[name] == ppo_policy.decide(bars[name], accounts.get(name))
    shared = ppo_policy.decide(bars, Account(position=1))
    assert all(shared[n] == ppo_policy.decide(bars[n], Account(position=1)) for n in bars)
    assert together["b"].time == frame.index[419]
    with pytest.raises(ValueError, match=r"without bars: \['z'\]"):
        ppo_policy.decide(bars, {"z": Account()})
    with pytest.raises(ValueError, match="one Account"):
        ppo_policy.decide(bars["a"], accounts)


def test_the_position_is_read(ppo_policy):
    history = ppo_policy.market.data.frame.iloc[:400]
    obs = [ppo_policy.observation(history, Account(position=p)) for p in range(3)]
    assert [o[-1] for o in obs] == [-1.0, 0.0, 1.0]
    assert np.array_equal(obs[1], ppo_policy.observation(history))  # no account: flat
    assert np.array_equal(obs[0][:-1], obs[2][:-1])
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match="account.position must be a level index"):
            ppo_policy.decide(history, Account(position=bad))
    with pytest.raises(ValueError, match="account.weight is read by anchored models only"):
        ppo_policy.decide(history, Account(weight=0.5))
    for fields, field in (({"equity": float("nan")}, "equity"), ({"peak": 0.0}, "peak"),
                          ({"max_drawdown": 1.5}, "max_drawdown"), ({"since_trade": -1}, "since_trade"),
                          ({"equity": "1"}, "equity")):
        with pytest.raises(ValueError, match=f"account.{field}"):
            Account(**fields)


def test_bad_histories_are_refused_saying_why(ppo_policy):
    frame = ppo_policy.market.data.frame.iloc[:200]
    need = ppo_policy.min_bars
    assert need == ppo_policy.market.arrays.first_valid + ppo_policy.window
    ppo_policy.decide(frame.iloc[:need])  # the fewest bars it takes
    with pytest.raises(BarsError, match=rf"too few bars for the feature lookback: {need - 1} given, at least {need}"):
        ppo_policy.decide(frame.iloc[: need - 1])
    with pytest.raises(BarsError, match="not in increasing order"):
        ppo_policy.decide(frame.iloc[::-1])
    with pytest.raises(BarsError, match="duplicate timestamp"):
        ppo_policy.decide(pd.concat([frame.iloc[:100], frame.iloc[99:]]))
    broken = frame.copy()
    broken.iloc[150, broken.columns.get_loc("close")] = np.nan
    with pytest.raises(BarsError, match="NaN or inf in 'close'"):
        ppo_policy.decide(broken, name="spx")
    with pytest.raises(BarsError, match="missing column"):
        ppo_policy.decide(frame.drop(columns="volume"))
    with pytest.raises(BarsError, match="must be a pandas DataFrame"):
        ppo_policy.decide(frame.to_numpy())


def test_a_history_starting_later_is_accepted_and_causal(ppo_policy):
    """History rules (module doc): a later start with enough bars decides; the newest bar's observation never
    reads a bar after it (appending bars leaves earlier decisions' inputs alone)."""
    frame = ppo_policy.market.data.frame
    later = frame.iloc[100:300]
    assert isinstance(ppo_policy.decide(later), Decision)
    full = ppo_policy.observation(frame.iloc[:300])
    changed = frame.iloc[:301].copy()
    changed.iloc[300, :4] *= 1.5  # a wild bar after the decision bar
    assert np.array_equal(ppo_policy.observation(changed.iloc[:300]), full)


def test_act_batches_equal_one_row_decisions(ppo_policy):
    frame = ppo_policy.market.data.frame
    obs = np.stack([ppo_policy.observation(frame.iloc[: t + 1], Account(position=t % 3)) for t in range(60, 400, 7)])
    batched = ppo_policy.act(obs)
    single = [int(ppo_policy.act(row[None])[0]) for row in obs]
    assert batched.tolist() == single and len(set(single)) >= 2
    assert batched.tolist() == [int(ppo_policy.agent.act_greedy(torch.from_numpy(r)[None])[0]) for r in obs]
    masks = np.ones((len(obs), 3), dtype=bool)
    masks[:, 2] = False
    masked = ppo_policy.act(obs, masks)
    assert (masked != 2).all() and (masked[batched != 2] == batched[batched != 2]).all()
    with pytest.raises(ValueError, match=r"observations must be \(B, 81\)"):
        ppo_policy.act(obs[:, :-1])


def test_act_breaks_exact_ties_as_the_one_row_decision(ppo_policy, monkeypatch):
    """Rows whose two best logits tie are recomputed one at a time by the agent's own act_greedy."""
    calls = []
    original = ppo_policy.agent.act_greedy

    def spy(obs, mask=None):
        calls.append(len(obs))
        return original(obs, mask)

    monkeypatch.setattr(ppo_policy.agent, "act_greedy", spy)
    last = ppo_policy.agent.actor[-1]
    saved = last.weight.detach().clone(), last.bias.detach().clone()
    try:
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([0.5, 0.5, 0.0]))  # levels 0 and 1 tie exactly everywhere
        obs = np.zeros((5, ppo_policy.obs_dim), dtype=np.float32)
        assert ppo_policy.act(obs).tolist() == [0] * 5
        assert calls == [1] * 5
    finally:
        with torch.no_grad():
            last.weight.copy_(saved[0])
            last.bias.copy_(saved[1])


def test_load_takes_paths_folders_and_registry_uris(ppo_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(ppo_checkpoint.read_bytes())
    asked = []
    fake = types.ModuleType("sentio_lab.deploy.registry")
    fake.resolve = lambda uri, registry_uri=None: asked.append((uri, registry_uri)) or folder
    monkeypatch.setitem(sys.modules, "sentio_lab.deploy.registry", fake)
    monkeypatch.setattr("sentio_lab.deploy.registry", fake, raising=False)
    policy = Policy.load("models:/spx@champion")
    assert asked == [("models:/spx@champion", None)] and policy.source == "models:/spx@champion"
    assert Policy.load("models:/spx/3", registry_uri="sqlite:///team.db").registry_uri == "sqlite:///team.db"
    assert asked[-1] == ("models:/spx/3", "sqlite:///team.db")
    assert policy.describe()["data_fingerprint"] == Policy.load(ppo_checkpoint).describe()["data_fingerprint"]
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        Policy.load(tmp_path / "nothing.pt")
    (folder / "other.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"expected one checkpoint \(\*.pt\) in the folder, found 2"):
        Policy.from_checkpoint(folder)

