"""From a dataset name or file to what an environment needs: data, chronological ranges, features.

Every PPO variant and the evaluation code build their market through :func:`prepare_market`, so the
same arguments always give the same bars, ranges and feature matrix. Features are fitted on the
training range only; pass a saved ``feature_state`` to reuse a trained model's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sentio_lab.data import MarketData, Split, chronological_split, load_market
from sentio_lab.env import MarketArrays
from sentio_lab.features import FeatureConfig, ObservationFeatures, build_observation_features


@dataclass
class PreparedMarket:
    """A loaded market with its ranges, its feature matrix and the arrays the envs read."""

    data: MarketData
    splits: dict[str, Split]
    features: ObservationFeatures
    arrays: MarketArrays

    def range(self, name: str) -> tuple[int, int]:
        """``(start, stop)`` bar positions of the named range ("train", "validation" or "test")."""
        if name not in self.splits:
            raise KeyError(f"unknown range {name!r}; choose from {list(self.splits)}")
        split = self.splits[name]
        return split.start, split.stop


def prepare_market(
    source: str | Path,
    feature_config: FeatureConfig,
    *,
    train_fraction: float = 0.6,
    validation_fraction: float = 0.2,
    feature_state: dict | None = None,
) -> PreparedMarket:
    """Load ``source``, split it chronologically, build features fitted on the training range."""
    data = load_market(source)
    splits = chronological_split(data, train_fraction, validation_fraction)
    features = build_observation_features(data.frame, splits["train"].stop, feature_config, state=feature_state)
    arrays = MarketArrays.from_frame(data.frame, features.values, features.first_valid)
    return PreparedMarket(data=data, splits=splits, features=features, arrays=arrays)
