"""Causal feature bank, normalisation fitted on the training range, and the observation matrix.

Everything a policy observes at bar ``t`` is computed from bars ``<= t`` (bar ``t`` closed). Features
come from *producers* registered by name (:func:`register_feature`); each declares its lookback, the
number of warm-up bars before all of its outputs are defined. Two banks exist:

* ``"basic"``: a handful of fast hand-written features (log returns, realised volatility, range,
  close location, gap, volume z-score). Fast enough for every PPO run and test.
* ``"talib"``: the basic features plus every applicable TA-Lib function (see :data:`TALIB_EXCLUDED`
  for the ones left out and why), over several periods, made scale-free (price levels become log
  ratios to the close, price differences are divided by the close) so one normaliser fits all markets.

Start dependence (decided): recursive indicators (EMA-family, Wilder smoothing, SAR, Hilbert
transforms, Heikin-Ashi) are computed by TA-Lib's forward recursion, so their value at ``t`` uses bars
``<= t`` only -- causal -- but it also depends, fading geometrically, on where the series *started*
(the seed of the recursion). We accept that and add an explicit settling warm-up to the lookback of
each such producer (``settle``) so the seed's weight has mostly decayed before the first usable row.
Cumulative level features (OBV, A/D, PVT, NVI, PVI, WAD) are used only through differences or ratios
over a fixed window, which removes the start level entirely; TA-Lib's anchored VWAP and CUMSUM, whose
value depends on the start forever, are excluded.

Zero volume (decided): a bar without volume is valid data (a holiday, a halt, a quiet FX hour, a feed that
carries no volume at all), so every producer that divides by volume defines its value there, causally:

* ``mfi_*``: 50 (neutral) where the window holds no money flow (TA-Lib says 0, "all selling");
* ``cmf_20``, ``obv_flow_14``, ``ad_flow_14``, ``pvt_flow_14``, ``adosc``, ``efi``: 0 (no flow, no pressure)
  where the window traded nothing;
* ``vwma_*``: the plain mean of close where the window traded nothing (equal weights);
* ``relvol_20``: after 20 bars without volume, 20 for a bar that trades (the ratio to the 20-bar mean that
  includes it, its largest value) and 1 for one that does not;
* ``marketfi`` (range per unit of volume): a bar without volume carries the latest traded bar's value, 0 before
  any; ``pvo``: 0 while the volume EMAs are both 0; ``correl_close_volume_*``, ``volume_z_20``: 0 for a constant
  window.

Window sums of volume are exact (:func:`_window_sum`): TA-Lib's running sums leave a residue after a zero-volume
run (4e-6 instead of 0), which turned 0 / 0 into arbitrary values (ADOSC reached 1e13). MFI, CMF, VWMA and RVOL
are therefore TA-Lib's definitions computed with exact sums; they equal TA-Lib's output on ordinary data.
Flat bars (high == low) are neutral where a producer divides by the range (close location 0). Producers are
scale-free, so tiny prices (1e-4 or 1e-8 of a stock's) give the same features.

:func:`build_observation_features` turns a frame into the ``(T, F)`` float32 matrix the environment
reads, with per-timeframe blocks (:mod:`sentio_lab.timeframes`) and optional filtered HMM regime
probabilities (:mod:`sentio_lab.regime`). Normaliser, pruning and HMM are fitted on rows
``[first_valid, train_stop)`` only -- or on the rows of a ``train_rows`` mask, such as a CPCV fold's several
training segments (:func:`sentio_lab.splits.fit_rows`) -- and stored in a plain-python ``state`` that can be
re-applied to new data without refitting.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import talib
import talib.abstract

from sentio_lab import regime as _regime
from sentio_lab.data import OHLCV_COLUMNS, canonical_session_close, canonicalize, fingerprint, infer_bar_freq
from sentio_lab.timeframes import resample_causal

#: Bumped whenever a producer's definition changes, so cached raw features are not reused.
#: 2: zero-volume conventions (MFI, VWMA, RVOL, MARKETFI; exact window sums of volume), session close.
FEATURE_VERSION = 2
#: Fitting needs at least this many training rows after the warm-up.
MIN_TRAIN_ROWS = 50
#: Quantile knots of the "rank" normaliser (the empirical CDF is piecewise linear between them).
RANK_KNOTS = 101
#: IQR of a standard normal: dividing the IQR by it makes the robust scale comparable to a std.
_IQR_TO_STD = 1.3489795003921634
BANKS: tuple[str, ...] = ("basic", "talib")
NORMALISERS: tuple[str, ...] = ("robust", "rank", "none")


# ================================================================================== config / results
@dataclass(frozen=True)
class FeatureConfig:
    """What to compute and how to normalise it. Hashable; recorded in the fitted state."""

    bank: str = "basic"
    """``"basic"`` (fast hand-written features) or ``"talib"`` (the full TA-Lib bank plus the basic ones)."""
    timeframes: tuple[str, ...] = ()
    """Extra higher timeframes (pandas offset aliases, e.g. ``("4h", "1D")`` or ``("W-FRI",)``)."""
    regimes: int = 0
    """Number of Gaussian-HMM states; 0 = no regime features (1 is meaningless and rejected)."""
    normalise: str = "robust"
    """``"robust"``: (x - median) / (IQR / 1.349); ``"rank"``: empirical CDF of the training range mapped
    to [-1, 1]; ``"none"``: raw values (and no clipping)."""
    clip: float = 5.0
    """Normalised values are clipped to ``[-clip, clip]`` (not applied with ``normalise="none"``)."""
    prune_corr: float | None = None
    """Drop a feature whose |correlation| on the training range with an earlier kept feature of the same
    block exceeds this."""
    cache_dir: str | None = None
    """Directory for a Parquet cache of raw features keyed by data fingerprint and config."""
    seed: int = 0
    """Seed of the HMM restarts."""
    regime_restarts: int = 4
    """Number of seeded HMM restarts (the best converged one by likelihood is kept)."""
    session_close: str | None = None
    """When a trading day ends ("HH:MM Area/City", e.g. "17:00 America/New_York"): daily, weekly and monthly
    timeframes run from one close to the next (see :mod:`sentio_lab.timeframes`). None: the UTC calendar.
    :func:`sentio_lab.market.prepare_market` fills it from the market (``MarketData.session_close``) when
    left None; pass ``"00:00 UTC"`` to keep UTC days for a market that has a session close."""

    def __post_init__(self) -> None:
        if self.bank not in BANKS:
            raise ValueError(f"FeatureConfig.bank must be one of {BANKS}, got {self.bank!r}")
        if isinstance(self.timeframes, str):
            raise ValueError(
                f"FeatureConfig.timeframes must be a tuple of rules, got the string {self.timeframes!r}"
            )
        tfs = tuple(self.timeframes)
        object.__setattr__(self, "timeframes", tfs)
        if len(set(tfs)) != len(tfs) or not all(isinstance(t, str) and t for t in tfs):
            raise ValueError(f"FeatureConfig.timeframes must be distinct non-empty strings, got {tfs}")
        if any(t in ("base", "regime") for t in tfs):
            raise ValueError("'base' and 'regime' are block names, not timeframes")
        if not isinstance(self.regimes, int) or self.regimes < 0 or self.regimes == 1:
            raise ValueError(f"FeatureConfig.regimes must be 0 or >= 2, got {self.regimes!r}")
        if self.normalise not in NORMALISERS:
            raise ValueError(f"FeatureConfig.normalise must be one of {NORMALISERS}, got {self.normalise!r}")
        if not (self.clip > 0):
            raise ValueError(f"FeatureConfig.clip must be > 0, got {self.clip}")
        if self.prune_corr is not None and not (0 < self.prune_corr <= 1):
            raise ValueError(f"FeatureConfig.prune_corr must be in (0, 1] or None, got {self.prune_corr}")
        if self.regime_restarts < 1:
            raise ValueError(f"FeatureConfig.regime_restarts must be >= 1, got {self.regime_restarts}")
        try:
            object.__setattr__(self, "session_close", canonical_session_close(self.session_close))
        except ValueError as err:
            raise ValueError(f"FeatureConfig.{err}") from err

    def fitted_fields(self) -> dict:
        """The fields a fitted state depends on (a state is only valid for the same values)."""
        return {
            "bank": self.bank,
            "timeframes": list(self.timeframes),
            "regimes": self.regimes,
            "normalise": self.normalise,
            "clip": float(self.clip),
            "prune_corr": None if self.prune_corr is None else float(self.prune_corr),
            # Only timeframe views depend on it: a state without timeframes fits every session close.
            "session_close": self.session_close if self.timeframes else None,
        }


@dataclass
class ObservationFeatures:
    """The observation matrix handed to the environment, plus what was fitted to make it."""

    values: np.ndarray
    """float32 ``(T, F)`` aligned with the frame's rows; finite from ``first_valid`` on, 0.0 before."""
    names: list[str]
    """Column names; extra timeframes are prefixed ``"<rule>:"``, regime columns are ``"regime:p<k>"``."""
    first_valid: int
    """First row where every feature is defined (after the longest warm-up of all blocks)."""
    blocks: dict[str, slice]
    """Column slice per block: ``"base"``, each extra timeframe, and ``"regime"`` when regimes > 0."""
    state: dict
    """Everything fitted on the training range, as plain python values (lists, floats, str)."""


@dataclass(frozen=True)
class Bars:
    """OHLCV as contiguous float64 arrays: what every producer receives."""

    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Bars:
        """Take the five OHLCV columns of ``frame``."""
        return cls(*(np.ascontiguousarray(frame[c].to_numpy(dtype=np.float64)) for c in OHLCV_COLUMNS))

    def __len__(self) -> int:
        """Number of bars."""
        return len(self.close)


# ============================================================================================ registry
@dataclass(frozen=True)
class FeatureProducer:
    """A named, causal feature function of OHLCV with its declared warm-up."""

    name: str
    lookback: int
    """Rows ``[lookback, T)`` of every output are finite for valid OHLCV input."""
    bank: str
    fn: Callable[[Bars], dict[str, np.ndarray]]
    description: str = ""
    sources: tuple[str, ...] = ()
    """TA-Lib functions this producer is built on (for the coverage audit)."""

    def __call__(self, bars: Bars) -> dict[str, np.ndarray]:
        """Compute the producer's columns (NaN during the warm-up)."""
        out = self.fn(bars)
        for key, col in out.items():
            if np.shape(col) != (len(bars),):
                raise ValueError(
                    f"producer {self.name}: column {key!r} has shape {np.shape(col)}, not ({len(bars)},)"
                )
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


#: Every registered producer by name, in registration order.
FEATURE_REGISTRY: dict[str, FeatureProducer] = {}


def register_feature(
    name: str, *, lookback: int, bank: str = "basic", sources: Iterable[str] = ()
) -> Callable[[Callable[[Bars], dict[str, np.ndarray]]], Callable[[Bars], dict[str, np.ndarray]]]:
    """Decorator registering ``fn(bars) -> {column: array}`` as producer ``name`` of ``bank``."""
    if bank not in BANKS:
        raise ValueError(f"unknown bank {bank!r}; use one of {BANKS}")
    if lookback < 0:
        raise ValueError(f"producer {name}: lookback must be >= 0")

    def decorate(fn: Callable[[Bars], dict[str, np.ndarray]]) -> Callable[[Bars], dict[str, np.ndarray]]:
        if name in FEATURE_REGISTRY:
            raise ValueError(f"feature producer {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        FEATURE_REGISTRY[name] = FeatureProducer(
            name, int(lookback), bank, fn, doc[0] if doc else "", tuple(sources)
        )
        return fn

    return decorate


def registered_producers(bank: str | None = None) -> list[FeatureProducer]:
    """Producers of ``bank`` in registration order: "basic", "talib" (includes basic) or None (all)."""
    if bank is None:
        return list(FEATURE_REGISTRY.values())
    if bank not in BANKS:
        raise ValueError(f"unknown bank {bank!r}; use one of {BANKS}")
    wanted = {"basic"} if bank == "basic" else {"basic", "talib"}
    return [p for p in FEATURE_REGISTRY.values() if p.bank in wanted]


# ============================================================================================= helpers
def _lag(x: np.ndarray, k: int) -> np.ndarray:
    """``x`` shifted k bars into the past (NaN for the first k rows)."""
    out = np.full_like(x, np.nan)
    if k < len(x):
        out[k:] = x[: len(x) - k]
    return out


def _rolling(x: np.ndarray, window: int, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """Trailing-window reduction ending at each row (row t uses x[t-window+1 .. t]); NaN before."""
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        out[window - 1 :] = reduce(np.lib.stride_tricks.sliding_window_view(x, window), axis=-1)
    return out


def _window_sum(x: np.ndarray, window: int) -> np.ndarray:
    """Exact trailing sums over ``window`` rows (row t sums x[t-window+1 .. t]); NaN before.

    Used for volume denominators instead of TA-Lib's running sums, which add and subtract and so leave a
    residue (e.g. 4e-6 instead of 0 after a run of zero-volume bars) that turns 0 / 0 into arbitrary numbers.
    """
    return _rolling(x, window, np.sum)


def _carry_defined(values: np.ndarray, defined: np.ndarray, before: float = 0.0) -> np.ndarray:
    """At each row the value of the latest row ``<= t`` where ``defined`` holds; ``before`` until the first."""
    last = np.maximum.accumulate(np.where(defined, np.arange(len(values)), -1))
    return np.where(last >= 0, values[np.maximum(last, 0)], before)


def _safe_div(num: np.ndarray, den: np.ndarray, undefined: float = 0.0) -> np.ndarray:
    """``num / den`` with the value defined as ``undefined`` where ``den == 0`` (a definition, not a fill:
    e.g. close location in a bar with high == low is neutral). NaN inputs stay NaN."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.where(np.isnan(num) | np.isnan(den), np.nan, undefined)
    ok = (den != 0) & ~np.isnan(den) & ~np.isnan(num)
    np.divide(num, den, out=out, where=ok)
    return out


def _log_ratio(level: np.ndarray, close: np.ndarray) -> np.ndarray:
    """Scale-free version of a price-level output: log(level / close). Non-positive levels give NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(level / close)


def _tl(fn: str, **params: float) -> int:
    """TA-Lib's own lookback for ``fn`` with ``params`` (unstable periods at TA-Lib's default, 0)."""
    f = talib.abstract.Function(fn)
    if params:
        f.parameters = params
    return int(f.lookback)


# ========================================================================================= basic bank
for _k in (1, 5, 20):

    def _ret(b: Bars, k: int = _k) -> dict[str, np.ndarray]:
        """Log return over k bars: log(close_t / close_{t-k})."""
        logc = np.log(b.close)
        return {f"ret_{k}": logc - _lag(logc, k)}

    register_feature(f"ret_{_k}", lookback=_k)(_ret)

for _w in (5, 20):

    def _rvol(b: Bars, w: int = _w) -> dict[str, np.ndarray]:
        """Realised volatility: std of the last w one-bar log returns."""
        r = np.diff(np.log(b.close), prepend=np.nan)
        return {f"rvol_{w}": _rolling(r, w, np.std)}

    register_feature(f"rvol_{_w}", lookback=_w)(_rvol)


@register_feature("range_hl", lookback=0)
def _range_hl(b: Bars) -> dict[str, np.ndarray]:
    """Bar range: log(high / low)."""
    return {"range_hl": np.log(b.high / b.low)}


@register_feature("close_loc", lookback=0)
def _close_loc(b: Bars) -> dict[str, np.ndarray]:
    """Close location in the bar's range, -1 at the low, +1 at the high, 0 for a bar with no range."""
    return {"close_loc": _safe_div(2.0 * b.close - b.high - b.low, b.high - b.low)}


@register_feature("body", lookback=0)
def _body(b: Bars) -> dict[str, np.ndarray]:
    """Candle body: log(close / open)."""
    return {"body": np.log(b.close / b.open)}


@register_feature("gap", lookback=1)
def _gap(b: Bars) -> dict[str, np.ndarray]:
    """Opening gap: log(open_t / close_{t-1})."""
    return {"gap": np.log(b.open) - _lag(np.log(b.close), 1)}


@register_feature("volume_z_20", lookback=19)
def _volume_z(b: Bars) -> dict[str, np.ndarray]:
    """z-score of log(1 + volume) within the last 20 bars (0 when the window's volume is constant)."""
    lv = np.log1p(b.volume)
    mean, std = _rolling(lv, 20, np.mean), _rolling(lv, 20, np.std)
    return {"volume_z_20": _safe_div(lv - mean, std)}


# ========================================================================================= TA-Lib bank
#: TA-Lib functions deliberately left out of the bank, with the reason (the rest are all used).
TALIB_EXCLUDED: dict[str, str] = {
    **{
        f: "element-wise arithmetic of two inputs; used inside other features, meaningless on its own"
        for f in ("ADD", "SUB", "MULT", "DIV")
    },
    **{
        f: "element-wise math transform of a price level (trigonometry, exp, rounding): not scale-free and "
        "no meaning for prices; log ratios are used directly instead"
        for f in (
            "ACOS",
            "ASIN",
            "ATAN",
            "CEIL",
            "COS",
            "COSH",
            "EXP",
            "FLOOR",
            "LN",
            "LOG10",
            "SIN",
            "SINH",
            "SQRT",
            "TAN",
            "TANH",
        )
    },
    "CUMSUM": "cumulative level anchored at the first bar: value depends on where the data starts, forever",
    "VWAP": "anchored at the first bar (no period): value depends on where the data starts, forever; "
    "the rolling volume-weighted mean is covered by VWMA",
    "MA": "dispatcher over moving-average types, each of which (SMA, EMA, WMA, DEMA, TEMA, TRIMA, KAMA, "
    "MAMA, T3) is included directly",
    "ROCP": "ROC / 100: an affine duplicate of ROC",
    "ROCR": "ROC / 100 + 1: an affine duplicate of ROC",
    "ROCR100": "ROC + 100: an affine duplicate of ROC",
    "ATR": "scale-free ATR (ATR / close) is exactly NATR / 100; NATR is included",
}


def _talib_feature(
    name: str, *, lookback: int, settle: int = 0, sources: Iterable[str] | None = None
) -> Callable[[Callable[[Bars], dict[str, np.ndarray]]], Callable[[Bars], dict[str, np.ndarray]]]:
    """Register a TA-Lib producer; ``settle`` extra warm-up bars let a recursion forget its seed."""
    return register_feature(
        name, lookback=lookback + settle, bank="talib", sources=(name,) if sources is None else sources
    )


def _ma_feature(fn: str, periods: tuple[int, ...], *, settle: Callable[[int], int] | None = None) -> None:
    """Register a moving average of log close minus log close, at each period.

    Filtering log prices (instead of log(MA(close) / close)) is the same to first order, exactly
    scale-free for these translation-equivariant filters, and stays defined where an extrapolating
    filter (TSF, DEMA, TEMA, HMA, ZLEMA, T3) of raw prices would dip below zero after a crash.
    """
    ta = getattr(talib, fn)
    lb = max(_tl(fn, timeperiod=p) + (settle(p) if settle else 0) for p in periods)

    def produce(b: Bars) -> dict[str, np.ndarray]:
        logc = np.log(b.close)
        return {f"{fn.lower()}_{p}": ta(logc, timeperiod=p) - logc for p in periods}

    produce.__doc__ = f"{fn} of log close at periods {periods}, minus log close."
    _talib_feature(fn, lookback=lb)(produce)


def _osc_feature(
    fn: str,
    periods: tuple[int, ...],
    inputs: tuple[str, ...],
    *,
    settle: Callable[[int], int] | None = None,
    per_close: bool = False,
    label: str | None = None,
) -> None:
    """Register a bounded / unitless oscillator taking one ``timeperiod`` (optionally divided by close)."""
    ta = getattr(talib, fn)
    lb = max(_tl(fn, timeperiod=p) + (settle(p) if settle else 0) for p in periods)

    def produce(b: Bars) -> dict[str, np.ndarray]:
        args = [getattr(b, i) for i in inputs]
        out = {}
        for p in periods:
            v = ta(*args, timeperiod=p)
            out[f"{label or fn.lower()}_{p}"] = v / b.close if per_close else v
        return out

    produce.__doc__ = f"{fn} at periods {periods}{' divided by close' if per_close else ''}."
    _talib_feature(fn, lookback=lb)(produce)


def _ema_settle(p: int) -> int:
    """Settling warm-up for an EMA / Wilder recursion of period p: the seed weight is <= ~e^-2 after it."""
    return 2 * p


_HT_SETTLE = 32  # Hilbert-transform recursions: about one dominant cycle extra

# --- moving averages (overlap studies): log ratio to close
_ma_feature("SMA", (5, 14, 30, 60))
_ma_feature("WMA", (5, 14, 30))
_ma_feature("TRIMA", (14, 30))
_ma_feature("EMA", (5, 14, 30), settle=_ema_settle)
_ma_feature("DEMA", (5, 14), settle=_ema_settle)
_ma_feature("TEMA", (5, 14), settle=_ema_settle)
_ma_feature("KAMA", (14, 30), settle=_ema_settle)
_ma_feature("RMA", (14, 30), settle=_ema_settle)
_ma_feature("HMA", (14, 30))
_ma_feature("ZLEMA", (14, 30), settle=_ema_settle)
_ma_feature("T3", (5, 10), settle=_ema_settle)
_ma_feature("MIDPOINT", (14, 30))
_ma_feature("LINEARREG", (14, 30))
_ma_feature("LINEARREG_INTERCEPT", (14, 30))
_ma_feature("TSF", (14, 30))


@_talib_feature("MIDPRICE", lookback=_tl("MIDPRICE", timeperiod=30))
def _midprice(b: Bars) -> dict[str, np.ndarray]:
    """Midpoint of the high/low range over 14 and 30 bars, log ratio to close."""
    return {
        f"midprice_{p}": _log_ratio(talib.MIDPRICE(b.high, b.low, timeperiod=p), b.close) for p in (14, 30)
    }


@_talib_feature("VWMA", lookback=_tl("VWMA", timeperiod=30))
def _vwma(b: Bars) -> dict[str, np.ndarray]:
    """Volume-weighted moving average over 14 and 30 bars, log ratio to close (plain mean without volume)."""
    # TA-Lib's VWMA, sum(close * volume) / sum(volume), with exact window sums (see _window_sum). Zero volume:
    # where the window traded nothing the weights are all equal (0), so the level is the plain mean of close.
    out = {}
    for p in (14, 30):
        volume = _window_sum(b.volume, p)
        traded = volume > 0
        weighted = _window_sum(b.close * b.volume, p) / np.where(traded, volume, 1.0)
        out[f"vwma_{p}"] = _log_ratio(np.where(traded, weighted, _rolling(b.close, p, np.mean)), b.close)
    return out


@_talib_feature("PERCENTILE", lookback=_tl("PERCENTILE", timeperiod=30))
def _percentile(b: Bars) -> dict[str, np.ndarray]:
    """25th / 50th / 75th percentile of close over 30 bars, log ratio to close."""
    return {
        f"percentile_30_{q}": _log_ratio(
            talib.PERCENTILE(b.close, timeperiod=30, percentile=float(q)), b.close
        )
        for q in (25, 50, 75)
    }


@_talib_feature("MAMA", lookback=_tl("MAMA"), settle=_HT_SETTLE)
def _mama(b: Bars) -> dict[str, np.ndarray]:
    """MESA adaptive moving average and its follower (FAMA), log ratio to close."""
    # On raw close, not log close: MAMA's phase-driven alpha is exactly scale-equivariant but not exactly
    # shift-equivariant, and both lines are positive averages, so the log ratio is always defined. During a halt
    # (unchanged prices) the phase is atan(Q / I) of two rounding residues: for a while after one, the lines
    # depend on the rounding of the price digits (finite and causal; see tests/test_messy_features.py).
    mama, fama = talib.MAMA(b.close, fastlimit=0.5, slowlimit=0.05)
    return {"mama": _log_ratio(mama, b.close), "fama": _log_ratio(fama, b.close)}


@_talib_feature("HT_TRENDLINE", lookback=_tl("HT_TRENDLINE"), settle=_HT_SETTLE)
def _ht_trendline(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert-transform instantaneous trendline, log ratio to close (a positive average: always defined)."""
    return {"ht_trendline": _log_ratio(talib.HT_TRENDLINE(b.close), b.close)}


# The period input (HT_DCPERIOD) starts after its own warm-up; MAVP's window then adds maxperiod - 1.
@_talib_feature("MAVP", lookback=_tl("HT_DCPERIOD") + _tl("MAVP", maxperiod=30), settle=_HT_SETTLE)
def _mavp(b: Bars) -> dict[str, np.ndarray]:
    """Moving average (period = Hilbert dominant cycle, 2..30) of log close, minus log close."""
    periods = talib.HT_DCPERIOD(b.close)
    # The dominant-cycle period is NaN in its own warm-up; TA-Lib then starts MAVP where both exist.
    logc = np.log(b.close)
    return {"mavp_dc": talib.MAVP(logc, periods, minperiod=2, maxperiod=30) - logc}


def _band_features(
    prefix: str, upper: np.ndarray, middle: np.ndarray, lower: np.ndarray, close: np.ndarray
) -> dict:
    """Scale-free band description: position of close in the band (-1..1 inside) and band width."""
    return {
        f"{prefix}_pos": _safe_div(2.0 * close - upper - lower, upper - lower),
        f"{prefix}_width": _safe_div(upper - lower, middle),
    }


@_talib_feature("BBANDS", lookback=_tl("BBANDS", timeperiod=20))
def _bbands(b: Bars) -> dict[str, np.ndarray]:
    """Bollinger bands (20, 2 sd): position of close in the band and band width / middle."""
    return _band_features(
        "bbands_20", *talib.BBANDS(b.close, timeperiod=20, nbdevup=2.0, nbdevdn=2.0), b.close
    )


@_talib_feature("ACCBANDS", lookback=_tl("ACCBANDS", timeperiod=20))
def _accbands(b: Bars) -> dict[str, np.ndarray]:
    """Acceleration bands (20): position of close in the band and band width / middle."""
    return _band_features("accbands_20", *talib.ACCBANDS(b.high, b.low, b.close, timeperiod=20), b.close)


@_talib_feature("DONCHIAN", lookback=_tl("DONCHIAN", timeperiod=20))
def _donchian(b: Bars) -> dict[str, np.ndarray]:
    """Donchian channel (20): position of close in the channel and channel width / middle."""
    return _band_features("donchian_20", *talib.DONCHIAN(b.high, b.low, timeperiod=20), b.close)


@_talib_feature("KC", lookback=_tl("KC", timeperiod=20, atrperiod=10), settle=_ema_settle(10))
def _kc(b: Bars) -> dict[str, np.ndarray]:
    """Keltner channel (20, ATR 10, 2): position of close in the channel and width / middle."""
    return _band_features(
        "kc_20", *talib.KC(b.high, b.low, b.close, timeperiod=20, atrperiod=10, nbdev=2.0), b.close
    )


@_talib_feature("SAR", lookback=_tl("SAR"), settle=30)
def _sar(b: Bars) -> dict[str, np.ndarray]:
    """Parabolic SAR (0.02, 0.2), log ratio to close (path-dependent; forgets its start at each reversal)."""
    return {"sar": _log_ratio(talib.SAR(b.high, b.low, acceleration=0.02, maximum=0.2), b.close)}


@_talib_feature("SAREXT", lookback=_tl("SAREXT"), settle=30)
def _sarext(b: Bars) -> dict[str, np.ndarray]:
    """Extended SAR with slow (0.01/0.1) acceleration: trend side (+1 long / -1 short) and log distance."""
    s = talib.SAREXT(
        b.high,
        b.low,
        accelerationinitlong=0.01,
        accelerationlong=0.01,
        accelerationmaxlong=0.1,
        accelerationinitshort=0.01,
        accelerationshort=0.01,
        accelerationmaxshort=0.1,
    )
    # TA-Lib encodes a short position as a negative SAR value.
    return {"sarext_side": np.sign(s), "sarext_dist": _log_ratio(np.abs(s), b.close)}


@_talib_feature("SUPERTREND", lookback=_tl("SUPERTREND", timeperiod=10), settle=_ema_settle(10))
def _supertrend(b: Bars) -> dict[str, np.ndarray]:
    """SuperTrend (10, 3): log ratio of the trend line to close and the trend direction."""
    line, trend = talib.SUPERTREND(b.high, b.low, b.close, timeperiod=10, multiplier=3.0)
    # Relative distance, not a log ratio: the lower band (hl2 - 3 ATR) can be negative after a crash.
    return {"supertrend": line / b.close - 1.0, "supertrend_dir": trend}


@_talib_feature("HA", lookback=_tl("HA"), settle=10)
def _ha(b: Bars) -> dict[str, np.ndarray]:
    """Heikin-Ashi candle: open, high, low and close as log ratios to close."""
    return {
        f"ha_{k}": _log_ratio(v, b.close)
        for k, v in zip(
            ("open", "high", "low", "close"), talib.HA(b.open, b.high, b.low, b.close), strict=True
        )
    }


for _fn in ("AVGPRICE", "MEDPRICE", "TYPPRICE", "WCLPRICE"):

    def _price_transform(b: Bars, fn: str = _fn) -> dict[str, np.ndarray]:
        """Price transform as log ratio to close."""
        ta = getattr(talib, fn)
        args = (
            (b.open, b.high, b.low, b.close)
            if fn == "AVGPRICE"
            else ((b.high, b.low) if fn == "MEDPRICE" else (b.high, b.low, b.close))
        )
        return {fn.lower(): _log_ratio(ta(*args), b.close)}

    _talib_feature(_fn, lookback=_tl(_fn))(_price_transform)

# --- momentum oscillators (bounded or unitless)
_osc_feature("RSI", (5, 14, 30), ("close",), settle=_ema_settle)
_osc_feature("CMO", (14,), ("close",), settle=_ema_settle)
_osc_feature("CMOU", (14, 30), ("close",))
_osc_feature("ROC", (14, 30), ("close",))
_osc_feature("TRIX", (5, 14), ("close",), settle=_ema_settle)
_osc_feature("ER", (10, 30), ("close",))
_osc_feature("FOSC", (14, 30), ("close",))
_osc_feature("VHF", (14, 28), ("close",))
_osc_feature("PERCENTRANK", (30, 60), ("close",))
_osc_feature("CCI", (14, 30), ("high", "low", "close"))
_osc_feature("WILLR", (14, 30), ("high", "low", "close"))
_osc_feature("ADX", (7, 14), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("ADXR", (14,), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("DX", (14,), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("PLUS_DI", (14,), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("MINUS_DI", (14,), ("high", "low", "close"), settle=_ema_settle)
_osc_feature("PLUS_DM", (14,), ("high", "low"), settle=_ema_settle, per_close=True)
_osc_feature("MINUS_DM", (14,), ("high", "low"), settle=_ema_settle, per_close=True)
_osc_feature("NATR", (5, 14, 30), ("high", "low", "close"), settle=_ema_settle)


@_talib_feature("MFI", lookback=_tl("MFI", timeperiod=30))
def _mfi(b: Bars) -> dict[str, np.ndarray]:
    """Money flow index at 14 / 30 bars (0..100); 50 (neutral) where the window holds no money flow."""
    # TA-Lib's MFI: 100 * up-flow / (up-flow + down-flow), flow = typical price * volume, counted up (down) when
    # the typical price rose (fell). Exact window sums; where the window holds no flow at all (zero volume, or an
    # unchanged typical price) TA-Lib says 0, "all selling", which is wrong: no flow is neutral, 50.
    typical = (b.high + b.low + b.close) / 3.0
    flow = typical * b.volume
    change = np.diff(typical, prepend=np.nan)
    up, down = np.where(change > 0, flow, 0.0), np.where(change < 0, flow, 0.0)
    up[0] = down[0] = np.nan  # the first bar has no previous typical price
    out = {}
    for p in (14, 30):
        up_sum, down_sum = _window_sum(up, p), _window_sum(down, p)
        out[f"mfi_{p}"] = 100.0 * _safe_div(up_sum, up_sum + down_sum, undefined=0.5)
    return out

_osc_feature("IMI", (14,), ("open", "close"))
_osc_feature("AROONOSC", (30,), ("high", "low"))
_osc_feature("MOM", (5, 14), ("close",), per_close=True)
_osc_feature("QSTICK", (10,), ("open", "close"), per_close=True)
_osc_feature("DPO", (20,), ("close",), per_close=True)
_osc_feature("STDDEV", (5, 14), ("close",), per_close=True)
_osc_feature("AVGDEV", (14,), ("close",), per_close=True)
_osc_feature("ADR", (14,), ("high", "low"), per_close=True)


@_talib_feature("CMF", lookback=_tl("CMF", timeperiod=20))
def _cmf(b: Bars) -> dict[str, np.ndarray]:
    """Chaikin money flow over 20 bars (-1..1); 0 (no flow) where the window traded nothing."""
    # TA-Lib's CMF with exact window sums: sum(close location * volume) / sum(volume); a flat bar (high == low)
    # has close location 0.
    location = _safe_div(2.0 * b.close - b.high - b.low, b.high - b.low)
    return {"cmf_20": _safe_div(_window_sum(location * b.volume, 20), _window_sum(b.volume, 20))}


_RELVOL = 20


@_talib_feature("RVOL", lookback=_tl("RVOL", timeperiod=_RELVOL))
def _relvol(b: Bars) -> dict[str, np.ndarray]:
    """Relative volume: volume / mean volume of the previous 20 bars (20 or 1 after 20 bars without volume)."""
    # TA-Lib's RVOL with an exact window sum. Where the previous 20 bars traded nothing the ratio is undefined:
    # a bar that trades then gets 20, the ratio to the 20-bar mean that includes it (its largest possible
    # value), and a bar that does not trade gets 1 (it is like its window).
    previous = _lag(_window_sum(b.volume, _RELVOL), 1)
    traded_before = previous > 0
    ratio = _RELVOL * b.volume / np.where(traded_before, previous, 1.0)
    empty = np.where(b.volume > 0, float(_RELVOL), 1.0)
    return {f"relvol_{_RELVOL}": np.where(np.isnan(previous), np.nan, np.where(traded_before, ratio, empty))}



@_talib_feature("AROON", lookback=_tl("AROON", timeperiod=14))
def _aroon(b: Bars) -> dict[str, np.ndarray]:
    """Aroon down / up over 14 bars (bars since the low / high, 0..100)."""
    down, up = talib.AROON(b.high, b.low, timeperiod=14)
    return {"aroon_14_down": down, "aroon_14_up": up}


@_talib_feature("BOP", lookback=_tl("BOP"))
def _bop(b: Bars) -> dict[str, np.ndarray]:
    """Balance of power: (close - open) / (high - low)."""
    return {"bop": talib.BOP(b.open, b.high, b.low, b.close)}


@_talib_feature("APO", lookback=_tl("APO", fastperiod=5, slowperiod=14, matype=1), settle=_ema_settle(14))
def _apo(b: Bars) -> dict[str, np.ndarray]:
    """Absolute price oscillator (EMA 5 - EMA 14) divided by close."""
    return {"apo_5_14": talib.APO(b.close, fastperiod=5, slowperiod=14, matype=1) / b.close}


@_talib_feature("PPO", lookback=_tl("PPO", fastperiod=12, slowperiod=26, matype=1), settle=_ema_settle(26))
def _ppo(b: Bars) -> dict[str, np.ndarray]:
    """Percentage price oscillator (EMA 12 vs EMA 26)."""
    return {"ppo_12_26": talib.PPO(b.close, fastperiod=12, slowperiod=26, matype=1)}


def _macd_dict(prefix: str, triple: tuple[np.ndarray, np.ndarray, np.ndarray], close: np.ndarray) -> dict:
    """MACD line, signal and histogram divided by close."""
    return {f"{prefix}_{k}": v / close for k, v in zip(("line", "signal", "hist"), triple, strict=True)}


@_talib_feature(
    "MACD", lookback=_tl("MACD", fastperiod=6, slowperiod=13, signalperiod=5), settle=_ema_settle(13)
)
def _macd(b: Bars) -> dict[str, np.ndarray]:
    """Fast MACD (EMA 6 / 13, signal 5) divided by close."""
    return _macd_dict("macd_6_13", talib.MACD(b.close, fastperiod=6, slowperiod=13, signalperiod=5), b.close)


@_talib_feature("MACDFIX", lookback=_tl("MACDFIX", signalperiod=9), settle=_ema_settle(26))
def _macdfix(b: Bars) -> dict[str, np.ndarray]:
    """Classic MACD (12 / 26, signal 9) divided by close."""
    return _macd_dict("macd_12_26", talib.MACDFIX(b.close, signalperiod=9), b.close)


@_talib_feature("MACDEXT", lookback=_tl("MACDEXT", fastperiod=12, slowperiod=26, signalperiod=9))
def _macdext(b: Bars) -> dict[str, np.ndarray]:
    """MACD built from simple moving averages (12 / 26, signal 9) divided by close."""
    triple = talib.MACDEXT(
        b.close, fastperiod=12, fastmatype=0, slowperiod=26, slowmatype=0, signalperiod=9, signalmatype=0
    )
    return _macd_dict("macdext_sma_12_26", triple, b.close)


@_talib_feature("STOCH", lookback=_tl("STOCH", fastk_period=30, slowk_period=5, slowd_period=5))
def _stoch(b: Bars) -> dict[str, np.ndarray]:
    """Slow stochastic %K / %D at (5, 3, 3) and (30, 5, 5)."""
    out = {}
    for fk, sk in ((5, 3), (30, 5)):
        k, d = talib.STOCH(b.high, b.low, b.close, fastk_period=fk, slowk_period=sk, slowd_period=sk)
        out[f"stoch_{fk}_k"], out[f"stoch_{fk}_d"] = k, d
    return out


@_talib_feature("STOCHF", lookback=_tl("STOCHF", fastk_period=14, fastd_period=3))
def _stochf(b: Bars) -> dict[str, np.ndarray]:
    """Fast stochastic %K / %D at (14, 3)."""
    k, d = talib.STOCHF(b.high, b.low, b.close, fastk_period=14, fastd_period=3)
    return {"stochf_14_k": k, "stochf_14_d": d}


@_talib_feature(
    "STOCHRSI",
    lookback=_tl("STOCHRSI", timeperiod=14, fastk_period=5, fastd_period=3),
    settle=_ema_settle(14),
)
def _stochrsi(b: Bars) -> dict[str, np.ndarray]:
    """Stochastic of RSI(14): fast %K (5) and %D (3)."""
    k, d = talib.STOCHRSI(b.close, timeperiod=14, fastk_period=5, fastd_period=3)
    return {"stochrsi_14_k": k, "stochrsi_14_d": d}


@_talib_feature("KDJ", lookback=_tl("KDJ"), settle=_ema_settle(3))
def _kdj(b: Bars) -> dict[str, np.ndarray]:
    """KDJ stochastic (9, 3, 3): K, D and J."""
    k, d, j = talib.KDJ(b.high, b.low, b.close)
    return {"kdj_k": k, "kdj_d": d, "kdj_j": j}


@_talib_feature("SMI", lookback=_tl("SMI"), settle=_ema_settle(25))
def _smi(b: Bars) -> dict[str, np.ndarray]:
    """Stochastic momentum index (13, 2, 25, 9) and its signal."""
    smi, signal = talib.SMI(b.high, b.low, b.close)
    return {"smi": smi, "smi_signal": signal}


@_talib_feature("TSI", lookback=_tl("TSI", firstperiod=25, secondperiod=13), settle=_ema_settle(25))
def _tsi(b: Bars) -> dict[str, np.ndarray]:
    """True strength index (25, 13)."""
    return {"tsi_25_13": talib.TSI(b.close, firstperiod=25, secondperiod=13)}


@_talib_feature("ULTOSC", lookback=_tl("ULTOSC", timeperiod1=7, timeperiod2=14, timeperiod3=28))
def _ultosc(b: Bars) -> dict[str, np.ndarray]:
    """Ultimate oscillator (7, 14, 28)."""
    return {"ultosc": talib.ULTOSC(b.high, b.low, b.close, timeperiod1=7, timeperiod2=14, timeperiod3=28)}


@_talib_feature("COPPOCK", lookback=_tl("COPPOCK"))
def _coppock(b: Bars) -> dict[str, np.ndarray]:
    """Coppock curve (WMA 10 of ROC 11 + ROC 14)."""
    return {"coppock": talib.COPPOCK(b.close)}


@_talib_feature("VORTEX", lookback=_tl("VORTEX", timeperiod=14))
def _vortex(b: Bars) -> dict[str, np.ndarray]:
    """Vortex indicator (14): +VI and -VI."""
    plus, minus = talib.VORTEX(b.high, b.low, b.close, timeperiod=14)
    return {"vortex_plus": plus, "vortex_minus": minus}


@_talib_feature("AC", lookback=_tl("AC"))
def _ac(b: Bars) -> dict[str, np.ndarray]:
    """Accelerator oscillator (5, 34, 5) divided by close."""
    return {"ac": talib.AC(b.high, b.low) / b.close}


@_talib_feature("AO", lookback=_tl("AO"))
def _ao(b: Bars) -> dict[str, np.ndarray]:
    """Awesome oscillator (5, 34) divided by close."""
    return {"ao": talib.AO(b.high, b.low) / b.close}


@_talib_feature("ERI", lookback=_tl("ERI", timeperiod=13), settle=_ema_settle(13))
def _eri(b: Bars) -> dict[str, np.ndarray]:
    """Elder ray (13): bull and bear power divided by close."""
    bull, bear = talib.ERI(b.high, b.low, b.close, timeperiod=13)
    return {"eri_bull": bull / b.close, "eri_bear": bear / b.close}


@_talib_feature("FRACTAL", lookback=_tl("FRACTAL"))
def _fractal(b: Bars) -> dict[str, np.ndarray]:
    """Williams fractal flags (2 / 2 bars), reported when the right-hand bars have closed."""
    high, low = talib.FRACTAL(b.high, b.low)
    return {"fractal_high": high.astype(np.float64), "fractal_low": low.astype(np.float64)}


# --- cycle indicators
@_talib_feature("HT_DCPERIOD", lookback=_tl("HT_DCPERIOD"), settle=_HT_SETTLE)
def _ht_dcperiod(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert dominant cycle period (bars)."""
    return {"ht_dcperiod": talib.HT_DCPERIOD(b.close)}


@_talib_feature("HT_DCPHASE", lookback=_tl("HT_DCPHASE"), settle=_HT_SETTLE)
def _ht_dcphase(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert dominant cycle phase as sin / cos (an angle in degrees wraps around; sin/cos do not)."""
    phase = np.deg2rad(talib.HT_DCPHASE(b.close))
    return {"ht_dcphase_sin": np.sin(phase), "ht_dcphase_cos": np.cos(phase)}


@_talib_feature("HT_PHASOR", lookback=_tl("HT_PHASOR"), settle=_HT_SETTLE)
def _ht_phasor(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert phasor components (in-phase, quadrature) divided by close."""
    inphase, quadrature = talib.HT_PHASOR(b.close)
    return {"ht_phasor_inphase": inphase / b.close, "ht_phasor_quadrature": quadrature / b.close}


@_talib_feature("HT_SINE", lookback=_tl("HT_SINE"), settle=_HT_SETTLE)
def _ht_sine(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert sine wave and lead sine."""
    sine, lead = talib.HT_SINE(b.close)
    return {"ht_sine": sine, "ht_leadsine": lead}


@_talib_feature("HT_TRENDMODE", lookback=_tl("HT_TRENDMODE"), settle=_HT_SETTLE)
def _ht_trendmode(b: Bars) -> dict[str, np.ndarray]:
    """Hilbert trend-vs-cycle mode (1 = trend)."""
    return {"ht_trendmode": talib.HT_TRENDMODE(b.close).astype(np.float64)}


# --- math operators over windows
@_talib_feature("MAX", lookback=_tl("MAX", timeperiod=30))
def _max(b: Bars) -> dict[str, np.ndarray]:
    """Highest high over 14 / 30 bars, log ratio to close."""
    return {f"max_high_{p}": _log_ratio(talib.MAX(b.high, timeperiod=p), b.close) for p in (14, 30)}


@_talib_feature("MIN", lookback=_tl("MIN", timeperiod=30))
def _min(b: Bars) -> dict[str, np.ndarray]:
    """Lowest low over 14 / 30 bars, log ratio to close."""
    return {f"min_low_{p}": _log_ratio(talib.MIN(b.low, timeperiod=p), b.close) for p in (14, 30)}


def _bars_since(index: np.ndarray, period: int) -> np.ndarray:
    """Bars elapsed since a window extreme given by its absolute index, scaled to 0..1 by the window."""
    t = np.arange(len(index), dtype=np.float64)
    return (t - index.astype(np.float64)) / (period - 1)


def _index_output(idx: np.ndarray, lookback: int) -> np.ndarray:
    """TA-Lib index outputs are integers (0 in the warm-up); mark the warm-up rows NaN explicitly."""
    out = idx.astype(np.float64)
    out[:lookback] = np.nan
    return out


@_talib_feature("MAXINDEX", lookback=_tl("MAXINDEX", timeperiod=30))
def _maxindex(b: Bars) -> dict[str, np.ndarray]:
    """Bars since the highest high of the last 14 / 30 bars (0..1 of the window)."""
    return {
        f"since_max_{p}": _bars_since(_index_output(talib.MAXINDEX(b.high, timeperiod=p), p - 1), p)
        for p in (14, 30)
    }


@_talib_feature("MININDEX", lookback=_tl("MININDEX", timeperiod=30))
def _minindex(b: Bars) -> dict[str, np.ndarray]:
    """Bars since the lowest low of the last 14 / 30 bars (0..1 of the window)."""
    return {
        f"since_min_{p}": _bars_since(_index_output(talib.MININDEX(b.low, timeperiod=p), p - 1), p)
        for p in (14, 30)
    }


@_talib_feature("MINMAX", lookback=_tl("MINMAX", timeperiod=60))
def _minmax(b: Bars) -> dict[str, np.ndarray]:
    """Position of close between the lowest and highest close of 60 bars (-1..1)."""
    lo, hi = talib.MINMAX(b.close, timeperiod=60)
    return {"minmax_close_60_pos": _safe_div(2.0 * b.close - hi - lo, hi - lo)}


@_talib_feature("MINMAXINDEX", lookback=_tl("MINMAXINDEX", timeperiod=60))
def _minmaxindex(b: Bars) -> dict[str, np.ndarray]:
    """Which came last in 60 bars, the highest or lowest close: (max index - min index) / 59 (-1..1)."""
    lo, hi = talib.MINMAXINDEX(b.close, timeperiod=60)
    return {"minmaxindex_close_60": (_index_output(hi, 59) - _index_output(lo, 59)) / 59.0}


@_talib_feature("SUM", lookback=_tl("SUM", timeperiod=14) + 1)
def _sum(b: Bars) -> dict[str, np.ndarray]:
    """Fraction of up-closes among the last 14 bars."""
    up = (b.close > _lag(b.close, 1)).astype(np.float64)
    up[0] = np.nan
    return {"up_fraction_14": talib.SUM(up, timeperiod=14) / 14.0}


# --- statistic functions
@_talib_feature("BETA", lookback=_tl("BETA", timeperiod=14))
def _beta(b: Bars) -> dict[str, np.ndarray]:
    """Beta of the high's returns on the low's returns over 14 bars (range expansion vs. drift)."""
    return {"beta_high_low_14": talib.BETA(b.high, b.low, timeperiod=14)}


@_talib_feature("CORREL", lookback=_tl("CORREL", timeperiod=30))
def _correl(b: Bars) -> dict[str, np.ndarray]:
    """Correlation of close with volume over 14 / 30 bars (0 when either is constant in the window)."""
    out = {}
    for p in (14, 30):
        c = talib.CORREL(b.close, b.volume, timeperiod=p)
        # TA-Lib divides by the product of the two variances; a constant window gives inf/NaN there.
        # Correlation with a constant is undefined; we define it as 0 (no linear relation).
        warm = np.arange(len(c)) < p - 1
        out[f"correl_close_volume_{p}"] = np.where(warm, np.nan, np.where(np.isfinite(c), c, 0.0))
    return out


@_talib_feature("LINEARREG_ANGLE", lookback=_tl("LINEARREG_ANGLE", timeperiod=30))
def _linreg_angle(b: Bars) -> dict[str, np.ndarray]:
    """Angle (degrees) of the regression line of 100 * log(close) over 14 / 30 bars: slope in %/bar."""
    # TA-Lib's angle depends on the price unit; on 100 * log price it is the same for every market.
    logc = 100.0 * np.log(b.close)
    return {f"linreg_angle_{p}": talib.LINEARREG_ANGLE(logc, timeperiod=p) for p in (14, 30)}


@_talib_feature("LINEARREG_SLOPE", lookback=_tl("LINEARREG_SLOPE", timeperiod=30))
def _linreg_slope(b: Bars) -> dict[str, np.ndarray]:
    """Slope of the regression line of log close over 14 / 30 bars (log return per bar)."""
    logc = np.log(b.close)
    return {f"linearreg_slope_{p}": talib.LINEARREG_SLOPE(logc, timeperiod=p) for p in (14, 30)}


@_talib_feature("VAR", lookback=_tl("VAR", timeperiod=30) + 1)
def _var(b: Bars) -> dict[str, np.ndarray]:
    """Variance of 1-bar percentage log returns over 30 bars."""
    r = 100.0 * np.diff(np.log(b.close), prepend=np.nan)
    return {"var_ret_30": talib.VAR(r, timeperiod=30)}


# --- volatility
@_talib_feature("TRANGE", lookback=_tl("TRANGE"))
def _trange(b: Bars) -> dict[str, np.ndarray]:
    """True range divided by close."""
    return {"trange": talib.TRANGE(b.high, b.low, b.close) / b.close}


@_talib_feature("CVI", lookback=_tl("CVI", timeperiod=10, rocperiod=10), settle=_ema_settle(10))
def _cvi(b: Bars) -> dict[str, np.ndarray]:
    """Chaikin volatility (10, 10)."""
    return {"cvi": talib.CVI(b.high, b.low, timeperiod=10, rocperiod=10)}


@_talib_feature("MASSI", lookback=_tl("MASSI", fastperiod=9, slowperiod=25), settle=_ema_settle(9))
def _massi(b: Bars) -> dict[str, np.ndarray]:
    """Mass index (9, 25)."""
    return {"massi": talib.MASSI(b.high, b.low, fastperiod=9, slowperiod=25)}


@_talib_feature("RVI", lookback=_tl("RVI", timeperiod=14, stddevperiod=10), settle=_ema_settle(14))
def _rvi(b: Bars) -> dict[str, np.ndarray]:
    """Relative volatility index (14, 10)."""
    return {"rvi": talib.RVI(b.close, timeperiod=14, stddevperiod=10)}


# --- volume: cumulative lines only as windowed differences / ratios (start level removed)
_FLOW = 14  # window for differences of cumulative volume lines


def _flow(cumulative: np.ndarray, volume: np.ndarray) -> np.ndarray:
    """Change of a cumulative volume line over _FLOW bars, per unit of volume traded in those bars.

    0 where those bars traded nothing (the line cannot move without volume: no flow).
    """
    return _safe_div(cumulative - _lag(cumulative, _FLOW), _window_sum(volume, _FLOW))


@_talib_feature("OBV", lookback=_FLOW)
def _obv(b: Bars) -> dict[str, np.ndarray]:
    """On-balance volume change over 14 bars / volume of those bars (-1..1)."""
    return {"obv_flow_14": _flow(talib.OBV(b.close, b.volume), b.volume)}


@_talib_feature("AD", lookback=_FLOW)
def _ad(b: Bars) -> dict[str, np.ndarray]:
    """Chaikin A/D line change over 14 bars / volume of those bars (-1..1)."""
    return {"ad_flow_14": _flow(talib.AD(b.high, b.low, b.close, b.volume), b.volume)}


@_talib_feature("PVT", lookback=_FLOW)
def _pvt(b: Bars) -> dict[str, np.ndarray]:
    """Price-volume trend change over 14 bars / volume of those bars."""
    return {"pvt_flow_14": _flow(talib.PVT(b.close, b.volume), b.volume)}


@_talib_feature("WAD", lookback=_tl("WAD") + _FLOW)
def _wad(b: Bars) -> dict[str, np.ndarray]:
    """Williams accumulation/distribution change over 14 bars, divided by close."""
    w = talib.WAD(b.high, b.low, b.close)
    return {"wad_change_14": (w - _lag(w, _FLOW)) / b.close}


for _fn in ("NVI", "PVI"):

    def _volume_index(b: Bars, fn: str = _fn) -> dict[str, np.ndarray]:
        """Negative / positive volume index: log change over 14 bars."""
        v = getattr(talib, fn)(b.close, b.volume)
        return {f"{fn.lower()}_change_14": _log_ratio(v, _lag(v, _FLOW))}

    _talib_feature(_fn, lookback=_tl(_fn) + _FLOW)(_volume_index)


@_talib_feature("ADOSC", lookback=_tl("ADOSC", fastperiod=3, slowperiod=10), settle=_ema_settle(10))
def _adosc(b: Bars) -> dict[str, np.ndarray]:
    """Chaikin A/D oscillator (3, 10) divided by the 10-bar mean volume (0 where those bars traded nothing)."""
    # The oscillator's EMAs still decay through a zero-volume run, but with nothing traded there is no pressure
    # to measure: defined as 0. The mean volume is an exact window mean (TA-Lib's running SMA leaves a residue
    # there, which made this ratio reach 1e13).
    return {
        "adosc": _safe_div(
            talib.ADOSC(b.high, b.low, b.close, b.volume, fastperiod=3, slowperiod=10),
            _rolling(b.volume, 10, np.mean),
        )
    }


@_talib_feature("EFI", lookback=_tl("EFI", timeperiod=13), settle=_ema_settle(13))
def _efi(b: Bars) -> dict[str, np.ndarray]:
    """Elder force index (13) divided by close times the 13-bar mean volume (0 where those bars traded nothing)."""
    # As ADOSC: an exact window mean, and 0 (no force) where the 13 bars traded nothing.
    return {
        "efi": _safe_div(talib.EFI(b.close, b.volume, timeperiod=13), b.close * _rolling(b.volume, 13, np.mean))
    }


@_talib_feature("MARKETFI", lookback=_tl("MARKETFI") + 13)
def _marketfi(b: Bars) -> dict[str, np.ndarray]:
    """Market facilitation index (range / volume) made unitless: times 14-bar mean volume / close."""
    # Range per unit of volume is undefined on a bar without volume: such a bar carries the value of the latest
    # bar that traded (causal: an earlier row), and 0 before any bar has a defined value.
    traded = b.volume > 0
    mfi = talib.MARKETFI(b.high, b.low, np.where(traded, b.volume, 1.0))
    value = mfi * _rolling(b.volume, 14, np.mean) / b.close
    out = _carry_defined(value, traded & np.isfinite(value))
    out[: _tl("MARKETFI") + 13] = np.nan  # the warm-up stays undefined, as for every producer
    return {"marketfi": out}


@_talib_feature("PVO", lookback=_tl("PVO", fastperiod=12, slowperiod=26, matype=1), settle=_ema_settle(26))
def _pvo(b: Bars) -> dict[str, np.ndarray]:
    """Percentage volume oscillator (EMA 12 vs EMA 26 of volume)."""
    return {"pvo": talib.PVO(b.volume, fastperiod=12, slowperiod=26, matype=1)}


# --- candlestick patterns: TA-Lib gives -200/-100/0/100/200; /100 keeps them at -2..2.
for _fn in talib.get_function_groups()["Pattern Recognition"]:

    def _pattern(b: Bars, fn: str = _fn) -> dict[str, np.ndarray]:
        """Candlestick pattern signal (-1 bearish, +1 bullish, +-2 confirmed; 0 none)."""
        out = getattr(talib, fn)(b.open, b.high, b.low, b.close).astype(np.float64) / 100.0
        lb = _tl(fn)
        out[:lb] = np.nan
        return {fn.lower(): out}

    _talib_feature(_fn, lookback=_tl(_fn))(_pattern)


def talib_coverage() -> tuple[set[str], dict[str, str]]:
    """TA-Lib functions used by the bank, and those excluded with the reason."""
    used = {s for p in registered_producers("talib") for s in p.sources}
    return used, dict(TALIB_EXCLUDED)


# ====================================================================================== raw features
@dataclass
class RawFeatures:
    """Un-normalised features of every block, NaN during each column's warm-up."""

    values: np.ndarray
    """float64 ``(T, F)``."""
    names: list[str]
    blocks: dict[str, slice]
    first_valid: int
    """First row at which every column is defined by its declaration (max over blocks)."""
    block_first_valid: dict[str, int] = field(default_factory=dict)


def compute_features(bars: Bars, producers: Iterable[FeatureProducer]) -> tuple[np.ndarray, list[str], int]:
    """Run ``producers`` on ``bars``: ``(values (T, F) float64, names, max lookback)``."""
    columns: list[np.ndarray] = []
    names: list[str] = []
    lookback = 0
    for producer in producers:
        out = producer(bars)
        for key, col in out.items():
            columns.append(col)
            names.append(key)
        lookback = max(lookback, producer.lookback)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate feature column names {dup}")
    values = np.column_stack(columns) if columns else np.empty((len(bars), 0))
    return values, names, lookback


def _raw_cache_key(frame: pd.DataFrame, config: FeatureConfig, base_freq: pd.Timedelta) -> str:
    """Cache key: data fingerprint + what the raw features depend on (bank, timeframes, code version)."""
    payload = {
        "fingerprint": fingerprint(frame),
        "bank": config.bank,
        "timeframes": list(config.timeframes),
        "session_close": config.session_close if config.timeframes else None,
        "base_freq_ns": int(base_freq.value),
        "feature_version": FEATURE_VERSION,
        "talib": talib.__version__,
        "producers": [(p.name, p.lookback) for p in registered_producers(config.bank)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> RawFeatures | None:
    """Load raw features from a cache file, or None if it does not exist."""
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"sentio_lab"])
    values = np.column_stack([table.column(i).to_numpy() for i in range(table.num_columns)]).astype(
        np.float64
    )
    return RawFeatures(
        values=values,
        names=list(meta["names"]),
        blocks={k: slice(*v) for k, v in meta["blocks"].items()},
        first_valid=int(meta["first_valid"]),
        block_first_valid={k: int(v) for k, v in meta["block_first_valid"].items()},
    )


def _write_cache(path: Path, raw: RawFeatures) -> None:
    """Write raw features atomically (temp file + rename) so a reader never sees half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {
        "names": raw.names,
        "blocks": {k: [s.start, s.stop] for k, s in raw.blocks.items()},
        "first_valid": raw.first_valid,
        "block_first_valid": raw.block_first_valid,
    }
    # Positional column names; the feature names, blocks and warm-ups travel in the file's metadata.
    table = pa.table({f"c{i}": raw.values[:, i] for i in range(raw.values.shape[1])})
    table = table.replace_schema_metadata({b"sentio_lab": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def raw_features(frame: pd.DataFrame, config: FeatureConfig, base_freq: pd.Timedelta) -> RawFeatures:
    """Raw (un-normalised) features of the base block and every extra timeframe, cached if configured.

    ``frame`` is validated first (sorted, unique timestamps, the OHLCV columns, valid prices; see
    :func:`sentio_lab.data.canonicalize`): :class:`~sentio_lab.data.DataValidationError` names the problem and
    the rows. ``base_freq`` is the duration of one base bar (used only by the timeframe views).
    """
    return _raw_features(_validated_frame(frame, source="raw_features"), config, base_freq)


def _raw_features(frame: pd.DataFrame, config: FeatureConfig, base_freq: pd.Timedelta) -> RawFeatures:
    """:func:`raw_features` of an already canonical frame."""
    cache_path = None
    if config.cache_dir is not None:
        cache_path = Path(config.cache_dir) / f"raw-{_raw_cache_key(frame, config, base_freq)}.parquet"
        cached = _read_cache(cache_path)
        if cached is not None and cached.values.shape[0] == len(frame):
            return cached
    producers = registered_producers(config.bank)
    base_values, base_names, base_lookback = compute_features(Bars.from_frame(frame), producers)
    parts, names = [base_values], list(base_names)
    blocks = {"base": slice(0, len(base_names))}
    block_first = {"base": base_lookback}
    for rule in config.timeframes:
        view = resample_causal(frame, rule, base_freq, session_close=config.session_close)
        htf_values, htf_names, htf_lookback = compute_features(Bars.from_frame(view.bars), producers)
        parts.append(view.align(htf_values))
        blocks[rule] = slice(len(names), len(names) + len(htf_names))
        names.extend(f"{rule}:{n}" for n in htf_names)
        block_first[rule] = view.first_row_with(htf_lookback)
    raw = RawFeatures(
        values=np.column_stack(parts),
        names=names,
        blocks=blocks,
        first_valid=max(block_first.values()),
        block_first_valid=block_first,
    )
    if cache_path is not None:
        _write_cache(cache_path, raw)
    return raw


def _check_finite(values: np.ndarray, names: list[str], first_valid: int, index: pd.Index) -> None:
    """Raise if any value from ``first_valid`` on is NaN or inf, naming the columns and first rows."""
    bad = ~np.isfinite(values[first_valid:])
    if bad.any():
        cols = np.flatnonzero(bad.any(axis=0))
        detail = ", ".join(
            f"{names[j]} (first at {index[first_valid + int(np.argmax(bad[:, j]))]})" for j in cols[:5]
        )
        more = f" and {len(cols) - 5} more" if len(cols) > 5 else ""
        raise ValueError(
            f"features are NaN/inf after the warm-up (row {first_valid}): {detail}{more}; a producer "
            "under-declares its lookback or the data breaks its assumptions"
        )


# ===================================================================================== normalisation
def _fit_normaliser(x: np.ndarray, method: str) -> dict:
    """Per-column statistics of training rows ``x`` (no constant columns) as plain python lists."""
    if method == "robust":
        q25, med, q75 = np.percentile(x, [25, 50, 75], axis=0)
        scale = (q75 - q25) / _IQR_TO_STD
        # Mostly-constant columns (candlestick patterns, flags) have IQR 0; scaling them by their largest
        # training departure from the median keeps their rare events at +-1 instead of blowing them up.
        spread = np.max(np.abs(x - med), axis=0)
        scale = np.where(scale > 0, scale, spread)
        return {"method": "robust", "center": med.tolist(), "scale": scale.tolist()}
    if method == "rank":
        probs = np.linspace(0.0, 1.0, RANK_KNOTS)
        quantiles = np.quantile(x, probs, axis=0)
        knots, levels = [], []
        for j in range(x.shape[1]):
            # Tied quantiles (discrete features) collapse to one knot at the mean of their CDF levels.
            uniq, inverse = np.unique(quantiles[:, j], return_inverse=True)
            level = np.bincount(inverse, weights=2.0 * probs - 1.0) / np.bincount(inverse)
            knots.append(uniq.tolist())
            levels.append(level.tolist())
        return {"method": "rank", "knots": knots, "levels": levels}
    return {"method": "none"}


def _apply_normaliser(x: np.ndarray, params: dict, clip: float) -> np.ndarray:
    """Apply fitted statistics to ``x`` (all rows), then clip."""
    method = params["method"]
    if method == "robust":
        out = (x - np.asarray(params["center"])) / np.asarray(params["scale"])
    elif method == "rank":
        out = np.empty_like(x)
        for j in range(x.shape[1]):
            # Piecewise-linear empirical CDF; outside the training range it saturates at -1 / +1.
            out[:, j] = np.interp(x[:, j], params["knots"][j], params["levels"][j])
    else:
        return x
    return np.clip(out, -clip, clip)


def _prune(x: np.ndarray, threshold: float) -> list[int]:
    """Greedy de-duplication in column order: keep a column unless |corr| with a kept one > threshold."""
    corr = np.abs(np.corrcoef(x, rowvar=False)) if x.shape[1] > 1 else np.ones((1, 1))
    kept: list[int] = []
    for j in range(x.shape[1]):
        if not kept or np.max(corr[j, kept]) <= threshold:
            kept.append(j)
    return kept


# =============================================================================== observation builder
def _validated_frame(frame: pd.DataFrame, source: str = "frame") -> pd.DataFrame:
    """Canonical OHLCV frame or a clear error (see :func:`sentio_lab.data.canonicalize`)."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{source}: frame must be a pandas DataFrame, got {type(frame).__name__}")
    return canonicalize(frame, source=source, min_rows=1)


def _fit_state(raw: RawFeatures, fit: np.ndarray, config: FeatureConfig, base_freq: pd.Timedelta) -> dict:
    """Fit dropping, pruning and normalisation on the rows of ``raw`` where the boolean mask ``fit`` is True;
    the state records the first and one-past-last of them (``fit_rows``) and their runs (``fit_segments``)."""
    train = raw.values[fit]
    runs = _regime.row_runs(fit)
    columns: list[str] = []
    block_sizes: dict[str, int] = {}
    dropped_constant: list[str] = []
    dropped_correlated: list[str] = []
    for block, sl in raw.blocks.items():
        idx = np.arange(sl.start, sl.stop)
        # A column constant on the training range carries nothing to learn and cannot be scaled.
        constant = np.ptp(train[:, idx], axis=0) == 0
        dropped_constant += [raw.names[i] for i in idx[constant]]
        idx = idx[~constant]
        if config.prune_corr is not None and len(idx) > 1:
            params = _fit_normaliser(train[:, idx], config.normalise)
            normed = _apply_normaliser(train[:, idx], params, config.clip)
            keep = _prune(normed, config.prune_corr)
            dropped_correlated += [raw.names[i] for i in np.delete(idx, keep)]
            idx = idx[keep]
        if len(idx) == 0:
            raise ValueError(f"block {block!r}: every feature is constant on the training range")
        columns += [raw.names[i] for i in idx]
        block_sizes[block] = len(idx)
    selected = train[:, [raw.names.index(c) for c in columns]]
    return {
        "version": FEATURE_VERSION,
        "config": config.fitted_fields(),
        "base_freq_ns": int(base_freq.value),
        "fit_rows": [runs[0][0], runs[-1][1]],
        "fit_segments": [[a, b] for a, b in runs],
        "columns": columns,
        "block_sizes": block_sizes,
        "dropped_constant": dropped_constant,
        "dropped_correlated": dropped_correlated,
        "normaliser": _fit_normaliser(selected, config.normalise),
        "regime": None,
    }


def _check_state(state: dict, config: FeatureConfig) -> None:
    """A saved state applies only to the configuration it was fitted with."""
    for key in ("version", "config", "base_freq_ns", "columns", "block_sizes", "normaliser", "regime"):
        if key not in state:
            raise ValueError(f"feature state lacks {key!r}; was it produced by build_observation_features?")
    if state["version"] != FEATURE_VERSION:
        raise ValueError(
            f"feature state has version {state['version']}, this code computes version {FEATURE_VERSION}"
        )
    wanted = config.fitted_fields()
    diff = {k: (state["config"].get(k), v) for k, v in wanted.items() if state["config"].get(k) != v}
    if diff:
        raise ValueError(f"feature state was fitted with a different config (state, given): {diff}")


def _training_rows(n: int, train_stop: int | None, train_rows: np.ndarray | None) -> np.ndarray:
    """Boolean ``(n,)`` mask of the training rows given as ``train_stop`` (rows ``< train_stop``) or a mask."""
    if train_rows is None:
        if isinstance(train_stop, bool) or not isinstance(train_stop, (int, np.integer)):
            raise TypeError(f"train_stop must be an integer row position, got {train_stop!r}")
        if not 0 < int(train_stop) <= n:
            raise ValueError(f"train_stop={train_stop} is outside 1..{n} (the frame has {n} rows)")
        return np.arange(n) < int(train_stop)
    if train_stop is not None:
        raise ValueError("give train_stop or train_rows, not both")
    rows = np.asarray(train_rows)
    if rows.dtype != bool or rows.shape != (n,):
        raise ValueError(f"train_rows must be a boolean mask of shape ({n},), got {rows.dtype} {rows.shape}")
    if not rows.any():
        raise ValueError("train_rows selects no row")
    return rows.copy()


def _training_bar_freq(frame: pd.DataFrame, rows: np.ndarray) -> pd.Timedelta:
    """Median gap between consecutive rows inside the runs of training rows (no gap spans a non-training row)."""
    runs = _regime.row_runs(rows)
    if len(runs) == 1:
        return infer_bar_freq(frame.iloc[runs[0][0] : runs[0][1]])
    times = frame.index.as_unit("ns").asi8
    gaps = np.concatenate([np.diff(times[a:b]) for a, b in runs])
    return pd.Timedelta(int(np.median(gaps)), unit="ns") if len(gaps) else pd.Timedelta(0)


def build_observation_features(
    frame: pd.DataFrame,
    train_stop: int | None,
    config: FeatureConfig = FeatureConfig(),
    state: dict | None = None,
    *,
    train_rows: np.ndarray | None = None,
) -> ObservationFeatures:
    """Compute, normalise and assemble the observation matrix for ``frame``.

    Without ``state`` the normaliser, pruning and HMM are fitted on the training rows from ``first_valid`` on:
    rows ``< train_stop``, or (``train_stop=None``) the rows where the boolean ``(len(frame),)`` mask
    ``train_rows`` is True, e.g. several disjoint segments (:func:`sentio_lab.splits.fit_rows` of a fold's
    training ranges; the HMM treats each run as its own sequence). The base bar duration comes from gaps inside
    the runs of training rows. With ``state`` (from an earlier call) nothing is refit and the training rows are
    only checked. The features themselves are causal either way: row ``t`` reads bars ``<= t``.
    """
    frame = _validated_frame(frame)
    n = len(frame)
    rows = _training_rows(n, train_stop, train_rows)
    if state is not None:
        _check_state(state, config)
        base_freq = pd.Timedelta(int(state["base_freq_ns"]), unit="ns")
    else:
        # Inferred from the training rows only, so other bars cannot move timeframe buckets.
        base_freq = _training_bar_freq(frame, rows)
        if config.timeframes and base_freq <= pd.Timedelta(0):
            raise ValueError("cannot infer the base bar duration from fewer than 2 training rows")

    raw = _raw_features(frame, config, base_freq)
    first_valid = raw.first_valid
    regime_inputs = None
    if config.regimes:
        regime_inputs = _regime.regime_inputs(frame["close"].to_numpy(dtype=np.float64))
        first_valid = max(first_valid, _regime.INPUT_LOOKBACK)
    if first_valid >= n:
        raise ValueError(
            f"too few rows: the warm-up needs {first_valid} bars (per block: {raw.block_first_valid}) "
            f"but the frame has {n}"
        )
    _check_finite(raw.values, raw.names, first_valid, frame.index)

    if state is None:
        fit = rows & (np.arange(n) >= first_valid)
        if fit.sum() < MIN_TRAIN_ROWS:
            given = f"train_stop={train_stop}" if train_rows is None else f"train_rows ({int(rows.sum())} rows)"
            raise ValueError(
                f"{given} leaves {int(fit.sum())} training rows after the "
                f"warm-up of {first_valid} bars; at least {MIN_TRAIN_ROWS} are needed"
            )
        state = _fit_state(raw, fit, config, base_freq)
        if config.regimes:
            model = _regime.fit_regime_model(
                regime_inputs,
                None,
                None,
                config.regimes,
                rows=fit,
                seed=config.seed,
                restarts=config.regime_restarts,
            )
            state["regime"] = model.to_state()

    missing = [c for c in state["columns"] if c not in raw.names]
    if missing:
        raise ValueError(f"feature state expects column(s) the bank did not produce: {missing[:5]}")
    position = {name: i for i, name in enumerate(raw.names)}
    selected = raw.values[:, [position[c] for c in state["columns"]]]
    normed = _apply_normaliser(selected, state["normaliser"], config.clip)
    names = list(state["columns"])
    blocks: dict[str, slice] = {}
    start = 0
    for block, size in state["block_sizes"].items():
        blocks[block] = slice(start, start + size)
        start += size
    if config.regimes:
        model = _regime.RegimeModel.from_state(state["regime"])
        probs = _regime.filtered_probabilities(model, regime_inputs)
        normed = np.column_stack([normed, probs])
        names += [f"regime:p{k}" for k in range(model.n_states)]
        blocks["regime"] = slice(start, start + model.n_states)

    values = normed.astype(np.float32)
    values[:first_valid] = 0.0
    _check_finite(values, names, first_valid, frame.index)
    return ObservationFeatures(
        values=values, names=names, first_valid=first_valid, blocks=blocks, state=state
    )


def config_from_state(state: dict, **overrides: object) -> FeatureConfig:
    """The :class:`FeatureConfig` a fitted state was built with (cache_dir / seed from ``overrides``)."""
    fields = dict(state["config"])
    fields["timeframes"] = tuple(fields["timeframes"])
    fields.update(overrides)
    return FeatureConfig(**fields)


def describe_config(config: FeatureConfig) -> str:
    """One-line JSON of a config (for logs and run records)."""
    return json.dumps(asdict(config), sort_keys=True, default=list)
