"""Panels (sentio_lab.data.panel): skfolio's S&P 500 closes, user files aligned on one calendar, missing bars refused
by name or forward-filled on request and recorded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sentio_lab.data import DataValidationError
from sentio_lab.data.panel import align_panel, load_panel, load_sp500_panel


def synthetic_frames(n_assets: int = 4, n_bars: int = 400, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Random-walk OHLCV frames on one business-day calendar, each asset its own volatility and volume."""
    rng = np.random.default_rng(seed)
    index = pd.bdate_range("2020-01-01", periods=n_bars)
    frames = {}
    for a in range(n_assets):
        sigma = 0.008 + 0.004 * a
        close = 50.0 * (a + 1) * np.exp(np.cumsum(rng.normal(0.0002, sigma, n_bars)))
        gap = np.exp(rng.normal(0.0, sigma / 3, n_bars))
        open_ = np.r_[close[0], close[:-1]] * gap
        high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, sigma / 2, n_bars)))
        low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, sigma / 2, n_bars)))
        volume = rng.uniform(2e4, 8e4, n_bars) * (a + 1)
        frames[f"A{a}"] = pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume},
                                       index=index)
    return frames


def write_files(frames: dict[str, pd.DataFrame], folder) -> dict[str, str]:
    paths = {}
    for name, frame in frames.items():
        path = folder / f"{name}.csv"
        frame.rename_axis("date").to_csv(path)
        paths[name] = str(path)
    return paths


def test_sp500_panel_is_skfolios_twenty_stocks_close_only():
    from skfolio.datasets import load_sp500_dataset

    panel = load_sp500_panel()
    prices = load_sp500_dataset()
    assert panel.assets == tuple(prices.columns) and len(panel.assets) == 20
    assert panel.close_only and panel.index[0] == pd.Timestamp("1990-01-02")
    assert panel.index[-1] == pd.Timestamp("2022-12-28")
    np.testing.assert_array_equal(panel.column("close"), prices.to_numpy())
    assert np.isnan(panel.column("open")).all() and panel.filled == ()
    sub = load_sp500_panel(start="2020-01-01", end="2020-12-31", assets=["MSFT", "KO"])
    assert sub.assets == ("MSFT", "KO") and sub.index[0].year == 2020 and sub.index[-1].year == 2020
    returns = sub.returns()
    np.testing.assert_allclose(returns["KO"].iloc[0], sub.frames["KO"]["close"].iloc[1] / sub.frames["KO"]["close"]
                               .iloc[0] - 1)
    with pytest.raises(DataValidationError, match=r"unknown asset\(s\) \['ZZZ'\]"):
        load_sp500_panel(assets=["AAPL", "ZZZ"])


def test_user_files_load_through_the_single_market_validation(tmp_path):
    frames = synthetic_frames()
    panel = load_panel(write_files(frames, tmp_path))
    assert panel.assets == ("A0", "A1", "A2", "A3") and not panel.close_only
    np.testing.assert_allclose(panel.column("volume")[:, 2], frames["A2"]["volume"].to_numpy())
    assert panel.report()["missing_policy"] == "refuse" and panel.report()["filled_bars"] == {}
    # a bad file is the single-market error, naming the file and the row
    broken = frames["A1"].copy()
    broken.iloc[7, broken.columns.get_loc("high")] = 0.5 * broken["low"].iloc[7]
    paths = write_files({**frames, "A1": broken}, tmp_path)
    with pytest.raises(DataValidationError, match=r"A1\.csv: high below max\(open, close\)"):
        load_panel(paths)
    # raw frames go through the same canonical checks
    panel = load_panel(frames, start="2020-03-02")
    assert panel.index[0] == pd.Timestamp("2020-03-02")
    with pytest.raises(KeyError, match="unknown column"):
        panel.column("adj close")


def test_a_missing_bar_is_refused_naming_asset_and_date():
    frames = synthetic_frames()
    dropped = frames["A2"].index[[30, 31]]
    frames["A2"] = frames["A2"].drop(dropped)
    with pytest.raises(DataValidationError, match=r"asset 'A2' has no bar at 2020-02-12 \(2 missing bar\(s\).*"
                                                  r"missing='ffill'") as err:
        load_panel(frames)
    assert err.value.flag == "--panel-missing" and "\n" not in str(err.value)


def test_forward_fill_is_explicit_and_recorded():
    frames = synthetic_frames()
    dropped = frames["A2"].index[[30, 31]]
    last = frames["A2"]["close"].iloc[29]
    frames["A2"] = frames["A2"].drop(dropped)
    panel = load_panel(frames, missing="ffill")
    filled = panel.frames["A2"].loc[dropped]
    assert (filled[["open", "high", "low", "close"]].to_numpy() == last).all() and (filled["volume"] == 0).all()
    assert panel.filled == (("A2", dropped[0]), ("A2", dropped[1]))
    report = panel.report()
    assert report["filled_bars"] == {"A2": 2} and report["filled"][0] == ("A2", str(dropped[0].date()))
    assert report["missing_policy"] == "ffill" and len(panel.index) == 400
    # untouched assets and bars stay as loaded
    pd.testing.assert_frame_equal(panel.frames["A0"], load_panel(synthetic_frames()).frames["A0"])


def test_an_asset_starting_late_cannot_be_filled():
    frames = synthetic_frames()
    frames["A3"] = frames["A3"].iloc[60:]
    with pytest.raises(DataValidationError, match=r"asset 'A3' has no bar at 2020-01-01 \(its data start at "
                                                  r"2020-03-25, nothing to carry forward\); start the panel"):
        load_panel(frames, missing="ffill")
    assert len(load_panel(frames, start="2020-03-25").index) == 340


def test_close_only_files_fill_at_next_close_and_keep_unknowns_unknown():
    frames = {k: v[["close"]] for k, v in synthetic_frames(3).items()}
    frames["A1"] = frames["A1"].drop(frames["A1"].index[5])
    panel = load_panel(frames, fill_price="next_close", missing="ffill")
    assert panel.close_only and np.isnan(panel.column("open")).all() and np.isnan(panel.column("volume")).all()
    with pytest.raises(DataValidationError, match="missing column"):
        load_panel(frames)


def test_policy_and_size_checks():
    frames = synthetic_frames(2)
    with pytest.raises(DataValidationError, match="missing='drop'"):
        load_panel(frames, missing="drop")
    with pytest.raises(DataValidationError, match="at least 2 assets"):
        align_panel({"A0": frames["A0"]}, name="one")
    stale = frames["A0"].copy()
    stale["open"] = np.r_[stale["close"].iloc[0], stale["close"].to_numpy()[:-1]]
    stale["high"] = stale[["open", "close", "high"]].max(axis=1)
    stale["low"] = stale[["open", "close", "low"]].min(axis=1)
    with pytest.raises(DataValidationError, match="asset 'A0': stale opens"):
        load_panel({"A0": stale, "A1": frames["A1"]})
    assert load_panel({"A0": stale, "A1": frames["A1"]}, fill_price="next_close").assets == ("A0", "A1")
