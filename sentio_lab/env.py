"""Trading environments: a batched torch env for training and a plain-numpy gymnasium env as reference.

Timing (see ARCHITECTURE.md), the same in both environments:

* the observation at step t is built from bars ``<= t`` (bar t has closed);
* the action chosen at step t is a *target position level*, filled at the **open of bar t+1** (the default,
  ``MarketArrays.fill_price == "next_open"``) or at the **close of bar t+1** (``"next_close"``: for close-only data
  and ranges whose opens cannot be trusted; the position decided at t then earns nothing of bar t+1's move);
* a short held over bar t+1 pays borrow at its close when ``costs.borrow_bps > 0`` (see ``sentio_lab.costs``): the
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
from dataclasses import dataclass
from typing import Literal, Protocol

import gymnasium as gym
import numpy as np
import pandas as pd
import torch

from sentio_lab.anchor import AnchorConfig, anchored_targets, benchmark_targets
from sentio_lab.costs import (
    CostModel,
    bars_per_day,
    borrow_cost,
    cost_inputs,
    execute,
    fill_cap,
    fill_reason,
    impact_eta,
    rebalance,
    year_fractions,
)
from sentio_lab.masks import InvalidAction, MaskConfig, MaskInputs, make_masker
from sentio_lab.observation_layout import (
    TokenBlock,
    check_token_blocks,
    observation_dim,
    observation_layout,
)

#: Where the order decided at the close of bar t fills: the open of bar t+1 (default) or the close of bar t+1.
FillPrice = Literal["next_open", "next_close"]
#: The accepted values of ``fill_price`` (``--fill-price``).
FILL_PRICES: tuple[str, ...] = ("next_open", "next_close")
#: Default action levels: short, flat, long (fractions of equity).
DEFAULT_POSITIONS: tuple[float, ...] = (-1.0, 0.0, 1.0)
#: Above this size the observation windows are gathered per step instead of precomputed (see TradingEnv).
WINDOW_MATRIX_MAX_BYTES = 256 * 2**20
#: Equity is floored here inside the log so a ruinous bar gives a large finite penalty, not -inf / NaN.
_MIN_EQUITY = 1e-12


@dataclass(frozen=True)
class MarketArrays:
    """What both environments read: prices and the (already normalised, causal) feature matrix."""

    open: np.ndarray
    """float64 (T,) bar opens: fills happen here with ``fill_price="next_open"`` (NaN allowed with next_close)."""
    close: np.ndarray
    """float64 (T,) bar closes: equity is marked here."""
    features: np.ndarray
    """float32 (T, F); row t depends on bars <= t only; finite from ``first_valid`` on."""
    first_valid: int = 0
    """First row whose features are defined (after indicator warm-up)."""
    year_fraction: np.ndarray | None = None
    """float64 (T,) or None: calendar time from bar t-1's close to bar t's close in 365-day years (entry 0
    is 0; :func:`sentio_lab.costs.year_fractions`). Needed only to charge short borrow; None without timestamps."""
    high: np.ndarray | None = None
    """float64 (T,) bar highs, or None: read by the spread estimators only."""
    low: np.ndarray | None = None
    """float64 (T,) bar lows, or None: read by the spread estimators only."""
    volume: np.ndarray | None = None
    """float64 (T,) bar volumes, or None: read by impact (ADV) and participation caps only, never observed."""
    bars_per_day: float | np.ndarray = 1.0
    """Bars per calendar day known at each bar (float64 (T,), :func:`sentio_lab.costs.bars_per_day`: causal), or
    one number for every bar: scales sigma_daily and ADV."""
    volume_kind: str = "quantity"
    """What ``volume`` counts: "quantity" (units traded) or "ticks" (FX tick volume: no quantity, so impact and
    caps need a user-given ADV, ``CostModel.adv``)."""
    fill_price: FillPrice = "next_open"
    """Where the order decided at bar t's close fills: ``"next_open"`` (bar t+1's open) or ``"next_close"`` (bar
    t+1's close, the price it is marked at: the position decided at t earns from that close on)."""

    @property
    def fill(self) -> np.ndarray:
        """float64 (T,) the price a fill *on* bar t happens at: :attr:`open` or :attr:`close` (``fill_price``)."""
        return self.close if self.fill_price == "next_close" else self.open

    @classmethod
    def from_frame(cls, frame, features: np.ndarray, first_valid: int = 0, volume_kind: str = "quantity",
                   fill_price: FillPrice = "next_open") -> MarketArrays:
        """Take opens, closes and bar times from a canonical OHLCV frame (``sentio_lab.data``) beside its features.

        ``year_fraction`` comes from the frame's DatetimeIndex (None if the index holds no timestamps).
        """
        index = frame.index
        return cls(
            open=frame["open"].to_numpy(dtype=np.float64),
            close=frame["close"].to_numpy(dtype=np.float64),
            features=np.ascontiguousarray(features, dtype=np.float32),
            first_valid=first_valid,
            year_fraction=year_fractions(index) if isinstance(index, pd.DatetimeIndex) else None,
            **{c: frame[c].to_numpy(dtype=np.float64) for c in ("high", "low", "volume") if c in frame.columns},
            bars_per_day=bars_per_day(index if isinstance(index, pd.DatetimeIndex) else None, len(frame)),
            volume_kind=volume_kind,
            fill_price=fill_price,
        )

    def __post_init__(self) -> None:
        """Check shapes and finiteness once, so the step loop never has to."""
        n = len(self.close)
        if self.open.shape != (n,) or self.features.ndim != 2 or self.features.shape[0] != n:
            raise ValueError(
                f"MarketArrays: open {self.open.shape}, close {self.close.shape} and features "
                f"{self.features.shape} must share their first dimension"
            )
        if self.fill_price not in FILL_PRICES:
            raise ValueError(f"MarketArrays: fill_price={self.fill_price!r}; choose from {list(FILL_PRICES)}")
        if not (0 <= self.first_valid < n):
            raise ValueError(f"MarketArrays: first_valid={self.first_valid} outside [0, {n})")
        bad = ~np.isfinite(self.features[self.first_valid :]).all(axis=1)
        if bad.any():
            raise ValueError(
                f"MarketArrays: non-finite features at rows {np.flatnonzero(bad)[:5] + self.first_valid}"
            )
        for name in ("high", "low", "volume"):
            column = getattr(self, name)
            if column is not None and np.shape(column) != (n,):
                raise ValueError(f"MarketArrays: {name} must be ({n},), got {np.shape(column)}")
        if self.year_fraction is not None:
            years = np.asarray(self.year_fraction)
            if years.shape != (n,) or years.dtype != np.float64:
                raise ValueError(f"MarketArrays: year_fraction must be float64 ({n},), got {years.dtype} {years.shape}")
            bad = ~(np.isfinite(years) & (years >= 0))
            if bad.any():
                raise ValueError(
                    f"MarketArrays: negative or non-finite year_fraction at rows {np.flatnonzero(bad)[:5]}"
                )


def _borrow_years(market: MarketArrays, costs: CostModel) -> np.ndarray | None:
    """The market's year fractions when shorts pay borrow, None when they do not; raises if they are missing."""
    if costs.borrow_rate == 0.0:
        return None
    if market.year_fraction is None:
        raise ValueError(
            f"costs.borrow_bps={costs.borrow_bps} needs bar timestamps, but MarketArrays.year_fraction is None "
            "(build the market with MarketArrays.from_frame on a DatetimeIndex, or pass year_fraction=)"
        )
    return market.year_fraction


def fill_arrays(market: MarketArrays, costs: CostModel, first: int = 0, last: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per decision bar t: (half-spread, impact eta, fill cap of the fill at t + 1) for a non-flat ``costs``
    (:mod:`sentio_lab.costs.execution`); None for the flat model. Raises if an estimate the decisions
    ``first .. last - 1`` need is undefined (too few bars before ``first``) or the market lacks a column."""
    if costs.is_flat:
        return None
    if market.volume_kind == "ticks" and costs.needs_volume and costs.volume != "ticks":
        raise ValueError(
            "this market's volume is tick volume (FX), not traded quantity: impact or a participation cap cannot "
            "read it; give the average daily volume in currency (CostModel.adv, --adv; caps: cap_volume='forecast')"
        )
    inputs = cost_inputs(costs, market.high, market.low, market.close, market.volume, market.bars_per_day)
    half = inputs.half_spread
    eta = impact_eta(costs, inputs.sigma, inputs.adv)
    # the fill of decision t happens on bar t + 1: its open (or close), its volume (the env's execution, never
    # observed)
    fill_price, fill_volume = np.r_[market.fill[1:], np.nan], np.r_[inputs.volume[1:], 0.0]
    cap = fill_cap(costs, fill_price, fill_volume, inputs.adv, inputs.per_day)
    last = len(market.close) - 1 if last is None else last
    used = slice(first, last)
    checks = [("half-spread", half)]
    if costs.impact != "none" or (costs.participation is not None and costs.cap_volume == "forecast"):
        checks += [("sigma_daily", inputs.sigma if costs.impact != "none" else half), ("ADV", inputs.adv)]
    for name, values in checks:
        bad = np.isnan(values[used])
        if bad.any():
            bar = first + int(np.flatnonzero(bad)[0])
            raise ValueError(f"cost model: the {name} estimate is undefined at decision bar {bar} (too few earlier "
                             "bars for the estimator): start later")
    return half, eta, cap


def episode_start_bounds(
    market: MarketArrays, window: int, start: int, stop: int, episode_length: int
) -> tuple[int, int]:
    """Inclusive range of valid episode starts inside bars ``[start, stop)``.

    The first observation needs ``window`` defined feature rows (they may lie before ``start``: that is
    the past, not a leak); the last step fills and marks on bar ``t0 + episode_length`` which must be < stop.
    """
    lo = max(start, market.first_valid + window - 1)
    hi = stop - 1 - episode_length
    if not (0 <= start < stop <= len(market.close)):
        raise ValueError(f"range [{start}, {stop}) outside the market's {len(market.close)} bars")
    if hi < lo:
        raise ValueError(
            f"range [{start}, {stop}) is too short for episodes of {episode_length} steps with a "
            f"{window}-bar window after {market.first_valid} warm-up bars (need stop - 1 - length >= {lo})"
        )
    return lo, hi


def check_ruin_fraction(ruin_fraction: float) -> float:
    """Validate the ruin level: in [0, 1). Below 0 an episode could go on from a negative equity, whose log
    reward is undefined; at 1 or above the first loss would end every episode."""
    value = float(ruin_fraction)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"ruin_fraction must be in [0, 1) (a fraction of the starting equity), got {ruin_fraction}")
    return value


def check_positions(positions: Sequence[float]) -> np.ndarray:
    """Validate action levels: finite, distinct, and including 0 (flat), where every episode starts."""
    levels = np.asarray(positions, dtype=np.float64)
    if levels.ndim != 1 or len(levels) < 2 or not np.isfinite(levels).all() or len(set(levels)) != len(levels):
        raise ValueError(f"positions must be at least two distinct finite levels, got {tuple(positions)}")
    if 0.0 not in levels:
        raise ValueError(
            f"positions {tuple(positions)} lack the flat level 0: episodes start flat, and a start position "
            "the agent could not choose would make its first observation lie"
        )
    return levels


def _bad_actions_error(actions: torch.Tensor | np.ndarray, num_actions: int) -> ValueError:
    """The error of level indices outside ``[0, num_actions)``."""
    return ValueError(
        f"step: actions {list(actions.tolist())} outside [0, {num_actions}) (one level index per env); "
        "the env is unchanged"
    )


class StartSampler(Protocol):
    """Where episodes may start, for episodes confined to several disjoint segments of bars.

    :class:`sentio_lab.splits.SegmentEpisodeSampler` is the implementation: uniform over every valid start of
    every segment, so an episode (its observations, fills, marks and bootstrap value) never crosses a gap.
    """

    window: int
    episode_length: int

    @property
    def start_low(self) -> int:
        """Earliest valid start."""

    @property
    def start_high(self) -> int:
        """Latest valid start."""

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` valid starts drawn from ``generator`` (on its device)."""

    def contains(self, starts: torch.Tensor) -> torch.Tensor:
        """Boolean per start: is it a valid start?"""


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

    Segments (``start_sampler``, e.g. :class:`sentio_lab.splits.SegmentEpisodeSampler` over a CPCV fold's
    training ranges): every start -- the first reset, every auto-reset and every given start -- is one of the
    sampler's valid starts, so no episode crosses a gap between segments. The sampler draws from the env's
    generator (resuming by :meth:`state_dict` stays exact); its window and episode length must be the env's.

    Masks (``masks``, :mod:`sentio_lab.masks`): :meth:`action_masks` gives the valid levels of the decision the
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
        ``anchor`` makes the actions tilts around a benchmark weight (:mod:`sentio_lab.anchor`)."""
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
        if self.masker is not None:  # masks index by level: check the range first (one more sync, masks only)
            if bool(bad.any()):
                raise _bad_actions_error(actions[bad], self.num_actions)
            level = self.masker.apply(level, self.t, self.level, self.equity)
        next_t = self.t + 1
        if self.anchor is None:
            weights, changed = self.positions.index_select(0, level), level != self.level
        else:  # target = clip(b_t + tilt), held inside the no-trade band (sentio_lab.anchor)
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
        else:  # spread / impact / cap: the decision bar's estimates, the fill bar's cap (sentio_lab.costs)
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
        if self.anchor.excess_reward:
            reward = reward - torch.log(equity.clamp_min(_MIN_EQUITY) / self.bench_equity)
        if self.anchor.deviation_penalty:
            reward = reward - self.anchor.deviation_penalty * deviation.square()
        self.bench_cash, self.bench_shares, self.bench_held, self.bench_equity = cash, shares, target, equity
        if self._carry:
            self.bench_pending = fill.capped
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


#: State an anchored env adds (its :meth:`TradingEnv.state_dict`).
_ANCHOR_STATE = ("held", "bench_cash", "bench_shares", "bench_held", "bench_equity", "bench_pending")


def _anchor_blocks(market: MarketArrays, token_blocks: Sequence[TokenBlock], anchor: AnchorConfig | None,
                   masks: MaskConfig | None) -> tuple[TokenBlock, ...]:
    """The env's token blocks: ``token_blocks`` and, when anchored, the ``"benchmark"`` block (``b_t``) last."""
    if anchor is None:
        return tuple(token_blocks)
    if masks is not None:
        raise ValueError("anchor with masks: mask rules index fixed position levels, anchored weights move with the "
                         "benchmark; drop --masks or --anchor")
    anchor.check_market(len(market.close))
    return (*token_blocks, anchor.token_block())


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
        else:  # target = clip(b_t + tilt), held inside the no-trade band (sentio_lab.anchor)
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
        else:  # spread / impact / cap (sentio_lab.costs.execution); a capped order may carry to the next bar
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
        log_return = float(np.log(max(equity, _MIN_EQUITY) / account["equity"]))
        account.update(cash=cash, shares=shares, held=target, equity=equity)
        return log_return
