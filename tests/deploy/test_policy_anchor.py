"""Policy of a benchmark-anchored model (``--anchor``): decisions from bar histories equal the backtest's, bit for bit.

The replay steps the backtest's own env (built as ``evaluate_policy`` builds it, with the anchor on the model's
market) over a real file's test range and, at every bar, asks the policy for the decision from the bars up to that
bar and the weight the env holds: the observation (window, weight held, benchmark weight ``b_t``), the tilt and the
target weight (``clip(b_t + tilt)``, or the weight held inside the no-trade band) must equal the env's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentio_lab import ppo
from sentio_lab.agents.variants import env_options, load_variant
from sentio_lab.deploy.policy import Account, Policy
from sentio_lab.env import TradingEnv
from sentio_lab.evaluation.episodes import evaluate_policy

#: sp500 to mid-2016: the test range (about Nov 2015 .. Jun 2016) holds 12-1 momentum turning negative and back.
TINY = dict(total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2, window=8,
            episode_length=24, track=False, progress=False, run_name="tiny", checkpoint_every=0,
            feature_cache_dir=None, data_end="2016-06-30")


@pytest.fixture(scope="module")
def anchored_policy(tmp_path_factory):
    """A tiny ppo model anchored on 12-1 momentum with a no-trade band; its actor head redrawn (seed 5) so the
    greedy tilt varies (an anchored agent starts as its benchmark: always the zero tilt)."""
    args = ppo.Args.from_flat(**TINY, run_dir=str(tmp_path_factory.mktemp("anchored")), anchor="momentum",
                              no_trade_band=0.3)
    policy = Policy.from_checkpoint(ppo.train(args).checkpoint_path)
    head = [m for m in policy.agent.actor.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.manual_seed(5)
    with torch.no_grad():
        torch.nn.init.normal_(head.weight, std=2.0)
        head.bias.zero_()
    return policy


@pytest.mark.slow
def test_anchored_decisions_equal_the_backtest_at_every_bar_of_the_test_range(anchored_policy):
    policy = anchored_policy
    args, market, agent = policy.args, policy.market, policy.agent
    options = env_options(args, market)
    costs = load_variant(policy.variant).cost_model(args)
    start, stop = market.range("test")
    window = args.features.window
    first = max(start, market.arrays.first_valid + window - 1)
    length = stop - 1 - first
    env = TradingEnv(market.arrays, num_envs=1, window=window, episode_length=length, start=start, stop=stop,
                     positions=tuple(args.env.positions), costs=costs, ruin_fraction=0.0, **options)
    obs = env.reset(starts=[first])
    frame = market.data.frame
    greedy, seen = agent.act_greedy, []

    def spy(observation, mask=None):  # what the policy hands its agent
        seen.append(observation.clone())
        return greedy(observation, mask)

    decisions = []
    agent.act_greedy = spy
    try:
        with torch.no_grad():
            for k in range(length):
                t = first + k
                held = float(env.held[0])
                decision = policy.decide(frame.iloc[: t + 1], Account(weight=held))
                assert torch.equal(seen.pop(), obs), f"observation differs at bar {t}"
                assert decision.action == int(greedy(obs)[0]) and decision.time == frame.index[t], t
                obs, _, _, _, info = env.step(torch.tensor([decision.action]))
                assert decision.weight == float(info["weight"][0]), f"target differs at bar {t}"
                decisions.append((decision, held))
    finally:
        del agent.act_greedy
    backtest = evaluate_policy(agent, market, window=window, positions=tuple(args.env.positions), costs=costs,
                               env_options=options)
    weights = np.array([d.weight for d, _ in decisions])
    assert np.array_equal(weights, backtest.weights.to_numpy())
    assert length > 100 and len({d.action for d, _ in decisions}) >= 3  # the tilts vary
    benchmark = options["anchor"].benchmark[first : first + length]
    assert set(benchmark.tolist()) == {-1.0, 1.0}  # the momentum sign flipped inside the range
    tilts = np.asarray(policy.tilts)[[d.action for d, _ in decisions]]
    banded = [w == h and w != np.clip(b + tilt, -1, 1) for (d, h), w, b, tilt in
              zip(decisions, weights, benchmark, tilts, strict=True)]
    assert any(banded)  # the no-trade band held a weight at least once


def test_an_anchored_account_is_a_weight_not_a_level(anchored_policy):
    policy = anchored_policy
    history = policy.market.data.frame.iloc[:400]
    assert policy.describe()["anchor"] == {"benchmark": "momentum", "tilts": [-0.5, -0.25, 0.0, 0.25, 0.5]}
    assert policy.fitted_on_history is None  # momentum reads closes <= t only
    for held in (-0.75, 0.0, 0.6):  # the position slot reads the weight held, in float32
        obs = policy.observation(history, Account(weight=held))
        assert obs[8 * policy.market.arrays.features.shape[1]] == np.float32(held)
    with pytest.raises(ValueError, match="anchored model holds a weight .* give account.weight"):
        policy.decide(history, Account(position=1))
    with pytest.raises(ValueError, match="account.weight must be a finite number"):
        Account(weight=float("inf"))
    flat = policy.decide(history)
    assert flat == policy.decide(history, Account(weight=0.0))


def test_the_service_decides_an_anchored_model_from_bars_only(anchored_policy):
    """Over HTTP: bars with ``account.weight`` answer the policy's decision (the target weight, not a level's); a
    ready observation is refused with a 422 saying why (its target needs ``b_t`` from the bars); a level index is
    a 422 on the account, not a 500."""
    from fastapi.testclient import TestClient

    from sentio_lab.deploy.service import create_app

    policy = anchored_policy
    client = TestClient(create_app(policy))
    frame = policy.market.data.frame.iloc[:420]
    bars = {"time": [t.isoformat() for t in frame.index],
            **{c: frame[c].tolist() for c in ("open", "high", "low", "close", "volume")}}
    answer = client.post("/decide", json={"bars": bars, "account": {"weight": 0.25}})
    assert answer.status_code == 200, answer.text
    expected = policy.decide(frame, Account(weight=0.25))
    assert answer.json()["action"] == expected.action and answer.json()["weight"] == expected.weight
    obs = policy.observation(frame, Account(weight=0.25)).tolist()
    for body, loc in (({"observation": obs}, ["body", "observation"]),
                      ({"batch": [{"observation": obs}]}, ["body", "batch", 0, "observation"]),
                      ({"observations": [obs]}, ["body", "observations"])):
        refused = client.post("/decide", json=body)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == loc
        assert "anchored to a benchmark" in refused.json()["detail"][0]["msg"]
    level = client.post("/decide", json={"bars": bars, "account": {"position": 1}})
    assert level.status_code == 422 and "give account.weight" in level.json()["detail"][0]["msg"]
