"""Causal estimators the cost models read: half-spread from OHLC, daily volatility, average daily volume.

Every series is indexed by the *decision* bar: entry ``t`` uses bars ``<= t`` only, and prices the fill at the
open of bar ``t + 1`` (ARCHITECTURE.md's timing). Written with pandas rolling windows (vectorised, well kept)
rather than a library: no maintained package ships causal Corwin-Schultz / Abdi-Ranaldo estimators.

* Corwin and Schultz (2012), "A Simple Way to Estimate Bid-Ask Spreads from Daily High and Low Prices". The
  two-bar estimate at ``t`` uses the highs and lows of bars ``t - 1`` and ``t``, after the paper's overnight
  adjustment (when bar t's range lies wholly above or below close ``t - 1``, it is shifted by the gap). Flat or
  quiet bars give negative estimates; as in the paper, each two-bar estimate is set to 0 when negative, then
  the last ``window`` estimates are averaged. Bar ``t - 1`` of the pair is taken as it traded.
* Abdi and Ranaldo (2017), "A Simple Estimation of Bid-Ask Spreads from Daily Close, High, and Low Prices".
  With mid-range ``eta_t = (log H_t + log L_t) / 2`` and ``c_t = log C_t``, the two-bar term at ``t`` is
  ``4 (c_{t-1} - eta_{t-1}) (c_{t-1} - eta_t)`` (bars ``t - 1`` and ``t``); the last ``window`` terms are
  averaged and ``S = sqrt(max(mean, 0))`` (the paper's negative-to-zero rule on the averaged estimate).
* ``sigma_daily``: sample standard deviation of the last ``vol_window`` days of close-to-close log returns
  (``vol_window x bars_per_day`` bars), scaled to a day by ``sqrt(bars_per_day)``.
* ADV (currency per day): the mean of ``volume x close`` over the last ``adv_window`` days, times bars per day.

The estimators return spreads as *full* spreads (fractions of price); a fill pays half.
Before enough bars exist an estimate uses what there is (at least one two-bar term / two returns / one bar);
earlier entries are NaN and an env refuses to fill there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

_CS_K = 3.0 - 2.0 * np.sqrt(2.0)


def bars_per_day(index: pd.DatetimeIndex | None) -> float:
    """Median number of bars per calendar date (1.0 for daily or coarser bars, or without timestamps)."""
    if not isinstance(index, pd.DatetimeIndex) or len(index) < 2:
        return 1.0
    counts = pd.Series(1, index=index).groupby(index.normalize()).size()
    return float(max(1.0, np.median(counts.to_numpy())))


def _rolling_mean(values: np.ndarray, window: int, min_periods: int = 1) -> np.ndarray:
    return pd.Series(values).rolling(window, min_periods=min_periods).mean().to_numpy()


def corwin_schultz(high: np.ndarray, low: np.ndarray, close: np.ndarray, window: int = 20) -> np.ndarray:
    """Corwin-Schultz spread (full, fraction of price) per decision bar from bars ``<= t`` (module doc)."""
    high, low, close = (np.asarray(x, dtype=np.float64) for x in (high, low, close))
    h, lo = high.copy(), low.copy()
    prev_close = np.r_[np.nan, close[:-1]]
    # Overnight adjustment (the paper's section on overnight returns): shift a bar wholly above / below the
    # previous close back by the gap, so the jump does not count as spread.
    up = lo > prev_close
    down = h < prev_close
    h = np.where(up, h - (lo - prev_close), np.where(down, h + (prev_close - h), h))
    lo = np.where(up, prev_close, np.where(down, lo + (prev_close - high), lo))
    with np.errstate(invalid="ignore", divide="ignore"):
        # the pair (t - 1, t): bar t - 1 as it traded, bar t adjusted against close t - 1
        prev_high, prev_low = np.r_[np.nan, high[:-1]], np.r_[np.nan, low[:-1]]
        beta = np.log(h / lo) ** 2 + np.log(prev_high / prev_low) ** 2
        gamma = np.log(np.maximum(h, prev_high) / np.minimum(lo, prev_low)) ** 2
        alpha = (np.sqrt(2.0 * beta) - np.sqrt(beta)) / _CS_K - np.sqrt(gamma / _CS_K)
        spread = 2.0 * (np.exp(alpha) - 1.0) / (1.0 + np.exp(alpha))
    spread = np.where(np.isnan(spread), np.nan, np.maximum(spread, 0.0))  # negative two-bar estimates -> 0
    return _rolling_mean(spread, window)


def abdi_ranaldo(high: np.ndarray, low: np.ndarray, close: np.ndarray, window: int = 20) -> np.ndarray:
    """Abdi-Ranaldo spread (full, fraction of price) per decision bar from bars ``<= t`` (module doc)."""
    high, low, close = (np.asarray(x, dtype=np.float64) for x in (high, low, close))
    eta = 0.5 * (np.log(high) + np.log(low))
    c = np.log(close)
    term = 4.0 * (np.r_[np.nan, c[:-1]] - np.r_[np.nan, eta[:-1]]) * (np.r_[np.nan, c[:-1]] - eta)
    mean = _rolling_mean(term, window)
    return np.where(np.isnan(mean), np.nan, np.sqrt(np.maximum(mean, 0.0)))


def daily_volatility(close: np.ndarray, vol_window: int = 20, per_day: float = 1.0) -> np.ndarray:
    """sigma_daily per decision bar: std of the last ``vol_window`` days of log returns, bars ``<= t``."""
    close = np.asarray(close, dtype=np.float64)
    returns = np.r_[np.nan, np.diff(np.log(close))]
    bars = max(2, int(round(vol_window * per_day)))
    std = pd.Series(returns).rolling(bars, min_periods=2).std(ddof=1).to_numpy()
    return std * np.sqrt(per_day)


def average_daily_volume(volume: np.ndarray, close: np.ndarray, adv_window: int = 20,
                         per_day: float = 1.0) -> np.ndarray:
    """ADV in currency per decision bar: mean ``volume x close`` of the last ``adv_window`` days times bars/day."""
    notional = np.asarray(volume, dtype=np.float64) * np.asarray(close, dtype=np.float64)
    bars = max(1, int(round(adv_window * per_day)))
    return _rolling_mean(notional, bars) * per_day


@dataclass(frozen=True)
class CostInputs:
    """Per-bar series a non-flat cost model fills with (all float64 ``(T,)``; see the module doc for timing)."""

    half_spread: np.ndarray
    """Half the estimated spread at decision bar t (0 without a spread model)."""
    sigma: np.ndarray
    """sigma_daily at decision bar t."""
    adv: np.ndarray
    """Average daily volume in currency at decision bar t (the user's ADV where given)."""
    volume: np.ndarray
    """The bar's own volume (units of the instrument; 0 where absent): caps the fill *on* that bar."""
    per_day: float
    """Bars per day."""


def cost_inputs(
    costs,
    high: np.ndarray | None,
    low: np.ndarray | None,
    close: np.ndarray,
    volume: np.ndarray | None,
    per_day: float = 1.0,
) -> CostInputs:
    """The series ``costs`` (a :class:`~sentio_lab.costs.CostModel`) needs, from the bars' OHLCV columns.

    Raises naming what is missing: highs and lows for a spread model, volume for impact or a cap without a
    user-given ADV.
    """
    close = np.asarray(close, dtype=np.float64)
    n = len(close)
    if costs.spread != "none":
        if high is None or low is None:
            raise ValueError(f"CostModel.spread={costs.spread!r} needs the bars' high and low columns")
        estimator = corwin_schultz if costs.spread == "corwin_schultz" else abdi_ranaldo
        half = 0.5 * estimator(high, low, close, costs.spread_window)
    else:
        half = np.zeros(n)
    if costs.needs_volume and volume is None:
        raise ValueError("the cost model reads the bars' volume (impact or a participation cap without a user ADV "
                         "in CostModel.adv), but the market has no volume column")
    vol = np.zeros(n) if volume is None else np.asarray(volume, dtype=np.float64)
    if costs.adv is not None:
        adv = np.full(n, float(costs.adv))
    elif volume is not None:
        adv = average_daily_volume(vol, close, costs.adv_window, per_day)
    else:
        adv = np.full(n, np.nan)
    sigma = daily_volatility(close, costs.vol_window, per_day)
    return CostInputs(half_spread=half, sigma=sigma, adv=adv, volume=vol, per_day=float(per_day))
