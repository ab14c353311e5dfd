"""Observation extensions of both envs: token blocks gathered by index and the drawdown state (D_t, M_t)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.arguments import FeatureArgs
from sentio_lab.env import MarketArrays, NumpyTradingEnv, TradingEnv
from sentio_lab.features.observation_layout import TokenBlock, check_token_blocks, observation_dim, observation_layout


def random_walk(n: int = 400, seed: int = 0, vol: float = 0.02) -> MarketArrays:
    """Opens and closes of a random walk; features are two causal columns (log return, its square)."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, vol, n)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, vol / 4, n))
    ret = np.r_[0.0, np.diff(np.log(close))]
    return MarketArrays(open=open_, close=close, features=np.column_stack([ret, ret**2]).astype(np.float32))


def lagged_block(n: int, k: int = 3, every: int = 5, name: str = "slow") -> TokenBlock:
    """Tokens = bar index of every ``every``-th bar; at bar t the last ``k`` completed ones (row 0 pads)."""
    completed = (np.arange(n) + 1) // every  # slow bar j covers bars 5j..5j+4 and completes at the last
    slow = np.arange(n // every)
    table = np.r_[np.zeros((1, 2)), np.column_stack([slow, -slow])].astype(np.float32)  # row j + 1 = slow bar j
    rows = completed[:, None] - k + 1 + np.arange(k)[None, :]
    index = np.where(rows >= 1, rows, 0)  # fewer than k completed: pad with row 0
    return TokenBlock(name=name, table=table, index=index.astype(np.int64))


def test_default_layout_is_unchanged():
    layout = observation_layout(num_features=3, window=4)
    assert layout == {"window": slice(0, 12), "position": slice(12, 13)}
    assert observation_dim(layout) == 13
    env = TradingEnv(random_walk(), num_envs=2, window=4, episode_length=16)
    assert env.obs_dim == 4 * 2 + 1 and env.reset().shape == (2, 9)


def test_layout_with_blocks_and_drawdown():
    block = lagged_block(400, k=3)
    layout = observation_layout(2, 4, [block], drawdown_obs=True)
    assert layout["slow"] == slice(9, 15) and layout["drawdown"] == slice(15, 17)
    assert observation_dim(layout) == 17
    with pytest.raises(ValueError, match="used twice or is reserved"):
        observation_layout(2, 4, [lagged_block(400, name="position")])


@pytest.mark.parametrize(
    ("table", "index", "message"),
    [
        (np.zeros(3, np.float32), np.zeros((5, 1), np.int64), "table must be a float"),
        (np.zeros((3, 2), np.float32), np.zeros(5, np.int64), "index must be an integer"),
        (np.zeros((3, 2), np.float32), np.full((5, 1), 3, np.int64), "outside"),
        (np.zeros((3, 2), np.float32), np.full((5, 1), -1, np.int64), "outside"),
    ],
)
def test_token_block_validation(table, index, message):
    with pytest.raises(ValueError, match=message):
        TokenBlock("b", table, index)


def test_token_blocks_need_one_row_per_bar():
    block = lagged_block(300)
    with pytest.raises(ValueError, match="300 rows, the market 400"):
        check_token_blocks([block], 400)
    with pytest.raises(ValueError, match="300 rows"):
        TradingEnv(random_walk(400), num_envs=2, window=4, episode_length=16, token_blocks=[block])
    with pytest.raises(ValueError, match="300 rows"):
        NumpyTradingEnv(random_walk(400), window=4, episode_length=16, token_blocks=[block])


def test_token_blocks_gather_table_rows_in_both_envs():
    market, block = random_walk(400), lagged_block(400, k=3)
    env = TradingEnv(market, num_envs=3, window=4, episode_length=50, token_blocks=[block], seed=3)
    ref = NumpyTradingEnv(market, window=4, episode_length=50, token_blocks=[block])
    starts = [10, 57, 200]
    obs = env.reset(starts=starts)
    rng = np.random.default_rng(0)
    ref_obs = [ref.reset(options={"start": s})[0] for s in starts]
    for step in range(40):
        t = env.t.numpy()
        expected = block.table[block.index[t]].reshape(3, -1)
        np.testing.assert_array_equal(obs[:, env.obs_layout["slow"]].numpy(), expected)
        actions = rng.integers(0, 3, 3)
        obs, *_ = env.step(torch.as_tensor(actions))
        if step == 0:  # the reference env reproduces the same layout (one env at a time)
            for i, s in enumerate(starts):
                np.testing.assert_array_equal(ref_obs[i], env_obs_at(market, block, s))


def env_obs_at(market: MarketArrays, block: TokenBlock, start: int) -> np.ndarray:
    """The observation a fresh episode at ``start`` sees, built by hand from the layout."""
    rows = market.features[start - 3 : start + 1].reshape(-1)
    return np.concatenate([rows, [0.0], block.table[block.index[start]].reshape(-1)]).astype(np.float32)


def drawdown_by_hand(equity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """D_t and M_t of an equity path that starts at 1 (plain loops, no shared code)."""
    peak, running_max, d_out, m_out = 1.0, 0.0, [], []
    for e in equity:
        peak = max(peak, e)
        d = 1.0 - e / peak
        running_max = max(running_max, d)
        d_out.append(d)
        m_out.append(running_max)
    return np.array(d_out), np.array(m_out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drawdown_costs_sum_to_each_episodes_max_drawdown(seed):
    """Over many episodes (auto-resets included) the per-step costs add up to the episode's max drawdown."""
    market = random_walk(600, seed=seed, vol=0.03)
    n, length = 6, 40
    env = TradingEnv(market, num_envs=n, window=4, episode_length=length, drawdown_obs=True, seed=seed)
    obs = env.reset()
    rng = np.random.default_rng(seed)
    equity_paths: list[list[float]] = [[] for _ in range(n)]
    cost_sums = np.zeros(n)
    checked = 0
    for _ in range(200):
        obs, _, _, _, info = env.step(torch.as_tensor(rng.integers(0, 3, n)))
        cost = info["drawdown_cost"].numpy()
        assert (cost >= 0).all()
        cost_sums += cost
        for i in range(n):
            equity_paths[i].append(float(info["equity"][i]))
            d, m = drawdown_by_hand(np.array(equity_paths[i]))
            if info["done"][i]:
                assert cost_sums[i] == pytest.approx(m[-1], abs=1e-12)
                equity_paths[i], cost_sums[i] = [], 0.0
                checked += 1
                np.testing.assert_array_equal(obs[i, env.obs_layout["drawdown"]].numpy(), [0.0, 0.0])
            else:
                np.testing.assert_allclose(obs[i, env.obs_layout["drawdown"]].numpy(), [d[-1], m[-1]], rtol=1e-6)
    assert checked >= 10


def test_drawdown_obs_matches_numpy_reference():
    market = random_walk(500, seed=4, vol=0.03)
    kwargs = dict(window=4, episode_length=60, drawdown_obs=True)
    env = TradingEnv(market, num_envs=1, **kwargs)
    ref = NumpyTradingEnv(market, **kwargs)
    obs = env.reset(starts=[20])
    ref_obs, _ = ref.reset(options={"start": 20})
    rng = np.random.default_rng(1)
    total = 0.0
    for _ in range(59):
        a = int(rng.integers(0, 3))
        obs, _, _, _, info = env.step(torch.as_tensor([a]))
        ref_obs, _, terminated, truncated, ref_info = ref.step(a)
        assert not (terminated or truncated)
        np.testing.assert_allclose(obs[0].numpy(), ref_obs, rtol=1e-6, atol=1e-7)
        assert float(info["drawdown_cost"][0]) == pytest.approx(ref_info["drawdown_cost"], abs=1e-15)
        total += ref_info["drawdown_cost"]
    assert total == pytest.approx(ref.max_drawdown, abs=1e-15) and total > 0


def test_drawdown_state_resumes_and_old_states_are_refused():
    market = random_walk(500, seed=5, vol=0.03)
    env = TradingEnv(market, num_envs=4, window=4, episode_length=30, drawdown_obs=True, seed=1)
    env.reset()
    for _ in range(7):
        env.step(torch.tensor([0, 2, 1, 0]))
    state = env.state_dict()
    assert {"peak", "max_drawdown"} <= set(state)
    twin = TradingEnv(market, num_envs=4, window=4, episode_length=30, drawdown_obs=True, seed=99)
    np.testing.assert_array_equal(twin.load_state_dict(state).numpy(), env._observe(env.t, env.level).numpy())
    for _ in range(40):
        a = torch.tensor([2, 0, 2, 1])
        o1, *_, i1 = env.step(a)
        o2, *_, i2 = twin.step(a)
        assert torch.equal(o1, o2) and torch.equal(i1["drawdown_cost"], i2["drawdown_cost"])
    plain = TradingEnv(market, num_envs=4, window=4, episode_length=30)
    plain.reset()
    with pytest.raises(ValueError, match="lacks"):
        twin.load_state_dict(plain.state_dict())
    assert "drawdown_cost" not in plain.step(torch.zeros(4, dtype=torch.long))[4]


# ------------------------------------------------------------------ evaluation finds a variant's env options
@dataclasses.dataclass
class DrawdownArgs:
    """Stands in for a variant's Args: this module's env_options() asks for the drawdown state."""

    features: FeatureArgs = dataclasses.field(default_factory=lambda: FeatureArgs(window=8))


def env_options(args: DrawdownArgs, market) -> dict:
    """The hook evaluate.env_options looks up in the module defining the arguments' class."""
    return {"drawdown_obs": True}


class WidthCheckingAgent(torch.nn.Module):
    """Greedy agent that records the observation width it is shown and always goes long."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.widths: set[int] = set()
        self.drawdown_seen: list[np.ndarray] = []

    def act_greedy(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.widths.add(obs.shape[1])
        self.drawdown_seen.append(obs[0, -2:].numpy().copy())  # (D_t, M_t) the agent was shown
        return torch.full((len(obs),), 2, dtype=torch.long)


def test_evaluation_applies_the_variants_env_options(sp500_market):
    from sentio_lab.agents.variants import agent_obs_dim
    from sentio_lab.agents.variants import env_options as find_env_options
    from sentio_lab.env.costs import CostModel
    from sentio_lab.evaluation.episodes import evaluate_policies, evaluate_policy

    args = DrawdownArgs()
    options = find_env_options(args, sp500_market)
    assert options == {"drawdown_obs": True}
    width = sp500_market.arrays.features.shape[1] * args.features.window + 1
    assert agent_obs_dim(args, sp500_market) == width + 2
    agent = WidthCheckingAgent()
    kwargs = dict(window=args.features.window, positions=(-1.0, 0.0, 1.0), costs=CostModel())
    one = evaluate_policy(agent, sp500_market, range_name="test", env_options=options, **kwargs)
    # the drawdown state shown at each decision is the one of the equity marked so far (by hand from the curve)
    d, m = drawdown_by_hand(one.equity.to_numpy())
    np.testing.assert_allclose(np.array(agent.drawdown_seen), np.column_stack([d, m])[:-1], rtol=1e-6, atol=1e-7)
    assert m[-1] > 0.05  # always long over sp500's 2017-2018 test range: a real drawdown was tracked
    many = evaluate_policies([agent], sp500_market, ["test"], env_options=options, **kwargs)
    assert agent.widths == {width + 2}
    pd.testing.assert_series_equal(one.equity, many[0][0].equity)
    plain_agent = WidthCheckingAgentPlain()
    plain = evaluate_policy(plain_agent, sp500_market, range_name="test", **kwargs)
    assert plain_agent.widths == {width}
    pd.testing.assert_series_equal(plain.equity, one.equity)  # the observation grew, the accounting did not move


class WidthCheckingAgentPlain(WidthCheckingAgent):
    """The same agent without the drawdown check (plain observations end with the position)."""

    def act_greedy(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.widths.add(obs.shape[1])
        return torch.full((len(obs),), 2, dtype=torch.long)


def test_env_options_default_to_none_for_plain_variants(tiny_args, sp500_market):
    from sentio_lab.agents.variants import env_options as find_env_options

    assert find_env_options(tiny_args, sp500_market) == {}
