"""Shared fixtures: tiny PPO arguments, a prepared real market and a synthetic market with an announced move."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest

try:  # pytest >= 9.2: structured test ids
    from _pytest.nodeid import coerce_node_id
except ImportError:  # pragma: no cover - older pytest
    coerce_node_id = None

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist the workers already fill the cores (`make test`: one per core): a second torch/OpenMP
    # thread per worker only contends for them. Set before torch is imported; subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


SHARED_SCOPES = ("class", "module", "package")


def _in_loadgroup_run(config) -> bool:
    # The controller runs with dist "loadgroup"; the workers collect too and read the groups there: they run with
    # dist "no" and the "loadgroup" flag set.
    return getattr(config.option, "dist", "no") == "loadgroup" or bool(getattr(config.option, "loadgroup", False))


@pytest.hookimpl(wrapper=True)  # around pytest-xdist's own hook, which reads the xdist_group marks into the ids
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` (``make test``): the tests of a module that share a class-, module- or
    package-scoped fixture (often a tiny training run) form one xdist group, so one worker builds that fixture once
    instead of every worker building its own. A test's explicit ``xdist_group`` mark wins."""
    if _in_loadgroup_run(config):
        for item in items:
            if item.get_closest_marker("xdist_group") is not None:
                continue
            info = getattr(item, "_fixtureinfo", None)
            definitions = info.name2fixturedefs.values() if info is not None else ()
            if any(defs and defs[-1].scope in SHARED_SCOPES for defs in definitions):
                item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    result = yield
    if getattr(config.option, "loadgroup", False):  # the workers: the controller schedules by the ids they send
        _put_groups_into_ids(items)
    return result


def _put_groups_into_ids(items) -> None:
    """Give each grouped test the ``@group`` id suffix, which is how the controller's loadgroup scheduler learns
    the groups. pytest-xdist 3.8 writes it to ``item._nodeid``, which pytest 9.2 no longer reads (its ids are
    structured ``NodeId``s; pytest-dev/pytest-xdist#1386), so without this every group was silently split."""
    for item in items:
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                        for mark in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if not names or item.nodeid.endswith(suffix):  # no group, or an xdist that set the suffix itself
            continue
        if hasattr(item, "_id"):
            item._id = coerce_node_id(item.nodeid + suffix)
        else:  # a pytest before structured ids, where xdist's own suffix took effect
            item._nodeid = item.nodeid + suffix


@pytest.fixture()
def tiny_args(tmp_path):
    """PPO arguments small enough for a unit test (3 iterations of 8 x 16 steps)."""
    from sentio_lab.ppo import Args

    return Args.from_flat(
        total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2,
        window=8, episode_length=24, track=False, progress=False, run_dir=str(tmp_path / "runs"),
        run_name="tiny", checkpoint_every=0, feature_cache_dir=str(tmp_path / "feature-cache"),
    )


@pytest.fixture(scope="session")
def sp500_market():
    """sp500 with the default feature pipeline, prepared once per test session."""
    from sentio_lab.env.market import prepare_market
    from sentio_lab.features import FeatureConfig

    return prepare_market("sp500", FeatureConfig())


def announced_market(n_bars: int = 3000, seed: int = 0, move: float = 0.01):
    """A synthetic market whose next bar's open-to-close move is announced by the feature at the close.

    The feature at bar t is the sign of bar t+1's move (an 'announcement' by construction: the one
    place a feature is allowed to know the next bar, because the test is about learning, not data).
    The agent fills at the next open, so knowing the sign earns ``move`` per bar, minus costs.
    """
    from sentio_lab.data import chronological_split, to_market
    from sentio_lab.env import MarketArrays
    from sentio_lab.env.market import PreparedMarket
    from sentio_lab.features import ObservationFeatures

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


@dataclasses.dataclass(frozen=True)
class MessyMarket:
    """A real frame made messier (all of it valid data) and where the mess is."""

    frame: pd.DataFrame
    zero_volume: tuple[int, ...]
    """Single zero-volume bars (the real 2015-05-12 one included)."""
    zero_run: tuple[int, int]
    """Rows [start, stop) without volume: 45 bars, longer than every volume window."""
    flat: tuple[int, ...]
    """Single flat bars (open = high = low = close)."""
    halt: tuple[int, int]
    """Rows [start, stop) of identical flat bars without volume (a halted market)."""


@pytest.fixture(scope="session")
def messy_nasdaq() -> MessyMarket:
    """520 real NASDAQ bars (2014-2016) with fractional volumes (TA-Lib's running sums then leave a residue),
    single zero-volume bars, a 45-bar zero-volume run, two flat bars and a halt of ten identical flat bars."""
    from sentio_lab.data import load_market

    frame = load_market("nasdaq").frame.iloc[3900 : 3900 + 520].copy()
    real_zero = tuple(int(i) for i in np.flatnonzero(frame["volume"].to_numpy() == 0))
    frame["volume"] *= 1.2345678901
    volume = frame.columns.get_loc("volume")
    singles, run, flat, halt = (100, 101, 300), (360, 405), (150, 151), (420, 430)
    frame.iloc[list(singles), volume] = 0.0
    frame.iloc[run[0] : run[1], volume] = 0.0
    for r in flat:
        frame.iloc[r, :4] = frame["close"].iloc[r]
    frame.iloc[halt[0] : halt[1], :4] = frame["close"].iloc[halt[0] - 1]
    frame.iloc[halt[0] : halt[1], volume] = 0.0
    return MessyMarket(frame, tuple(sorted(singles + real_zero)), run, flat, halt)


def replace(args, **changes):
    """dataclasses.replace, importable by tests."""
    return args.replace(**changes)
