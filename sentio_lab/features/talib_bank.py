"""The ``"talib"`` bank's machinery: TA-Lib lookbacks, registration helpers, the exclusions and the coverage audit.

The bank is the basic features plus every applicable TA-Lib function (:data:`TALIB_EXCLUDED` lists the ones
left out and why), over several periods, made scale-free (price levels become log ratios to the close, price
differences are divided by the close) so one normaliser fits all markets. Its producers live in one module per
group, registered in this order: :mod:`~sentio_lab.features.overlap`, :mod:`~sentio_lab.features.momentum`,
:mod:`~sentio_lab.features.cycles`, :mod:`~sentio_lab.features.stats`, :mod:`~sentio_lab.features.volume` and
:mod:`~sentio_lab.features.patterns`.

Start dependence (decided): recursive indicators (EMA-family, Wilder smoothing, SAR, Hilbert
transforms, Heikin-Ashi) are computed by TA-Lib's forward recursion, so their value at ``t`` uses bars
``<= t`` only -- causal -- but it also depends, fading geometrically, on where the series *started*
(the seed of the recursion). We accept that and add an explicit settling warm-up to the lookback of
each such producer (``settle``) so the seed's weight has mostly decayed before the first usable row.
Cumulative level features (OBV, A/D, PVT, NVI, PVI, WAD) are used only through differences or ratios
over a fixed window, which removes the start level entirely; TA-Lib's anchored VWAP and CUMSUM, whose
value depends on the start forever, are excluded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import talib
import talib.abstract

from sentio_lab.features.registry import Bars, register_feature, registered_producers

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


def _tl(fn: str, **params: float) -> int:
    """TA-Lib's own lookback for ``fn`` with ``params`` (unstable periods at TA-Lib's default, 0)."""
    f = talib.abstract.Function(fn)
    if params:
        f.parameters = params
    return int(f.lookback)


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


def talib_coverage() -> tuple[set[str], dict[str, str]]:
    """TA-Lib functions used by the bank, and those excluded with the reason."""
    used = {s for p in registered_producers("talib") for s in p.sources}
    return used, dict(TALIB_EXCLUDED)
