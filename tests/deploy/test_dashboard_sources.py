"""The dashboard's slower sources (issue 22 s2): the out-of-sample band (by hand), the backtest-parity expectation
(equal to a real paper ledger), the registry's versions table (champion, challenger, verdicts, gate), and the page
saying what is missing instead of failing."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from sentio_lab.deploy import dashboard as board
from sentio_lab.deploy.equity_expectation import experiment_paths, oos_band, parity_expectation
from sentio_lab.deploy.verdict import Verdict

ACCOUNTS = ("CREATE TABLE accounts (account TEXT, model TEXT, feed TEXT, positions TEXT, fill_price TEXT, "
            "capital REAL, first_bar INTEGER)")
SCHEMA = """
CREATE TABLE equity (account TEXT, bar INTEGER, time TEXT, equity REAL, peak REAL, max_drawdown REAL);
CREATE TABLE positions (account TEXT, bar INTEGER, time TEXT, level INTEGER, shares REAL, weight REAL, pending INTEGER);
CREATE TABLE fills (account TEXT, bar INTEGER, time TEXT, order_bar INTEGER, shares REAL, price REAL,
                    executed_price REAL, fee REAL, capped INTEGER);
CREATE TABLE alerts (account TEXT, bar INTEGER, time TEXT, kind TEXT, metric TEXT, value REAL, threshold REAL,
                     message TEXT);
"""


def ledger_file(path: Path, equity: np.ndarray, first_bar: int = 10, model: str = "model.pt") -> Path:
    """A ledger whose account opened at ``first_bar`` with the given equity marks (one per bar)."""
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        db.execute(ACCOUNTS)
        db.execute("INSERT INTO accounts VALUES ('acct', ?, 'feed.csv', '[-1, 0, 1]', 'next_open', 1e6, ?)",
                   (model, first_bar))
    append_bars(path, equity, first_bar)
    return path


def append_bars(path: Path, equity: np.ndarray, first: int) -> None:
    with sqlite3.connect(path) as db:
        for k, value in enumerate(equity):
            db.execute("INSERT INTO equity VALUES ('acct', ?, ?, ?, ?, 0.0)", (first + k, f"t{first + k}",
                                                                                float(value), float(value)))


def experiment_folder(folder: Path, paths: list[np.ndarray], agents: tuple[str, ...] = ("a",)) -> Path:
    """An experiment output folder holding ``paths`` as the out-of-sample equity of every agent in ``agents``."""
    folder.mkdir()
    curves, results = [], []
    for name in agents:
        for p, equity in enumerate(paths):
            stamps = pd.bdate_range("2020-01-01", periods=len(equity))
            curves.append(pd.DataFrame({"name": name, "seed": 1, "path": p, "timestamp": stamps, "equity": equity}))
            results.append({"kind": "agent", "name": name, "seed": 1, "path": p})
    curves.append(pd.DataFrame({"name": "buy_and_hold", "seed": -1, "path": 0,
                                "timestamp": pd.bdate_range("2020-01-01", periods=5), "equity": np.ones(5)}))
    results.append({"kind": "baseline", "name": "buy_and_hold", "seed": -1, "path": 0})
    pd.concat(curves, ignore_index=True).to_parquet(folder / "equity.parquet")
    pd.DataFrame(results).to_parquet(folder / "results.parquet")
    return folder


# ------------------------------------------------------------------------------------------------- the band
def test_the_band_is_the_quantiles_of_every_window_of_every_path():
    rng = np.random.default_rng(3)
    paths = [np.exp(np.cumsum(rng.normal(0.0, 0.01, n))) for n in (40, 25)]
    band = oos_band(paths, 30, quantiles=(0.1, 0.9), min_windows=12)
    for h in (1, 7, 22):  # by hand: every start s of every path long enough
        ratios = [p[s + h] / p[s] for p in paths for s in range(len(p) - h)]
        assert band.windows[h] == len(ratios) == (40 - h) + max(0, 25 - h)
        assert band.lower[h] == pytest.approx(np.quantile(ratios, 0.1), rel=1e-12)
        assert band.upper[h] == pytest.approx(np.quantile(ratios, 0.9), rel=1e-12)
    assert band.lower[0] == band.upper[0] == 1.0 and band.windows[0] == 2
    # 40 - h windows remain once h >= 25: the band stops where fewer than 12 are left (h = 29), short of 30
    assert band.horizon == 28 and not band.complete
    assert oos_band(paths, 10).complete and oos_band(paths, 10).horizon == 10
    placed = band.from_bar(100)
    assert placed.index[0] == 100 and placed.index[-1] == 128 and placed["upper"].iloc[5] == band.upper[5]
    # a steadily rising path: the band grows with the horizon as the path does
    rising = oos_band([np.exp(0.01 * np.arange(50))], 5, min_windows=1)
    np.testing.assert_allclose(rising.lower, np.exp(0.01 * np.arange(6)), rtol=1e-12)


def test_the_band_refuses_bad_input():
    good = [np.linspace(1.0, 2.0, 30)]
    with pytest.raises(ValueError, match="0 < lower < upper < 1"):
        oos_band(good, 5, quantiles=(0.9, 0.1))
    with pytest.raises(ValueError, match="horizon must be >= 0"):
        oos_band(good, -1)
    with pytest.raises(ValueError, match="path 1: equity must be"):
        oos_band([good[0], np.array([1.0, 0.0, 1.0])], 5)
    with pytest.raises(ValueError, match="no out-of-sample paths"):
        oos_band([], 5)


def test_band_paths_come_from_an_experiment_folder(tmp_path):
    folder = experiment_folder(tmp_path / "one", [np.linspace(1, 1.2, 30), np.linspace(1, 0.9, 30)])
    paths, name = experiment_paths(folder)
    assert name == "a" and len(paths) == 2 and paths[1].iloc[-1] == pytest.approx(0.9)
    two = experiment_folder(tmp_path / "two", [np.linspace(1, 1.2, 30)], agents=("a", "b"))
    with pytest.raises(ValueError, match=r"2 agent configurations \['a', 'b'\]; name one \(--oos-name\)"):
        experiment_paths(two)
    assert experiment_paths(two, "b")[1] == "b"
    with pytest.raises(FileNotFoundError, match="no results.parquet"):
        experiment_paths(tmp_path)


# ------------------------------------------------------------------------------------------------- the page
def test_the_page_draws_the_band_and_the_backtest_and_reports_the_gap(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paper = np.exp(np.cumsum(np.r_[0.0, rng.normal(0, 0.01, 20)]))
    path = ledger_file(tmp_path / "paper.sqlite", paper)
    expected = pd.Series(paper.copy(), index=pd.RangeIndex(10, 31, name="bar"))
    expected.iloc[7] *= np.exp(-0.01)  # a planted parity gap of 0.01 at bar 17
    calls = []

    def fake_expectation(model, feed, first_bar):  # noqa: ANN001, ANN202
        calls.append((model, feed, first_bar))
        return expected.loc[: 10 + len(calls) * 20]

    monkeypatch.setattr(board, "parity_expectation", fake_expectation)
    oos = experiment_folder(tmp_path / "oos", [np.exp(np.cumsum(rng.normal(0, 0.01, 200))) for _ in range(3)])
    page = board.Dashboard(path, "acct", oos=oos, slow_refresh_s=3600)
    assert calls == [("model.pt", "feed.csv", 10)]
    assert "max |log(paper / backtest)| **1.00e-02** over 21 bars" in page.expectations.object
    assert "5%-95% of the equity ratio over h bars, every window of the 3 out-of-sample paths of `a`" in \
        page.expectations.object
    axes = page.curve.object.axes[0]
    band = [c for c in axes.collections if isinstance(c, PolyCollection)]
    assert len(band) == 1
    top = band[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(page.band.upper[:21].max())
    assert [line.get_label() for line in axes.get_lines()] == ["paper", "backtest"]
    np.testing.assert_allclose(axes.get_lines()[1].get_ydata(), expected.to_numpy())
    np.testing.assert_allclose(axes.get_lines()[0].get_ydata(), paper)
    page.slow_refresh_s = 0.0
    page.refresh()
    assert len(calls) == 1  # the expectation covers every bar of the ledger: never recomputed
    page.slow_refresh_s = 3600
    # new bars past the expectation: recomputed only once the slow period has passed
    append_bars(path, [paper[-1]] * 5, 31)
    page.refresh()
    assert len(calls) == 1
    page.slow_refresh_s = 0.0
    page.refresh()
    assert len(calls) == 2 and "over 21 bars" in page.expectations.object  # the expectation covers bars 10..30
    page.refresh()
    assert len(calls) == 3  # still short of bar 35: tried again


def test_the_page_says_what_is_missing_and_stays_up(tmp_path, monkeypatch):
    path = ledger_file(tmp_path / "paper.sqlite", np.ones(5))

    def broken(model, feed, first_bar):  # noqa: ANN001, ANN202
        raise FileNotFoundError(f"{feed}: no such feed")

    monkeypatch.setattr(board, "parity_expectation", broken)
    page = board.Dashboard(path, "acct")
    text = page.expectations.object
    assert "No backtest expectation: FileNotFoundError: feed.csv: no such feed" in text
    assert "No band: no out-of-sample evaluation given (--oos EXPERIMENT_FOLDER)." in text
    assert "No registry model" in page.registry.object and page.versions_pane.object.empty
    assert [c for c in page.curve.object.axes[0].collections if isinstance(c, PolyCollection)] == []
    short = experiment_folder(tmp_path / "short", [np.linspace(1.0, 1.1, 4)])
    page = board.Dashboard(path, "acct", oos=short, expectation=False)
    assert "No backtest expectation (turned off)." in page.expectations.object
    assert "ends at bar 10 (fewer than 20 windows" in page.expectations.object  # 4-bar paths: no h >= 1 band
    page = board.Dashboard(path, "acct", oos=tmp_path / "nowhere", expectation=False)
    assert "No band: " in page.expectations.object and "no results.parquet" in page.expectations.object
    bare = tmp_path / "bare.sqlite"  # a ledger without the accounts table
    with sqlite3.connect(bare) as db:
        db.executescript(SCHEMA)
    append_bars(bare, np.ones(3), 0)
    page = board.Dashboard(bare, "acct", oos=short)
    assert "the ledger has no accounts row" in page.expectations.object and "No band" in page.expectations.object


# ------------------------------------------------------------------------------------------------- the registry
def version(number: int, verdict: Verdict, aliases: tuple[str, ...] = (), status: str = "registered"):
    return SimpleNamespace(version=str(number), aliases=list(aliases),
                           tags={"status": status, "variant": "ppo", **verdict.to_tags()})


STRONG = Verdict(median_sharpe=1.2, dsr=0.9, pbo=0.1, spa_p_value=0.02, spa_reverse_p_value=0.6,
                 benchmark="buy_and_hold", source="experiment x")
WEAK = Verdict(median_sharpe=0.1, dsr=0.3, pbo=float("nan"), spa_p_value=0.5, spa_reverse_p_value=0.4,
               benchmark="buy_and_hold", source="experiment y")


def test_the_versions_table_shows_roles_verdicts_and_the_gate():
    table = board.versions_table([version(1, STRONG, ("champion",)), version(2, WEAK, ("challenger",)),
                                  version(3, WEAK, status="retired")], trading="1")
    assert table["version"].tolist() == [3, 2, 1]
    champion = table.set_index("version").loc[1]
    assert champion["role"] == "champion" and champion["gate"] == "pass" and champion["trading"] == "yes"
    assert (champion["median Sharpe"], champion["DSR"], champion["PBO"], champion["SPA p"]) == \
        ("1.20", "0.90", "0.10", "0.020")
    challenger = table.set_index("version").loc[2]
    assert challenger["role"] == "challenger" and challenger["PBO"] == "n/a"
    assert challenger["gate"] == "fail: DSR 0.300 is not above 0.5" and challenger["trading"] == ""
    assert table.set_index("version").loc[3, "status"] == "retired"
    assert board.registry_model_of("/r/downloads/demo/3/bundle/checkpoint.pt") == ("demo", "3")
    assert board.registry_model_of("/r/runs/ppo/checkpoint.pt") is None


def test_the_page_reads_the_registry_every_slow_period(tmp_path, monkeypatch):
    path = ledger_file(tmp_path / "paper.sqlite", np.ones(3), model="/r/downloads/demo/2/bundle/checkpoint.pt")
    asked = []

    def listing(name, registry_uri=None):  # noqa: ANN001, ANN202
        asked.append((name, registry_uri))
        return [version(1, STRONG, ("champion",)), version(2, WEAK, ("challenger",))][: len(asked)]

    monkeypatch.setattr(board, "list_versions", listing)
    page = board.Dashboard(path, "acct", registry_uri="sqlite:///x.db", expectation=False, slow_refresh_s=3600)
    assert asked == [("demo", "sqlite:///x.db")]  # the name of the registry model the account trades
    assert "`demo`: 1 version(s); champion v1" in page.registry.object
    page.refresh()
    assert len(asked) == 1 and len(page.versions_pane.object) == 1
    page.slow_refresh_s = 0.0
    page.refresh()
    assert len(page.versions_pane.object) == 2
    assert page.versions_pane.object.set_index("version").loc[2, "trading"] == "yes"

    def down(name, registry_uri=None):  # noqa: ANN001, ANN202
        raise OSError("connection refused")

    monkeypatch.setattr(board, "list_versions", down)
    page = board.Dashboard(path, "acct", model_name="other", expectation=False)
    assert page.registry.object == "Registry unavailable: OSError: connection refused"


def test_the_command_line_passes_the_sources(tmp_path, monkeypatch):
    path = ledger_file(tmp_path / "paper.sqlite", np.ones(3))
    served = []
    monkeypatch.setattr(board.pn, "serve", lambda apps, **kwargs: served.append(apps))
    monkeypatch.setattr(board, "list_versions", lambda name, registry_uri=None: [version(1, STRONG, ("champion",))])
    oos = experiment_folder(tmp_path / "oos", [np.linspace(1.0, 1.3, 80)])
    board.main(["--ledger", str(path), "--account", "acct", "--model-name", "demo", "--oos", str(oos),
                "--no-expectation", "--refresh-ms", "0"])
    page = served[0]["/"]()
    assert "(turned off)" in page[2].object and "1 out-of-sample paths of `a`" in page[2].object
    assert "champion v1" in page[6].object


# --------------------------------------------------------------------------------------- parity on a real run
@pytest.mark.slow
def test_the_expectation_is_the_paper_ledger_of_a_real_run(tmp_path):
    """A tiny model paper-traded on real sp500 bars from a later first bar (--start): the backtest expectation the
    dashboard draws equals the ledger's equity at every bar, so a parity gap on the page is a real gap."""
    from sentio_lab.data import load_market
    from sentio_lab.deploy.paper import PaperTrader
    from sentio_lab.ppo import Args, train

    args = Args.from_flat(total_timesteps=256, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=1,
                          hidden_size=8, window=8, episode_length=24, track=False, progress=False,
                          run_dir=str(tmp_path), run_name="tiny", checkpoint_every=0,
                          feature_cache_dir=str(tmp_path / "cache"))
    checkpoint = train(args).checkpoint_path
    frame = load_market("sp500").frame.iloc[-120:]
    feed = tmp_path / "feed.csv"
    frame.to_csv(feed)
    trader = PaperTrader(checkpoint, feed, tmp_path / "ledger.sqlite", account="acct", start=str(frame.index[50]))
    try:
        trader.run()
        recorded = trader.ledger.equity("acct")
    finally:
        trader.close()
    assert recorded.index[0] == 50
    expected = parity_expectation(checkpoint, feed, 50)
    assert list(expected.index) == list(recorded.index)
    np.testing.assert_allclose(expected.to_numpy(), recorded.to_numpy(), rtol=0, atol=1e-9)
    assert np.ptp(recorded.to_numpy()) > 1e-4  # the account moved: equality is not two flat lines
    with pytest.raises(ValueError, match="first complete observation on .* is bar"):
        parity_expectation(checkpoint, feed, 3)  # before the warm-up: not the account's first bar
    with pytest.raises(ValueError, match="has 120 bars"):
        parity_expectation(checkpoint, feed, 500)
    page = board.Dashboard(tmp_path / "ledger.sqlite", "acct", expectation=True)
    gap = page.expectations.object.split("max |log(paper / backtest)| **")[1].split("**")[0]
    assert float(gap) < 1e-9 and f"over {len(recorded)} bars" in page.expectations.object
