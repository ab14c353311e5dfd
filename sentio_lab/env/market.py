"""From a dataset name or file to what an environment needs: data, chronological ranges, features.

Every PPO variant and the evaluation code build their market through :func:`prepare_market`, so the
same arguments always give the same bars, ranges and feature matrix. Features are fitted on the
training range only; pass a saved ``feature_state`` to reuse a trained model's statistics.

For purged walk-forward and CPCV (:mod:`sentio_lab.env.splits`), :func:`prepare_fold_market` refits the features
(normalisation, pruning, HMM) on one fold's training segments only and names its ranges: ``"train"`` (the
span of the training segments: several in CPCV, with test groups between them, so a training env must draw
its starts from :meth:`PreparedMarket.episode_sampler`), optionally ``"validation"`` and the test groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sentio_lab.data import (
    DEFAULT_MIN_ROWS,
    MarketData,
    Split,
    StaleOpensPolicy,
    chronological_split,
    load_market,
    too_few_bars_error,
)
from sentio_lab.env import FillPrice, MarketArrays
from sentio_lab.env.splits import FILL_DELAY, Fold, Segment, SegmentEpisodeSampler, fit_rows
from sentio_lab.features import FeatureConfig, ObservationFeatures, build_observation_features
from sentio_lab.features.observation import MIN_TRAIN_ROWS, warmup_rows

#: Bundled datasets whose volume column is tick volume (no traded quantity; see ``MarketArrays.volume_kind``).
TICK_VOLUME_DATASETS = frozenset({"eurusd_1h"})


def volume_kind(data: MarketData) -> str:
    """"ticks" for a bundled FX dataset (:data:`TICK_VOLUME_DATASETS`), else "quantity"."""
    return "ticks" if data.name in TICK_VOLUME_DATASETS else "quantity"


@dataclass
class PreparedMarket:
    """A loaded market with its ranges, its feature matrix and the arrays the envs read."""

    data: MarketData
    splits: dict[str, Split]
    features: ObservationFeatures
    arrays: MarketArrays
    feature_config: FeatureConfig | None = None
    """The configuration the features were built with (``session_close`` filled in by :func:`prepare_market`)."""
    fold: Fold | None = None
    """The split the features were fitted for (:func:`prepare_fold_market`); None for chronological ranges."""
    train_segments: tuple[Segment, ...] | None = None
    """Training env ranges ``[start, stop)`` (a fold's, less any validation slice); None: the ``"train"`` range."""

    def range(self, name: str) -> tuple[int, int]:
        """``(start, stop)`` bar positions of the named range ("train", "validation", "test", "test:<group>")."""
        if name not in self.splits:
            raise KeyError(f"unknown range {name!r}; choose from {list(self.splits)}")
        split = self.splits[name]
        return split.start, split.stop

    def training_segments(self) -> tuple[Segment, ...]:
        """The env ranges training may use: :attr:`train_segments`, else the single ``"train"`` range."""
        return self.train_segments if self.train_segments is not None else (self.range("train"),)

    def episode_sampler(self, window: int, episode_length: int) -> SegmentEpisodeSampler:
        """Episode starts over :meth:`training_segments` for ``TradingEnv(start_sampler=...)``: no episode of
        ``episode_length`` steps with a ``window``-row observation crosses a gap between segments."""
        return SegmentEpisodeSampler(self.training_segments(), window, episode_length,
                                     first_valid=self.arrays.first_valid, n_bars=len(self.arrays.close))


def effective_feature_config(
    feature_config: FeatureConfig, data: MarketData, feature_state: dict | None = None
) -> FeatureConfig:
    """``feature_config`` with its session close decided: the config's own if set, else a saved state's (the
    features a model was trained on), else the market's (``data.session_close``, e.g. 17:00 New York for FX)."""
    if feature_config.session_close is not None:
        return feature_config
    if feature_state is not None:
        session_close = feature_state.get("config", {}).get("session_close")
    else:
        session_close = data.session_close
    if session_close is None:
        return feature_config
    return dataclasses.replace(feature_config, session_close=session_close)


def prepare_market(
    source: str | Path | MarketData,
    feature_config: FeatureConfig,
    *,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    stale_opens: StaleOpensPolicy = "refuse",
    train_fraction: float = 0.6,
    validation_fraction: float = 0.2,
    feature_state: dict | None = None,
    window: int | None = None,
    episode_length: int | None = None,
    fill_price: FillPrice = "next_open",
) -> PreparedMarket:
    """Load ``source`` (or take a loaded :class:`~sentio_lab.data.MarketData` as it is), split it chronologically,
    build features fitted on the training range.

    ``start``, ``end``, ``stale_opens`` and ``fill_price`` go to :func:`sentio_lab.data.load_market` (an inclusive
    date range, a bundled dataset's default start when ``start`` is None, the stale-open policy, which next-close
    fills never need). The features use the session close chosen by :func:`effective_feature_config`; the arrays
    fill at ``fill_price`` (:class:`~sentio_lab.env.MarketArrays`). With ``window`` and ``episode_length`` (a
    training run's) a market too short to train on is refused with one
    :class:`~sentio_lab.data.DataValidationError` saying how many bars it needs
    (:func:`sentio_lab.data.bars_needed`).
    """
    if isinstance(source, MarketData):  # loaded already (a pool's instrument, sentio_lab.env.pool)
        data = source
    else:
        data = load_market(source, start=start, end=end, stale_opens=stale_opens, fill_price=fill_price)
    splits = chronological_split(data, train_fraction, validation_fraction)
    config = effective_feature_config(feature_config, data, feature_state)
    train_stop = splits["train"].stop
    lengths = None if window is None or episode_length is None else (
        window, episode_length, train_fraction, validation_fraction)
    try:
        features = build_observation_features(data.frame, train_stop, config, state=feature_state)
    except ValueError:  # too few rows to fit the features? Say how many the training run needs.
        if lengths is not None:
            _check_length(data, warmup_rows(data.frame, train_stop, config), *lengths)
        raise
    if lengths is not None:
        _check_length(data, features.first_valid, *lengths)
    arrays = MarketArrays.from_frame(data.frame, features.values, features.first_valid, volume_kind(data), fill_price)
    return PreparedMarket(data=data, splits=splits, features=features, arrays=arrays, feature_config=config)


def _check_length(
    data: MarketData, warmup: int, window: int, episode_length: int, train_fraction: float,
    validation_fraction: float,
) -> None:
    """Raise :func:`~sentio_lab.data.too_few_bars_error` when ``data`` is too short to train on."""
    error = too_few_bars_error(data.name, len(data), warmup=warmup, window=window, episode_length=episode_length,
                               train_fraction=train_fraction, validation_fraction=validation_fraction,
                               min_train_rows=MIN_TRAIN_ROWS, min_rows=DEFAULT_MIN_ROWS)
    if error is not None:
        raise error


def _split(name: str, frame: pd.DataFrame, start: int, stop: int) -> Split:
    """The range ``[start, stop)`` of ``frame`` as a named :class:`~sentio_lab.data.Split`."""
    return Split(name, start, stop, frame.index[start], frame.index[stop - 1])


def _carve_validation(train: tuple[Segment, ...], validation_bars: int) -> tuple[tuple[Segment, ...], Segment]:
    """Split the last ``validation_bars`` decision bars off the last training segment: ``(training, validation)``.

    The last segment ``[s, e)`` decides on ``s .. e - 2``; validation is the env range ``[a, e)`` with
    ``a = e - 1 - validation_bars`` (decisions ``a .. e - 2``) and training keeps ``[s, a)``, whose last decision
    ``a - 2`` is filled and marked on ``a - 1``: the purge of the splits. Nothing is trained after it.
    """
    *head, (s, e) = train
    a = e - FILL_DELAY - validation_bars
    if a - FILL_DELAY <= s:
        raise ValueError(f"validation_bars={validation_bars} leaves no training decision in the last training "
                         f"segment [{s}, {e})")
    return (*head, (s, a)), (a, e)


def prepare_fold_market(
    base: PreparedMarket | MarketData,
    fold: Fold,
    *,
    feature_config: FeatureConfig | None = None,
    validation_bars: int = 0,
    fill_price: FillPrice | None = None,
) -> PreparedMarket:
    """The market of one purged walk-forward or CPCV fold: features fitted on its training segments only.

    ``base`` is a prepared market (its data and, unless ``feature_config`` is given, its feature config) or a
    loaded :class:`~sentio_lab.data.MarketData` with ``feature_config``. Normalisation, pruning and the HMM are
    fitted on :func:`sentio_lab.env.splits.fit_rows` of the training segments (the HMM with one sequence per
    segment); the raw features are the frame's, through the feature cache when ``cache_dir`` is set, so a fold
    costs one fit. With ``validation_bars`` the last that many decision bars of the last training segment become
    the ``"validation"`` range (purged from training, and not fitted on). ``fill_price`` defaults to the base
    market's (``"next_open"`` for a MarketData base).

    Ranges: ``"train"`` spans the training segments (test groups may lie inside it: train through
    :meth:`PreparedMarket.episode_sampler`, never through the span), ``"test:<group>"`` is each test group's env
    range and ``"test"`` the single test group of a walk-forward fold.
    """
    if isinstance(base, PreparedMarket):
        data, config = base.data, feature_config or base.feature_config
        if config is None:
            raise ValueError("prepare_fold_market: the base market records no feature_config; pass feature_config=")
    elif isinstance(base, MarketData):
        if feature_config is None:
            raise ValueError("prepare_fold_market: pass feature_config= with a MarketData base")
        data, config = base, effective_feature_config(feature_config, base)
    else:
        raise TypeError(f"prepare_fold_market: base must be a PreparedMarket or MarketData, got {type(base).__name__}")
    if validation_bars < 0:
        raise ValueError(f"validation_bars must be >= 0, got {validation_bars}")
    frame, n = data.frame, len(data.frame)
    train = tuple(fold.train)
    if not train or not fold.test:
        raise ValueError(f"fold {fold.fold}: no training segment or no test group")
    validation = None
    if validation_bars:
        train, validation = _carve_validation(train, validation_bars)
    rows = fit_rows(train, n)  # checks every segment lies inside the market's bars
    for a, b in fold.test:
        if not 0 <= a < b <= n:
            raise ValueError(f"fold {fold.fold}: test group [{a}, {b}) outside the market's {n} bars")
    features = build_observation_features(frame, None, config, train_rows=rows)
    if fill_price is None:
        fill_price = base.arrays.fill_price if isinstance(base, PreparedMarket) else "next_open"
    quality = data.quality
    if fill_price == "next_open" and quality is not None and quality.stale_stretches and \
            quality.stale_opens_policy != "allow":  # loaded for next-close fills: its opens were never checked
        raise ValueError(f"{data.name}: this range holds stale opens and was loaded for next-close fills; pass "
                         "fill_price='next_close' (--fill-price next_close)")
    arrays = MarketArrays.from_frame(frame, features.values, features.first_valid, volume_kind(data), fill_price)
    splits = {"train": _split("train", frame, train[0][0], train[-1][1])}
    if validation is not None:
        splits["validation"] = _split("validation", frame, *validation)
    for group, (a, b) in zip(fold.groups, fold.test, strict=True):
        splits[f"test:{group}"] = _split(f"test:{group}", frame, a, b)
    if len(fold.test) == 1:
        splits["test"] = _split("test", frame, *fold.test[0])
    return PreparedMarket(data=data, splits=splits, features=features, arrays=arrays, feature_config=config,
                          fold=fold, train_segments=train)
