"""Causal estimators the cost models read: half-spread from OHLC, daily volatility, average daily volume.

Every series is indexed by the *decision* bar: entry ``t`` uses bars ``<= t`` only, and prices the fill at the
open of bar ``t + 1`` (ARCHITECTURE.md's timing). Written with numpy sliding windows (vectorised; pandas'
rolling sums were replaced, see :func:`_window_stat`) rather than a library: no maintained package ships causal
Corwin-Schultz / Abdi-Ranaldo estimators.

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
* ``bars_per_day[t]`` (:func:`bars_per_day`) is itself causal: the median bar count of the calendar dates
  completed before bar t's date. A median over the whole index (as before issue 17) made sigma, ADV, impact and
  the forecast cap at t depend on how *later* bars are spaced. Why causal rather than the calendar or the
  training range: a calendar count needs trading hours the data do not carry (FX trades 24 h, equities' hourly
  bars 7 a session), and a training-range constant on a CPCV fold would read training bars after a test group
  and differ per fold; the running median is the same number for every env on the market and settles after
  a few days. With a changing ``bars_per_day`` the windows change length: entry t uses the window of its own
  ``bars_per_day[t]``.

The estimators return spreads as *full* spreads (fractions of price); a fill pays half.
Before enough bars exist an estimate uses what there is (at least one two-bar term / two returns / one bar);
earlier entries are NaN and an env refuses to fill there. Each window is summed on its own
(:func:`_window_stat`), so an entry depends on the bars of its window and nothing else, to the last bit.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import pandas as pd

_CS_K = 3.0 - 2.0 * np.sqrt(2.0)


def bars_per_day(index: pd.DatetimeIndex | None, n_bars: int | None = None) -> np.ndarray:
    """Bars per calendar date as known at each bar, float64 ``(T,)`` (module doc): entry t is the median bar count
    of the dates completed before bar t's date, at least 1; on the first date (none completed) the bars of that
    date up to t. Daily or coarser bars give 1.0 everywhere. Without timestamps (``index`` not a DatetimeIndex)
    it is 1.0 for each of ``n_bars`` bars (``len(index)`` when None)."""
    if not isinstance(index, pd.DatetimeIndex):
        n = len(index) if n_bars is None and index is not None else int(n_bars or 0)
        return np.ones(n)
    dates = index.normalize().asi8
    starts = np.flatnonzero(np.r_[True, dates[1:] != dates[:-1]])  # first bar of each run of one date
    counts = np.diff(np.r_[starts, len(index)])
    out = np.empty(len(index))
    completed: list[int] = []
    for k, (first, count) in enumerate(zip(starts, counts, strict=True)):
        if k == 0:
            out[first:first + count] = np.arange(1, count + 1)  # only the first date's bars so far are known
        else:  # ``completed`` is kept sorted: its median by index
            half = len(completed) // 2
            out[first:first + count] = (completed[half] if len(completed) % 2
                                        else 0.5 * (completed[half - 1] + completed[half]))
        bisect.insort(completed, int(count))
    return np.maximum(out, 1.0)


def _per_bar(per_day: float | np.ndarray, n: int) -> np.ndarray:
    """``per_day`` as a float64 ``(n,)`` array (a scalar is the same for every bar)."""
    values = np.broadcast_to(np.asarray(per_day, dtype=np.float64), (n,))
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError("bars per day must be finite and > 0 at every bar")
    return values


def _window_stat(values: np.ndarray, window: int, stat: str, min_periods: int) -> np.ndarray:
    """Entry t: ``stat`` ("mean" or "std", ddof 1) of the non-NaN entries of ``values[t - window + 1 .. t]``, NaN
    with fewer than ``min_periods`` of them; each window summed on its own (two passes for the std).

    Why not pandas' rolling: its running sums carry the rounding of every earlier entry into each result, so on a
    CPCV fold a test group's bars moved a later training bar's sigma in the last bits (issue 17: training inputs
    must be bit-identical whatever the test bars hold). Chunked so memory stays ~32 MB for any window.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    view = np.lib.stride_tricks.sliding_window_view(np.r_[np.full(window - 1, np.nan), values], window)
    chunk = max(1, 4_000_000 // window)
    with np.errstate(invalid="ignore", divide="ignore"):
        for a in range(0, n, chunk):
            w = view[a:a + chunk]
            finite = ~np.isnan(w)
            count = finite.sum(axis=1)
            mean = np.where(finite, w, 0.0).sum(axis=1) / count
            if stat == "std":
                result = np.sqrt((np.where(finite, w - mean[:, None], 0.0) ** 2).sum(axis=1) / (count - 1))
            else:
                result = mean
            out[a:a + chunk] = np.where(count >= min_periods, result, np.nan)
    return out


def _rolling_by_window(values: np.ndarray, windows: np.ndarray, stat: str, min_periods: int) -> np.ndarray:
    """Entry t: the ``stat`` of :func:`_window_stat` over the ``windows[t]`` entries ending at t (one pass per
    distinct window length: few, as the running median of bars per day moves in steps)."""
    out = np.full(len(values), np.nan)
    for window in np.unique(windows):
        rows = windows == window
        out[rows] = _window_stat(values, int(window), stat, min(min_periods, int(window)))[rows]
    return out


def _rolling_mean(values: np.ndarray, window: int, min_periods: int = 1) -> np.ndarray:
    return _window_stat(values, window, "mean", min_periods)


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


def window_bars(days: int, per_day: float | np.ndarray, minimum: int = 1) -> np.ndarray:
    """Bars in a window of ``days`` days at each bar: ``max(minimum, round(days x per_day[t]))`` (int64)."""
    per_day = np.asarray(per_day, dtype=np.float64)
    return np.maximum(minimum, np.round(days * per_day)).astype(np.int64)


def daily_volatility(close: np.ndarray, vol_window: int = 20, per_day: float | np.ndarray = 1.0) -> np.ndarray:
    """sigma_daily per decision bar: std of the last ``vol_window`` days of log returns, bars ``<= t``
    (``per_day``: bars per day, one number or one per bar as :func:`bars_per_day` gives)."""
    close = np.asarray(close, dtype=np.float64)
    per_day = _per_bar(per_day, len(close))
    returns = np.r_[np.nan, np.diff(np.log(close))]
    std = _rolling_by_window(returns, window_bars(vol_window, per_day, 2), "std", min_periods=2)
    return std * np.sqrt(per_day)


def average_daily_volume(volume: np.ndarray, close: np.ndarray, adv_window: int = 20,
                         per_day: float | np.ndarray = 1.0) -> np.ndarray:
    """ADV in currency per decision bar: mean ``volume x close`` of the last ``adv_window`` days times bars/day."""
    notional = np.asarray(volume, dtype=np.float64) * np.asarray(close, dtype=np.float64)
    per_day = _per_bar(per_day, len(notional))
    return _rolling_by_window(notional, window_bars(adv_window, per_day), "mean", min_periods=1) * per_day


def cost_reach(costs, per_day: float | np.ndarray = 1.0) -> int:
    """Bars before a decision bar t that the cost inputs ``costs`` (a :class:`~sentio_lab.env.costs.CostModel`) reads
    at t reach back to (the CPCV embargo counts them, :class:`sentio_lab.env.splits.PurgeEmbargo`): the largest over
    every bar of ``per_day`` (:func:`bars_per_day`).

    Only what the model reads counts: a spread model reads ``spread_window`` two-bar terms (bars ``t - w .. t``);
    impact reads sigma_daily (``B`` returns, so closes ``t - B .. t`` with ``B`` the window in bars) and, without
    a user ADV, the ADV (``B`` bars ``t - B + 1 .. t``); a forecast participation cap reads the ADV. The flat
    model reads none: 0.
    """
    reach = 0
    if costs.spread != "none":
        reach = max(reach, int(costs.spread_window))
    reads_adv = costs.adv is None and (
        costs.impact != "none" or (costs.participation is not None and costs.cap_volume == "forecast"))
    if costs.impact != "none":
        reach = max(reach, int(np.max(window_bars(costs.vol_window, per_day, 2))))
    if reads_adv:
        reach = max(reach, int(np.max(window_bars(costs.adv_window, per_day))) - 1)
    return reach


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
    per_day: np.ndarray
    """Bars per day known at decision bar t (:func:`bars_per_day`)."""


def cost_inputs(
    costs,
    high: np.ndarray | None,
    low: np.ndarray | None,
    close: np.ndarray,
    volume: np.ndarray | None,
    per_day: float | np.ndarray = 1.0,
) -> CostInputs:
    """The series ``costs`` (a :class:`~sentio_lab.env.costs.CostModel`) needs, from the bars' OHLCV columns.

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
    return CostInputs(half_spread=half, sigma=sigma, adv=adv, volume=vol, per_day=_per_bar(per_day, n).copy())
