"""The monitoring dashboard: ledger reading (unit), and the served page in headless Chromium (Playwright): the
equity shown equals the ledger's, follows new bars, an alert row appears after a planted drift, the registry's
versions show the champion, the out-of-sample band is drawn (its pixels are in the chart); a screenshot is saved."""

from __future__ import annotations

import io
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sentio_lab.deploy import dashboard as board
from sentio_lab.deploy.alerts import DriftThresholds, LedgerAlertSink
from sentio_lab.deploy.drift import fit_reference
from sentio_lab.deploy.drift_monitor import DriftMonitor

#: The paper ledger's tables as far as the dashboard reads them (sentio_lab.deploy.ledger, issue 21).
SCHEMA = """
CREATE TABLE equity (account TEXT, bar INTEGER, time TEXT, equity REAL, peak REAL, max_drawdown REAL);
CREATE TABLE positions (account TEXT, bar INTEGER, time TEXT, level INTEGER, shares REAL, weight REAL, pending INTEGER);
CREATE TABLE fills (account TEXT, bar INTEGER, time TEXT, order_bar INTEGER, shares REAL, price REAL,
                    executed_price REAL, fee REAL, capped INTEGER);
CREATE TABLE alerts (account TEXT, bar INTEGER, time TEXT, kind TEXT, metric TEXT, value REAL, threshold REAL,
                     message TEXT);
"""
ACCOUNTS = """CREATE TABLE accounts (account TEXT, model TEXT, feed TEXT, positions TEXT, fill_price TEXT, capital REAL,
                                first_bar INTEGER)"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class SqlLedger:
    """The trader's side of the test: writes bars and alerts into the ledger file, one transaction each."""

    def __init__(self, path: Path, account: str = "acct") -> None:
        self.path, self.account = path, account
        with sqlite3.connect(path) as db:
            db.executescript(SCHEMA)
        self.bars = 0
        self.equity = 1.0

    def write_bars(self, returns: np.ndarray) -> None:
        with sqlite3.connect(self.path) as db:
            for r in returns:
                bar, self.equity = self.bars, self.equity * float(np.exp(r))
                stamp = str(pd.Timestamp("2024-01-01") + pd.Timedelta(days=bar))
                db.execute("INSERT INTO equity VALUES (?, ?, ?, ?, ?, ?)",
                           (self.account, bar, stamp, self.equity, self.equity, 0.0))
                db.execute("INSERT INTO positions VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (self.account, bar, stamp, 2, 0.01, 1.0, 0))
                db.execute("INSERT INTO fills VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (self.account, bar, stamp, bar - 1, 0.001, 100.0, 100.01, 1e-5, 0))
                self.bars += 1

    def record_alert(self, account, bar, time, kind, metric, value, threshold, message):  # noqa: ANN001
        with sqlite3.connect(self.path) as db:
            db.execute("INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (account, bar, time, kind, metric, value, threshold, message))


def test_read_ledger_filters_the_account_and_refuses_foreign_files(tmp_path):
    ledger = SqlLedger(tmp_path / "paper.sqlite")
    ledger.write_bars(np.full(5, 0.01))
    SqlLedger.write_bars(type("Other", (), {"path": ledger.path, "account": "other", "bars": 0, "equity": 2.0})(),
                         np.zeros(3))
    view = board.read_ledger(ledger.path, "acct")
    assert len(view.equity) == 5 and view.last_equity == pytest.approx(np.exp(0.05))
    assert "Equity **1.051271**" in board.equity_text(view) and "drawdown 0.00%" in board.equity_text(view)
    empty = board.read_ledger(ledger.path, "nobody")
    assert empty.last_equity is None and board.equity_text(empty) == "No bars yet."
    with pytest.raises(FileNotFoundError, match="no ledger"):
        board.read_ledger(tmp_path / "missing.sqlite", "acct")
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE equity (account TEXT, bar INTEGER)")
    with pytest.raises(ValueError, match="tables \\['positions', 'fills', 'alerts'\\] are missing"):
        board.read_ledger(foreign, "acct")
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all " * 100)
    with pytest.raises(ValueError, match="cannot be read as a SQLite ledger"):
        board.read_ledger(text, "acct")


def test_dashboard_panes_follow_the_ledger(tmp_path):
    ledger = SqlLedger(tmp_path / "paper.sqlite")
    page = board.Dashboard(ledger.path, "acct")
    assert page.headline.object == "No bars yet." and page.position.object == "No position yet."
    ledger.write_bars(np.r_[np.full(10, 0.01), np.full(5, -0.02)])
    page.refresh()
    assert f"{ledger.equity:.6f}" in page.headline.object
    assert "drawdown 9.52%" in page.headline.object  # 1 - exp(-0.1)
    assert "level 2" in page.position.object and len(page.fills.object) == 15
    assert page.fills.object["bar"].iloc[0] == 14  # newest first
    assert board.dashboard(ledger.path, "acct", refresh_ms=0) is not None


def test_dashboard_refreshes_periodically_and_serves_on_localhost(tmp_path, monkeypatch):
    ledger = SqlLedger(tmp_path / "paper.sqlite")
    callbacks, served = [], []
    monkeypatch.setattr(board.pn.state, "add_periodic_callback",
                        lambda callback, period: callbacks.append((callback, period)))
    board.dashboard(ledger.path, "acct", refresh_ms=250)
    assert [period for _, period in callbacks] == [250]
    ledger.write_bars(np.full(3, 0.01))
    callbacks[0][0]()  # one tick of the timer re-reads the ledger
    monkeypatch.setattr(board.pn, "serve", lambda apps, **kwargs: served.append((apps, kwargs)))
    board.main(["--ledger", str(ledger.path), "--account", "acct", "--port", "5999"])
    (apps, kwargs), = served
    assert kwargs["port"] == 5999 and kwargs["address"] == "127.0.0.1" and kwargs["show"] is False
    page = apps["/"]()
    assert f"{ledger.equity:.6f}" in page[1].object  # the headline of the page the server would build
    with pytest.raises(FileNotFoundError):
        board.main(["--ledger", str(tmp_path / "missing.sqlite"), "--account", "acct"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float, log: Path) -> None:
    """Poll until the page answers (a loaded 2-core machine takes tens of seconds to start Panel)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard did not answer at {url} within {seconds} s; its log: {log.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium; .ci/run does)")
def test_served_dashboard_in_headless_chromium(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    ledger = SqlLedger(tmp_path / "paper.sqlite")
    with sqlite3.connect(ledger.path) as db:  # the account opened at bar 0 (its model is not needed here)
        db.execute(ACCOUNTS)
        db.execute("INSERT INTO accounts VALUES ('acct', 'model.pt', 'feed.csv', '[-1, 0, 1]', 'next_open', 1e6, 0)")
    rng = np.random.default_rng(0)
    ledger.write_bars(rng.normal(0.0005, 0.01, 120))
    oos = _oos_folder(tmp_path / "oos", rng)
    registry_uri = _registry(tmp_path / "mlflow")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(board.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "sentio_lab.deploy.dashboard", "--ledger", str(ledger.path),
                                   "--account", "acct", "--port", str(port), "--refresh-ms", "500", "--oos", str(oos),
                                   "--model-name", "demo", "--registry-uri", registry_uri, "--no-expectation"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(f"http://127.0.0.1:{port}/", 240, log)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/")
            # Panel renders into shadow roots: Playwright's CSS pierces them; text_content reads the rendered text.
            figure = page.locator(".equity-now strong").first
            figure.wait_for(timeout=120_000)
            _until(lambda: figure.text_content() == f"{ledger.equity:.6f}", 60, "the ledger's equity")
            assert float(figure.text_content()) == pytest.approx(
                board.read_ledger(ledger.path, "acct").last_equity, abs=5e-7)
            # The trader writes more bars: the page follows.
            ledger.write_bars(rng.normal(0.0005, 0.01, 30))
            _until(lambda: figure.text_content() == f"{ledger.equity:.6f}", 60, "the new equity")
            alerts = page.locator(".alerts-table table").first
            assert "feature_psi" not in alerts.text_content()
            # A planted drift: feature 'a' jumps by 4 sd; the monitor's alert reaches the ledger, then the page.
            reference = fit_reference(rng.standard_normal((600, 1)), ["a"])
            monitor = DriftMonitor(reference, DriftThresholds(window=100), LedgerAlertSink(ledger, "acct"))
            for t in range(300):
                monitor.update(t, features=np.array([rng.standard_normal() + (4.0 if t >= 150 else 0.0)]))
            written = board.read_ledger(ledger.path, "acct").alerts
            assert "feature_psi" in set(written["kind"]) and written["bar"].min() >= 150
            _until(lambda: "feature_psi" in alerts.text_content(), 60, "the alert row")
            assert "feature_ks" in alerts.text_content()
            # The registry's versions: v2 is champion, v3 challenger, with their verdict numbers and gate result.
            rows = page.locator(".versions-table tbody tr")
            _until(lambda: rows.count() == 3, 60, "three model versions")
            champion = rows.filter(has_text="champion").first.text_content().split()
            assert champion[:2] == ["2", "champion"] and "1.20" in champion and champion[-1] == "pass"
            assert "challenger" in rows.filter(has_text="DSR 0.300").first.text_content().split()
            # The band: said on the page, and its colour fills part of the chart image (none without a band).
            status = " ".join(page.locator(".expectation-status p").all_text_contents())  # inside the shadow root
            assert "band: 5%-95% of the equity ratio" in status
            assert "No backtest expectation (turned off)" in status
            chart = page.locator(".equity-chart img").first
            _until(lambda: _band_pixels(chart.screenshot()) > 2000, 60, "the band in the chart")
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
            target = os.environ.get("SENTIO_DASHBOARD_SCREENSHOT")
            if target:  # `make dashboard-screenshot` keeps it for the docs
                shutil.copyfile(shot, target)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _band_pixels(png: bytes) -> int:
    """Pixels of the chart coloured as the band's fill on white (BAND_COLOR at BAND_ALPHA)."""
    from matplotlib.colors import to_rgb
    from PIL import Image

    fill = 255 * (1 - board.BAND_ALPHA) + board.BAND_ALPHA * 255 * np.array(to_rgb(board.BAND_COLOR))
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    return int((np.abs(pixels - fill).max(axis=-1) <= 6).sum())


def _oos_folder(folder: Path, rng: np.random.Generator) -> Path:
    """An experiment folder with 4 out-of-sample paths of 400 bars of agent "a"."""
    folder.mkdir()
    curves = [pd.DataFrame({"name": "a", "seed": 1, "path": p, "timestamp": pd.bdate_range("2020-01-01", periods=400),
                            "equity": np.exp(np.cumsum(rng.normal(0.0004, 0.01, 400)))}) for p in range(4)]
    pd.concat(curves).to_parquet(folder / "equity.parquet")
    pd.DataFrame({"kind": ["agent"] * 4, "name": ["a"] * 4}).to_parquet(folder / "results.parquet")
    return folder


def _registry(folder: Path) -> str:
    """An MLflow registry holding versions 1 (retired), 2 (champion, passes the gate) and 3 (challenger, low DSR)
    of model "demo": tags as :func:`sentio_lab.deploy.registry.register` writes them (no bundle is needed here)."""
    from mlflow import MlflowClient

    from sentio_lab.deploy.verdict import Verdict

    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("demo")
    verdicts = [(0.4, 0.6, "retired"), (1.2, 0.9, "registered"), (0.5, 0.3, "registered")]
    for sharpe, dsr, status in verdicts:
        verdict = Verdict(median_sharpe=sharpe, dsr=dsr, pbo=0.2, spa_p_value=0.1, spa_reverse_p_value=0.5,
                          benchmark="buy_and_hold", source="experiment demo")
        client.create_model_version("demo", str(folder / "bundle"), tags={"status": status, "variant": "ppo",
                                                                         **verdict.to_tags()})
    client.set_registered_model_alias("demo", "champion", "2")
    client.set_registered_model_alias("demo", "challenger", "3")
    return uri


def _until(condition, seconds: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"the page never showed {what} within {seconds} s")
