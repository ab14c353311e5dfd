"""From a dataset name or file to what an environment needs: data, chronological ranges, features.

Every PPO variant and the evaluation code build their market through :func:`prepare_market`, so the
same arguments always give the same bars, ranges and feature matrix. Features are fitted on the
training range only; pass a saved ``feature_state`` to reuse a trained model's statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sentio_lab.data import MarketData, Split, StaleOpensPolicy, chronological_split, load_market
from sentio_lab.env import MarketArrays
from sentio_lab.features import FeatureConfig, ObservationFeatures, build_observation_features


@dataclass
class PreparedMarket:
    """A loaded market with its ranges, its feature matrix and the arrays the envs read."""

    data: MarketData
    splits: dict[str, Split]
    features: ObservationFeatures
    arrays: MarketArrays
    feature_config: FeatureConfig | None = None
    """The configuration the features were built with (``session_close`` filled in by :func:`prepare_market`)."""

    def range(self, name: str) -> tuple[int, int]:
        """``(start, stop)`` bar positions of the named range ("train", "validation" or "test")."""
        if name not in self.splits:
            raise KeyError(f"unknown range {name!r}; choose from {list(self.splits)}")
        split = self.splits[name]
        return split.start, split.stop


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
    source: str | Path,
    feature_config: FeatureConfig,
    *,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    stale_opens: StaleOpensPolicy = "refuse",
    train_fraction: float = 0.6,
    validation_fraction: float = 0.2,
    feature_state: dict | None = None,
) -> PreparedMarket:
    """Load ``source``, split it chronologically, build features fitted on the training range.

    ``start``, ``end`` and ``stale_opens`` go to :func:`sentio_lab.data.load_market` (an inclusive date range,
    a bundled dataset's default start when ``start`` is None, and the stale-open policy). The features use
    the session close chosen by :func:`effective_feature_config`.
    """
    data = load_market(source, start=start, end=end, stale_opens=stale_opens)
    splits = chronological_split(data, train_fraction, validation_fraction)
    config = effective_feature_config(feature_config, data, feature_state)
    features = build_observation_features(data.frame, splits["train"].stop, config, state=feature_state)
    arrays = MarketArrays.from_frame(data.frame, features.values, features.first_valid)
    return PreparedMarket(data=data, splits=splits, features=features, arrays=arrays, feature_config=config)
