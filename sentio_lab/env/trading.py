"""Trading environments: a batched torch env for training and a plain-numpy gymnasium env as reference.

Timing (see ARCHITECTURE.md), the same in both environments:

* the observation at step t is built from bars ``<= t`` (bar t has closed);
* the action chosen at step t is a *target position level*, filled at the **open of bar t+1** (the default,
  ``MarketArrays.fill_price == "next_open"``) or at the **close of bar t+1** (``"next_close"``: for close-only data
  and ranges whose opens cannot be trusted; the position decided at t then earns nothing of bar t+1's move);
* a short held over bar t+1 pays borrow at its close when ``costs.borrow_bps > 0`` (see ``sentio_lab.env.costs``): the
  position filled at its open, or, with next-close fills, the position held before that close's fill;
* equity is marked at the close of bar t+1 and the reward is ``log(equity_{t+1} / equity_t)``, net of costs;
* an episode ends by *truncation* after ``episode_length`` steps (PPO bootstraps there) or by
  *termination* when equity falls to ``ruin_fraction`` of its start (ruin).

Holding the same level trades nothing; changing level rebalances to the new target weight
(``costs.rebalance``). Observations are a window of the last ``window`` feature rows, flattened, plus the
current position level; optionally followed by token blocks (:class:`TokenBlock`: e.g. the last K completed bars
of a higher timeframe, gathered by precomputed indices) and the drawdown state ``(D_t, M_t)`` (``drawdown_obs``).
The layout, in this order, is :func:`observation_layout`.

Drawdown state (``drawdown_obs``): with ``peak_t`` the episode's highest marked equity so far (starting at 1),
``D_t = 1 - equity_t / peak_t`` and ``M_t = max_{s<=t} D_s``. ``info["drawdown_cost"]`` of a step is
``M_{t+1} - M_t >= 0``; over an episode these costs sum to its maximum drawdown (telescoping, ``M_0 = 0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sentio_lab.env.anchor import AnchorConfig, anchored_targets, benchmark_targets
from sentio_lab.env.arrays import (
    _ANCHOR_STATE,
    _MIN_EQUITY,
    DEFAULT_POSITIONS,
    WINDOW_MATRIX_MAX_BYTES,
    MarketArrays,
    StartSampler,
    _anchor_blocks,
    _bad_actions_error,
    _borrow_years,
    check_positions,
    check_ruin_fraction,
    episode_start_bounds,
    fill_arrays,
)
from sentio_lab.env.costs import (
    CostModel,
    execute,
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


class TradingEnv:
    """``num_envs`` episodes stepped together by tensor operations, on CPU or CUDA.

    ``step`` auto-resets finished episodes (random window inside the range) and returns the final
    observation of each finished episode in ``info["final_obs"]`` so PPO can bootstrap truncations.

    Staggered starts (``stagger_starts``, on by default): a random-start :meth:`reset` shortens each env's
    first episode by its own offset, uniform in ``[0, episode_length)`` and drawn from the env's generator,
    by starting that env's step counter at the offset. Episodes then end on different steps and a rollout
    mixes episode phases instead of every env truncating on the same step. Later episodes (auto-resets)
    run the full length; ``reset(starts=...)`` (evaluation) never staggers. ``steps`` therefore counts the
    steps towards truncation, not the steps taken.

    Segments (``start_sampler``, e.g. :class:`sentio_lab.env.splits.SegmentEpisodeSampler` over a CPCV fold's
    training ranges): every start -- the first reset, every auto-reset and every given start -- is one of the
    sampler's valid starts, so no episode crosses a gap between segments. The sampler draws from the env's
    generator (resuming by :meth:`state_dict` stays exact); its window and episode length must be the env's.

    Masks (``masks``, :mod:`sentio_lab.env.masks`): :meth:`action_masks` gives the valid levels of the decision the
    next :meth:`step` takes (after an auto-reset: the new episode's first); ``step`` enforces them for every
    policy (``invalid_action``: ``"refuse"`` raises, ``"nearest"`` maps to the nearest valid level, ties towards
    flat). ``mask_counts`` / ``mask_binding`` count per rule the chosen actions it masked / the decisions where it
    masked any level. The mask state is part of :meth:`state_dict`. ``masks=None`` is the unmasked env, unchanged.
    """

    def __init__(
        self,
        market: MarketArrays,
        *,
        num_envs: int = 8,
        window: int = 32,
        episode_length: int = 256,
        start: int = 0,
        stop: int | None = None,
        positions: Sequence[float] = DEFAULT_POSITIONS,
        costs: CostModel = CostModel(),
        ruin_fraction: float = 0.05,
        device: str | torch.device = "cpu",
        seed: int = 0,
        stagger_starts: bool = True,
        start_sampler: StartSampler | None = None,
        masks: MaskConfig | None = None,
        invalid_action: InvalidAction = "nearest",
        mask_inputs: MaskInputs | None = None,
        token_blocks: Sequence[TokenBlock] = (),
        drawdown_obs: bool = False,
        anchor: AnchorConfig | None = None,
    ) -> None:
        """Build the env on bars ``[start, stop)`` of ``market`` (episodes from ``start_sampler`` when given,
        whose starts must lie inside that range); tensors live on ``device``. ``mask_inputs`` overrides the
        series the mask rules read (required for the GARCH forecast: fitted on the training range).
        ``token_blocks`` and ``drawdown_obs`` extend the observation (module doc, :func:`observation_layout`).
        ``anchor`` makes the actions tilts around a benchmark weight (:mod:`sentio_lab.env.anchor`)."""
        token_blocks = _anchor_blocks(market, token_blocks, anchor, masks)
        stop = len(market.close) if stop is None else stop
        self.start_low, self.start_high = episode_start_bounds(market, window, start, stop, episode_length)
        self.start_sampler = start_sampler
        if start_sampler is not None:
            if (start_sampler.window, start_sampler.episode_length) != (window, episode_length):
                raise ValueError(
                    f"start_sampler is sized for window {start_sampler.window}, episode_length "
                    f"{start_sampler.episode_length}; this env has window {window}, episode_length {episode_length}"
                )
            low, high = start_sampler.start_low, start_sampler.start_high
            if low < self.start_low or high > self.start_high:
                raise ValueError(
                    f"start_sampler starts [{low}, {high}] leave the env's valid starts [{self.start_low}, "
                    f"{self.start_high}] (warm-up {market.first_valid} bars, range [{start}, {stop}))"
                )
            self.start_low, self.start_high = low, high
        self.num_envs, self.window, self.episode_length = num_envs, window, episode_length
        self.costs, self.ruin_fraction, self.stagger_starts = costs, check_ruin_fraction(ruin_fraction), stagger_starts
        self.device = torch.device(device)
        self.num_features = market.features.shape[1]
        self.token_blocks, self.drawdown_obs = tuple(token_blocks), drawdown_obs
        self.obs_layout = observation_layout(self.num_features, window, self.token_blocks, drawdown_obs)
        self.obs_dim = observation_dim(self.obs_layout)
        self.num_actions = len(positions) if anchor is None else len(anchor.tilts)
        dev, f64 = self.device, torch.float64
        self._tokens = []
        for block in check_token_blocks(self.token_blocks, len(market.close)):
            self._tokens.append((torch.tensor(block.table, dtype=torch.float32, device=dev),
                                 torch.tensor(block.index, dtype=torch.long, device=dev)))
        self.positions = torch.as_tensor(check_positions(positions), dtype=f64, device=dev)
        # Fills of decision t happen at bar t + 1's open or close (market.fill_price); marks at its close.
        self.fill = torch.tensor(market.fill, dtype=f64, device=dev)
        self.close = torch.tensor(market.close, dtype=f64, device=dev)
        self._borrow_on_held = market.fill_price == "next_close"
        self.features = torch.tensor(market.features, dtype=torch.float32, device=dev)
        # Borrow per short share at each bar's close (None when shorts pay nothing: the step skips it).
        years = _borrow_years(market, costs)
        self._borrow_per_share = (
            None if years is None else torch.tensor(costs.borrow_rate * years * market.close, dtype=f64, device=dev)
        )
        # Non-flat cost models: per decision bar the half-spread, impact coefficient and fill cap (None: flat).
        arrays = fill_arrays(market, costs, self.start_low, stop - 1)
        self._fill_arrays = None if arrays is None else tuple(torch.tensor(a, dtype=f64, device=dev) for a in arrays)
        self._carry = costs.remainder == "carry" and costs.participation is not None
        self._window_offsets = torch.arange(-window + 1, 1, device=dev)
        # Row r of the window matrix is the flattened window ending at bar r + window - 1. Copying one
        # contiguous row per env is ~10x cheaper than a 2-D gather, at the price of window x the memory;
        # large banks (many features, long windows) keep the gather.
        self._window_matrix = None
        rows = len(market.close) - window + 1
        if rows * window * self.num_features * 4 <= WINDOW_MATRIX_MAX_BYTES:
            windows = self.features.unfold(0, window, 1).transpose(1, 2)  # (rows, window, F) view
            self._window_matrix = windows.reshape(rows, window * self.num_features).contiguous()
        self._flat_level = int(np.argmin(np.abs(np.asarray(positions, dtype=float))))
        self.anchor = anchor
        if anchor is not None:  # actions are tilts; the level an episode starts from is the zero tilt
            self._flat_level = anchor.zero_action
            self._anchor_bounds = anchor.bounds(check_positions(positions))
            self._benchmark = torch.tensor(anchor.benchmark, dtype=f64, device=dev)
            self._tilts = torch.tensor(anchor.tilts, dtype=f64, device=dev)
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(seed)
        zeros = torch.zeros(num_envs, dtype=f64, device=dev)
        self.t = torch.zeros(num_envs, dtype=torch.long, device=dev)
        self.steps = torch.zeros_like(self.t)
        self.level = torch.full_like(self.t, self._flat_level)
        self.cash, self.shares, self.equity = zeros.clone(), zeros.clone(), zeros.clone()
        self.peak, self.max_drawdown = zeros + 1.0, zeros.clone()
        self.pending = torch.zeros(num_envs, dtype=torch.bool, device=dev)
        self._reset_anchor(torch.ones_like(self.pending))
        self.masker = make_masker(market.close, market.features, np.asarray(positions, dtype=np.float64), masks,
                                  mask_inputs, num_envs, invalid_action, dev)

    @property
    def _state_names(self) -> tuple[str, ...]:
        names = ("t", "steps", "level", "cash", "shares", "equity")
        names = names + ("pending",) if self._carry else names
        names = names + ("peak", "max_drawdown") if self.drawdown_obs else names
        return names + _ANCHOR_STATE if self.anchor is not None else names

    # ----------------------------------------------------------------------------------- observations
    def _observe(self, t: torch.Tensor, level: torch.Tensor, envs: torch.Tensor | None = None) -> torch.Tensor:
        if self._window_matrix is not None:
            rows = self._window_matrix.index_select(0, t - (self.window - 1))
        else:  # (N, window, F): bars t-window+1 .. t, flattened
            rows = self.features[t[:, None] + self._window_offsets].reshape(len(t), -1)
        if self.anchor is None:
            position = self.positions.index_select(0, level).to(torch.float32)[:, None]
        else:  # the weight held (``envs``: a bool subset, as after auto-resets)
            position = (self.held if envs is None else self.held[envs]).to(torch.float32)[:, None]
        if not self._tokens and not self.drawdown_obs:
            return torch.cat([rows, position], dim=1)
        parts = [rows, position]
        for table, index in self._tokens:  # (N, K) rows of the table -> (N, K * d)
            parts.append(table[index.index_select(0, t)].reshape(len(t), -1))
        if self.drawdown_obs:  # (D_t, M_t) of the observed envs (``envs``: a bool subset, as after auto-resets)
            state = torch.stack([1.0 - self.equity / self.peak, self.max_drawdown], dim=1)
            parts.append((state if envs is None else state[envs]).to(torch.float32))
        return torch.cat(parts, dim=1)

    def _sample_starts(self, n: int) -> torch.Tensor:
        if self.start_sampler is not None:  # one draw from the env's generator: state_dict resumes exactly
            return self.start_sampler.sample(n, self.generator).to(self.device)
        return torch.randint(
            self.start_low, self.start_high + 1, (n,), generator=self.generator, device=self.device
        )

    # ------------------------------------------------------------------------------------------- API
    def reset(self, starts: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Start every episode, at ``starts`` (bar indices, one per env) or at random valid bars (from the
        ``start_sampler`` when there is one: given starts must then be valid starts of its segments).

        Random starts are staggered when ``stagger_starts`` (see the class doc); given ``starts`` never are.
        """
        steps = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        if starts is None:
            t0 = self._sample_starts(self.num_envs)
            if self.stagger_starts:
                steps = torch.randint(
                    0, self.episode_length, (self.num_envs,), generator=self.generator, device=self.device
                )
        else:
            t0 = torch.as_tensor(starts, dtype=torch.long, device=self.device).reshape(-1)
            if len(t0) != self.num_envs:
                raise ValueError(f"reset: {len(t0)} starts given for {self.num_envs} envs")
            bad = (t0 < self.start_low) | (t0 > self.start_high)
            if bad.any():
                raise ValueError(
                    f"reset: starts {t0[bad].tolist()} outside the valid range [{self.start_low}, {self.start_high}]"
                )
            if self.start_sampler is not None:
                bad = ~self.start_sampler.contains(t0)
                if bad.any():
                    raise ValueError(f"reset: starts {t0[bad].tolist()} are no valid start of the sampler's segments")
        # Fresh tensors, not in-place fills: the previous step's info["equity"] is self.equity itself.
        self.t = t0.clone()
        self.steps = steps
        self.level = torch.full_like(self.t, self._flat_level)
        self.cash = torch.ones(self.num_envs, dtype=torch.float64, device=self.device)
        self.shares = torch.zeros_like(self.cash)
        self.equity = torch.ones_like(self.cash)
        self.peak, self.max_drawdown = torch.ones_like(self.cash), torch.zeros_like(self.cash)
        self.pending = torch.zeros_like(self.t, dtype=torch.bool)
        self._reset_anchor(torch.ones_like(self.pending))
        if self.masker is not None:
            self.masker.reset_where(torch.ones_like(self.t, dtype=torch.bool))
        return self._observe(self.t, self.level)

    def action_masks(self) -> torch.Tensor:
        """Bool ``(num_envs, num_actions)``: the levels the next :meth:`step` may choose (all without masks)."""
        if self.masker is None:
            return torch.ones(self.num_envs, self.num_actions, dtype=torch.bool, device=self.device)
        return self.masker.action_masks(self.t, self.level, self.equity)

    @property
    def mask_counts(self) -> dict[str, int]:
        """Per active rule: how many chosen actions it masked (refused or remapped), since construction."""
        return {} if self.masker is None else self.masker.counts("counts")

    @property
    def mask_binding(self) -> dict[str, int]:
        """Per active rule: in how many decisions it masked at least one level."""
        return {} if self.masker is None else self.masker.counts("binding")

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Apply one target level per env; return (obs, reward, terminated, truncated, info).

        ``info`` holds ``equity`` (marked at the new bar's close, before any auto-reset), ``final_obs``
        (the observation an ended episode would have seen next; equal to ``obs`` for running ones) and
        ``done`` (terminated | truncated). ``actions`` are integer level indices (a float tensor is a
        TypeError); an index outside ``[0, num_actions)`` is a ValueError raised before any state changes.
        """
        actions = torch.as_tensor(actions, device=self.device)
        if actions.shape != self.t.shape:
            raise ValueError(f"step: expected actions of shape ({self.num_envs},), got {tuple(actions.shape)}")
        if actions.is_floating_point() or actions.is_complex():
            raise TypeError(f"step: actions must be integer level indices, got dtype {actions.dtype}")
        actions = actions.to(torch.long)
        # Out-of-range indices are clamped for the gathers (on CUDA a bad index is an unrecoverable device-side
        # assert) and reported below, in the one host sync the step needs anyway, before any state changes.
        bad = (actions < 0) | (actions >= self.num_actions)
        level = actions.clamp(0, self.num_actions - 1)  # a new tensor: the caller's must not move
        if self.masker is not None:  # apply() sees clamped levels; "refuse" checks the range first (it may raise)
            if self.masker.invalid_action == "refuse" and bool(bad.any()):
                raise _bad_actions_error(actions[bad], self.num_actions)
            level = self.masker.apply(level, self.t, self.level, self.equity)  # its counts commit in update()
        next_t = self.t + 1
        if self.anchor is None:
            weights, changed = self.positions.index_select(0, level), level != self.level
        else:  # target = clip(b_t + tilt), held inside the no-trade band (sentio_lab.env.anchor)
            b_t = self._benchmark.index_select(0, self.t)
            lo, hi = self._anchor_bounds
            weights, changed, deviation = anchored_targets(b_t, self._tilts.index_select(0, level), self.held, lo,
                                                           hi, self.anchor.no_trade_band)
        cash, shares, equity, fill = self._account_step(self.cash, self.shares, weights, changed, self.pending)
        reward = torch.log(equity.clamp_min(_MIN_EQUITY) / self.equity)
        if self.anchor is not None:
            reward = self._anchor_step(reward, b_t, deviation)
        steps = self.steps + 1
        terminated = equity <= self.ruin_fraction
        truncated = (steps >= self.episode_length) & ~terminated
        done = terminated | truncated
        any_bad, any_done = torch.stack([bad.any(), done.any()]).tolist()
        if any_bad:
            raise _bad_actions_error(actions[bad], self.num_actions)
        if self.masker is not None:
            self.masker.update(changed, equity, steps)
        drawdown_cost = None
        if self.drawdown_obs:  # M_{t+1} - M_t (module doc); out of place like every state update
            peak = torch.maximum(self.peak, equity)
            max_drawdown = torch.maximum(self.max_drawdown, 1.0 - equity / peak)
            drawdown_cost = max_drawdown - self.max_drawdown
            self.peak, self.max_drawdown = peak, max_drawdown
        self.cash, self.shares, self.level = cash, shares, level
        self.equity, self.t, self.steps = equity, next_t, steps
        if self.anchor is not None:
            self.held = weights
        if self._carry:
            self.pending = fill.capped
        obs = self._observe(self.t, self.level)
        info = {"equity": equity, "final_obs": obs, "done": done}
        if fill is not None:  # the fill record: shares traded, price concession, whether the cap bound
            info["fill"] = {"delta": fill.delta, "rate": fill.rate, "capped": fill.capped, "requested": fill.requested}
        if drawdown_cost is not None:
            info["drawdown_cost"] = drawdown_cost
        if self.anchor is not None:  # the weight filled (held), its tilt from b_t and the benchmark's own account
            info.update(weight=weights, tilt=deviation, benchmark_equity=self.bench_equity)
        if any_done:
            info["final_obs"] = obs.clone()
            self._reset_done(done)
            obs[done] = self._observe(self.t[done], self.level[done], done)
        return obs, reward, terminated, truncated, info

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that evolves while stepping (episode positions, accounts, generator), for resuming."""
        state = {name: getattr(self, name).detach().cpu().clone() for name in self._state_names}
        state["generator"] = self.generator.get_state()
        if self.masker is not None:
            state.update({f"mask:{k}": v for k, v in self.masker.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Restore :meth:`state_dict` output; return the current observation to continue from."""
        if len(state["t"]) != self.num_envs:
            raise ValueError(f"env state holds {len(state['t'])} episodes, this env runs {self.num_envs}")
        missing = [name for name in self._state_names if name not in state]
        if missing:
            raise ValueError(f"env state lacks {missing} (saved by an env without drawdown_obs?)")
        for name in self._state_names:
            setattr(self, name, state[name].to(self.device).clone())
        self.generator.set_state(state["generator"])
        mask_state = {k[5:]: v for k, v in state.items() if k.startswith("mask:")}
        if self.masker is not None:
            self.masker.load_state_dict(mask_state)
        elif mask_state:
            raise ValueError("env state holds mask-rule state, but this env has no masks (build it with masks=)")
        return self._observe(self.t, self.level)

    def _reset_done(self, done: torch.Tensor) -> None:
        # Out of place: tensors already handed to the caller (equity in info) must not change.
        self.t = torch.where(done, self._sample_starts(self.num_envs), self.t)
        self.steps = torch.where(done, 0, self.steps)
        self.level = torch.where(done, self._flat_level, self.level)
        one = torch.ones_like(self.cash)
        self.cash = torch.where(done, one, self.cash)
        self.shares = torch.where(done, 0.0 * one, self.shares)
        self.equity = torch.where(done, one, self.equity)
        self.pending = self.pending & ~done
        if self.drawdown_obs:
            self.peak = torch.where(done, one, self.peak)
            self.max_drawdown = torch.where(done, 0.0 * one, self.max_drawdown)
        self._reset_anchor(done)
        if self.masker is not None:
            self.masker.reset_where(done)

    # ------------------------------------------------------------------------------------ fills, anchoring
    def _account_step(self, cash: torch.Tensor, shares: torch.Tensor, weights: torch.Tensor, trade: torch.Tensor,
                      pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """Fill ``weights`` on bar t + 1 where ``trade`` (or a carried remainder), charge borrow, mark at its close:
        ``(cash, shares, equity, fill record or None)``. The agent's account and the benchmark's shadow one."""
        next_t = self.t + 1
        price = self.fill.index_select(0, next_t)
        before, fill = shares, None
        if self._fill_arrays is None:
            cash, shares, _ = rebalance(cash, shares, price, weights, trade, self.costs)
        else:  # spread / impact / cap: the decision bar's estimates, the fill bar's cap (sentio_lab.env.costs)
            half, eta, cap = (a.index_select(0, self.t) for a in self._fill_arrays)
            fill = execute(cash, shares, price, weights, trade | pending, self.costs, half, eta, cap)
            cash, shares = fill.cash, fill.shares
        if self._borrow_per_share is not None:  # on the shares held over bar t + 1 (module doc)
            held = before if self._borrow_on_held else shares
            cash = cash - held.neg().clamp_min(0.0) * self._borrow_per_share.index_select(0, next_t)
        return cash, shares, cash + shares * self.close.index_select(0, next_t), fill

    def _anchor_step(self, reward: torch.Tensor, b_t: torch.Tensor, deviation: torch.Tensor) -> torch.Tensor:
        """Step the benchmark's shadow account; return the reward with the anchor's options applied."""
        lo, hi = self._anchor_bounds
        target, trade = benchmark_targets(b_t, self.bench_held, lo, hi)
        cash, shares, equity, fill = self._account_step(self.bench_cash, self.bench_shares, target, trade,
                                                        self.bench_pending)
        # Ruin of the shadow account (leverage, or a short held through a rally, can take it to <= 0): from the bar
        # its mark falls to the floor it is flat at the floor and trades nothing more (sentio_lab.env.anchor).
        # (No host sync: torch.where on every step.)
        ruined = (self.bench_equity <= _MIN_EQUITY) | (equity <= _MIN_EQUITY)
        floor = torch.full_like(equity, _MIN_EQUITY)
        cash, equity = torch.where(ruined, floor, cash), torch.where(ruined, floor, equity)
        shares, target = torch.where(ruined, 0.0, shares), torch.where(ruined, 0.0, target)
        if self.anchor.excess_reward:
            reward = reward - torch.log(equity / self.bench_equity)
        if self.anchor.deviation_penalty:
            reward = reward - self.anchor.deviation_penalty * deviation.square()
        self.bench_cash, self.bench_shares, self.bench_held, self.bench_equity = cash, shares, target, equity
        if self._carry:
            self.bench_pending = fill.capped & ~ruined
        return reward

    def _reset_anchor(self, done: torch.Tensor) -> None:
        """Flat, equity 1: the held weight and the benchmark's shadow account of the episodes ``done``."""
        if self.anchor is None:
            return
        zero = torch.zeros(self.num_envs, dtype=torch.float64, device=self.device)
        if done.all():
            self.held, self.bench_held, self.bench_shares = zero, zero.clone(), zero.clone()
            self.bench_cash, self.bench_equity = zero + 1.0, zero + 1.0
            self.bench_pending = torch.zeros_like(done)
            return
        self.held = torch.where(done, zero, self.held)
        self.bench_held = torch.where(done, zero, self.bench_held)
        self.bench_shares = torch.where(done, zero, self.bench_shares)
        self.bench_cash = torch.where(done, zero + 1.0, self.bench_cash)
        self.bench_equity = torch.where(done, zero + 1.0, self.bench_equity)
        self.bench_pending = self.bench_pending & ~done
