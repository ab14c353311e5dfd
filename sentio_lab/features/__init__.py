"""Causal feature bank, normalisation fitted on the training range, and the observation matrix.

Everything a policy observes at bar ``t`` is computed from bars ``<= t`` (bar ``t`` closed). Features
come from *producers* registered by name (:func:`register_feature`); each declares its lookback, the
number of warm-up bars before all of its outputs are defined. The banks:

* ``"basic"``: a handful of fast hand-written features (log returns, realised volatility, range,
  close location, gap, volume z-score). Fast enough for every PPO run and test.
* ``"talib"``: the basic features plus every applicable TA-Lib function (see :data:`TALIB_EXCLUDED`
  for the ones left out and why), over several periods, made scale-free (price levels become log
  ratios to the close, price differences are divided by the close) so one normaliser fits all markets.
* ``"close"``: the basic features that read closes only, for close-only data.
* ``"slow"``: six regime-normalised multi-horizon features from closes (returns over 5 / 20 / 60 bars and
  distances to the 50 / 200-bar means in volatility units, a volatility ratio): a small input set for capacity
  control (:mod:`sentio_lab.features.slow`).

Start dependence (decided): recursive indicators (EMA-family, Wilder smoothing, SAR, Hilbert transforms,
Heikin-Ashi) are causal but depend, fading geometrically, on where the series *started*; each such producer adds
an explicit settling warm-up to its lookback. Cumulative level features are used only through differences or
ratios over a fixed window; TA-Lib's anchored VWAP and CUMSUM are excluded. The rule in full:
:mod:`sentio_lab.features.talib_bank`.

Zero volume (decided): a bar without volume is valid data (a holiday, a halt, a quiet FX hour, a feed that
carries no volume at all), so every producer that divides by volume defines its value there, causally, and
window sums of volume are exact; the convention of each producer: :mod:`sentio_lab.features.volume`.
Flat bars (high == low) are neutral where a producer divides by the range (close location 0). Producers are
scale-free, so tiny prices (1e-4 or 1e-8 of a stock's) give the same features.

:func:`build_observation_features` turns a frame into the ``(T, F)`` float32 matrix the environment
reads, with per-timeframe blocks (:mod:`sentio_lab.data.timeframes`) and optional filtered HMM regime
probabilities (:mod:`sentio_lab.features.regime`). Normaliser, pruning and HMM are fitted on rows
``[first_valid, train_stop)`` only -- or on the rows of a ``train_rows`` mask, such as a CPCV fold's several
training segments (:func:`sentio_lab.env.splits.fit_rows`) -- and stored in a plain-python ``state`` that can be
re-applied to new data without refitting.

Modules: :mod:`~sentio_lab.features.registry` (producers, their registry and lookbacks),
:mod:`~sentio_lab.features.arrays` (causal array helpers), :mod:`~sentio_lab.features.basic` (the basic bank),
:mod:`~sentio_lab.features.talib_bank` (TA-Lib machinery, exclusions, coverage) and the TA-Lib producers by group
(:mod:`~sentio_lab.features.overlap`, :mod:`~sentio_lab.features.momentum`, :mod:`~sentio_lab.features.cycles`,
:mod:`~sentio_lab.features.stats`, :mod:`~sentio_lab.features.volume`, :mod:`~sentio_lab.features.patterns`),
:mod:`~sentio_lab.features.slow` (the slow bank),
:mod:`~sentio_lab.features.config` (:class:`FeatureConfig`), :mod:`~sentio_lab.features.raw` (raw features and
their cache), :mod:`~sentio_lab.features.normalise` (normalisation and pruning) and
:mod:`~sentio_lab.features.observation` (the observation matrix and its fitted state).
"""

from __future__ import annotations

# ``x as x`` imports keep names that tests read on the package (private helpers, _regime, resample_causal)
# reachable without making them public API.
from sentio_lab.features.arrays import _lag as _lag
from sentio_lab.features.arrays import _rolling as _rolling
from sentio_lab.features.arrays import _safe_div as _safe_div
from sentio_lab.features.config import FeatureConfig, config_from_state, describe_config
from sentio_lab.features.normalise import _IQR_TO_STD as _IQR_TO_STD
from sentio_lab.features.normalise import NORMALISERS, RANK_KNOTS
from sentio_lab.features.normalise import _apply_normaliser as _apply_normaliser
from sentio_lab.features.normalise import _fit_normaliser as _fit_normaliser
from sentio_lab.features.normalise import _prune as _prune
from sentio_lab.features.observation import MIN_TRAIN_ROWS, ObservationFeatures, build_observation_features
from sentio_lab.features.observation import _regime as _regime
from sentio_lab.features.raw import RawFeatures, compute_features, raw_features
from sentio_lab.features.raw import _raw_cache_key as _raw_cache_key
from sentio_lab.features.raw import resample_causal as resample_causal
from sentio_lab.features.registry import (
    BANKS,
    FEATURE_REGISTRY,
    FEATURE_VERSION,
    Bars,
    FeatureProducer,
    register_feature,
    registered_producers,
)
from sentio_lab.features.talib_bank import TALIB_EXCLUDED, talib_coverage

# The producer modules, imported for their registrations and in this order: registration order is the column
# order of the features, which every fitted state and raw-feature cache key records. Keep the order.
# isort: off
from sentio_lab.features import basic, overlap, momentum, cycles, stats, volume, patterns, slow  # noqa: F401
# isort: on

__all__ = [
    "BANKS",
    "FEATURE_REGISTRY",
    "FEATURE_VERSION",
    "MIN_TRAIN_ROWS",
    "NORMALISERS",
    "RANK_KNOTS",
    "TALIB_EXCLUDED",
    "Bars",
    "FeatureConfig",
    "FeatureProducer",
    "ObservationFeatures",
    "RawFeatures",
    "build_observation_features",
    "compute_features",
    "config_from_state",
    "describe_config",
    "raw_features",
    "register_feature",
    "registered_producers",
    "talib_coverage",
]
