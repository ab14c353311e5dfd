"""Market arrays and the pieces both trading envs share: fill prices and times, the valid episode starts, the
checks of positions and ruin, and the token blocks an anchored env appends (module :mod:`sentio_lab.env.trading`
has the timing convention)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import pandas as pd
import torch

from sentio_lab.env.anchor import AnchorConfig
from sentio_lab.env.costs import (
    CostModel,
    bars_per_day,
    cost_inputs,
    fill_cap,
    impact_eta,
    year_fractions,
)
from sentio_lab.env.masks import MaskConfig
from sentio_lab.features.observation_layout import (
    TokenBlock,
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
    is 0; :func:`sentio_lab.env.costs.year_fractions`). Needed only to charge short borrow; None without timestamps."""
    high: np.ndarray | None = None
    """float64 (T,) bar highs, or None: read by the spread estimators only."""
    low: np.ndarray | None = None
    """float64 (T,) bar lows, or None: read by the spread estimators only."""
    volume: np.ndarray | None = None
    """float64 (T,) bar volumes, or None: read by impact (ADV) and participation caps only, never observed."""
    bars_per_day: float | np.ndarray = 1.0
    """Bars per calendar day known at each bar (float64 (T,), :func:`sentio_lab.env.costs.bars_per_day`: causal), or
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
    (:mod:`sentio_lab.env.costs.execution`); None for the flat model. Raises if an estimate the decisions
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

    :class:`sentio_lab.env.splits.SegmentEpisodeSampler` is the implementation: uniform over every valid start of
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

