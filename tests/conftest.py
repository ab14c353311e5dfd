"""Shared fixtures: tiny PPO arguments, a prepared real market and a synthetic market with an announced move."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture()
def tiny_args(tmp_path):
    """PPO arguments small enough for a unit test (3 iterations of 8 x 16 steps)."""
    from sentio_lab.ppo import Args

    return Args(
        total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2,
        window=8, episode_length=24, track=False, progress=False, run_dir=str(tmp_path / "runs"),
        run_name="tiny", checkpoint_every=0, feature_cache_dir=str(tmp_path / "feature-cache"),
    )


@pytest.fixture(scope="session")
def sp500_market():
    """sp500 with the default feature pipeline, prepared once per test session."""
    from sentio_lab.features import FeatureConfig
    from sentio_lab.market import prepare_market

    return prepare_market("sp500", FeatureConfig())


def announced_market(n_bars: int = 3000, seed: int = 0, move: float = 0.01):
    """A synthetic market whose next bar's open-to-close move is announced by the feature at the close.

    The feature at bar t is the sign of bar t+1's move (an 'announcement' by construction: the one
    place a feature is allowed to know the next bar, because the test is about learning, not data).
    The agent fills at the next open, so knowing the sign earns ``move`` per bar, minus costs.
    """
    from sentio_lab.data import chronological_split, to_market
    from sentio_lab.env import MarketArrays
    from sentio_lab.features import ObservationFeatures
    from sentio_lab.market import PreparedMarket

    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], size=n_bars)  # sign[t] = direction of bar t+1
    close = np.empty(n_bars)
    opens = np.empty(n_bars)
    opens[0] = close[0] = 100.0
    for t in range(1, n_bars):
        opens[t] = close[t - 1]
        close[t] = opens[t] * np.exp(move * sign[t - 1])
    high = np.maximum(opens, close) * 1.001
    low = np.minimum(opens, close) * 0.999
    frame = pd.DataFrame(
        {"open": opens, "high": high, "low": low, "close": close, "volume": 1e6},
        index=pd.date_range("2000-01-03", periods=n_bars, freq="B"),
    )
    data = to_market(frame, name="announced")
    splits = chronological_split(data, 0.6, 0.2)
    values = sign[:, None].astype(np.float32)
    features = ObservationFeatures(values=values, names=["announced_sign"], first_valid=0,
                                   blocks={"base": slice(0, 1)}, state={})
    arrays = MarketArrays.from_frame(data.frame, values, 0)
    return PreparedMarket(data=data, splits=splits, features=features, arrays=arrays)


@pytest.fixture(scope="session")
def synthetic_market():
    """See :func:`announced_market`."""
    return announced_market()


def replace(args, **changes):
    """dataclasses.replace, importable by tests."""
    return dataclasses.replace(args, **changes)
