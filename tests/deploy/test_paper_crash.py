"""Crash safety of the paper trader (issue 21 s4): ``kill -9`` at random points, restart, same ledger.

The trader runs in child processes (the command line, ``sentio_lab.deploy.paper.main``) forked from a
``multiprocessing`` fork server that has imported torch and the package once: a real process per run, killed by
SIGKILL from inside (the ``SENTIO_PAPER_CRASH=<point>@<bar>`` hook) at points between the fill and the decision,
between the decision and the write, in the middle of a bar's transaction (after any one table's row), after the
commit before the order is sent, and between bars. After each kill the ledger holds whole bars only, and after the
last restart it equals an uninterrupted run's, row for row: no fill lost or duplicated.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sentio_lab.agents.variants import load_variant
from sentio_lab.data import load_market
from sentio_lab.deploy.ledger import TABLES, Ledger
from sentio_lab.deploy.paper import CRASH_ENV

FEED_BARS = 130  # real sp500 bars: 27 of warm-up and window, then 103 bars traded
FIRST = 27
KILLS = 2 + 9  # the first bar's two points, then each point of POINTS once at a random later bar
#: Where a bar can be interrupted (module doc of sentio_lab.deploy.paper); the first bar has no fill and no hook
#: inside its transaction.
POINTS = ("fill", "decide", "write:fills", "write:positions", "write:cash", "write:equity", "write:orders", "commit",
          "sent")


def run_trader(argv: list[str], crash: str | None) -> None:
    """The child's body: the command line with the crash hook set (or not)."""
    from sentio_lab.deploy import paper

    if crash is None:
        os.environ.pop(CRASH_ENV, None)
    else:
        os.environ[CRASH_ENV] = crash
    sys.exit(paper.main(argv))


@pytest.fixture(scope="module")
def trader_process():
    """A function ``(argv, crash) -> exit code`` running the trader in a child forked from a preloaded server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sentio_lab.deploy.paper"])

    def run(argv, crash=None):
        child = context.Process(target=run_trader, args=(argv, crash))
        child.start()
        child.join(timeout=300)
        assert child.exitcode is not None, "the trader hung"
        return child.exitcode

    return run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny ppo checkpoint and a feed of the last FEED_BARS sp500 bars."""
    folder = tmp_path_factory.mktemp("crash")
    module = load_variant("ppo")
    args = module.Args.from_flat(
        total_timesteps=384, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=1, hidden_size=8, window=8,
        episode_length=24, track=False, progress=False, run_dir=str(folder), run_name="tiny", checkpoint_every=0,
        feature_cache_dir=str(folder / "cache"))
    checkpoint = str(module.train(args).checkpoint_path)
    feed = folder / "feed.csv"
    load_market("sp500").frame.iloc[-FEED_BARS:].to_csv(feed)
    return checkpoint, feed


def argv(checkpoint, feed, ledger):
    """The trader's command line."""
    return ["--model", checkpoint, "--feed", str(feed), "--account", str(ledger), "--account-name", "crash"]


def whole_bars(ledger_path) -> int | None:
    """The last bar of the ledger, after checking that every bar is whole: the same bars in positions, cash,
    equity and orders, one fill on every bar after the first (filling the order of the bar before)."""
    with Ledger(ledger_path) as ledger:
        if ledger.account("crash") is None:
            return None
        bars = {name: ledger.table(name, "crash")["bar"].tolist() for name in ("positions", "cash", "equity",
                                                                                 "orders")}
        fills = ledger.table("fills", "crash")
        last = ledger.last_bar("crash")
    expected = list(range(FIRST, last + 1))
    assert all(found == expected for found in bars.values()), bars
    assert fills["bar"].tolist() == expected[1:] and (fills["order_bar"] == fills["bar"] - 1).all()
    return last


@pytest.mark.slow
def test_kill_9_at_random_points_and_restart_gives_the_uninterrupted_ledger(setup, trader_process, tmp_path):
    checkpoint, feed = setup
    reference = tmp_path / "reference.db"
    assert trader_process(argv(checkpoint, feed, reference)) == 0
    with Ledger(reference) as ledger:
        expected = ledger.dump()
    assert len(expected["equity"]) == FEED_BARS - FIRST and len(expected["fills"]) == FEED_BARS - FIRST - 1
    assert len({row[-1] for row in expected["orders"]}) >= 3  # the policy trades

    rng = np.random.default_rng(2026)
    bars = np.sort(rng.choice(np.arange(FIRST + 1, FEED_BARS), size=KILLS - 2, replace=False))
    points = rng.permutation(np.resize(np.array(POINTS), len(bars)))  # every kind of point, in random order
    plan = [("decide", FIRST), ("sent", FIRST)]
    plan += [(str(point), int(bar)) for point, bar in zip(points, bars, strict=True)]
    assert len(plan) == KILLS and {point for point, _ in plan} == set(POINTS)
    crashed = tmp_path / "crashed.db"
    for point, bar in plan:
        code = trader_process(argv(checkpoint, feed, crashed), crash=f"{point}@{bar}")
        assert code == -signal.SIGKILL, (point, bar, code)  # killed there, not finished nor failed
        last = whole_bars(crashed)
        # what the kill left: nothing of its bar before the commit, the whole bar after it
        written = point in ("commit", "sent")
        assert last == (bar if written else (bar - 1 if bar > FIRST else None)), (point, bar, last)
    assert trader_process(argv(checkpoint, feed, crashed)) == 0
    assert whole_bars(crashed) == FEED_BARS - 1
    with Ledger(crashed) as ledger:
        got = ledger.dump()
    for name in TABLES:
        assert got[name] == expected[name], name


@pytest.mark.slow
def test_a_second_trader_on_an_account_is_refused_while_the_first_runs(setup, trader_process, tmp_path):
    checkpoint, feed = setup
    ledger = tmp_path / "ledger.db"
    first = subprocess.Popen(
        [sys.executable, "-m", "sentio_lab.deploy.paper", *argv(checkpoint, feed, ledger), "--follow", "--poll",
         "0.2", "--idle-exit", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "ledger.db.crash.lock"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        assert lock.read_text().strip() == str(first.pid)
        second = subprocess.run([sys.executable, "-m", "sentio_lab.deploy.paper", *argv(checkpoint, feed, ledger)],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"account 'crash' in {ledger} is being traded by pid {first.pid}" in second.stderr
        assert second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    whole_bars(ledger)  # killed while following: whole bars only
    assert trader_process(argv(checkpoint, feed, ledger)) == 0  # the lock died with it: a restart trades on
    assert whole_bars(ledger) == FEED_BARS - 1
