"""The plain-numpy gymnasium portfolio env: one episode, the readable reference the torch
:class:`sentio_lab.env.portfolio.PortfolioEnv` is checked against step by step (same timing, same observation
layout, same fill formula: :mod:`sentio_lab.env.portfolio`)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from sentio_lab.env.arrays import _MIN_EQUITY, _borrow_years, check_ruin_fraction, episode_start_bounds
from sentio_lab.env.costs import CostModel, borrow_cost
from sentio_lab.env.portfolio import observation_size
from sentio_lab.env.portfolio_arrays import (
    Allocation,
    InvalidWeights,
    PortfolioArrays,
    asset_fill_arrays,
    asset_weights,
    check_allocation,
    check_weights,
    portfolio_fill,
)


class NumpyPortfolioEnv(gym.Env):
    """One portfolio episode in plain numpy (a gymnasium env: ``Box`` actions of target weights, ``Box``
    observations). ``reset(options={"start": t0})`` starts at bar ``t0``; without it a start is drawn from the
    ``seed``-ed generator."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        arrays: PortfolioArrays,
        *,
        window: int = 32,
        episode_length: int = 256,
        start: int = 0,
        stop: int | None = None,
        allocation: Allocation = "long_only",
        gross_limit: float = 1.0,
        invalid_weights: InvalidWeights = "refuse",
        costs: CostModel = CostModel(),
        ruin_fraction: float = 0.05,
    ) -> None:
        """The same options as :class:`sentio_lab.env.portfolio.PortfolioEnv`, for a single episode."""
        check_allocation(allocation, gross_limit, invalid_weights)
        stop = len(arrays.close) if stop is None else stop
        self.start_low, self.start_high = episode_start_bounds(arrays, window, start, stop, episode_length)
        self.arrays, self.costs, self.window, self.episode_length = arrays, costs, window, episode_length
        self.allocation, self.gross_limit, self.invalid_weights = allocation, float(gross_limit), invalid_weights
        self.ruin_fraction = check_ruin_fraction(ruin_fraction)
        self.num_assets, num_features = arrays.num_assets, arrays.features.shape[2]
        self._years = _borrow_years(arrays, costs)  # None when shorts pay no borrow
        self._fill_arrays = asset_fill_arrays(arrays, costs, self.start_low, stop - 1)
        width = self.num_assets + 1 if allocation == "long_only" else self.num_assets
        low = 0.0 if allocation == "long_only" else -self.gross_limit
        high = 1.0 if allocation == "long_only" else self.gross_limit
        self.action_space = gym.spaces.Box(low, high, shape=(width,), dtype=np.float64)
        size = observation_size(self.num_assets, num_features, window)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(size,), dtype=np.float32)

    def _observe(self) -> np.ndarray:
        t, a = self.t, self.num_assets
        block = self.arrays.features[t - self.window + 1:t + 1]  # (window, A, F), oldest first
        per_asset = block.transpose(1, 0, 2).reshape(a, -1)
        held = asset_weights(self.cash, self.shares, self.arrays.close[t]).astype(np.float32)
        return np.concatenate([np.column_stack([per_asset, held[:a]]).reshape(-1), held[a:]]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """All cash, equity 1, at ``options["start"]`` or a random valid start."""
        super().reset(seed=seed)
        start = (options or {}).get("start")
        if start is None:
            start = int(self.np_random.integers(self.start_low, self.start_high + 1))
        if not self.start_low <= start <= self.start_high:
            raise ValueError(f"reset: start {start} outside the valid range [{self.start_low}, {self.start_high}]")
        self.t, self.steps = int(start), 0
        self.cash, self.shares, self.equity = np.float64(1.0), np.zeros(self.num_assets), 1.0
        return self._observe(), {"equity": self.equity}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Rebalance to the target weights at bar t+1's fill price, pay borrow, mark at its close."""
        weights = check_weights(np.asarray(action, dtype=np.float64), self.allocation, self.gross_limit,
                                self.invalid_weights, self.num_assets)
        t, nt = self.t, self.t + 1
        price = self.arrays.fill[nt]
        if self._fill_arrays is None:
            zero = np.zeros(self.num_assets)
            half, eta, cap = zero, zero, zero + np.inf
        else:
            half, eta, cap = (a[t] for a in self._fill_arrays)
        fill = portfolio_fill(self.cash, self.shares, price, weights, self.costs, half, eta, cap)
        cash = fill.cash
        if self._years is not None:
            held = self.shares if self.arrays.fill_price == "next_close" else fill.shares
            cash = cash - borrow_cost(held, self.arrays.close[nt], self._years[nt], self.costs).sum()
        equity = float(cash + (fill.shares * self.arrays.close[nt]).sum())
        reward = float(np.log(max(equity, _MIN_EQUITY) / self.equity))
        self.cash, self.shares, self.equity, self.t, self.steps = cash, fill.shares, equity, nt, self.steps + 1
        terminated = equity <= self.ruin_fraction
        truncated = self.steps >= self.episode_length and not terminated
        info = {"equity": equity, "weights": weights, "cost": float(fill.cost), "delta": fill.delta,
                "capped": fill.capped}
        return self._observe(), reward, bool(terminated), bool(truncated), info
