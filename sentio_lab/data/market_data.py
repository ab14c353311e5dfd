"""A validated market (:class:`MarketData`): the canonical frame plus its bar spacing, fingerprint, quality report
and session close, as :func:`to_market` records them for a raw frame."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sentio_lab.data.quality import DataQuality, data_quality
from sentio_lab.data.session import canonical_session_close
from sentio_lab.data.validation import DEFAULT_MIN_ROWS, canonicalize, fingerprint, infer_bar_freq


@dataclass(frozen=True)
class MarketData:
    """A validated market: the canonical OHLCV frame plus what a run must record about it."""

    frame: pd.DataFrame
    """Sorted unique DatetimeIndex; float64 columns open, high, low, close, volume."""
    name: str
    """Dataset name or file path the data came from."""
    bar_freq: pd.Timedelta
    """Inferred bar spacing (median gap between consecutive bars)."""
    fingerprint: str
    """Hash of index and values; two runs on the same data share it."""
    quality: DataQuality | None = None
    """Data-quality report (always set by :func:`to_market` and :func:`load_market`)."""
    session_close: str | None = None
    """When a trading day ends ("HH:MM Area/City", e.g. "17:00 America/New_York" for FX), None for UTC days.
    :func:`sentio_lab.env.market.prepare_market` hands it to the features (``FeatureConfig.session_close``), where
    daily / weekly / monthly views run from one session close to the next."""

    def __len__(self) -> int:
        """Number of bars."""
        return len(self.frame)


def to_market(
    raw: pd.DataFrame, *, name: str, min_rows: int = DEFAULT_MIN_ROWS, session_close: str | None = None,
    optional: tuple[str, ...] = (),
) -> MarketData:
    """Canonicalise and validate a raw OHLCV frame, then record its bar frequency, fingerprint and quality.

    No stale-open policy is applied here (the report lists any stretches); :func:`load_market` applies it.
    ``optional`` columns may be absent or NaN (close-only data, :func:`~sentio_lab.data.canonicalize`).
    """
    frame = canonicalize(raw, source=name, min_rows=min_rows, optional=optional)
    bar_freq = infer_bar_freq(frame)
    return MarketData(frame=frame, name=name, bar_freq=bar_freq, fingerprint=fingerprint(frame),
                      quality=data_quality(frame, bar_freq, source=name),
                      session_close=canonical_session_close(session_close))
