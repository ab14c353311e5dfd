"""Purged walk-forward and combinatorial purged cross-validation (CPCV) over bars, sized from what the agent sees.

Vocabulary
----------
* **Decision bar** ``t``: an action is chosen at its close, filled at the open of ``t + 1`` and marked at the
  close of ``t + 1`` (the one-bar fill delay, ARCHITECTURE.md).
* **Env range** ``[start, stop)``: what ``TradingEnv(start=, stop=)`` is built on. Episodes start at
  ``t0 in [lo, stop - 1 - L]`` with ``lo = max(start, first_valid + window - 1)``
  (:func:`sentio_lab.env.episode_start_bounds`); the decisions are ``t0 .. t0 + L - 1 <= stop - 2``, the
  fills and marks ``t0 + 1 .. t0 + L <= stop - 1`` and the truncation bootstrap value uses the observation at
  bar ``t0 + L <= stop - 1``. Observations reach back ``window - 1`` feature rows before ``lo``.
* **Feature span** ``F`` (:func:`feature_span`): feature row ``r`` is a function of raw bars ``[r - F, r]``.
  For the base block ``F`` is the longest registered producer lookback; a higher-timeframe (HTF) producer with
  lookback ``L`` reads ``L + 1`` complete HTF bars plus the still-open bucket, so it spans up to
  ``(L + 2) * B - 1`` base bars with ``B`` base bars per HTF bar (computed from the actual calendar when the
  frame is given, :func:`htf_span`); the HMM inputs add :data:`sentio_lab.features.regime.INPUT_LOOKBACK`.
* **Test group**: decision bars ``[a, b)``, evaluated as the env range ``[a, b + 1)`` (decisions ``a .. b - 1``,
  marks ``a + 1 .. b``). The next group starts at ``b``: the last mark of one group is the decision bar of the
  next, so the groups of a backtest path chain into one equity curve over every bar (:func:`stitch_equity`).
  The bars ``[a, b]`` are the group's **test bars**.

A training env on ``[s, e)`` touches the bars ``[lo - (window - 1) - F, e - 1]`` (:func:`touched_bars`). The
rule that keeps every training sample -- its observation, its reward and its bootstrap value -- off the test
bars ``[a, b]`` of every test group:

* **before** a test group: ``e <= a``. In decision bars the last training decision is ``a - 2``, filled and
  marked on ``a - 1``, where the bootstrap observation also lies: a **purge of 1 decision bar** (the fill
  delay). The env's own bound ``t0 + L <= stop - 1`` enforces the rest.
* **after** a test group: ``lo - (window - 1) - F >= b + 1``, i.e. training decisions start at
  ``b + window + F`` at the earliest. The decision bars ``b .. b + window + F - 1`` are dropped: the purge (1)
  plus an **embargo of** ``window - 1 + F`` bars, the bars whose observation windows and feature lookbacks
  still see the test group.
* **cost windows** (issue 17): a non-flat cost model prices the fill of decision t from estimates over bars
  ``t - C .. t`` (spread, sigma_daily and ADV windows, :func:`sentio_lab.env.costs.cost_reach`; ``C = 0`` for flat
  costs). The embargo is then ``max(window - 1 + F, C)`` (:attr:`PurgeEmbargo.reach`) and the touched-bar audit
  counts those bars too. The mask volatility forecasts restart at each training segment instead
  (:func:`sentio_lab.env.mask_inputs.restarted_per_segment`), so they add nothing here.

Walk-forward trains only before its test group, so it needs the purge and no embargo. Training rows for
normalisation and the HMM are :func:`fit_rows`: the rows of the training env ranges, all clean by the rule.

Limits: the span is the *declared* lookback. Recursive producers (EMA family, Wilder smoothing, Hilbert
transforms) and the HMM's forward filter have infinite, geometrically fading memory; the registry's settling
warm-up covers the former by convention, and ``extra_embargo`` widens the embargo for the latter.

What is skfolio's and what is ours
----------------------------------
skfolio's :class:`~skfolio.model_selection.WalkForward` (expanding / rolling, ``purged_size``) and
:class:`~skfolio.model_selection.CombinatorialPurgedCV` (groups, ``purged_size`` / ``embargo_size``, and its
path bookkeeping: ``test_set_index``, ``get_path_ids``, ``n_test_paths``) choose the indices, run on decision
bars with ``purged_size = 1`` and ``embargo_size = window - 1 + F``. Ours: deriving ``F`` from the registry and
the calendar, turning index sets into env ranges (runs of training decisions ``[r0, r1]`` become
``[r0, r1 + 2)``; test groups ``[a, b)`` become ``[a, b + 1)``), the touched-bar audit each fold must pass at
construction, :func:`fit_rows`, and the segment-aware episode sampler (skfolio knows nothing of episodes).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from sentio_lab.features import FeatureConfig
from sentio_lab.features.spans import feature_span

#: Bars between a decision and the bar that fills and marks it (ARCHITECTURE.md): the purge.
FILL_DELAY = 1

Segment = tuple[int, int]


@dataclass(frozen=True)
class PurgeEmbargo:
    """What the agent sees, and the purge and embargo (in decision bars) derived from it (module doc)."""

    window: int
    """Observation window in feature rows."""
    feature_span: int
    """Bars before a feature row that the row may read (:func:`feature_span`)."""
    extra_embargo: int = 0
    """Added to the embargo, e.g. for the HMM filter's fading memory."""
    cost_span: int = 0
    """Bars before a decision bar that its cost inputs read (:func:`sentio_lab.env.costs.cost_reach`: the spread,
    sigma_daily and ADV windows; 0 for flat costs)."""

    @classmethod
    def for_features(
        cls, window: int, config: FeatureConfig, frame: pd.DataFrame | None = None, **kwargs: object
    ) -> PurgeEmbargo:
        """Gaps for a ``window``-row observation of ``config``'s features (``kwargs`` go to :func:`feature_span`,
        except ``extra_embargo``)."""
        extra = int(kwargs.pop("extra_embargo", 0))
        return cls(window=window, feature_span=feature_span(config, frame, **kwargs), extra_embargo=extra)

    def __post_init__(self) -> None:
        """Reject sizes that cannot describe an observation."""
        if self.window < 1 or self.feature_span < 0 or self.extra_embargo < 0 or self.cost_span < 0:
            raise ValueError(f"PurgeEmbargo: window >= 1, feature_span, extra_embargo, cost_span >= 0; got {self}")

    @property
    def purge(self) -> int:
        """Decision bars dropped before (and after) a test group: the fill delay."""
        return FILL_DELAY

    @property
    def embargo(self) -> int:
        """Further decision bars dropped after a test group: ``reach + extra_embargo``."""
        return self.reach + self.extra_embargo

    @property
    def observation_reach(self) -> int:
        """Bars before an observation's bar that it may read: ``window - 1 + feature_span``."""
        return self.window - 1 + self.feature_span

    @property
    def reach(self) -> int:
        """Bars before a decision bar that the env may read for it: ``max(observation_reach, cost_span)`` (the
        observation, and the cost inputs of its fill)."""
        return max(self.observation_reach, self.cost_span)


# ================================================================================================= folds
@dataclass(frozen=True)
class Fold:
    """One split: training env ranges, test groups (env ranges), their backtest paths and the gaps used."""

    fold: int
    method: str
    """``"walk_forward"``, ``"walk_forward_rolling"`` or ``"cpcv"``."""
    train: tuple[Segment, ...]
    """Training env ranges ``[start, stop)``, disjoint and in time order (several in CPCV)."""
    test: tuple[Segment, ...]
    """Test groups as env ranges ``[a, b + 1)`` (decision bars ``[a, b)``), in time order."""
    groups: tuple[int, ...]
    """Group number of each test group (CPCV group id; walk-forward: the fold number)."""
    paths: tuple[int, ...]
    """Backtest path of each test group (walk-forward: all 0)."""
    purge: int
    embargo: int

    def test_mask(self, n_bars: int) -> np.ndarray:
        """Boolean ``(n_bars,)``: True on every test bar of this fold."""
        mask = np.zeros(n_bars, dtype=bool)
        for a, stop in self.test:
            mask[a:stop] = True
        return mask


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers as inclusive ``(first, last)`` pairs."""
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1)
    firsts = np.concatenate([[index[0]], index[breaks + 1]])
    lasts = np.concatenate([index[breaks], [index[-1]]])
    return [(int(f), int(last)) for f, last in zip(firsts, lasts, strict=True)]


def _decision_bars(n_bars: int, first_valid: int, window: int, start: int, stop: int | None) -> tuple[int, int]:
    """Decision bars ``[d0, d1)`` of bars ``[start, stop)``: observable, and filled on a bar inside the range."""
    stop = n_bars if stop is None else stop
    if not 0 <= start < stop <= n_bars:
        raise ValueError(f"range [{start}, {stop}) outside the market's {n_bars} bars")
    d0, d1 = max(start, first_valid + window - 1), stop - FILL_DELAY
    if d1 <= d0:
        raise ValueError(f"range [{start}, {stop}) holds no decision bar after {first_valid} warm-up bars")
    return d0, d1


def walk_forward(
    n_bars: int,
    gaps: PurgeEmbargo,
    *,
    test_size: int | None = None,
    train_size: int | None = None,
    n_folds: int | None = None,
    expanding: bool = True,
    first_valid: int = 0,
    start: int = 0,
    stop: int | None = None,
) -> list[Fold]:
    """Walk-forward folds over the decision bars of ``[start, stop)`` by skfolio's ``WalkForward``.

    Sizes count decision bars. Give ``test_size`` or ``n_folds`` (then ``test_size`` fills the range after the
    first training window); ``train_size`` is the (first, when ``expanding``) training window, by default one
    test size. The purge is the fill delay; nothing is trained after a test group, so no embargo applies.
    """
    from skfolio.model_selection import WalkForward  # skfolio pulls in plotly: imported on use

    d0, d1 = _decision_bars(n_bars, first_valid, gaps.window, start, stop)
    n = d1 - d0
    if test_size is None:
        if n_folds is None or n_folds < 1:
            raise ValueError("walk_forward: give test_size or n_folds >= 1")
        if train_size is None:
            test_size = (n - gaps.purge) // (n_folds + 1)
        else:
            test_size = (n - train_size - gaps.purge) // n_folds
    train_size = test_size if train_size is None else train_size
    if test_size < 1 or train_size < 1:
        raise ValueError(f"walk_forward: {n} decision bars leave test_size={test_size}, train_size={train_size}")
    cv = WalkForward(test_size=test_size, train_size=train_size, expand_train=expanding, purged_size=gaps.purge)
    method = "walk_forward" if expanding else "walk_forward_rolling"
    folds = []
    for k, (train, test) in enumerate(cv.split(np.zeros((n, 1)))):
        (r0, r1), = _runs(train + d0)
        (a, last), = _runs(test + d0)
        folds.append(Fold(k, method, ((r0, r1 + 1 + FILL_DELAY),), ((a, last + 1 + FILL_DELAY),), (k,), (0,),
                          gaps.purge, 0))
    if n_folds is not None and len(folds) > n_folds:
        folds = folds[:n_folds]
    if not folds:
        raise ValueError(f"walk_forward: no fold fits {n} decision bars (train {train_size}, test {test_size})")
    for fold in folds:
        check_fold(fold, gaps, n_bars=n_bars, first_valid=first_valid)
    return folds


def combinatorial_purged(
    n_bars: int,
    gaps: PurgeEmbargo,
    *,
    n_groups: int,
    n_test_groups: int,
    first_valid: int = 0,
    start: int = 0,
    stop: int | None = None,
) -> list[Fold]:
    """CPCV folds over the decision bars of ``[start, stop)`` by skfolio's ``CombinatorialPurgedCV``.

    ``n_groups`` contiguous groups (skfolio's sizes: ``n // n_groups`` each, the last takes the remainder);
    every choice of ``n_test_groups`` is one fold, and each test group carries its backtest path id
    (skfolio's ``get_path_ids``). There are ``comb(n_groups - 1, n_test_groups - 1)`` paths.
    """
    from skfolio.model_selection import CombinatorialPurgedCV  # skfolio pulls in plotly: imported on use

    d0, d1 = _decision_bars(n_bars, first_valid, gaps.window, start, stop)
    n = d1 - d0
    cv = CombinatorialPurgedCV(n_folds=n_groups, n_test_folds=n_test_groups, purged_size=gaps.purge,
                               embargo_size=gaps.embargo)
    group_size = n // n_groups
    if gaps.purge + gaps.embargo >= group_size - 1:
        raise ValueError(
            f"CPCV: groups of {group_size} decision bars cannot hold the purge {gaps.purge} + embargo "
            f"{gaps.embargo} (max(window {gaps.window} - 1 + feature span {gaps.feature_span}, cost span "
            f"{gaps.cost_span}) + extra {gaps.extra_embargo}); use fewer groups, more data, a shorter window, a "
            "shorter-lookback bank or shorter cost windows"
        )
    path_ids = cv.get_path_ids()
    folds = []
    for k, (train, tests) in enumerate(cv.split(np.zeros((n, 1)))):
        segments = tuple((r0, r1 + 1 + FILL_DELAY) for r0, r1 in _runs(train + d0))
        groups = []
        for test in tests:
            (a, last), = _runs(test + d0)
            groups.append((a, last + 1 + FILL_DELAY))
        fold = Fold(k, "cpcv", segments, tuple(groups), tuple(int(g) for g in cv.test_set_index[k]),
                    tuple(int(p) for p in path_ids[k]), gaps.purge, gaps.embargo)
        check_fold(fold, gaps, n_bars=n_bars, first_valid=first_valid)
        folds.append(fold)
    return folds


def backtest_paths(folds: Sequence[Fold]) -> dict[int, list[tuple[int, int]]]:
    """Path id -> ``[(fold, position of the test group in that fold), ...]`` in time order.

    Raises unless every path's groups chain (each starts on the bar the previous one ends on).
    """
    paths: dict[int, list[tuple[int, int]]] = {}
    for fold in folds:
        for j, path in enumerate(fold.paths):
            paths.setdefault(path, []).append((fold.fold, j))
    by_id = {fold.fold: fold for fold in folds}
    for path, members in paths.items():
        members.sort(key=lambda m: by_id[m[0]].test[m[1]][0])
        ranges = [by_id[f].test[j] for f, j in members]
        for (_, prev_stop), (nxt, _) in zip(ranges, ranges[1:], strict=False):
            if nxt != prev_stop - 1:
                raise ValueError(f"path {path}: test groups {ranges} do not chain")
    return dict(sorted(paths.items()))


def stitch_equity(pieces: Sequence[pd.Series]) -> pd.Series:
    """Chain the equity curves of a path's test groups (each starting at 1.0 on the previous one's last bar).

    Each group's episode starts flat, so a stitched path re-enters at every group boundary: it pays that
    trade's costs and does not hold over the boundary bar's close-to-next-open move.
    """
    if not pieces:
        raise ValueError("stitch_equity: no pieces")
    out = [pieces[0]]
    level = float(pieces[0].iloc[-1])
    for piece in pieces[1:]:
        if piece.index[0] != out[-1].index[-1]:
            raise ValueError(f"stitch_equity: a piece starts at {piece.index[0]}, the path is at {out[-1].index[-1]}")
        scaled = piece / float(piece.iloc[0]) * level
        out.append(scaled.iloc[1:])
        level = float(scaled.iloc[-1])
    return pd.concat(out).rename("equity")


# ======================================================================================== leakage audit
def segment_start_bounds(
    segments: Sequence[Segment], window: int, episode_length: int, *, first_valid: int = 0, n_bars: int | None = None
) -> list[tuple[int, int] | None]:
    """Inclusive episode-start range of each segment (None where no episode fits).

    The same bounds as :func:`sentio_lab.env.episode_start_bounds` per segment: ``lo = max(start, first_valid +
    window - 1)``, ``hi = stop - 1 - episode_length``.
    """
    out: list[tuple[int, int] | None] = []
    for start, stop in segments:
        if not (0 <= start < stop and (n_bars is None or stop <= n_bars)):
            raise ValueError(f"segment [{start}, {stop}) outside the market's {n_bars} bars")
        lo, hi = max(start, first_valid + window - 1), stop - 1 - episode_length
        out.append((lo, hi) if hi >= lo else None)
    return out


def touched_bars(
    segment: Segment, gaps: PurgeEmbargo, *, episode_length: int = 1, first_valid: int = 0
) -> np.ndarray:
    """Every bar an env on ``segment`` can read: observation windows with their feature lookbacks, the fill and
    mark bars and the bootstrap observation. Empty when no episode of ``episode_length`` fits.

    Episodes start at ``t0 in [lo, hi]``; start ``t0`` observes bars ``t0 .. t0 + L`` (the last one is the
    bootstrap observation), each reading ``gaps.reach`` bars back (observation and cost windows), and fills and
    marks on ``t0 + 1 .. t0 + L``.
    """
    (bounds,) = segment_start_bounds([segment], gaps.window, episode_length, first_valid=first_valid)
    if bounds is None:
        return np.empty(0, dtype=np.int64)
    lo, hi = bounds
    return np.arange(max(0, lo - gaps.reach), hi + episode_length + 1, dtype=np.int64)


class LeakageError(AssertionError):
    """A training env could read a test bar: the split is wrong, not the data."""


def check_fold(fold: Fold, gaps: PurgeEmbargo, *, n_bars: int, first_valid: int = 0) -> None:
    """Raise :class:`LeakageError` if a training env of ``fold`` could read a test bar (checked with one-step
    episodes, the widest reach)."""
    test = fold.test_mask(n_bars)
    for segment in fold.train:
        bars = touched_bars(segment, gaps, episode_length=1, first_valid=first_valid)
        leaked = bars[test[bars]]
        if len(leaked):
            raise LeakageError(f"fold {fold.fold}: training segment {segment} reads test bars {leaked[:5].tolist()}")


def fit_rows(segments: Sequence[Segment], n_bars: int, *, first_valid: int = 0) -> np.ndarray:
    """Boolean ``(n_bars,)`` training-row mask for normalisation and the HMM: rows of the segments from
    ``first_valid`` on. Row ``r`` reads bars ``[r - F, r]``, all clean by the purge/embargo rule."""
    mask = np.zeros(n_bars, dtype=bool)
    for start, stop in segments:
        if not 0 <= start < stop <= n_bars:
            raise ValueError(f"segment [{start}, {stop}) outside the market's {n_bars} bars")
        mask[max(start, first_valid):stop] = True
    return mask


# ============================================================================================ sampling
@dataclass
class SegmentEpisodeSampler:
    """Episode starts drawn uniformly over every valid start of every segment; an episode never crosses a gap.

    Segment ``k`` with starts ``[lo_k, hi_k]`` is drawn with weight ``hi_k - lo_k + 1``. Segments too short for
    one episode are left out (listed in ``skipped``); none left raises.
    """

    segments: Sequence[Segment]
    window: int
    episode_length: int
    first_valid: int = 0
    n_bars: int | None = None
    bounds: list[tuple[int, int]] = field(init=False)
    skipped: list[Segment] = field(init=False)

    def __post_init__(self) -> None:
        """Compute each segment's start bounds and the cumulative counts the sampler inverts."""
        all_bounds = segment_start_bounds(self.segments, self.window, self.episode_length,
                                          first_valid=self.first_valid, n_bars=self.n_bars)
        self.bounds = [b for b in all_bounds if b is not None]
        self.skipped = [tuple(s) for s, b in zip(self.segments, all_bounds, strict=True) if b is None]
        if self.skipped:  # never silently: those bars are not trained on
            warnings.warn(f"segments {self.skipped} are too short for an episode of {self.episode_length} steps "
                          f"with a {self.window}-bar window; no episode is drawn there", UserWarning, stacklevel=2)
        if not self.bounds:
            raise ValueError(f"no segment of {list(self.segments)} fits an episode of {self.episode_length} steps "
                             f"with a {self.window}-bar window")
        lo = torch.tensor([b[0] for b in self.bounds], dtype=torch.long)
        counts = torch.tensor([b[1] - b[0] + 1 for b in self.bounds], dtype=torch.long)
        self._lo, self._cum = lo, torch.cumsum(counts, 0)
        self._offset = self._cum - counts  # draws [offset_k, cum_k) land in segment k

    @property
    def num_starts(self) -> int:
        """Number of distinct valid starts."""
        return int(self._cum[-1])

    @property
    def start_low(self) -> int:
        """Earliest valid start."""
        return self.bounds[0][0]

    @property
    def start_high(self) -> int:
        """Latest valid start."""
        return self.bounds[-1][1]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` starts (long tensor on the generator's device), one ``randint`` draw each from ``generator``."""
        device = generator.device
        u = torch.randint(0, self.num_starts, (n,), generator=generator, device=device)
        cum = self._cum.to(device)
        k = torch.searchsorted(cum, u, right=True)
        return self._lo.to(device)[k] + u - self._offset.to(device)[k]

    def contains(self, starts: torch.Tensor) -> torch.Tensor:
        """Boolean per start: is it a valid start of some segment?"""
        starts = torch.as_tensor(starts, dtype=torch.long)
        ok = torch.zeros(starts.shape, dtype=torch.bool, device=starts.device)
        for lo, hi in self.bounds:
            ok |= (starts >= lo) & (starts <= hi)
        return ok
