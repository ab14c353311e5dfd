"""The producer registry: what a feature producer receives (:class:`Bars`), declares and is listed in.

A producer is a named, causal function of OHLCV registered with :func:`register_feature`; it declares its
lookback, the number of warm-up bars before all of its outputs are defined. :data:`FEATURE_REGISTRY` keeps the
producers in registration order, which is the column order of the features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sentio_lab.data import CLOSE_ONLY_OPTIONAL, OHLCV_COLUMNS

#: Bumped whenever a producer's definition changes, so cached raw features are not reused.
#: 2: zero-volume conventions (MFI, VWMA, RVOL, MARKETFI; exact window sums of volume), session close.
FEATURE_VERSION = 2
BANKS: tuple[str, ...] = ("basic", "talib", "close", "slow")
#: The "close" bank: the basic producers that read closes only (log returns, realised volatility), for close-only
#: data (no open / high / low / volume; next-close fills).
CLOSE_BANK: tuple[str, ...] = ("ret_1", "ret_5", "ret_20", "rvol_5", "rvol_20")


def bank_optional_columns(bank: str) -> tuple[str, ...]:
    """The OHLCV columns ``bank``'s producers never read, which may therefore be absent or NaN (close-only data)."""
    return CLOSE_ONLY_OPTIONAL if bank in ("close", "slow") else ()


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
    """Producers of ``bank`` in registration order: "basic", "talib" (includes basic), "close" (the basic
    producers of :data:`CLOSE_BANK`), "slow" (:mod:`sentio_lab.features.slow`, closes only) or None (all)."""
    if bank is None:
        return list(FEATURE_REGISTRY.values())
    if bank not in BANKS:
        raise ValueError(f"unknown bank {bank!r}; use one of {BANKS}")
    if bank == "close":
        return [p for p in FEATURE_REGISTRY.values() if p.name in CLOSE_BANK]
    wanted = {"basic": {"basic"}, "talib": {"basic", "talib"}, "slow": {"slow"}}[bank]
    return [p for p in FEATURE_REGISTRY.values() if p.bank in wanted]
