"""The plain-numpy gymnasium env: one episode of the market, the short readable reference the torch env
(:class:`sentio_lab.env.trading.TradingEnv`) is checked against step by step (same timing, module
:mod:`sentio_lab.env.trading`)."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from sentio_lab.env.anchor import AnchorConfig, anchored_targets, benchmark_targets
from sentio_lab.env.arrays import (
    _MIN_EQUITY,
    DEFAULT_POSITIONS,
    MarketArrays,
    _anchor_blocks,
    _borrow_years,
    check_positions,
    check_ruin_fraction,
    episode_start_bounds,
    fill_arrays,
)
from sentio_lab.env.costs import (
    CostModel,
    borrow_cost,
    cost_inputs,
    execute,
    fill_reason,
    rebalance,
)
from sentio_lab.env.mask_inputs import MaskInputs
from sentio_lab.env.masks import InvalidAction, MaskConfig, make_masker
from sentio_lab.features.observation_layout import (
    TokenBlock,
    check_token_blocks,
    observation_dim,
    observation_layout,
)


class NumpyTradingEnv(gym.Env):
    """One episode of the same market in plain numpy: the short, readable reference implementation.

    Stable-Baselines3 trains on it; tests check the torch env against it step by step.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        market: MarketArrays,
        *,
        window: int = 32,
        episode_length: int = 256,
        start: int = 0,
        stop: int | None = None,
        positions: Sequence[float] = DEFAULT_POSITIONS,
        costs: CostModel = CostModel(),
        ruin_fraction: float = 0.05,
        masks: MaskConfig | None = None,
        invalid_action: InvalidAction = "nearest",
        mask_inputs: MaskInputs | None = None,
        token_blocks: Sequence[TokenBlock] = (),
        drawdown_obs: bool = False,
        anchor: AnchorConfig | None = None,
    ) -> None:
        """Same arguments as :class:`TradingEnv`, for a single episode; masks by the same rules (numpy arrays)."""
        super().__init__()
        token_blocks = _anchor_blocks(market, token_blocks, anchor, masks)
        stop = len(market.close) if stop is None else stop
        self.start_low, self.start_high = episode_start_bounds(market, window, start, stop, episode_length)
        self.market, self.window, self.episode_length = market, window, episode_length
        self.positions = check_positions(positions)
        self.costs, self.ruin_fraction = costs, check_ruin_fraction(ruin_fraction)
        self._borrow_years = _borrow_years(market, costs)
        self._fill_arrays = fill_arrays(market, costs, self.start_low, stop - 1)
        self._adv = None if self._fill_arrays is None else cost_inputs(
            costs, market.high, market.low, market.close, market.volume, market.bars_per_day).adv
        self.flat_level = int(np.argmin(np.abs(self.positions)))
        self.token_blocks, self.drawdown_obs = tuple(token_blocks), drawdown_obs
        self.obs_layout = observation_layout(market.features.shape[1], window, self.token_blocks, drawdown_obs)
        obs_dim = observation_dim(self.obs_layout)
        check_token_blocks(self.token_blocks, len(market.close))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(obs_dim,), dtype=np.float32)
        self.anchor = anchor
        self.action_space = gym.spaces.Discrete(len(positions) if anchor is None else len(anchor.tilts))
        if anchor is not None:  # actions are tilts; an episode starts from the zero tilt, flat
            self.flat_level = anchor.zero_action
            self._anchor_bounds = anchor.bounds(self.positions)
        self.masker = make_masker(market.close, market.features, self.positions, masks, mask_inputs, 1, invalid_action,
                                  None)

    def action_masks(self) -> np.ndarray:
        """Bool ``(num_actions,)``: the levels the next :meth:`step` may choose (sb3-contrib's MaskablePPO API)."""
        if self.masker is None:
            return np.ones(len(self.positions), dtype=bool)
        return self.masker.action_masks(np.array([self.t]), np.array([self.level]), np.array([self.equity]))[0]

    def _observe(self) -> np.ndarray:
        rows = self.market.features[self.t - self.window + 1 : self.t + 1]
        position = np.float32(self.positions[self.level] if self.anchor is None else self.held)
        parts = [rows.reshape(-1), [position]]
        parts += [block.table[block.index[self.t]].reshape(-1) for block in self.token_blocks]
        if self.drawdown_obs:
            parts.append([1.0 - self.equity / self.peak, self.max_drawdown])
        return np.concatenate(parts).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Start an episode at ``options["start"]`` or at a random valid bar."""
        super().reset(seed=seed)
        start = (options or {}).get("start")
        if start is None:
            start = int(self.np_random.integers(self.start_low, self.start_high + 1))
        elif not (self.start_low <= start <= self.start_high):
            raise ValueError(f"reset: start {start} outside [{self.start_low}, {self.start_high}]")
        self.t, self.steps, self.level = int(start), 0, self.flat_level
        self.cash, self.shares, self.equity = 1.0, 0.0, 1.0
        self.peak, self.max_drawdown = 1.0, 0.0
        self.pending = False
        self.held = 0.0
        self.bench = {"cash": 1.0, "shares": 0.0, "held": 0.0, "equity": 1.0, "pending": False}
        if self.masker is not None:
            self.masker.reset_where(np.array([True]))
        return self._observe(), {"equity": self.equity}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Fill the target level at the next open (or close), mark at the next close, reward the log equity change."""
        index = int(action)
        if index != action:
            raise TypeError(f"step: action {action!r} is not an integer level index")
        if not 0 <= index < self.action_space.n:
            raise ValueError(f"step: action {index} outside [0, {self.action_space.n})")
        action = index
        if self.masker is not None:
            action = int(self.masker.apply(np.array([action]), np.array([self.t]), np.array([self.level]),
                                           np.array([self.equity]))[0])
        if self.anchor is None:
            target, changed = self.positions[action], action != self.level
        else:  # target = clip(b_t + tilt), held inside the no-trade band (sentio_lab.env.anchor)
            b_t = self.anchor.benchmark[self.t]
            target, changed, deviation = (x.item() for x in anchored_targets(
                b_t, np.float64(self.anchor.tilts[action]), np.float64(self.held), *self._anchor_bounds,
                self.anchor.no_trade_band))
        price = self.market.fill[self.t + 1]
        held = self.shares  # the shares held over bar t + 1 when the fill is at its close
        record = None
        if self.anchor is not None:  # the benchmark's shadow account, before the agent's (both read bar t)
            bench_log_return = self._benchmark_step(b_t, price)
        if self._fill_arrays is None:
            self.cash, self.shares, _ = rebalance(self.cash, self.shares, price, target, changed, self.costs)
        else:  # spread / impact / cap (sentio_lab.env.costs.execution); a capped order may carry to the next bar
            half, eta, cap = (float(a[self.t]) for a in self._fill_arrays)
            trade = bool(changed or self.pending)
            fill = execute(np.float64(self.cash), np.float64(self.shares), price, target, trade,
                           self.costs, half, eta, cap)
            self.cash, self.shares = fill.cash, fill.shares
            capped = bool(fill.capped)
            self.pending = capped and self.costs.remainder == "carry"
            record = {"delta": float(fill.delta), "rate": float(fill.rate), "capped": capped,
                      "requested": float(fill.requested),
                      "reason": fill_reason(trade, capped, cap, float(self._adv[self.t]), self.costs)}
        self.cash, self.shares = float(self.cash), float(self.shares)
        self.level = action
        self.t += 1
        self.steps += 1
        close = self.market.close[self.t]
        if self._borrow_years is not None:
            borrowed = held if self.market.fill_price == "next_close" else self.shares
            self.cash -= float(borrow_cost(borrowed, close, self._borrow_years[self.t], self.costs))
        equity = self.cash + self.shares * close
        reward = float(np.log(max(equity, _MIN_EQUITY) / self.equity))
        self.equity = equity
        info = {"equity": equity}
        if self.anchor is not None:
            self.held = target
            reward -= bench_log_return if self.anchor.excess_reward else 0.0
            reward -= self.anchor.deviation_penalty * deviation**2 if self.anchor.deviation_penalty else 0.0
            info.update(weight=target, tilt=deviation, benchmark_equity=self.bench["equity"])
        if self.masker is not None:
            self.masker.update(np.array([changed]), np.array([equity]), np.array([self.steps]))
        terminated = bool(equity <= self.ruin_fraction)
        truncated = bool(self.steps >= self.episode_length and not terminated)
        if record is not None:
            info["fill"] = record
        if self.drawdown_obs:
            self.peak = max(self.peak, equity)
            max_drawdown = max(self.max_drawdown, 1.0 - equity / self.peak)
            info["drawdown_cost"], self.max_drawdown = max_drawdown - self.max_drawdown, max_drawdown
        return self._observe(), reward, terminated, truncated, info

    def _benchmark_step(self, b_t: float, price: float) -> float:
        """Step the benchmark's shadow account over bar t + 1 (target ``clip(b_t)``, same fills and costs, no band);
        return its log return."""
        account, lo, hi = self.bench, *self._anchor_bounds
        target, trade = (x.item() for x in benchmark_targets(np.float64(b_t), np.float64(account["held"]), lo, hi))
        before = account["shares"]  # held over bar t + 1 when the fill is at its close
        if self._fill_arrays is None:
            cash, shares, _ = rebalance(account["cash"], account["shares"], price, target, trade, self.costs)
        else:
            half, eta, cap = (float(a[self.t]) for a in self._fill_arrays)
            fill = execute(np.float64(account["cash"]), np.float64(account["shares"]), price, target,
                           bool(trade or account["pending"]), self.costs, half, eta, cap)
            cash, shares = fill.cash, fill.shares
            account["pending"] = bool(fill.capped) and self.costs.remainder == "carry"
        cash, shares = float(cash), float(shares)
        close = self.market.close[self.t + 1]
        if self._borrow_years is not None:
            borrowed = before if self.market.fill_price == "next_close" else shares
            cash -= float(borrow_cost(borrowed, close, self._borrow_years[self.t + 1], self.costs))
        equity = cash + shares * close
        if account["equity"] <= _MIN_EQUITY or equity <= _MIN_EQUITY:  # ruined: flat at the floor from now on
            cash, shares, target, equity = _MIN_EQUITY, 0.0, 0.0, _MIN_EQUITY
            account["pending"] = False
        log_return = float(np.log(equity / account["equity"]))
        account.update(cash=cash, shares=shares, held=target, equity=equity)
        return log_return
