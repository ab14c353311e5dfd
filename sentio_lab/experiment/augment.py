"""Training-data augmentation: stationary-block-bootstrap copies of a fold's training segments, trained on beside
the real bars.

With ``augment_paths = K`` in an experiment file, every cell trains on an *augmented* fold market
(:func:`augmented_market`): the real fold market, unchanged, with ``K`` copies of each of its training segments
appended after its last bar. Each copy is one stationary-block-bootstrap path of its segment, built exactly as the
placebo control builds its bars (:func:`sentio_lab.experiment.placebo.bootstrap_training_bars`: close-to-close
returns resampled in blocks of geometric length, mean ``augment_block_mean``; open, high and low keep each source
bar's shape; the first bar anchors the level), so it depends on that training segment's rows and nothing else.
The training env draws its episodes uniformly over every valid start of the real segments and of the copies
(:class:`~sentio_lab.env.splits.SegmentEpisodeSampler`), so a path is drawn in proportion to its length.

What stays real, and why it cannot leak:

* The real bars stay where they are: the validation slice and the test groups are the real market's rows, never
  touched, and rows ``0 .. T-1`` of the augmented market are the real market's (prices, features, cost inputs).
* The fitted feature state (normalisation, pruning, HMM) stays the one fitted on the real training rows only: each
  copy's features are computed on the copy alone and transformed with that state (nothing is refitted on
  augmented rows), so the checkpoint's feature state is the real fold market's.
* A copy's timestamps are its source segment's, shifted by a whole number of weeks past the previous copy (bar
  spacing, weekdays and times of day are kept, so calendar and session features read the same kind of bars).
* No episode on a copy reads across its start: its first decision bar leaves room for the copy's own feature
  warm-up and window, the cost inputs' look-back and the benchmark's span (``reach``).

Refused (one line each): exogenous features (their as-of joins follow timestamps, which a copy only borrows) and a
``vol_target`` anchor (its scale is fitted on the training segments, which would then include the copies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sentio_lab.agents.training import anchor_span
from sentio_lab.data import Split
from sentio_lab.data.validation import fingerprint
from sentio_lab.env import MarketArrays
from sentio_lab.env.market import PreparedMarket, volume_kind
from sentio_lab.env.splits import Segment
from sentio_lab.experiment.placebo import bootstrap_training_bars
from sentio_lab.features import build_observation_features

if TYPE_CHECKING:
    from sentio_lab.experiment.cells import Cell
    from sentio_lab.experiment.runner import Plan

WEEK = pd.Timedelta(days=7)


@dataclasses.dataclass(frozen=True)
class AugmentedCopy:
    """Where one bootstrapped copy lies in the augmented frame, and which real segment it resamples."""

    replicate: int
    source: Segment
    """the real training segment ``[start, stop)`` it was drawn from"""
    rows: Segment
    """its rows ``[start, stop)`` in the augmented frame"""


def augmented_frame(frame: pd.DataFrame, segments: Sequence[Segment], *, paths: int, block_mean: float,
                    seed: int) -> tuple[pd.DataFrame, tuple[AugmentedCopy, ...]]:
    """``frame`` with ``paths`` bootstrapped copies of every training segment appended (module docstring).

    Copy ``k`` of segment ``i`` draws from its own stream of ``numpy.random.SeedSequence([seed, k, i])``; the
    result is a pure function of ``frame``'s training rows, ``segments``, ``paths``, ``block_mean`` and ``seed``.
    """
    if paths < 1:
        raise ValueError(f"augmented_frame: paths must be >= 1, got {paths}")
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise ValueError("augmented_frame: the frame needs a DatetimeIndex (copies are placed after its last bar)")
    pieces, copies, end, row = [frame], [], frame.index[-1], len(frame)
    for k in range(paths):
        for i, (start, stop) in enumerate(segments):
            part = frame.iloc[start:stop]
            stream = np.random.SeedSequence([seed, k, i]).generate_state(1)[0]
            copy, _ = bootstrap_training_bars(part, [(0, len(part))], block_mean=block_mean, seed=int(stream))
            weeks = (end - part.index[0]) // WEEK + 1  # whole weeks: the copy starts after the previous bar
            copy.index = part.index + weeks * WEEK
            end = copy.index[-1]
            pieces.append(copy)
            copies.append(AugmentedCopy(k, (int(start), int(stop)), (row, row + len(part))))
            row += len(part)
    return pd.concat(pieces), tuple(copies)


def augmented_market(market: PreparedMarket, *, paths: int, block_mean: float, seed: int, window: int,
                     reach: int = 0) -> tuple[PreparedMarket, tuple[AugmentedCopy, ...]]:
    """The fold market ``market`` with ``paths`` bootstrapped copies of its training segments to train on.

    ``window`` is the observation window and ``reach`` how many bars before a decision its cost inputs and the
    benchmark read: a copy's first decision bar is ``max(its feature warm-up + window - 1, reach)`` rows into it.
    Returns the market and its copies. The validation and test ranges are ``market``'s; the feature state is
    ``market``'s (fitted on its real training rows), applied to each copy.
    """
    if market.fold is None or market.feature_config is None:
        raise ValueError("augmented_market: a fold market (prepare_fold_market) is needed")
    if market.feature_config.exogenous:
        raise ValueError("augment_paths: exogenous features are joined by timestamp, which a bootstrapped copy only "
                         "borrows; drop the exogenous features or set augment_paths = 0")
    real = market.data.frame
    frame, copies = augmented_frame(real, market.training_segments(), paths=paths, block_mean=block_mean,
                                    seed=seed)
    values, segments = [market.features.values], list(market.training_segments())
    for copy in copies:
        a, b = copy.rows
        part = frame.iloc[a:b]
        features = build_observation_features(part, None, market.feature_config, market.features.state,
                                              train_rows=np.ones(len(part), dtype=bool))
        values.append(features.values.astype(market.features.values.dtype, copy=False))
        first = a + max(features.first_valid + window - 1, reach)
        if first < b:  # else too short to decide on: nothing of it is drawn (the sampler lists the real ones)
            segments.append((first, b))
    data = dataclasses.replace(market.data, frame=frame, fingerprint=fingerprint(frame))
    features = dataclasses.replace(market.features, values=np.concatenate(values))
    arrays = MarketArrays.from_frame(frame, features.values, market.features.first_valid, volume_kind(market.data),
                                     market.arrays.fill_price)
    splits = {**market.splits, "train": Split("train", segments[0][0], len(frame), frame.index[segments[0][0]],
                                              frame.index[-1])}
    return dataclasses.replace(market, data=data, features=features, arrays=arrays, splits=splits,
                               train_segments=tuple(segments)), copies


def augmented_fingerprint(market: PreparedMarket, *, paths: int, block_mean: float, seed: int) -> str:
    """The data fingerprint a cell trained on :func:`augmented_market` records (its checkpoint is checked
    against it), computed from the bars alone (no features)."""
    frame, _ = augmented_frame(market.data.frame, market.training_segments(), paths=paths, block_mean=block_mean,
                               seed=seed)
    return fingerprint(frame)


# ============================================================================================ runner side
def training_market(plan: Plan, cell: Cell, market: PreparedMarket, args: Any) -> PreparedMarket:
    """What ``cell`` trains on: ``market``, or with ``augment_paths`` that market with its bootstrapped copies
    (:func:`~sentio_lab.experiment.augment.augmented_market`, seeded by the cell's seed)."""
    if cell.augment is None:
        return market
    config = plan.config
    reach = max(plan.gaps.cost_span, anchor_span(args, market))
    return augmented_market(market, paths=config.augment_paths, block_mean=config.augment_block_mean,
                            seed=cell.seed, window=plan.accounting["window"], reach=reach)[0]


def trained_fingerprint(plan: Plan, cell: Cell, market: PreparedMarket) -> str:
    """The data fingerprint ``cell``'s checkpoint records when it trained on :func:`training_market` of ``market``."""
    if cell.augment is None:
        return market.data.fingerprint
    return augmented_fingerprint(market, paths=plan.config.augment_paths, block_mean=plan.config.augment_block_mean,
                                 seed=cell.seed)
