"""The batched torch portfolio env: ``num_envs`` accounts over A assets, the action a vector of target weights.

Timing -- the single-asset env's (:mod:`sentio_lab.env.trading`), asset by asset:

* the observation at step t is built from bars ``<= t`` of every asset;
* the weights chosen at step t fill at the **open of bar t+1** (``PortfolioArrays.fill_price == "next_open"``) or at
  the **close of bar t+1** (``"next_close"``: close-only panels such as skfolio's S&P 500 set), with each asset's
  own costs (:func:`sentio_lab.env.portfolio_arrays.portfolio_fill`; fee, slippage, half-spread, impact on the
  capital, participation caps);
* a short held over bar t+1 pays borrow at its close (``costs.borrow_bps > 0``): the shares after the fill at its
  open, or, with next-close fills, the shares held before that close's fill;
* the account is marked at the close of bar t+1; the reward is ``log(equity_{t+1} / equity_t)``, net of costs;
* an episode ends by truncation after ``episode_length`` steps or by termination at ``ruin_fraction`` (ruin).

Actions (``allocation``): ``"long_only"`` takes ``(num_envs, A + 1)`` weights on the simplex, cash last;
``"long_short"`` takes ``(num_envs, A)`` signed weights with ``sum |w| <= gross_limit`` (cash is the rest,
``1 - sum w``). Every step rebalances every asset to its target (weights drift between bars, so holding the same
target trades the drift back). ``invalid_weights="project"`` maps a vector outside the set onto it instead of
refusing it (:func:`~sentio_lab.env.portfolio_arrays.check_weights`). With ``anchor`` (long-only) the action is a
tilt around a benchmark's weights, projected onto the simplex, and ``excess_reward`` subtracts the benchmark's own
log return (:mod:`sentio_lab.env.portfolio_anchor`).

Observation, float32 ``(num_envs, A x (window x F + 1) + 1)``, asset-major: for each asset its last ``window``
feature rows (bars ``t - window + 1 .. t``, oldest first, F features each, flattened) then its held weight at
bar t's close; the cash weight last (:func:`observation_size`). Every asset's block has the same layout, so a
network can encode the assets alike (reshape the first ``A x (window x F + 1)`` entries to ``(A, window x F + 1)``).
"""

from __future__ import annotations

import torch

from sentio_lab.env.arrays import (
    _MIN_EQUITY,
    WINDOW_MATRIX_MAX_BYTES,
    StartSampler,
    _borrow_years,
    check_ruin_fraction,
    episode_start_bounds,
)
from sentio_lab.env.costs import CostModel
from sentio_lab.env.portfolio_anchor import PortfolioAnchor, ShadowAccount, project_to_simplex
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


def observation_size(num_assets: int, num_features: int, window: int) -> int:
    """Length of a portfolio observation (module doc): ``A x (window x F + 1) + 1``."""
    return num_assets * (window * num_features + 1) + 1


class PortfolioEnv:
    """``num_envs`` portfolio episodes stepped together by tensor operations, on CPU or CUDA (module doc).

    ``step`` auto-resets finished episodes (random start; from ``start_sampler`` when given, e.g. a CPCV fold's
    :class:`sentio_lab.env.splits.SegmentEpisodeSampler`) and returns each finished episode's last observation in
    ``info["final_obs"]``. Random starts are staggered as in :class:`sentio_lab.env.trading.TradingEnv`.
    """

    def __init__(
        self,
        arrays: PortfolioArrays,
        *,
        num_envs: int = 8,
        window: int = 32,
        episode_length: int = 256,
        start: int = 0,
        stop: int | None = None,
        allocation: Allocation = "long_only",
        gross_limit: float = 1.0,
        invalid_weights: InvalidWeights = "refuse",
        costs: CostModel = CostModel(),
        ruin_fraction: float = 0.05,
        device: str | torch.device = "cpu",
        seed: int = 0,
        stagger_starts: bool = True,
        start_sampler: StartSampler | None = None,
        anchor: PortfolioAnchor | None = None,
    ) -> None:
        """Build the env on bars ``[start, stop)`` of ``arrays``; tensors live on ``device``."""
        check_allocation(allocation, gross_limit, invalid_weights)
        if anchor is not None:
            if allocation != "long_only":
                raise ValueError("anchor: a benchmark tilt is projected onto the long-only simplex; use "
                                 "allocation='long_only'")
            anchor.check(len(arrays.close), arrays.num_assets)
        stop = len(arrays.close) if stop is None else stop
        self.start_low, self.start_high = episode_start_bounds(arrays, window, start, stop, episode_length)
        self.start_sampler = start_sampler
        if start_sampler is not None:
            if (start_sampler.window, start_sampler.episode_length) != (window, episode_length):
                raise ValueError(f"start_sampler is sized for window {start_sampler.window}, episode_length "
                                 f"{start_sampler.episode_length}; this env has {window}, {episode_length}")
            low, high = start_sampler.start_low, start_sampler.start_high
            if low < self.start_low or high > self.start_high:
                raise ValueError(f"start_sampler starts [{low}, {high}] leave the env's valid starts "
                                 f"[{self.start_low}, {self.start_high}]")
            self.start_low, self.start_high = low, high
        self.arrays, self.costs = arrays, costs
        self.num_envs, self.window, self.episode_length = num_envs, window, episode_length
        self.allocation, self.gross_limit, self.invalid_weights = allocation, float(gross_limit), invalid_weights
        self.ruin_fraction, self.stagger_starts = check_ruin_fraction(ruin_fraction), stagger_starts
        self.num_assets, self.num_features = arrays.num_assets, arrays.features.shape[2]
        self.action_dim = self.num_assets + (1 if allocation == "long_only" else 0)
        self.obs_dim = observation_size(self.num_assets, self.num_features, window)
        dev, f64 = torch.device(device), torch.float64
        self.device = dev
        self.fill = torch.tensor(arrays.fill, dtype=f64, device=dev)
        self.close = torch.tensor(arrays.close, dtype=f64, device=dev)
        self._borrow_on_held = arrays.fill_price == "next_close"
        years = _borrow_years(arrays, costs)
        self._borrow_per_share = None if years is None else torch.tensor(
            costs.borrow_rate * years[:, None] * arrays.close, dtype=f64, device=dev)
        per_asset = asset_fill_arrays(arrays, costs, self.start_low, stop - 1)
        if per_asset is None:  # the flat model: no spread, no impact, no cap
            zeros = torch.zeros(num_envs, self.num_assets, dtype=f64, device=dev)
            self._flat_inputs = (zeros, zeros, zeros + float("inf"))
            self._fill_arrays = None
        else:
            self._fill_arrays = tuple(torch.tensor(a, dtype=f64, device=dev) for a in per_asset)
        features = torch.tensor(arrays.features, dtype=torch.float32, device=dev)
        rows = len(arrays.close) - window + 1
        # Row r: every asset's window ending at bar r + window - 1, (A, window x F). One index_select per step
        # instead of a 4-D gather, at window x the features' memory; large panels keep the gather.
        self._windows = None
        self._features = features
        if rows * window * features[0].numel() * 4 <= WINDOW_MATRIX_MAX_BYTES:
            windows = features.unfold(0, window, 1).permute(0, 1, 3, 2)  # (rows, A, window, F)
            self._windows = windows.reshape(rows, self.num_assets, window * self.num_features).contiguous()
        self._offsets = torch.arange(-window + 1, 1, device=dev)
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(seed)
        self.t = torch.zeros(num_envs, dtype=torch.long, device=dev)
        self.steps = torch.zeros_like(self.t)
        self.cash = torch.ones(num_envs, dtype=f64, device=dev)
        self.shares = torch.zeros(num_envs, self.num_assets, dtype=f64, device=dev)
        self.equity = torch.ones_like(self.cash)
        self.anchor = anchor
        self._benchmark = None if anchor is None else torch.tensor(anchor.benchmark, dtype=f64, device=dev)
        shadow = anchor is not None and (anchor.excess_reward or anchor.drifts)
        self.shadow = ShadowAccount(num_envs, self.num_assets, dev) if shadow else None

    # ----------------------------------------------------------------------------------- observations
    def _observe(self, t: torch.Tensor, cash: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        if self._windows is not None:
            blocks = self._windows.index_select(0, t - (self.window - 1))
        else:  # (N, window, A, F) -> (N, A, window x F)
            gathered = self._features[t[:, None] + self._offsets]
            blocks = gathered.permute(0, 2, 1, 3).reshape(len(t), self.num_assets, -1)
        held = asset_weights(cash, shares, self.close.index_select(0, t)).to(torch.float32)
        per_asset = torch.cat([blocks, held[:, :-1, None]], dim=2).reshape(len(t), -1)
        return torch.cat([per_asset, held[:, -1:]], dim=1)

    def _sample_starts(self, n: int) -> torch.Tensor:
        if self.start_sampler is not None:
            return self.start_sampler.sample(n, self.generator).to(self.device)
        return torch.randint(self.start_low, self.start_high + 1, (n,), generator=self.generator, device=self.device)

    # ------------------------------------------------------------------------------------------- API
    def reset(self, starts: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Start every episode all in cash with equity 1, at ``starts`` (bar indices, one per env) or at random
        valid bars (staggered when ``stagger_starts``); return the first observation."""
        steps = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        if starts is None:
            t0 = self._sample_starts(self.num_envs)
            if self.stagger_starts:
                steps = torch.randint(0, self.episode_length, (self.num_envs,), generator=self.generator,
                                      device=self.device)
        else:
            t0 = torch.as_tensor(starts, dtype=torch.long, device=self.device).reshape(-1)
            if len(t0) != self.num_envs:
                raise ValueError(f"reset: {len(t0)} starts given for {self.num_envs} envs")
            bad = (t0 < self.start_low) | (t0 > self.start_high)
            if self.start_sampler is not None:
                bad = bad | ~self.start_sampler.contains(t0)
            if bad.any():
                raise ValueError(f"reset: starts {t0[bad].tolist()} are no valid episode start (valid: "
                                 f"[{self.start_low}, {self.start_high}] and the sampler's segments)")
        self.t, self.steps = t0.clone(), steps
        self.cash = torch.ones(self.num_envs, dtype=torch.float64, device=self.device)
        self.shares = torch.zeros(self.num_envs, self.num_assets, dtype=torch.float64, device=self.device)
        self.equity = torch.ones_like(self.cash)
        if self.shadow is not None:
            self.shadow.reset()
        return self._observe(self.t, self.cash, self.shares)

    def _shadow_holds(self) -> torch.Tensor:
        # bool (N,): the benchmark holds (drifts) this step; it re-targets on each episode's first step, every k after.
        return self.shadow.age % self.anchor.rebalance_every != 0

    def tilt_base(self) -> torch.Tensor:
        """float64 ``(num_envs, A + 1)``: the weights an anchored env adds this step's tilt to before projecting:
        the benchmark's ``b_t`` on its re-target steps (every step with ``rebalance_every`` 1), its shadow account's
        weights drifted to bar t's close in between (sentio_lab.env.portfolio_anchor)."""
        if self._benchmark is None:
            raise ValueError("tilt_base: the env has no anchor (build it with anchor=PortfolioAnchor(...))")
        return self._tilt_base(self._benchmark.index_select(0, self.t),
                               self._shadow_holds() if self.anchor.drifts else None)

    def _tilt_base(self, benchmark: torch.Tensor, shadow_hold: torch.Tensor | None) -> torch.Tensor:
        # tilt_base from this step's b_t and shadow holds (None: the benchmark does not drift), which step() has
        if shadow_hold is None:
            return benchmark
        drifted = asset_weights(self.shadow.cash, self.shadow.shares, self.close.index_select(0, self.t))
        return torch.where(shadow_hold[:, None], drifted, benchmark)

    def step(self, actions: torch.Tensor, hold: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Rebalance every env to its target weights; return (obs, reward, terminated, truncated, info).

        ``hold`` (bool ``(num_envs,)``, optional): accounts that trade nothing this step (their shares drift with
        the prices; their actions are still checked): a policy that rebalances only at a declared frequency.

        ``info``: ``equity`` (marked at bar t+1's close), ``weights`` (the asset weights filled), ``cost`` (fees and
        price concessions paid, equity units), ``turnover`` (traded notional over the equity at the fill prices),
        ``capped`` (bool ``(N, A)``, with a participation cap), ``final_obs`` and ``done``; anchored with
        ``excess_reward``, ``benchmark_equity``. Invalid weights raise before any state changes
        (``invalid_weights="refuse"``).
        """
        actions = torch.as_tensor(actions, device=self.device)
        if actions.ndim != 2 or actions.shape[0] != self.num_envs or not actions.is_floating_point():
            raise ValueError(f"step: expected float weights of shape ({self.num_envs}, {self.action_dim}), got "
                             f"{tuple(actions.shape)} {actions.dtype}")
        benchmark = None if self._benchmark is None else self._benchmark.index_select(0, self.t)
        if hold is not None:
            hold = torch.as_tensor(hold, dtype=torch.bool, device=self.device).reshape(self.num_envs)
        shadow_hold = None
        if benchmark is not None:  # a tilt around the benchmark's weights (tilt_base)
            if actions.shape[1] != self.action_dim:
                raise ValueError(f"step: expected tilts of width {self.action_dim}, got {actions.shape[1]}")
            actions = actions.to(torch.float64)
            if self.anchor.drifts:  # a zero tilt holds where the account *is* the benchmark's (shares and cash)
                shadow_hold = self._shadow_holds()
                zero_hold = (shadow_hold & (actions == 0).all(-1) & (self.shares == self.shadow.shares).all(-1)
                             & (self.cash == self.shadow.cash))
                hold = zero_hold if hold is None else hold | zero_hold
            actions = project_to_simplex(self._tilt_base(benchmark, shadow_hold) + actions)
        weights = check_weights(actions.to(torch.float64), self.allocation, self.gross_limit, self.invalid_weights,
                                self.num_assets)
        next_t = self.t + 1
        price = self.fill.index_select(0, next_t)
        if self._fill_arrays is None:
            half, eta, cap = self._flat_inputs
        else:  # the decision bar's spread and impact estimates, the fill's cap
            half, eta, cap = (a.index_select(0, self.t) for a in self._fill_arrays)
        fill = portfolio_fill(self.cash, self.shares, price, weights, self.costs, half, eta, cap, hold)
        cash = fill.cash
        if self._borrow_per_share is not None:  # on the shares held over bar t + 1 (module doc)
            held = self.shares if self._borrow_on_held else fill.shares
            cash = cash - (held.neg().clamp_min(0.0) * self._borrow_per_share.index_select(0, next_t)).sum(-1)
        equity = cash + (fill.shares * self.close.index_select(0, next_t)).sum(-1)
        reward = torch.log(equity.clamp_min(_MIN_EQUITY) / self.equity)
        extra = {}
        if self.shadow is not None:  # the benchmark's account: the same prices, costs and cost inputs
            shadow = self.shadow
            target = check_weights(benchmark, "long_only", 1.0, "refuse", self.num_assets)
            # The benchmark's own clock alone: a caller's hold never cancels its re-target.
            bench = portfolio_fill(shadow.cash, shadow.shares, price, target, self.costs, half, eta, cap, shadow_hold)
            bench_return = shadow.log_return(bench.cash, bench.shares, self.close.index_select(0, next_t))
            if self.anchor.excess_reward:
                reward = reward - bench_return
            extra["benchmark_equity"] = shadow.equity
        at_price = self.cash + (self.shares * price).sum(-1)
        turnover = (fill.delta.abs() * price).sum(-1) / at_price
        steps = self.steps + 1
        terminated = equity <= self.ruin_fraction
        truncated = (steps >= self.episode_length) & ~terminated
        done = terminated | truncated
        self.cash, self.shares, self.equity, self.t, self.steps = cash, fill.shares, equity, next_t, steps
        obs = self._observe(self.t, self.cash, self.shares)
        if hold is not None:  # a held account's weights are its own at the fill prices, not the ignored targets
            weights = torch.where(hold[:, None], asset_weights(self.cash, self.shares, price)[:, :self.num_assets],
                                  weights)
        info = {"equity": equity, "weights": weights, "cost": fill.cost, "turnover": turnover, "final_obs": obs,
                "done": done, **extra}
        if self._fill_arrays is not None:
            info["capped"] = fill.capped
        if bool(done.any()):
            info["final_obs"] = obs.clone()
            self._reset_done(done)
            obs[done] = self._observe(self.t[done], self.cash[done], self.shares[done])
        return obs, reward, terminated, truncated, info

    def _reset_done(self, done: torch.Tensor) -> None:
        # Out of place: tensors handed to the caller (info["equity"]) must not change.
        self.t = torch.where(done, self._sample_starts(self.num_envs), self.t)
        self.steps = torch.where(done, 0, self.steps)
        one = torch.ones_like(self.cash)
        self.cash = torch.where(done, one, self.cash)
        self.shares = torch.where(done[:, None], 0.0 * self.shares, self.shares)
        self.equity = torch.where(done, one, self.equity)
        if self.shadow is not None:
            self.shadow.reset(done)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that evolves while stepping (episode positions, accounts, generator), for resuming."""
        state = {name: getattr(self, name).detach().cpu().clone() for name in ("t", "steps", "cash", "shares",
                                                                               "equity")}
        state["generator"] = self.generator.get_state()
        if self.shadow is not None:
            state.update(self.shadow.state_dict())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Restore :meth:`state_dict` output; return the current observation to continue from."""
        if state["shares"].shape != (self.num_envs, self.num_assets):
            raise ValueError(f"env state holds accounts of shape {tuple(state['shares'].shape)}, this env runs "
                             f"({self.num_envs}, {self.num_assets})")
        for name in ("t", "steps", "cash", "shares", "equity"):
            setattr(self, name, state[name].to(self.device).clone())
        self.generator.set_state(state["generator"])
        if self.shadow is not None:
            self.shadow.load_state_dict(state, self.device)
        return self._observe(self.t, self.cash, self.shares)
