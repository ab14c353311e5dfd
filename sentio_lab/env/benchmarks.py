"""The benchmark rules: a baseline's desired weight per bar from closes ``<= t``, and the anchor built from one.

These rules are what :mod:`sentio_lab.evaluation.baselines` trades as policies and what an anchored env
(:mod:`sentio_lab.env.anchor`) tilts around, so they live in the env stage: the training env of every variant builds
its anchor from them (:func:`anchor_config`), and evaluation imports them from here.

* ``buy_and_hold``: weight 1.
* ``sma_crossover``: long-flat, 1 while the 50-bar mean of closes is above the 200-bar mean, else 0.
* ``momentum``: time-series momentum, the sign of the return from 12 months ago to 1 month ago (Moskowitz,
  Ooi and Pedersen, 2012): +1 / -1, or long-flat with ``long_only=True``. Months are calendar months on the
  bar times (the last bar at or before ``ts_t - 12 months``); without times, ``bars_per_month`` bars.
* ``vol_target``: buy-and-hold scaled to the training range's volatility,
  ``clip(train_vol / forecast_vol_t, 0, max_level)``, with ``forecast_vol_t`` the EWMA (RiskMetrics,
  lambda 0.94) root mean square of log returns up to ``t`` and ``train_vol`` the root mean square of the
  training segments' log returns.

Causality: the weight at bar ``t`` reads closes ``t - span .. t`` (:meth:`Baseline.span`) and, for ``vol_target``,
the training segments; NaN until the signal is defined.

Level-valued or not: ``buy_and_hold``, ``sma_crossover`` and ``momentum`` want weights in {-1, 0, 1}, which the default
position set holds; ``vol_target`` wants any weight in ``[0, max_level]``. As a *baseline policy* a weight is rounded
to the nearest level of the position set; as an *anchor* it is traded as it is (clipped to the limits). So "a zero
tilt is the benchmark bit for bit" compares with the baseline policy only where every weight is a level
(:func:`on_levels`); elsewhere the anchored benchmark is the unrounded rule, the one
:func:`sentio_lab.evaluation.baselines.evaluate_anchor_benchmark` reports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from sentio_lab.env.anchor import DEFAULT_TILTS, AnchorConfig
from sentio_lab.env.arrays import check_positions
from sentio_lab.env.market import PreparedMarket

Segment = tuple[int, int]


@dataclass(frozen=True)
class PriceHistory:
    """What baselines read: closes, bar times and the training segments (for the volatility target)."""

    close: np.ndarray
    """float64 ``(T,)`` closes."""
    index: pd.DatetimeIndex | None
    """Bar times (None: calendar-free, months counted in bars)."""
    train: tuple[Segment, ...]
    """Training env ranges ``[start, stop)``."""

    @classmethod
    def from_market(cls, market: PreparedMarket, train: Sequence[Segment] | None = None) -> PriceHistory:
        """Closes and times of ``market``; ``train`` defaults to its ``"train"`` range."""
        frame = market.data.frame
        segments = tuple(train) if train is not None else (market.range("train"),)
        index = frame.index if isinstance(frame.index, pd.DatetimeIndex) else None
        return cls(close=frame["close"].to_numpy(dtype=np.float64), index=index, train=segments)


class Baseline(ABC):
    """A rule from closes ``<= t`` to a desired weight at bar ``t``."""

    name: ClassVar[str]
    wants: ClassVar[tuple[float, ...]]
    """Signs of exposure the rule asks for (checked against the position set)."""

    @abstractmethod
    def weights(self, history: PriceHistory) -> np.ndarray:
        """Desired weight per bar, float64 ``(T,)``; NaN where the signal is not defined yet."""

    @property
    def exposures(self) -> tuple[float, ...]:
        """Exposures this configuration asks for (by default :attr:`wants`)."""
        return self.wants

    def span(self, history: PriceHistory) -> int:
        """Bars before bar ``t`` the weight at ``t`` reads (its lookback; the purge / embargo count it). A rule
        used as an anchor must declare it."""
        raise TypeError(f"baseline {self.name!r} declares no span(): its lookback is needed to size the embargo")


class BuyAndHold(Baseline):
    """Always fully long."""

    name, wants = "buy_and_hold", (1.0,)

    def weights(self, history: PriceHistory) -> np.ndarray:
        """1.0 on every bar."""
        return np.ones(len(history.close))

    def span(self, history: PriceHistory) -> int:
        """0: reads nothing."""
        return 0


def trailing_mean(x: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``x[t - n + 1 .. t]`` at each ``t`` (NaN for ``t < n - 1``)."""
    out = np.full(len(x), np.nan)
    if len(x) >= n:
        out[n - 1 :] = np.lib.stride_tricks.sliding_window_view(x, n).mean(axis=-1)
    return out


@dataclass
class SmaCrossover(Baseline):
    """Long while the fast mean of closes is above the slow one, flat otherwise."""

    fast: int = 50
    slow: int = 200
    name: ClassVar[str] = "sma_crossover"
    wants: ClassVar[tuple[float, ...]] = (1.0,)

    def weights(self, history: PriceHistory) -> np.ndarray:
        """1 where SMA(fast) > SMA(slow), 0 where not, NaN before ``slow - 1``."""
        if not 0 < self.fast < self.slow:
            raise ValueError(f"sma_crossover: need 0 < fast < slow, got {self.fast}, {self.slow}")
        fast, slow = trailing_mean(history.close, self.fast), trailing_mean(history.close, self.slow)
        return np.where(np.isnan(slow), np.nan, (fast > slow).astype(np.float64))

    def span(self, history: PriceHistory) -> int:
        """``slow - 1``: the slow mean reads closes ``t - slow + 1 .. t``."""
        return self.slow - 1


@dataclass
class TimeSeriesMomentum(Baseline):
    """Sign of the return from ``lookback_months`` ago to ``skip_months`` ago (12-1 momentum)."""

    lookback_months: int = 12
    skip_months: int = 1
    long_only: bool = False
    bars_per_month: int = 21
    """Used only without bar times."""
    name: ClassVar[str] = "momentum"
    wants: ClassVar[tuple[float, ...]] = (1.0, -1.0)

    def anchors(self, history: PriceHistory) -> tuple[np.ndarray, np.ndarray]:
        """Bar positions ``(far, near)`` at or before ``lookback_months`` / ``skip_months`` before each bar."""
        n = len(history.close)
        if history.index is None:
            t = np.arange(n)
            return t - self.lookback_months * self.bars_per_month, t - self.skip_months * self.bars_per_month
        ts = history.index.as_unit("ns").asi8

        def before(months: int) -> np.ndarray:
            back = (history.index - pd.DateOffset(months=months)).as_unit("ns").asi8
            return np.searchsorted(ts, back, side="right") - 1

        return before(self.lookback_months), before(self.skip_months)

    def weights(self, history: PriceHistory) -> np.ndarray:
        """+1 / -1 (0 instead of -1 when ``long_only``; 0 for no change), NaN without 12 months of history."""
        if not 0 <= self.skip_months < self.lookback_months:
            raise ValueError(f"momentum: need 0 <= skip < lookback, got {self.skip_months}, {self.lookback_months}")
        far, near = self.anchors(history)
        ok = far >= 0
        sign = np.full(len(history.close), np.nan)
        sign[ok] = np.sign(np.log(history.close[near[ok]]) - np.log(history.close[far[ok]]))
        return np.maximum(sign, 0.0) if self.long_only else sign

    def span(self, history: PriceHistory) -> int:
        """The longest distance from a bar back to its ``lookback_months`` anchor on this calendar."""
        far = self.anchors(history)[0]
        ok = far >= 0
        distance = np.arange(len(far))[ok] - far[ok]
        return int(distance.max()) if ok.any() else self.lookback_months * self.bars_per_month

    @property
    def exposures(self) -> tuple[float, ...]:
        """Exposures this configuration asks for."""
        return (1.0,) if self.long_only else self.wants


@dataclass
class VolTarget(Baseline):
    """Buy-and-hold scaled by ``train_vol / forecast_vol_t``, clipped to ``[0, max_level]``."""

    lam: float = 0.94
    """EWMA decay of squared log returns (RiskMetrics)."""
    min_periods: int = 20
    """Returns needed before the forecast counts as defined."""
    max_level: float = 1.0
    name: ClassVar[str] = "vol_target"
    wants: ClassVar[tuple[float, ...]] = (1.0,)

    def forecast_vol(self, close: np.ndarray) -> np.ndarray:
        """EWMA root mean square of the log returns up to each bar (NaN before ``min_periods`` returns)."""
        returns = np.diff(np.log(close), prepend=np.nan)
        var = pd.Series(returns**2).ewm(alpha=1.0 - self.lam, adjust=True, min_periods=self.min_periods).mean()
        return np.sqrt(var.to_numpy())

    @staticmethod
    def train_vol(history: PriceHistory) -> float:
        """Root mean square of the log returns earned inside the training segments (bars ``start + 1 .. stop - 1``)."""
        logc = np.log(history.close)
        returns = np.concatenate([np.diff(logc[s:e]) for s, e in history.train])
        if len(returns) == 0:
            raise ValueError(f"vol_target: training segments {history.train} hold no return")
        return float(np.sqrt(np.mean(returns**2)))

    def weights(self, history: PriceHistory) -> np.ndarray:
        """``clip(train_vol / forecast_vol_t, 0, max_level)``; NaN while the forecast is undefined."""
        if not (0 < self.lam < 1 and self.max_level > 0 and self.min_periods >= 1):
            raise ValueError(f"vol_target: need 0 < lam < 1, max_level > 0, min_periods >= 1; got {self}")
        forecast = self.forecast_vol(history.close)
        with np.errstate(divide="ignore"):
            ratio = self.train_vol(history) / forecast
        return np.where(np.isnan(forecast), np.nan, np.clip(ratio, 0.0, self.max_level))

    def span(self, history: PriceHistory) -> int:
        """The EWMA's memory is infinite but fades: by convention the bars until an old return's weight
        ``lam^k`` falls below 1 % (75 bars at lam 0.94), plus the close before it, at least ``min_periods + 1``.
        (The training volatility reads the training segments only, which a training env may read.)"""
        return max(int(np.ceil(np.log(0.01) / np.log(self.lam))), self.min_periods) + 1


#: Deterministic baselines by the names experiment configs use ("random" is
#: :func:`~sentio_lab.evaluation.baselines.evaluate_random`).
BASELINES: dict[str, Callable[[], Baseline]] = {
    "buy_and_hold": BuyAndHold, "sma_crossover": SmaCrossover, "momentum": TimeSeriesMomentum,
    "vol_target": VolTarget,
}


def make_baseline(baseline: Baseline | str) -> Baseline:
    """A deterministic baseline from an instance or a :data:`BASELINES` name."""
    if isinstance(baseline, Baseline):
        return baseline
    if baseline not in BASELINES:
        raise KeyError(f"unknown baseline {baseline!r}; known: {sorted(BASELINES)} and 'random'")
    return BASELINES[baseline]()


def benchmark_weights(baseline: Baseline | str, market: PreparedMarket,
                      train: Sequence[Segment] | None = None) -> np.ndarray:
    """The anchor of :mod:`sentio_lab.env.anchor`: the baseline's desired weight per bar, float64 ``(T,)``, flat (0)
    where its signal is not defined yet -- the weight :class:`~sentio_lab.evaluation.baselines.WeightPolicy` trades,
    before rounding to levels.

    Causal: the weight at ``t`` reads closes ``<= t`` (within :meth:`Baseline.span` bars). ``train`` (default: the
    market's :meth:`~sentio_lab.env.market.PreparedMarket.training_segments`, a fold's training ranges on fold markets)
    is what ``vol_target`` scales by: training bars only.
    """
    rule = make_baseline(baseline)
    segments = tuple(train) if train is not None else market.training_segments()
    weights = rule.weights(PriceHistory.from_market(market, segments))
    return np.where(np.isnan(weights), 0.0, weights).astype(np.float64)


def benchmark_span(baseline: Baseline | str, market: PreparedMarket) -> int:
    """Bars before bar ``t`` that the baseline's weight at ``t`` reads on ``market`` (:meth:`Baseline.span`):
    an anchored variant's observation reaches this far back, so the CPCV embargo must cover it."""
    return make_baseline(baseline).span(PriceHistory.from_market(market, market.training_segments()))


def anchor_config(baseline: Baseline | str, market: PreparedMarket, *, tilts: Sequence[float] = DEFAULT_TILTS,
                  excess_reward: bool = False, deviation_penalty: float = 0.0, no_trade_band: float = 0.0,
                  train: Sequence[Segment] | None = None) -> AnchorConfig:
    """The :class:`~sentio_lab.env.anchor.AnchorConfig` of an env whose actions tilt ``baseline``'s weight on ``market``
    (:func:`benchmark_weights`; the limits are the env's position set)."""
    rule = make_baseline(baseline)
    return AnchorConfig(benchmark_weights(rule, market, train), tilts=tuple(tilts), excess_reward=excess_reward,
                        deviation_penalty=deviation_penalty, no_trade_band=no_trade_band, name=rule.name)


def on_levels(weights: np.ndarray, positions: Sequence[float]) -> bool:
    """True when every weight is one of the ``positions`` levels: then the anchored zero tilt and the baseline policy
    (weights rounded to levels) trade the same weights, bit for bit (module doc)."""
    return bool(np.isin(np.asarray(weights, dtype=np.float64), check_positions(positions)).all())
