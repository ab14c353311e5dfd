"""How far back the features may read: the span of every feature block, in base bars (the embargo of the CPCV folds
and the look-back checks count it; :mod:`sentio_lab.env.splits` has the vocabulary).

``F`` (:func:`feature_span`): feature row ``r`` is a function of raw bars ``[r - F, r]``. For the base block ``F`` is
the longest registered producer lookback; a higher-timeframe (HTF) producer with lookback ``L`` reads ``L + 1``
complete HTF bars plus the still-open bucket, so it spans up to ``(L + 2) * B - 1`` base bars with ``B`` base bars
per HTF bar (:func:`htf_span_bound`; on the actual calendar when the frame is given, :func:`htf_span`); the HMM
inputs add :data:`sentio_lab.features.regime.INPUT_LOOKBACK`; exogenous series count how long before a row the oldest
period they show began (:func:`sentio_lab.features.exogenous.exogenous_span`, on the frame's calendar).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sentio_lab.data import infer_bar_freq
from sentio_lab.data.timeframes import resample_causal
from sentio_lab.features.config import FeatureConfig
from sentio_lab.features.exogenous import exogenous_span
from sentio_lab.features.regime import INPUT_LOOKBACK
from sentio_lab.features.registry import registered_producers


def htf_span(
    frame: pd.DataFrame,
    rule: str,
    lookback: int,
    base_freq: pd.Timedelta | None = None,
    session_close: str | None = None,
) -> int:
    """Base-bar span of an HTF producer with ``lookback`` on ``frame``'s calendar: the tight bound given the
    declared lookback alone.

    The largest ``r - first`` over rows ``r`` with a defined value, where ``first`` is the first base row of the
    oldest HTF bar the row may read (``latest(r) - lookback``), assumed read whole (its open, high, low, volume).
    A producer that reads only that bar's close reaches up to one HTF bar less. Pass the features' own
    ``base_freq`` (their fitted state's ``base_freq_ns``) and ``session_close`` so the buckets are theirs.
    """
    base = infer_bar_freq(frame) if base_freq is None else base_freq
    # session_close only when set: resample_causal takes it as a keyword-only argument where sessions exist
    extra = {} if session_close is None else {"session_close": session_close}
    view = resample_causal(frame, rule, base, **extra)
    first_rows = np.searchsorted(frame.index.as_unit("ns").asi8, view.bars.index.as_unit("ns").asi8, side="left")
    rows = np.flatnonzero(view.latest >= lookback)
    if len(rows) == 0:
        return len(frame)  # never defined: nothing of this block reaches the env
    return int(np.max(rows - first_rows[view.latest[rows] - lookback]))


def htf_span_bound(lookback: int, bars_per_htf_bar: int) -> int:
    """Calendar-free bound on an HTF producer's span: ``(lookback + 2) * bars_per_htf_bar - 1`` base bars."""
    if lookback < 0 or bars_per_htf_bar < 1:
        raise ValueError(f"lookback must be >= 0 and bars_per_htf_bar >= 1, got {lookback}, {bars_per_htf_bar}")
    return (lookback + 2) * bars_per_htf_bar - 1


def feature_span(
    config: FeatureConfig,
    frame: pd.DataFrame | None = None,
    *,
    bars_per_htf_bar: dict[str, int] | None = None,
    base_freq: pd.Timedelta | None = None,
) -> int:
    """How many bars before row ``r`` the observation features of ``config`` may read (see the module doc).

    Every block runs the same producers, so ``L`` is the bank's longest registered lookback. HTF blocks use the
    span on ``frame``'s own calendar when given (:func:`htf_span`), else :func:`htf_span_bound` with
    ``bars_per_htf_bar[rule]``; exogenous series need ``frame``.
    """
    lookback = max((p.lookback for p in registered_producers(config.bank)), default=0)
    span = max(lookback, INPUT_LOOKBACK if config.regimes else 0)
    for rule in config.timeframes:
        if frame is not None:
            span = max(span, htf_span(frame, rule, lookback, base_freq, getattr(config, "session_close", None)))
        elif bars_per_htf_bar is not None and rule in bars_per_htf_bar:
            span = max(span, htf_span_bound(lookback, bars_per_htf_bar[rule]))
        else:
            raise ValueError(f"timeframe {rule!r}: pass the frame or bars_per_htf_bar[{rule!r}] to size its span")
    exogenous = getattr(config, "exogenous", ())
    if exogenous:
        if frame is None:
            raise ValueError(f"exogenous series {list(exogenous)}: pass the frame to size their span")
        base = infer_bar_freq(frame) if base_freq is None else base_freq
        span = max(span, exogenous_span(frame.index, exogenous, base))
    return span
