"""Regenerate docs/images/dashboard.png: the monitoring dashboard over a realistic paper replay.

``make dashboard-screenshot`` (or ``python experiments/figures/dashboard_screenshot.py [--out runs/dashboard_demo]``)
runs, in ``--out`` (every step is redone from scratch; minutes on a laptop):

1. a tiny CPCV experiment of ``ppo`` on the bundled sp500 bars up to 2017-12-29 (4 groups, 2 test groups: 3
   out-of-sample paths; one seed; 512 steps per fold): the out-of-sample paths behind the band and the verdict;
2. the same configuration trained once on the same bars: the model that trades;
3. an embedded MLflow registry (``<out>/mlflow``): version 1 with the experiment's verdict, promoted to champion
   (through the default gate where it passes; otherwise through a gate that checks nothing, printed, because a
   512-step model rarely passes: the page's gate column then says it fails), and version 2 with the
   checkpoint's own one-path verdict as challenger;
4. the champion (``models:/demo@champion``) paper-traded on the 2018 bars (the feed holds 60 bars before them
   for the warm-up), with a drift monitor (features against the training rows, a 100-bar window; Sharpe and
   drawdown against the out-of-sample windows; parity against the backtest) writing its alerts to the ledger;
5. the dashboard served on localhost and photographed by headless Chromium (Playwright), the PNG reduced to a
   256-colour palette so it stays small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from sentio_lab.agents.variants import load_trained
from sentio_lab.data import load_market
from sentio_lab.deploy.alerts import DriftThresholds, LedgerAlertSink
from sentio_lab.deploy.drift import fit_reference, observation_blocks
from sentio_lab.deploy.drift_monitor import DriftMonitor
from sentio_lab.deploy.equity_expectation import experiment_paths, parity_expectation
from sentio_lab.deploy.ledger import Ledger
from sentio_lab.deploy.paper import PaperTrader
from sentio_lab.deploy.registry import PromotionRefused, promote, register
from sentio_lab.deploy.verdict import Gate, verdict_from_checkpoint, verdict_from_experiment
from sentio_lab.experiment.config import AgentSpec, ExperimentConfig
from sentio_lab.experiment.runner import plan_experiment, run_experiment
from sentio_lab.ppo import Args, train

ROOT = Path(__file__).resolve().parents[2]
#: The tiny configuration (experiment and deployed model alike).
SETTINGS = dict(total_timesteps=512, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=2, hidden_size=16,
                window=8, episode_length=32)
ARGV = tuple(x for k, v in SETTINGS.items() for x in (f"--{k.replace('_', '-')}", str(v)))
TRAIN_END = "2017-12-29"
LIVE_START = "2018-01-02"


def build_replay(out: Path) -> dict[str, str]:
    """Steps 1-4 of the module doc; the dashboard's command-line sources."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cache = str(out / "cache")
    config = ExperimentConfig(name="demo", dataset="sp500", data_end=TRAIN_END, split="cpcv", n_groups=4,
                              n_test_groups=2, seeds=(1,), baselines=("buy_and_hold", "momentum"), random_seeds=1,
                              common_args=("--feature-cache-dir", cache), agents=(AgentSpec("tiny_ppo", "ppo", ARGV),))
    experiment = out / "experiment"
    print("1/5 experiment", flush=True)
    run_experiment(plan_experiment(config), experiment, progress=False)
    print("2/5 model", flush=True)
    args = Args.from_flat(**SETTINGS, data_end=TRAIN_END, seed=1, track=False, progress=False, run_name="demo",
                          run_dir=str(out / "runs"), checkpoint_every=0, feature_cache_dir=cache)
    checkpoint = train(args).checkpoint_path
    print("3/5 registry", flush=True)
    registry_uri = f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}"
    os.environ["MLFLOW_TRACKING_URI"] = registry_uri  # the paper trader resolves models:/ URIs there
    report = out / "report.txt"
    report.write_text("demo model for the dashboard screenshot\n")
    first = register(checkpoint, "demo", verdict=verdict_from_experiment(experiment, reps=200), report=report,
                     registry_uri=registry_uri)
    try:
        promote("demo", first.version, registry_uri=registry_uri)
    except PromotionRefused as refused:
        print(f"   default gate refused ({refused}); promoting through a gate that checks nothing", flush=True)
        promote("demo", first.version, gate=Gate(spa_alpha=None, min_dsr=None, allow_single_path=True),
                registry_uri=registry_uri)
    register(checkpoint, "demo", verdict=verdict_from_checkpoint(checkpoint, reps=200), report=report,
             registry_uri=registry_uri, alias="challenger")
    print("4/5 paper replay", flush=True)
    frame = load_market("sp500").frame
    live = frame.index.get_loc(frame.index[frame.index >= LIVE_START][0])
    feed = out / "sp500_2018.csv"
    frame.iloc[live - 60:].to_csv(feed)
    ledger_path = out / "ledger.sqlite"
    trader = PaperTrader("models:/demo@champion", feed, ledger_path, account="paper", start=LIVE_START)
    try:
        trader.run()
        model = trader.model
    finally:
        trader.close()
    monitor_replay(model, feed, ledger_path, experiment)
    return {"--ledger": str(ledger_path), "--account": "paper", "--registry-uri": registry_uri,
            "--oos": str(experiment)}


def monitor_replay(model: str, feed: Path, ledger_path: Path, experiment: Path) -> None:
    """Run the drift monitor over the paper account's bars, writing its alerts into the ledger."""
    own = load_trained(model)  # the training market: the reference rows
    start, stop = own.market.range("train")
    features, names, regime = observation_blocks(own.market.features)
    rows = slice(max(start, own.market.features.first_valid), stop)
    close = own.market.data.frame["close"].to_numpy()
    thresholds = DriftThresholds(window=100)
    paths, _ = experiment_paths(experiment)
    reference = fit_reference(features[rows], names, psi_bins=thresholds.psi_bins,
                              market_returns=np.diff(np.log(close[rows])), oos_paths=paths,
                              performance_window=thresholds.performance_window)
    live = load_trained(model, dataset=feed).market
    live_features, _, _ = observation_blocks(live.features)
    live_close = live.data.frame["close"].to_numpy()
    with Ledger(ledger_path) as ledger:
        equity = ledger.equity("paper")
        expected = parity_expectation(model, feed, int(equity.index[0]))
        monitor = DriftMonitor(reference, thresholds, LedgerAlertSink(ledger, "paper"))
        for bar, value in equity.items():
            monitor.update(int(bar), time=live.data.frame.index[bar], features=live_features[bar], equity=value,
                           expected_equity=float(expected.loc[bar]),
                           market_return=float(np.log(live_close[bar] / live_close[bar - 1])))
        print(f"   {len(ledger.alerts('paper'))} alerts written", flush=True)


def photograph(sources: dict[str, str], target: Path, width: int = 1200) -> None:
    """Serve the dashboard on a free port and save a full-page screenshot of it at ``target`` (palette PNG)."""
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "sentio_lab.deploy.dashboard", "--port", str(port), "--slow-refresh-s", "5",
               *[x for pair in sources.items() for x in pair]]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator(".versions-table table").first.wait_for(timeout=240_000)
            page.locator(".expectation-status").get_by_text("Backtest parity").wait_for(timeout=240_000)
            time.sleep(3.0)  # the chart image of the same refresh
            raw = target.with_suffix(".raw.png")
            page.screenshot(path=str(raw), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    Image.open(raw).convert("RGB").quantize(colors=256).save(target, optimize=True)
    raw.unlink()
    print(f"5/5 {target}: {target.stat().st_size / 1024:.0f} KB", flush=True)


def main() -> None:
    """Command line (module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dashboard_demo", help="working folder (removed and rebuilt)")
    parser.add_argument("--target", default=str(ROOT / "docs" / "images" / "dashboard.png"))
    args = parser.parse_args()
    photograph(build_replay(Path(args.out).resolve()), Path(args.target))


if __name__ == "__main__":
    main()
