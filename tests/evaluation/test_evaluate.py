import dataclasses

import numpy as np
import pandas as pd
import pytest

from sentio_lab import ppo
from sentio_lab.agents.variants import load_trained, load_variant
from sentio_lab.evaluation.episodes import evaluate_checkpoint, evaluate_policy


def test_unknown_variant():
    with pytest.raises(KeyError, match="unknown variant"):
        load_variant("nope")


def test_checkpoint_evaluation_equals_live_agent(tiny_args, sp500_market):
    result = ppo.train(tiny_args, market=sp500_market)
    live = evaluate_policy(result.agent, sp500_market, window=tiny_args.features.window,
                           positions=tiny_args.env.positions,
                           costs=ppo.cost_model(tiny_args))
    restored = evaluate_checkpoint(result.checkpoint_path)
    pd.testing.assert_series_equal(live.weights, restored.weights)
    pd.testing.assert_series_equal(live.equity, restored.equity)
    test_start, test_stop = sp500_market.range("test")
    assert restored.start == test_start and restored.equity.index[-1] == sp500_market.data.frame.index[test_stop - 1]
    assert len(restored.equity) == len(restored.weights) + 1 and restored.equity.iloc[0] == 1.0
    assert set(np.unique(restored.weights)) <= set(tiny_args.env.positions)


def test_checkpoint_evaluation_carries_the_reports_summary_and_refuses_a_damaged_file(tiny_args, sp500_market):
    """evaluate_checkpoint returns the statistics the reports show (issue 17 §6), and a damaged checkpoint raises
    instead of giving a normal-looking flat result (§1); ``bars`` evaluates any span of bars."""
    from sentio_lab.agents.checkpoint import CheckpointError
    from sentio_lab.evaluation.metrics import STAT_NAMES, stats_table, summary_stats

    result = ppo.train(tiny_args, market=sp500_market)
    restored = evaluate_checkpoint(result.checkpoint_path, "validation")
    summary = restored.summary
    assert tuple(summary) == STAT_NAMES
    assert summary == summary_stats(restored.equity, restored.weights)
    table = stats_table({"ppo": restored.equity}, {"ppo": restored.weights})  # what a report tables
    assert summary["sharpe"] == table.loc["sharpe", "ppo"]
    assert summary["max_drawdown"] == table.loc["max_drawdown", "ppo"]
    assert summary["turnover_per_year"] == table.loc["turnover_per_year", "ppo"] and np.isfinite(summary["sharpe"])
    assert summary["bars"] == len(restored.weights)

    by_bars = evaluate_policy(result.agent, sp500_market, window=tiny_args.features.window,
                              positions=tiny_args.env.positions,
                              costs=ppo.cost_model(tiny_args), range_name="validation",
                              bars=sp500_market.range("validation"))
    pd.testing.assert_series_equal(by_bars.equity, restored.equity, check_exact=True)
    start, _ = sp500_market.range("train")
    _, stop = sp500_market.range("test")
    everything = evaluate_policy(result.agent, sp500_market, window=tiny_args.features.window,
                                 positions=tiny_args.env.positions,
                                 costs=ppo.cost_model(tiny_args), range_name="all", bars=(start, stop))
    assert everything.equity.index[-1] == sp500_market.data.frame.index[stop - 1]
    assert everything.start == max(start, sp500_market.arrays.first_valid + tiny_args.features.window - 1)

    path = result.checkpoint_path
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3 : len(raw) // 3 + 64] = bytes(64)  # zeros over weights or the pickle
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged checkpoint"):
        evaluate_checkpoint(path)


def test_checkpoint_on_changed_data_is_refused(tiny_args, sp500_market, tmp_path):
    frame = sp500_market.data.frame.copy()
    csv = tmp_path / "sp500.csv"
    frame.to_csv(csv)
    args = tiny_args.replace(dataset=str(csv))
    result = ppo.train(args)
    trained = load_trained(result.checkpoint_path)
    assert trained.market.data.fingerprint == sp500_market.data.fingerprint
    frame.iloc[-1, frame.columns.get_loc("close")] *= 1.001
    frame.iloc[-1, frame.columns.get_loc("high")] *= 1.002
    frame.to_csv(csv)
    with pytest.raises(ValueError, match="fingerprint"):
        load_trained(result.checkpoint_path)
    # evaluating on other data is possible when asked for explicitly
    other = evaluate_checkpoint(result.checkpoint_path, dataset=csv)
    assert other.equity.iloc[0] == 1.0


def test_ruin_ends_the_evaluation_early(sp500_market):
    class AlwaysLong:
        def parameters(self):
            import torch

            yield torch.zeros(1)

        def act_greedy(self, obs):
            import torch

            return torch.full((obs.shape[0],), 1, dtype=torch.long)

    # 50x leverage on a daily index goes bust on the first big down day of the range
    evaluation = evaluate_policy(AlwaysLong(), sp500_market, window=8, positions=(0.0, 50.0),
                                 costs=ppo.cost_model(ppo.Args.from_flat()), range_name="train")
    assert evaluation.ruined and evaluation.equity.iloc[-1] == 1e-12
    assert (evaluation.equity.iloc[:-1] > 1e-12).all()
    from sentio_lab.evaluation.metrics import summary_stats

    stats = summary_stats(evaluation.equity, evaluation.weights)  # a ruined curve still gets its statistics
    assert stats["total_return"] == pytest.approx(-1.0)
    assert len(evaluation.weights) < sp500_market.range("train")[1] - sp500_market.range("train")[0] - 8


def test_evaluation_charges_the_checkpoints_borrow_and_old_checkpoints_none(tiny_args, sp500_market, tmp_path):
    """The cost model of an evaluation comes from the checkpoint's args, short borrow included; a checkpoint
    saved before ``borrow_bps`` existed (no such key in its args) is evaluated with no borrow."""
    from sentio_lab.agents.checkpoint import load_checkpoint, save_checkpoint
    from sentio_lab.env.costs import CostModel

    if "borrow_bps" not in {f.name for f in dataclasses.fields(ppo.Args)}:
        pytest.skip("ppo.Args has no borrow_bps field yet")
    args = tiny_args.replace(borrow_bps=2_000.0, positions=(-1.0, 0.0, 1.0))
    result = ppo.train(args, market=sp500_market)
    restored = evaluate_checkpoint(result.checkpoint_path)
    assert restored.costs == CostModel(fee_bps=args.env.fee_bps, slippage_bps=args.env.slippage_bps, borrow_bps=2_000.0)
    live = evaluate_policy(result.agent, sp500_market, window=args.features.window, positions=args.env.positions,
                           costs=restored.costs)
    pd.testing.assert_series_equal(live.equity, restored.equity)
    free = evaluate_policy(result.agent, sp500_market, window=args.features.window, positions=args.env.positions,
                           costs=CostModel(fee_bps=args.env.fee_bps, slippage_bps=args.env.slippage_bps))
    pd.testing.assert_series_equal(free.weights, restored.weights)  # borrow is not in the observation
    if (restored.weights < 0).any():  # a short was held: it paid
        assert restored.equity.iloc[-1] < free.equity.iloc[-1]

    bundle = load_checkpoint(result.checkpoint_path)
    del bundle["args"]["env"]["borrow_bps"]
    bundle.pop("format_version", None)
    old_path = save_checkpoint(tmp_path / "old.pt", bundle)
    old = evaluate_checkpoint(old_path)
    assert old.costs.borrow_bps == 0.0
    pd.testing.assert_series_equal(old.equity, free.equity)


# ------------------------------------------------------------------------------------------ batched evaluation
def _with_ranges(market, **ranges):
    """``market`` with extra named ranges ``name=(start, stop)``."""
    from sentio_lab.data import Split

    index = market.data.frame.index
    splits = dict(market.splits)
    for name, (a, b) in ranges.items():
        splits[name] = Split(name, a, b, index[a], index[b - 1])
    return dataclasses.replace(market, splits=splits)


def _mlp_agents(market, window, positions, specs):
    """Small MLP agents, ``specs`` = [(seed, hidden, bias on the actor's last layer)], whose normalisers have seen
    real observations (each agent its own statistics)."""
    import torch

    from sentio_lab.agents.nets import MLPActorCritic
    from sentio_lab.env import TradingEnv

    obs_dim = market.arrays.features.shape[1] * window + 1
    agents = []
    for seed, hidden, bias in specs:
        torch.manual_seed(seed)
        agent = MLPActorCritic(obs_dim, len(positions), hidden=hidden)
        env = TradingEnv(market.arrays, num_envs=32, window=window, episode_length=8, positions=positions, seed=seed)
        agent.obs_norm.update(env.reset())
        with torch.no_grad():
            agent.actor[-1].weight.mul_(100.0)  # trained-like logit scale: actions change from bar to bar
            agent.actor[-1].bias.add_(torch.tensor(bias, dtype=torch.float32))
        agents.append(agent)
    return agents


def _assert_same(batched, single):
    assert (batched.range_name, batched.start, batched.ruined, batched.costs) == (
        single.range_name, single.start, single.ruined, single.costs)
    pd.testing.assert_series_equal(batched.weights, single.weights, check_exact=True)
    pd.testing.assert_series_equal(batched.equity, single.equity, check_exact=True)
    assert np.array_equal(batched.equity.to_numpy(), single.equity.to_numpy())  # bit for bit, not "close"


@pytest.fixture(scope="module")
def ranged_market(sp500_market):
    """sp500 with three extra ranges of different lengths: one starting inside the feature warm-up, one over the
    August 2015 sell-off (the longest) and a short one ending on the market's last bar."""
    n = len(sp500_market.data.frame)
    crash = sp500_market.data.frame.index.get_loc(pd.Timestamp("2015-08-24"))
    return _with_ranges(sp500_market, early=(0, 140), crash=(crash - 120, crash + 80), end=(n - 60, n))


def test_batched_evaluation_equals_one_at_a_time(ranged_market):
    from sentio_lab.env.costs import CostModel
    from sentio_lab.evaluation.episodes import evaluate_policies

    window, positions = 8, (0.0, 1.0, 40.0)  # 40x long is ruined by a 2.5% down bar
    costs = CostModel(fee_bps=1.0, slippage_bps=2.0)
    # two architectures (hidden 16 and 24): two vmapped groups; agent 1 leans to 40x, agent 0 away from it
    agents = _mlp_agents(ranged_market, window, positions, [(0, 16, [0.0, 0.0, -3.0]), (1, 16, [0.0, 0.0, 1.0]),
                                                            (2, 24, [0.0, 0.0, 0.0])])
    names = ["early", "crash", "end"]
    batched = evaluate_policies(agents, ranged_market, names, window=window, positions=positions, costs=costs)
    assert len(batched) == 3 and all(len(row) == 3 for row in batched)
    lengths = set()
    for i, agent in enumerate(agents):
        for j, name in enumerate(names):
            single = evaluate_policy(agent, ranged_market, window=window, positions=positions, costs=costs,
                                     range_name=name)
            _assert_same(batched[i][j], single)
            if not single.ruined:
                lengths.add(len(single.weights))
    # the cases the test is about actually happened: ranges of different lengths, ruin and no ruin, changing actions
    assert len(lengths) >= 2
    ruined = [[e.ruined for e in row] for row in batched]
    assert any(map(any, ruined)) and not all(map(all, ruined))
    assert batched[1][1].ruined  # the 40x-leaning agent over the sell-off
    assert all(batched[0][j].weights.nunique() >= 2 for j in range(3))
    assert batched[0][0].start == ranged_market.arrays.first_valid + window - 1  # the warm-up clamp
    assert not batched[0][2].ruined  # ran to the market's last bar, and no further
    assert batched[0][2].equity.index[-1] == ranged_market.data.frame.index[-1]


def test_batched_evaluation_mixes_other_policies_and_duplicate_ranges(ranged_market):
    """A policy that is no MLPActorCritic (here: always 50x long, ruined) goes through its own act_greedy, beside
    a stacked MLP agent; a range named twice is evaluated twice."""
    import torch

    from sentio_lab.evaluation.episodes import evaluate_policies

    class AlwaysLong(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def act_greedy(self, obs):
            return torch.full((obs.shape[0],), 1, dtype=torch.long)

    window, positions, costs = 8, (0.0, 50.0), ppo.cost_model(ppo.Args.from_flat())
    (mlp,) = _mlp_agents(ranged_market, window, positions, [(3, 16, [0.0, -2.0])])
    agents = [AlwaysLong(), mlp]
    names = ["crash", "test", "crash"]
    batched = evaluate_policies(agents, ranged_market, names, window=window, positions=positions, costs=costs)
    for i, agent in enumerate(agents):
        for j, name in enumerate(names):
            single = evaluate_policy(agent, ranged_market, window=window, positions=positions, costs=costs,
                                     range_name=name)
            _assert_same(batched[i][j], single)
    assert batched[0][0].ruined and batched[0][0].equity.iloc[-1] == 1e-12


@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
def test_stacked_logits_agree_with_unbatched_far_inside_the_tie_guard(ranged_market, logit_scale):
    """The guard's margin: batched (vmapped) logits differ from one-row logits by far less than the tolerance,
    for an untrained policy head (gain 0.01) and one with trained-like logits (100x its weights)."""
    import torch

    from sentio_lab.env import TradingEnv
    from sentio_lab.evaluation.episodes import TIE_ATOL, TIE_RTOL, _StackedGreedy

    window, positions = 8, (-1.0, 0.0, 1.0)
    agents = _mlp_agents(ranged_market, window, positions, [(s, 16, [0.0, 0.0, 0.0]) for s in range(4)])
    for agent in agents:
        with torch.no_grad():
            agent.actor[-1].weight.mul_(logit_scale / 100.0)
    env = TradingEnv(ranged_market.arrays, num_envs=4 * 256, window=window, episode_length=8, seed=7)
    obs = env.reset().view(4, 256, -1)
    stacked = _StackedGreedy(agents, "cpu")
    with torch.no_grad():
        logits = stacked.logits(obs)
        single = torch.stack([torch.cat([a.actor(a.normalise(obs[g, b : b + 1])) for b in range(256)])
                              for g, a in enumerate(agents)])
    tolerance = (TIE_ATOL + TIE_RTOL * stacked.scale)[:, None]
    error = (logits - single).abs().amax(-1)
    assert (error <= tolerance / 20).all(), float((error / tolerance).max())
    assert (error > 0).any()  # batched and one-row logits do differ in the last bits: the guard is needed
    assert single.abs().max() > 0.01 * logit_scale  # logits of the intended size
    actions = stacked(obs)
    assert torch.equal(actions, torch.stack([a.act_greedy(obs[g]) for g, a in enumerate(agents)]))


def test_exact_ties_are_decided_by_the_unbatched_argmax(ranged_market):
    """Two identical logit rows tie exactly: every tied row is re-run unbatched and takes the first index."""
    import torch

    from sentio_lab.evaluation.episodes import _StackedGreedy, evaluate_policies

    window, positions = 8, (0.0, 1.0, -1.0)
    agents = _mlp_agents(ranged_market, window, positions, [(4, 16, [0.0, 0.0, 0.0]), (5, 16, [0.0, 0.0, 0.0])])
    for agent in agents:
        with torch.no_grad():
            agent.actor[-1].weight[2] = agent.actor[-1].weight[1]
            agent.actor[-1].bias[2] = agent.actor[-1].bias[1]
    costs = ppo.cost_model(ppo.Args.from_flat())
    batched = evaluate_policies(agents, ranged_market, ["early", "end"], window=window, positions=positions,
                                costs=costs)
    for i, agent in enumerate(agents):
        for j, name in enumerate(["early", "end"]):
            single = evaluate_policy(agent, ranged_market, window=window, positions=positions, costs=costs,
                                     range_name=name)
            _assert_same(batched[i][j], single)
            assert -1.0 not in set(single.weights) and 1.0 in set(single.weights)  # ties went to index 1
    from sentio_lab.env import TradingEnv

    env = TradingEnv(ranged_market.arrays, num_envs=2 * 16, window=window, episode_length=8, seed=3,
                     positions=positions)
    obs = env.reset().view(2, 16, -1)
    stacked = _StackedGreedy(agents, "cpu")
    with torch.no_grad():
        logits = stacked.logits(obs)
        actions = stacked(obs)
    tied = logits[..., 1] >= logits[..., 0]
    assert tied.any() and stacked.rechecked >= int(tied.sum())
    assert torch.equal(actions, torch.stack([a.act_greedy(obs[g]) for g, a in enumerate(agents)]))


def test_length_buckets_keep_every_env_inside_the_data():
    from sentio_lab.evaluation.episodes import _length_buckets

    # the short range ending on the last bar (index 2) cannot run the longest range's 199 steps
    assert _length_buckets([27, 500, 1361], [112, 199, 59], 1421) == [[1, 0], [2]]
    assert _length_buckets([10, 20, 30], [5, 5, 5], 100) == [[0, 1, 2]]
    for firsts, lengths, n in [([0, 900, 40], [100, 99, 800], 1000), ([5, 6, 7, 8], [10, 9, 8, 7], 18)]:
        buckets = _length_buckets(firsts, lengths, n)
        assert sorted(j for b in buckets for j in b) == list(range(len(firsts)))
        for bucket in buckets:
            longest = max(lengths[j] for j in bucket)
            assert lengths[bucket[0]] == longest and all(firsts[j] + longest <= n - 1 for j in bucket)


def test_batched_evaluation_edge_cases(ranged_market):
    from sentio_lab.evaluation.episodes import evaluate_policies

    window, positions, costs = 8, (-1.0, 0.0, 1.0), ppo.cost_model(ppo.Args.from_flat())
    agents = _mlp_agents(ranged_market, window, positions, [(0, 16, [0.0, 0.0, 0.0])])
    kw = dict(window=window, positions=positions, costs=costs)
    assert evaluate_policies([], ranged_market, ["test"], **kw) == []
    assert evaluate_policies(agents, ranged_market, [], **kw) == [[]]
    with pytest.raises(KeyError, match="unknown range"):
        evaluate_policies(agents, ranged_market, ["test", "nope"], **kw)
    short = _with_ranges(ranged_market, tiny=(0, 5))  # ends inside the feature warm-up
    with pytest.raises(ValueError, match="too short"):
        evaluate_policies(agents, short, ["tiny"], **kw)
    # one decision bar exactly: first observable bar 27, stop 29; and no decision at all: stop 28
    edge = _with_ranges(ranged_market, one=(20, 29), none=(27, 28))
    (one, none), = evaluate_policies(agents, edge, ["one", "none"], **kw)
    for batched, name in [(one, "one"), (none, "none")]:
        _assert_same(batched, evaluate_policy(agents[0], edge, range_name=name, **kw))
    assert len(one.weights) == 1 and len(none.weights) == 0 and list(none.equity) == [1.0]


def test_batched_evaluation_of_cpcv_test_groups(sp500_market):
    """A CPCV fold's test groups (the last one runs to the market's end and is longer): every agent over every
    group in one call, equal to one evaluation at a time on the fold's own market."""
    from sentio_lab.env.market import prepare_fold_market
    from sentio_lab.env.splits import PurgeEmbargo, combinatorial_purged
    from sentio_lab.evaluation.episodes import evaluate_policies

    window, positions, costs = 8, (-1.0, 0.0, 1.0), ppo.cost_model(ppo.Args.from_flat())
    gaps = PurgeEmbargo.for_features(window, sp500_market.feature_config, sp500_market.data.frame)
    folds = combinatorial_purged(len(sp500_market.data), gaps, n_groups=6, n_test_groups=2,
                                 first_valid=sp500_market.arrays.first_valid)
    fold = next(f for f in folds if f.groups == (0, 5))
    market = prepare_fold_market(sp500_market, fold)
    names = [f"test:{g}" for g in fold.groups]
    agents = _mlp_agents(market, window, positions, [(s, 16, [0.0, 0.0, 0.0]) for s in range(3)])
    batched = evaluate_policies(agents, market, names, window=window, positions=positions, costs=costs)
    for i, agent in enumerate(agents):
        for j, name in enumerate(names):
            _assert_same(batched[i][j], evaluate_policy(agent, market, window=window, positions=positions,
                                                        costs=costs, range_name=name))
    first, last = (len(e.weights) for e in batched[0])
    assert last > first  # skfolio's last group takes the remainder
    assert batched[0][1].equity.index[-1] == market.data.frame.index[-1]


# ------------------------------------------------------------------------------------------ masked evaluation
def _masked_reference(agent, market, range_name, window, positions, costs, masks):
    """A hand-written greedy episode under ``masks``: invalid logits to -inf, argmax; and the env's rule counters."""
    import torch

    from sentio_lab.env import TradingEnv

    start, stop = market.range(range_name)
    first = max(start, market.arrays.first_valid + window - 1)
    env = TradingEnv(market.arrays, num_envs=1, window=window, episode_length=stop - 1 - first, start=start,
                     stop=stop, positions=positions, costs=costs, ruin_fraction=0.0, masks=masks)
    obs, chosen = env.reset(starts=[first]), []
    with torch.no_grad():
        for _ in range(stop - 1 - first):
            valid = env.action_masks()
            logits = agent.actor(agent.normalise(obs))
            action = torch.where(valid, logits, -torch.inf).argmax(-1)
            assert bool(valid[0, action[0]])
            chosen.append(int(action[0]))
            obs, _, terminated, _, _ = env.step(action)
            if bool(terminated[0]):
                break
    return np.asarray(positions)[chosen], env.mask_counts


def test_masked_evaluation_takes_the_best_valid_action_batched_and_single_alike(ranged_market):
    from sentio_lab.agents.variants import action_masking
    from sentio_lab.env.costs import CostModel
    from sentio_lab.env.masks import MaskConfig
    from sentio_lab.evaluation.episodes import evaluate_policies

    window, positions = 8, (-1.0, 0.0, 1.0)
    costs = CostModel(fee_bps=1.0, slippage_bps=1.0)
    masks = MaskConfig(long_only=True, cooldown=3)
    # agent 0 leans hard to the short level the masks forbid; the others are mixed
    agents = _mlp_agents(ranged_market, window, positions, [(0, 16, [5.0, 0.0, 0.0]), (1, 16, [0.0, 0.0, 0.0]),
                                                            (2, 24, [0.0, 0.5, 0.0])])
    names = ["early", "crash", "validation"]
    batched = evaluate_policies(agents, ranged_market, names, window=window, positions=positions, costs=costs,
                                masks=masks)
    for i, agent in enumerate(agents):
        for j, name in enumerate(names):
            single = evaluate_policy(agent, ranged_market, window=window, positions=positions, costs=costs,
                                     range_name=name, masks=masks)
            _assert_same(batched[i][j], single)
            weights, counts = _masked_reference(agent, ranged_market, name, window, positions, costs, masks)
            np.testing.assert_array_equal(single.weights.to_numpy(), weights)
            assert counts == {"long_only": 0, "cooldown": 0}  # the greedy agent never chose a masked action
            assert (single.weights >= 0).all()
            # cool-down 3: a new non-flat level is held for at least 3 decisions (flat may always be taken)
            w = single.weights.to_numpy()
            changes = np.flatnonzero(w[1:] != w[:-1]) + 1
            for a, b in zip(changes[:-1], changes[1:], strict=True):
                assert b - a >= 3 or w[b] == 0.0
    unmasked = evaluate_policy(agents[0], ranged_market, window=window, positions=positions, costs=costs,
                               range_name="crash")
    assert (unmasked.weights < 0).any()  # without masks agent 0 does go short: the masks made the difference
    # no masks: the keywords are empty and nothing changes
    assert action_masking(ppo.Args.from_flat()) == {}
    plain = evaluate_policy(agents[1], ranged_market, window=window, positions=positions, costs=costs,
                            range_name="crash", **action_masking(ppo.Args.from_flat()))
    _assert_same(evaluate_policies([agents[1]], ranged_market, ["crash"], window=window, positions=positions,
                                   costs=costs)[0][0], plain)


def test_tie_guard_with_masks_ranks_valid_logits_only(ranged_market):
    """The largest logit is masked and the two valid ones tie exactly: every row is a near-tie of the *valid*
    logits, re-run unbatched with its mask; a row with one valid action is never a near-tie."""
    import torch

    from sentio_lab.env import TradingEnv
    from sentio_lab.evaluation.episodes import _StackedGreedy

    window, positions = 8, (-1.0, 0.0, 1.0)
    agents = _mlp_agents(ranged_market, window, positions, [(4, 16, [50.0, 0.0, 0.0]), (5, 16, [50.0, 0.0, 0.0])])
    for agent in agents:
        with torch.no_grad():
            agent.actor[-1].weight[2] = agent.actor[-1].weight[1]
            agent.actor[-1].bias[2] = agent.actor[-1].bias[1]
    env = TradingEnv(ranged_market.arrays, num_envs=2 * 16, window=window, episode_length=8, seed=3,
                     positions=positions)
    obs = env.reset().view(2, 16, -1)
    mask = torch.ones(2, 16, 3, dtype=torch.bool)
    mask[..., 0] = False  # long only
    stacked = _StackedGreedy(agents, "cpu")
    with torch.no_grad():
        assert (stacked.logits(obs).argmax(-1) == 0).all()  # unmasked, the short level wins everywhere
        actions = stacked(obs, mask)
    assert (actions == 1).all() and stacked.rechecked == 2 * 16  # exact ties of the valid pair: first index
    assert torch.equal(actions, torch.stack([a.act_greedy(obs[g], mask[g]) for g, a in enumerate(agents)]))
    only = torch.zeros_like(mask)
    only[..., 2] = True
    with torch.no_grad():
        assert (stacked(obs, only) == 2).all() and stacked.rechecked == 2 * 16  # one valid action: no recheck
    empty = mask.clone()
    empty[1, 3] = False
    with pytest.raises(ValueError, match="no valid action"):
        stacked(obs, empty)
