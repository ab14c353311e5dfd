"""Market data: load OHLCV from bundled datasets or user files, validate it, report its quality, split it.

Every loader returns a :class:`MarketData` holding one *canonical frame*: a sorted, unique
``DatetimeIndex`` and float64 columns ``open high low close volume``. Bad input raises
:class:`DataValidationError` naming the problem and the offending rows; nothing is dropped or filled.
Every market also carries a :class:`DataQuality` report (``market.quality``; print it at the start of a run).

Stale opens
-----------
The environments fill an order chosen at the close of bar t at the **open of bar t+1**. Some feeds carry no
real opening price and copy the previous close instead; on such a bar the fill happens at the very close the
agent has just seen (same-bar execution, which the timing convention forbids). :func:`load_market` finds
those feeds with the stale-open rule, stated in full in :mod:`sentio_lab.data.quality` and implemented by
:func:`data_quality`: a window of ``STALE_WINDOW`` (63) consecutive session opens is flagged when more than
``STALE_THRESHOLD`` (10 %) of them open at the previous bar's close exactly, and flagged windows make *stale
stretches*. By default (``stale_opens="refuse"``) a selected range that still holds one is refused; the policy,
and the default start of the bundled datasets that the rule accepts, are described in
:mod:`sentio_lab.data.loading`.

Session close
-------------
A market may say when its trading day ends (:attr:`MarketData.session_close`, "HH:MM Area/City", parsed by
:func:`parse_session_close`; see :mod:`sentio_lab.data.session`). :func:`sentio_lab.env.market.prepare_market`
hands it to the features, whose daily / weekly / monthly views then run from one close to the next
(:mod:`sentio_lab.data.timeframes`).

Modules: :mod:`~sentio_lab.data.validation` (the canonical frame, :func:`canonicalize`, bar spacing and
fingerprint), :mod:`~sentio_lab.data.session` (session close), :mod:`~sentio_lab.data.quality`
(:class:`DataQuality`, the stale-open rule), :mod:`~sentio_lab.data.market_data` (:class:`MarketData`,
:func:`to_market`), :mod:`~sentio_lab.data.ranges` (:func:`select_range`, :func:`chronological_split`) and
:mod:`~sentio_lab.data.loading` (bundled datasets, files, :func:`load_market`).
"""

from __future__ import annotations

from sentio_lab.data.loading import (
    BUNDLED_DATASETS,
    DEFAULT_DATASET,
    SP500_DEFAULT_START,
    STALE_OPENS_POLICIES,
    TIMESTAMP_COLUMNS,
    BundledDataset,
    DataFileNotFoundError,
    StaleOpensPolicy,
    load_market,
    read_ohlcv_file,
)
from sentio_lab.data.market_data import MarketData, to_market
from sentio_lab.data.quality import (
    SESSION_GAP_FACTOR,
    STALE_THRESHOLD,
    STALE_WINDOW,
    DataQuality,
    StaleStretch,
    YearQuality,
    data_quality,
    find_stale_stretches,
    session_open_mask,
)
from sentio_lab.data.ranges import (
    MIN_EVALUATION_BARS,
    Split,
    bars_needed,
    chronological_split,
    select_range,
    split_stops,
    too_few_bars_error,
)
from sentio_lab.data.session import SessionClose, canonical_session_close, parse_session_close
from sentio_lab.data.validation import (
    CLI_FLAGS,
    CLOSE_ONLY_OPTIONAL,
    DEFAULT_MIN_ROWS,
    OHLCV_COLUMNS,
    PRICE_COLUMNS,
    DataValidationError,
    canonicalize,
    fingerprint,
    infer_bar_freq,
    option,
)

__all__ = [
    "BUNDLED_DATASETS",
    "CLI_FLAGS",
    "CLOSE_ONLY_OPTIONAL",
    "DEFAULT_DATASET",
    "DEFAULT_MIN_ROWS",
    "MIN_EVALUATION_BARS",
    "OHLCV_COLUMNS",
    "PRICE_COLUMNS",
    "SESSION_GAP_FACTOR",
    "SP500_DEFAULT_START",
    "STALE_OPENS_POLICIES",
    "STALE_THRESHOLD",
    "STALE_WINDOW",
    "TIMESTAMP_COLUMNS",
    "BundledDataset",
    "DataFileNotFoundError",
    "DataQuality",
    "DataValidationError",
    "MarketData",
    "SessionClose",
    "Split",
    "StaleOpensPolicy",
    "StaleStretch",
    "YearQuality",
    "bars_needed",
    "canonical_session_close",
    "canonicalize",
    "chronological_split",
    "data_quality",
    "find_stale_stretches",
    "fingerprint",
    "infer_bar_freq",
    "load_market",
    "option",
    "parse_session_close",
    "read_ohlcv_file",
    "select_range",
    "session_open_mask",
    "split_stops",
    "to_market",
    "too_few_bars_error",
]
