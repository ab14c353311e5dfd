"""Token blocks of higher timeframes: per timeframe its own sequence of *completed* bars, one token per bar.

A hierarchical (multi-timeframe) policy reads, at base bar ``t``, the last ``K_h`` completed bars of each higher
timeframe ``h`` as a sequence of tokens, instead of base-bar columns that repeat until the next ``h`` bar closes.
:func:`timeframe_token_block` builds, for one timeframe, a :class:`~sentio_lab.features.observation_layout.TokenBlock`:

* ``table`` ``(1 + n_h, d + 1)``: row 0 is the padding token (all zeros); row ``1 + j`` is completed ``h`` bar
  ``j``'s own features (the producers of a feature bank run on the ``h`` bars themselves,
  :mod:`sentio_lab.data.timeframes` gives the bars), normalised with robust statistics fitted on training bars only,
  followed by a validity flag ``1.0`` (0 in the padding row, so a network can mask padding by it);
* ``index`` ``(T, K_h)``: row ``t`` names the last ``K_h`` ``h`` bars visible at ``t``'s close, oldest first,
  padded (row 0) before ``K_h`` exist or while a bar's features are still in their warm-up.

Causality: ``h`` bar ``j`` becomes visible at the close of base row ``close_row[j]``
(:func:`sentio_lab.data.timeframes.resample_causal`), so row ``t`` of ``index`` names only bars with
``close_row <= t``; the bar still forming at ``t`` never appears. A token's features read ``h`` bars ``<= j`` only
(the producers are causal), and the normaliser is fitted on training rows, so nothing after ``t`` moves a token
seen at ``t`` (tests/features/test_tokens.py perturbs the future, values and timestamps, and compares bit for bit).

Training bars: an ``h`` bar is fitted on when every base row it depends on (from its bucket's first base row to
the row that closes it, :func:`htf_training_bars`) is a training row and its features are defined. The training
rows are those the market's base features were fitted on (``market.features.state["fit_segments"]``), so a CPCV
fold's tokens are normalised on that fold's training segments only. A feature constant on the training bars
keeps scale 1.

Why hand-written rather than a library: the index table is a few lines of ``numpy`` on top of the causal
resampler the project already has and tests; no library knows the visibility rule of a forming bar.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from sentio_lab.data.timeframes import TimeframeView, resample_causal
from sentio_lab.features.normalise import _apply_normaliser, _fit_normaliser
from sentio_lab.features.observation_layout import TokenBlock
from sentio_lab.features.raw import compute_features
from sentio_lab.features.registry import Bars, registered_producers
from sentio_lab.features.spans import htf_span

#: Table row of the padding token (all zeros, validity flag 0).
PAD_ROW = 0
#: Feature bank of the tokens: the fast "basic" bank (TA-Lib's long warm-ups would leave few daily tokens).
TOKEN_BANK = "basic"
#: Clip of the normalised token features (as FeatureConfig's default).
TOKEN_CLIP = 5.0


def block_name(rule: str) -> str:
    """Name of the token block of timeframe ``rule`` in the observation layout (``"tokens:<rule>"``)."""
    return f"tokens:{rule}"


@functools.cache
def token_feature_names(bank: str = TOKEN_BANK) -> tuple[str, ...]:
    """Feature names of one token of ``bank`` (without the validity flag): computed once on a synthetic frame."""
    n = 400
    close = 100.0 * np.exp(np.cumsum(np.full(n, 1e-3)))
    bars = Bars(open=close, high=close * 1.01, low=close * 0.99, close=close, volume=np.ones(n))
    _, names, _ = compute_features(bars, registered_producers(bank))
    return tuple(names)


def token_width(bank: str = TOKEN_BANK) -> int:
    """Width ``d`` of one token row: the bank's features plus the validity flag."""
    return len(token_feature_names(bank)) + 1


def training_rows(market_state: dict, n: int) -> np.ndarray:
    """Boolean ``(n,)`` mask of the rows a market's features were fitted on (the state's ``fit_segments``)."""
    rows = np.zeros(n, dtype=bool)
    for a, b in market_state["fit_segments"]:
        rows[int(a) : int(b)] = True
    return rows


def htf_training_bars(index: pd.DatetimeIndex, view: TimeframeView, train_rows: np.ndarray) -> np.ndarray:
    """Boolean per completed HTF bar of ``view``: are all the base rows it depends on training rows?

    Bar ``j`` depends on the rows of its own bucket (from its first base row, the first row at or after its
    bucket start) up to the row that closes it (``view.close_row[j]``; after a gap at the bucket's end that is
    the first row of a later bucket, where the bar becomes visible). Counting from the bucket's own first row
    keeps the span non-empty when two HTF bars close on the same base row (a gap ending on the last base bar of
    a bucket): counting from the previous bar's close row, as before issue 17, gave an empty span there, which
    passed for any bar and fitted the normaliser on bars after t or inside a test group.
    """
    train_rows = np.asarray(train_rows, dtype=bool)
    outside = np.concatenate([[0], np.cumsum(~train_rows)])  # outside[r] = non-training rows before r
    first_row = np.searchsorted(index.as_unit("ns").asi8, view.bars.index.as_unit("ns").asi8, side="left")
    return outside[view.close_row + 1] - outside[first_row] == 0


def timeframe_token_block(
    frame: pd.DataFrame,
    rule: str,
    num_tokens: int,
    train_rows: np.ndarray,
    base_freq: pd.Timedelta | str,
    *,
    session_close: str | None = None,
    bank: str = TOKEN_BANK,
    clip: float = TOKEN_CLIP,
) -> TokenBlock:
    """The :class:`TokenBlock` of the last ``num_tokens`` completed ``rule`` bars of ``frame`` (module doc).

    ``train_rows`` is a boolean mask over ``frame``'s rows (the normaliser is fitted on ``rule`` bars inside it);
    ``base_freq`` is the duration of one base bar (pass the fitted one: inferring it would read the future).
    """
    if num_tokens < 1:
        raise ValueError(f"timeframe {rule!r}: num_tokens must be >= 1, got {num_tokens}")
    train_rows = np.asarray(train_rows, dtype=bool)
    if train_rows.shape != (len(frame),):
        raise ValueError(f"train_rows must have one entry per frame row ({len(frame)}), got {train_rows.shape}")
    view = resample_causal(frame, rule, base_freq, session_close=session_close)
    values, names, lookback = compute_features(Bars.from_frame(view.bars), registered_producers(bank))
    if tuple(names) != token_feature_names(bank):  # pragma: no cover - producers emit fixed columns
        raise RuntimeError(f"bank {bank!r} produced columns {names}, expected {token_feature_names(bank)}")
    n_htf = len(view.bars)
    defined = (np.arange(n_htf) >= lookback) & np.isfinite(values).all(axis=1)
    fit = defined & htf_training_bars(frame.index, view, train_rows)
    if fit.sum() < 2:
        raise ValueError(f"timeframe {rule!r}: {int(fit.sum())} completed training bars with defined features; "
                         "at least 2 are needed to fit the token normaliser")
    params = _fit_normaliser(values[fit], "robust")
    params["scale"] = [s if s > 0 else 1.0 for s in params["scale"]]  # constant on training: left unscaled
    normed = np.where(defined[:, None], _apply_normaliser(np.nan_to_num(values), params, clip), 0.0)

    table = np.zeros((1 + n_htf, len(names) + 1), dtype=np.float32)
    table[1:, :-1] = normed
    table[1:, -1] = defined
    # index[t, k]: h bar latest[t] - (K - 1 - k) (oldest first); padding before bar 0 or inside the warm-up
    bar = view.latest[:, None] - np.arange(num_tokens - 1, -1, -1)[None, :]
    ok = (bar >= 0) & defined[np.clip(bar, 0, n_htf - 1)]
    index = np.where(ok, bar + 1, PAD_ROW).astype(np.int64)
    return TokenBlock(name=block_name(rule), table=table, index=index)


def build_token_blocks(market: object, timeframes: Sequence[str], num_tokens: Sequence[int]) -> list[TokenBlock]:
    """Token blocks of ``timeframes`` (``num_tokens[i]`` bars of ``timeframes[i]``) for a prepared market.

    ``market`` is a :class:`~sentio_lab.env.market.PreparedMarket`: its frame, the base bar duration and training rows
    its features were fitted with, and its session close (FX days end at 17:00 New York).
    """
    if len(timeframes) != len(num_tokens):
        raise ValueError(f"{len(timeframes)} token timeframes but {len(num_tokens)} token counts")
    frame = market.data.frame
    state = market.features.state
    base_freq = pd.Timedelta(int(state["base_freq_ns"]), unit="ns")
    session_close = None if market.feature_config is None else market.feature_config.session_close
    rows = training_rows(state, len(frame))
    return [
        timeframe_token_block(frame, rule, int(k), rows, base_freq, session_close=session_close)
        for rule, k in zip(timeframes, num_tokens, strict=True)
    ]


def token_span(market: object, timeframes: Sequence[str], num_tokens: Sequence[int], bank: str = TOKEN_BANK) -> int:
    """Base bars before bar t that the token blocks seen at t may read, on ``market``'s own calendar.

    The oldest of the ``K`` completed bars of a timeframe and the ``bank``'s longest lookback before it: an HTF
    producer of lookback ``K - 1 + L`` (:func:`~sentio_lab.features.spans.htf_span`, which also counts the forming bar,
    so
    the bound is conservative by one HTF bar). The experiment runner widens its embargo to cover it
    (``observation_span`` of ``ppo_transformer``); 0 without token timeframes.
    """
    if len(timeframes) != len(num_tokens):
        raise ValueError(f"{len(timeframes)} token timeframes but {len(num_tokens)} token counts")
    lookback = max((p.lookback for p in registered_producers(bank)), default=0)
    frame = market.data.frame
    base_freq = pd.Timedelta(int(market.features.state["base_freq_ns"]), unit="ns")
    session_close = None if market.feature_config is None else market.feature_config.session_close
    return max((htf_span(frame, rule, int(k) - 1 + lookback, base_freq, session_close)
                for rule, k in zip(timeframes, num_tokens, strict=True)), default=0)
