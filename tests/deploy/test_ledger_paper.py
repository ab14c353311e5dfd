"""Paper trading (issue 21 s4): the SQLite ledger, the paper broker against the env, backtest parity on a real file.

* the ledger: schema and WAL mode, one transaction per bar (a failure mid-bar leaves nothing), idempotent per
  (account, bar), alerts, and the refusals (foreign file, SQLite without our marker or of another version, a
  second trader on an account, an account reopened with other settings);
* the paper broker fills exactly as :class:`~sentio_lab.env.TradingEnv` does, step by step, under the flat cost
  model and under spread + square-root impact + a participation cap with carried remainders + borrow;
* backtest parity: a paper account trading a tiny model on a real file (bundled sp500 bars written to a CSV)
  records at every bar the equity that ``evaluate_policy`` computes on the same bars, to 1e-9 (bit for bit in
  fact), for ``ppo`` (flat costs) and ``ppo_risk`` (drawdown state in the observation, every cost option);
* the feed: a CSV appended to by another writer (partial lines included) gives the replay's ledger; a feed that
  changes under an account is refused.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from sentio_lab.agents.variants import env_options, load_trained, load_variant
from sentio_lab.data import load_market
from sentio_lab.deploy import paper
from sentio_lab.deploy.broker import Broker, PaperBroker
from sentio_lab.deploy.ledger import (
    SCHEMA_VERSION,
    TABLES,
    Account,
    FillRecord,
    Ledger,
    LedgerError,
    Mark,
    Order,
)
from sentio_lab.deploy.paper import CheckpointDecider, Feed, PaperError, PaperTrader, main, resolve_model
from sentio_lab.env import TradingEnv
from sentio_lab.env.costs import CostModel
from sentio_lab.env.market import prepare_market
from sentio_lab.evaluation.episodes import evaluate_policy
from sentio_lab.features import FeatureConfig

FEED_BARS = 160  # real sp500 bars in the feed: 27 bars of warm-up and window, then ~130 decisions


def tiny_checkpoint(folder, variant: str = "ppo", **extra) -> str:
    """A tiny run of ``variant`` on sp500 (hidden size 8, window 8, 384 steps): its checkpoint path."""
    module = load_variant(variant)
    args = module.Args.from_flat(
        total_timesteps=384, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=1, hidden_size=8, window=8,
        episode_length=24, track=False, progress=False, run_dir=str(folder), run_name=variant, checkpoint_every=0,
        feature_cache_dir=str(folder / "cache"), **extra)
    return str(module.train(args).checkpoint_path)


@pytest.fixture(scope="module")
def feed(tmp_path_factory):
    """The last FEED_BARS bars of the bundled sp500 dataset (its test range), written as a CSV feed."""
    path = tmp_path_factory.mktemp("feed") / "sp500_tail.csv"
    load_market("sp500").frame.iloc[-FEED_BARS:].to_csv(path)
    return path


@pytest.fixture(scope="module")
def ppo_checkpoint(tmp_path_factory):
    """A tiny ppo model (flat costs, levels -1 / 0 / 1)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ppo"))


@pytest.fixture(scope="module")
def risk_checkpoint(tmp_path_factory):
    """A tiny ppo_risk model (drawdown state observed) with every cost option: Corwin-Schultz half-spread,
    square-root impact, a participation cap whose remainders carry, and short borrow; four levels."""
    return tiny_checkpoint(tmp_path_factory.mktemp("risk"), "ppo_risk", num_quantiles=8, spread="corwin_schultz",
                           impact="sqrt", participation=2e-7, remainder="carry", borrow_bps=300.0,
                           positions=(-1.0, 0.0, 0.5, 1.0))


def mark(bar, equity=1.0, level=1, **changes):
    """A mark at ``bar`` with sensible defaults."""
    values = dict(bar=bar, time=f"t{bar}", level=level, shares=0.0, weight=0.0, pending=False, cash=equity,
                  borrow=0.0, equity=equity, peak=equity, max_drawdown=0.0)
    values.update(changes)
    return Mark(**values)


SETTINGS = Account("acct", "model.pt", "feed.csv", (-1.0, 0.0, 1.0), "next_open", 1e6, 5)


# ------------------------------------------------------------------------------------------------- the ledger
def test_a_new_ledger_has_the_schema_in_wal_mode_and_records_each_bar_once(tmp_path):
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ledger.open_account(SETTINGS, mark(5), Order(5, "t5", 2, 1.0))
        assert not ledger.open_account(SETTINGS, mark(5), Order(5, "t5", 2, 1.0))  # reopened: nothing new
        fill = FillRecord(6, "t6", 5, 0.01, 100.0, 100.01, 0.001, False)
        assert ledger.record_bar("acct", fill, mark(6, 1.01, level=2), Order(6, "t6", 1, 0.0))
        before = ledger.dump()
        # a replayed bar writes nothing, even with other values (the first write wins; a restart recomputes it)
        assert not ledger.record_bar("acct", fill, mark(6, 9.0), Order(6, "t6", 0, -1.0))
        assert ledger.dump() == before
        assert [len(before[name]) for name in TABLES] == [1, 2, 1, 2, 2, 2, 0]
        assert ledger.last_bar("acct") == 6 and ledger.last_bar("other") is None
        assert ledger.mark("acct", 6) == mark(6, 1.01, level=2) and ledger.mark("acct", 7) is None
        assert ledger.order("acct", 6) == Order(6, "t6", 1, 0.0) and ledger.order("acct", 7) is None
        assert ledger.account("acct") == SETTINGS and ledger.account("other") is None
        assert ledger.equity("acct").to_dict() == {5: 1.0, 6: 1.01}
        with pytest.raises(LedgerError, match="bar 8 does not follow the last recorded bar 6"):
            ledger.record_bar("acct", None, mark(8), None)
        with pytest.raises(LedgerError, match="not open"):
            ledger.record_bar("other", None, mark(0), None)
        with pytest.raises(KeyError, match="unknown ledger table"):
            ledger.table("nope")
    with Ledger(path) as again:  # reopened from disk: the same rows
        assert again.dump() == before


def test_a_bar_is_one_transaction_a_failure_inside_it_leaves_nothing(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.open_account(SETTINGS, mark(5), Order(5, "t5", 2, 1.0))
        before = ledger.dump()

        def fail_after(table):
            if table == "cash":  # fills and positions are written inside the transaction by now
                raise RuntimeError("crash")

        with pytest.raises(RuntimeError, match="crash"):
            ledger.record_bar("acct", FillRecord(6, "t6", 5, 0.01, 100.0, 100.01, 0.001, False), mark(6),
                              Order(6, "t6", 1, 0.0), between_writes=fail_after)
        assert ledger.dump() == before
        seen = []
        assert ledger.record_bar("acct", FillRecord(6, "t6", 5, 0.01, 100.0, 100.01, 0.001, False), mark(6),
                                 Order(6, "t6", 1, 0.0), between_writes=seen.append)
        assert seen == ["fills", "positions", "cash", "equity", "orders"]


def test_alerts_are_recorded_once_per_account_bar_kind_and_metric(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        assert ledger.record_alert("acct", 7, "2018-01-02", "drift", "psi:ret_1", 0.31, 0.25, "PSI 0.31 > 0.25")
        assert not ledger.record_alert("acct", 7, "2018-01-02", "drift", "psi:ret_1", 0.5, 0.25, "again")
        assert ledger.record_alert("acct", 7, "2018-01-02", "drift", "ks:ret_1", None, None, "KS")
        assert ledger.record_alert("other", 3, "2018-01-01", "performance", "sharpe", -1.0, 0.05, "p")
        alerts = ledger.alerts("acct")
        assert [(a.metric, a.value, a.message) for a in alerts] == [("ks:ret_1", None, "KS"),
                                                                    ("psi:ret_1", 0.31, "PSI 0.31 > 0.25")]
        assert len(ledger.alerts()) == 3 and len(ledger.table("alerts", "other")) == 1


@pytest.mark.parametrize("content, message", [
    (b"date,open,close\n2020-01-01,1,2\n", "not a SQLite file"),
    (b"SQLite format 3\x00" + b"\x00" * 200, "unreadable as a paper ledger"),
])
def test_a_foreign_or_corrupted_file_is_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "ledger.db"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match=message) as error:
        Ledger(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert path.read_bytes() == content  # refused without touching it


def test_sqlite_without_our_marker_or_of_another_version_is_refused(tmp_path):
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE trades (id INTEGER)")
    with pytest.raises(LedgerError, match="without the paper-ledger schema marker"):
        Ledger(foreign)
    newer = tmp_path / "newer.db"
    Ledger(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1}, this code reads version"):
        Ledger(newer)
    empty = tmp_path / "empty.db"
    empty.touch()
    with Ledger(empty) as ledger:  # an empty file is a new ledger
        assert ledger.account("acct") is None
    nested = tmp_path / "runs" / "paper" / "ledger.sqlite"  # the README's --account: a folder not made yet
    with Ledger(nested) as ledger:
        assert ledger.account("acct") is None
    with Ledger(nested) as ledger:  # and it reopens as a ledger
        assert ledger.account("acct") is None
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(LedgerError, match="cannot make its folder.*--account") as error:
        Ledger(tmp_path / "a_file" / "ledger.sqlite")
    assert "\n" not in str(error.value)


def test_an_account_reopened_with_other_settings_or_a_bad_name_is_refused(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.open_account(SETTINGS, mark(5), None)
        other = Account("acct", "other.pt", "feed.csv", (-1.0, 0.0, 1.0), "next_open", 1e6, 5)
        with pytest.raises(LedgerError, match="was opened with model='model.pt', not 'other.pt'"):
            ledger.open_account(other, mark(5), None)
        for bad in ("", "../x", ".hidden", "a b"):
            with pytest.raises(ValueError, match="account name"):
                ledger.lock_account(bad)


def test_two_traders_on_one_account_are_refused_by_a_lock_that_dies_with_its_process(tmp_path):
    path = tmp_path / "ledger.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sentio_lab.deploy.ledger import Ledger; "
         f"held = Ledger({str(path)!r}); held.lock_account('acct'); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Ledger(path) as ledger:
            with pytest.raises(LedgerError, match=f"being traded by pid {holder.pid}"):
                ledger.lock_account("acct")
            ledger.lock_account("other")  # locks are per account
            ledger.lock_account("other")  # and re-entrant in one process
    finally:
        holder.kill()
        holder.wait()
    with Ledger(path) as ledger:  # killed: the kernel released its lock
        ledger.lock_account("acct")


# ------------------------------------------------------------------------------------------------- the broker
def broker_account(market, costs, levels, actions, first):
    """Step PaperBroker through ``actions`` from bar ``first``: equity, cash and shares after each fill."""
    broker = PaperBroker(levels, costs)
    assert isinstance(broker, Broker)
    flat = int(np.argmin(np.abs(levels)))
    held = mark(first, level=flat, time=str(first))
    rows = []
    for k, action in enumerate(actions):
        t = first + k
        broker.submit("a", Order(t, str(t), int(action), levels[action]), held)
        done = broker.execution("a", t + 1, market.arrays, str(t + 1))
        equity = done.cash + done.shares * market.arrays.close[t + 1]
        rows.append((equity, done.cash, done.shares))
        held = mark(t + 1, equity, level=int(action), cash=done.cash, shares=done.shares, pending=done.pending)
    return np.array(rows)


@pytest.mark.parametrize("costs", [
    CostModel(fee_bps=2.0, slippage_bps=3.0, borrow_bps=250.0),
    CostModel(spread="abdi_ranaldo", impact="sqrt", participation=1e-7, remainder="carry", borrow_bps=400.0),
    CostModel(impact="almgren_chriss", participation=1e-7, cap_volume="forecast"),
], ids=["flat+borrow", "spread+sqrt+carry+borrow", "almgren_chriss+forecast-cap"])
@pytest.mark.parametrize("fill_price", ["next_open", "next_close"])
def test_the_paper_broker_fills_as_the_env_does(costs, fill_price):
    market = prepare_market("sp500", FeatureConfig(), fill_price=fill_price, start="2016-01-01",
                            end="2016-12-31")
    levels = (-1.0, 0.0, 0.5, 1.0)
    first, steps = 60, 150
    actions = np.random.default_rng(3).integers(0, len(levels), steps)
    actions[10:20] = 3  # a long hold: a capped order's remainder carries over several bars
    # one step longer than stepped: the last step must not truncate (an auto-reset would reset cash and shares)
    env = TradingEnv(market.arrays, num_envs=1, window=8, episode_length=steps + 1, start=0, stop=first + steps + 2,
                     positions=levels, costs=costs, ruin_fraction=0.0)
    env.reset(starts=[first])
    expected = []
    for action in actions:
        _, _, _, _, info = env.step(torch.tensor([int(action)]))
        expected.append((float(info["equity"][0]), float(env.cash[0]), float(env.shares[0])))
    got = broker_account(market, costs, levels, actions, first)
    np.testing.assert_allclose(got, np.array(expected), rtol=0, atol=1e-12)
    assert np.ptp(got[:, 0]) > 0.01  # the account moved: the comparison is not of constants


def test_the_broker_refuses_an_order_out_of_turn():
    market = prepare_market("sp500", FeatureConfig(), start="2016-01-01", end="2016-12-31")
    broker = PaperBroker((-1.0, 0.0, 1.0), CostModel())
    with pytest.raises(ValueError, match="no open order"):
        broker.execution("a", 11, market.arrays, "t")
    with pytest.raises(ValueError, match="submitted with the account marked at bar 9"):
        broker.submit("a", Order(10, "t", 2, 1.0), mark(9))
    broker.submit("a", Order(10, "t", 2, 1.0), mark(10))
    broker.submit("a", Order(10, "t", 2, 1.0), mark(10))  # a resubmission is the same order
    with pytest.raises(ValueError, match="older than the open order"):
        broker.submit("a", Order(9, "t", 2, 1.0), mark(9))
    with pytest.raises(ValueError, match="fills on bar 11, not on bar 12"):
        broker.execution("a", 12, market.arrays, "t")
    timeless = dataclasses.replace(market.arrays, year_fraction=None)
    borrowing = PaperBroker((-1.0, 0.0, 1.0), CostModel(borrow_bps=100.0))
    borrowing.submit("a", Order(10, "t", 0, -1.0), mark(10))
    with pytest.raises(ValueError, match="borrow costs need bar timestamps"):
        borrowing.execution("a", 11, timeless, "t")
    with pytest.raises(ValueError, match="not in the market"):
        broker.submit("a", Order(len(market.arrays.close) - 1, "t", 2, 1.0), mark(len(market.arrays.close) - 1))
        broker.execution("a", len(market.arrays.close), market.arrays, "t")


# ---------------------------------------------------------------------------------------- backtest parity
def backtest(checkpoint, feed_path):
    """evaluate_policy of the checkpoint's agent over every bar of the feed file."""
    trained = load_trained(checkpoint, dataset=feed_path)
    variant = load_variant(trained.bundle["variant"])
    return evaluate_policy(trained.agent, trained.market, window=trained.args.features.window,
                           positions=tuple(trained.args.env.positions), costs=variant.cost_model(trained.args),
                           bars=(0, len(trained.market.data.frame)),
                           env_options=env_options(trained.args, trained.market))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ppo_checkpoint", "risk_checkpoint"])
def test_the_paper_account_equals_the_backtest_at_every_bar(which, feed, tmp_path, request):
    checkpoint = request.getfixturevalue(which)
    trader = PaperTrader(checkpoint, feed, tmp_path / "ledger.db", account="parity")
    try:
        assert trader.run() == FEED_BARS - 27  # one row per bar from the first decision on (27 warm-up bars)
        equity = trader.ledger.equity("parity")
        orders = trader.ledger.table("orders", "parity")
        fills = trader.ledger.table("fills", "parity")
        cash = trader.ledger.table("cash", "parity")
    finally:
        trader.close()
    expected = backtest(checkpoint, feed)
    frame = pd.read_csv(feed, index_col=0, parse_dates=True)
    assert equity.index[0] == expected.start and len(equity) == len(expected.equity)
    assert list(frame.index[equity.index].astype(str)) == list(expected.equity.index.astype(str))
    np.testing.assert_allclose(equity.to_numpy(), expected.equity.to_numpy(), rtol=0, atol=1e-9)
    # the decisions too: the target of every order but the last (decided at the last bar, filled on none)
    assert np.array_equal(orders["target_weight"].to_numpy()[:-1], expected.weights.to_numpy())
    assert orders["target_weight"].nunique() >= 3  # a policy that trades, so parity means something
    assert (fills["shares"] != 0).sum() > 10 and (fills["bar"] == fills["order_bar"] + 1).all()
    if which == "risk_checkpoint":  # every cost path was exercised: capped fills and short borrow
        assert fills["capped"].sum() > 0 and (cash["borrow"] > 0).sum() > 0


@pytest.mark.slow
def test_nothing_recorded_at_bar_t_depends_on_later_bars(ppo_checkpoint, feed, tmp_path):
    """No look-ahead, by perturbation: bars after bar k rescaled (prices x 1.2, volume x 0.5) change nothing the
    ledger holds for bars <= k (orders, fills, marks), and do change what comes after."""
    k = 90
    frame = pd.read_csv(feed, index_col=0)
    frame.iloc[k + 1 :, :4] *= 1.2
    frame.iloc[k + 1 :, 4] *= 0.5
    perturbed = tmp_path / "perturbed.csv"
    frame.to_csv(perturbed)
    dumps = []
    for path, name in ((feed, "original"), (perturbed, "perturbed")):
        trader = PaperTrader(ppo_checkpoint, path, tmp_path / f"{name}.db")
        try:
            trader.run()
            dumps.append({table: trader.ledger.table(table, "paper") for table in TABLES[1:-1]})
        finally:
            trader.close()
    original, changed = dumps
    for table in original:
        before = original[table]["bar"] <= k
        assert before.sum() > 50
        pd.testing.assert_frame_equal(original[table][before], changed[table][before])
    after = original["equity"]["bar"] > k
    assert not np.allclose(original["equity"]["equity"][after], changed["equity"]["equity"][after])


def test_parity_fails_when_the_broker_mis_sizes_fills(ppo_checkpoint, feed, tmp_path, monkeypatch):
    """The parity comparison can fail: a broker that charges a basis point more slippage drifts off the backtest."""
    decider = CheckpointDecider(ppo_checkpoint)
    costs = CostModel(fee_bps=decider.costs.fee_bps, slippage_bps=decider.costs.slippage_bps + 1.0)
    trader = PaperTrader(ppo_checkpoint, feed, tmp_path / "ledger.db", broker=PaperBroker(decider.positions, costs))
    try:
        trader.run()
        equity = trader.ledger.equity("paper").to_numpy()
    finally:
        trader.close()
    assert np.abs(equity - backtest(ppo_checkpoint, feed).equity.to_numpy()).max() > 1e-5


# ---------------------------------------------------------------------------------------------- the feed
def test_a_followed_csv_appended_by_another_writer_gives_the_replay_ledger(ppo_checkpoint, feed, tmp_path):
    text = feed.read_text()
    header, *lines = text.splitlines(keepends=True)
    live = tmp_path / "live.csv"
    live.write_text(header + "".join(lines[:40]))

    def writer():  # appends the rest in bursts, sometimes stopping mid-line (the trader must wait for the rest)
        position = 40
        while position < len(lines):
            chunk = "".join(lines[position : position + 7])
            with live.open("a") as handle:
                handle.write(chunk[: len(chunk) // 2])
                handle.flush()
                time.sleep(0.02)
                handle.write(chunk[len(chunk) // 2 :])
            position += 7
            time.sleep(0.03)

    thread = threading.Thread(target=writer)
    followed = PaperTrader(ppo_checkpoint, live, tmp_path / "followed.db")
    thread.start()
    try:
        logged = []
        written = followed.run(follow=True, poll=0.01, idle_exit=1.5, log=logged.append)
        assert len(logged) >= 2 and logged[-1].startswith(f"account paper: bar {FEED_BARS - 1} (2018-12-31")
        thread.join()
        got = followed.ledger.dump("paper")
    finally:
        thread.join()
        followed.close()
    replayed = PaperTrader(ppo_checkpoint, live, tmp_path / "replayed.db")
    try:
        assert replayed.run() == written == FEED_BARS - 27
        assert replayed.ledger.dump("paper") == got
    finally:
        replayed.close()


def test_feed_polling_reads_complete_lines_only(tmp_path, feed):
    header, *lines = feed.read_text().splitlines(keepends=True)
    live = tmp_path / "live.csv"
    live.write_text(header)
    assert Feed(live, follow=True).poll().empty
    live.write_text(header + "".join(lines[:3]) + lines[3][:10])
    frame = Feed(live, follow=True).poll()
    assert len(frame) == 3 and not frame.isna().any().any()
    (tmp_path / "bars.parquet").touch()
    with pytest.raises(PaperError, match="--follow reads a CSV"):
        Feed(tmp_path / "bars.parquet", follow=True)
    with pytest.raises(PaperError, match="no such feed file"):
        Feed(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text(header + lines[1] + lines[0])  # out of order
    with pytest.raises(PaperError, match=str(bad)):
        Feed(bad).poll()


def test_a_feed_or_model_that_changes_under_the_account_is_refused(ppo_checkpoint, risk_checkpoint, feed, tmp_path):
    ledger, own = tmp_path / "ledger.db", tmp_path / "feed.csv"
    frame = pd.read_csv(feed, index_col=0)
    frame.iloc[: FEED_BARS - 20].to_csv(own)
    trader = PaperTrader(ppo_checkpoint, own, ledger)
    try:
        assert trader.run() == FEED_BARS - 20 - 27
        frame.iloc[5, frame.columns.get_loc("volume")] *= 1.5  # a traded bar edited, then more bars appended
        frame.to_csv(own)
        with pytest.raises(PaperError, match="rows already traded changed"):
            trader.run()
    finally:
        trader.close()
    frame.iloc[1:].to_csv(own)  # the same bars, one row later: restarted on it, the timestamps disagree
    with pytest.raises(PaperError, match="the feed changed under account 'paper'"):
        PaperTrader(ppo_checkpoint, own, ledger).run()
    frame.iloc[:100].to_csv(own)  # fewer bars than the ledger recorded
    with pytest.raises(PaperError, match="100 bars, but account 'paper' is recorded up to bar 139"):
        PaperTrader(ppo_checkpoint, own, ledger).run()
    with pytest.raises(LedgerError, match="trades feed="):
        PaperTrader(ppo_checkpoint, feed, ledger)
    with pytest.raises(LedgerError, match="trades model="):
        PaperTrader(risk_checkpoint, own, ledger)


# ------------------------------------------------------------------------------------ command line, models
def test_the_command_line_trades_and_reports_errors_in_one_line(ppo_checkpoint, feed, tmp_path, capsys):
    ledger = tmp_path / "ledger.db"
    assert main(["--model", ppo_checkpoint, "--feed", str(feed), "--account", str(ledger), "--account-name",
                 "cli", "--start", "2018-10-01"]) == 0
    out = capsys.readouterr().out
    with Ledger(ledger) as opened:
        first = opened.account("cli").first_bar
        assert pd.Timestamp(opened.mark("cli", first).time) >= pd.Timestamp("2018-10-01")
        assert f"{FEED_BARS - first} bars written; account cli: bar {FEED_BARS - 1}" in out
    assert main(["--model", ppo_checkpoint, "--feed", str(feed), "--account", str(ledger), "--account-name",
                 "cli"]) == 0  # restarted on a finished feed: nothing new
    assert "0 bars written" in capsys.readouterr().out
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes")
    assert main(["--model", ppo_checkpoint, "--feed", str(feed), "--account", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a SQLite file" in err and err.count("\n") == 1
    assert main(["--model", str(tmp_path / "none.pt"), "--feed", str(feed), "--account", str(ledger)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paper.parse_args(["--model", "m", "--feed", "f", "--account", "a", "--speed", "0"])
    with pytest.raises(SystemExit):
        paper.parse_args(["--model", "m", "--feed", "f", "--account", "a", "--poll", "-1"])


def test_a_paced_replay_sleeps_between_bars(monkeypatch):
    slept = []
    monkeypatch.setattr(paper._time, "sleep", slept.append)
    assert list(PaperTrader._arrivals(3, 6, speed=4.0)) == [4, 5, 6] and slept == [0.25] * 3
    assert list(PaperTrader._arrivals(3, 6, speed=None)) == [4, 5, 6] and len(slept) == 3


def test_model_uris_and_folders(ppo_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "bundle"
    folder.mkdir()
    with pytest.raises(PaperError, match="expected one checkpoint"):
        resolve_model(str(folder))
    (folder / "checkpoint.pt").write_bytes(open(ppo_checkpoint, "rb").read())
    assert resolve_model(str(folder)) == folder / "checkpoint.pt"

    class Registry:
        @staticmethod
        def resolve(uri):
            assert uri == "models:/demo@champion"
            return folder

    monkeypatch.setitem(sys.modules, "sentio_lab.deploy.registry", Registry)
    assert resolve_model("models:/demo@champion") == folder / "checkpoint.pt"
    monkeypatch.setitem(sys.modules, "sentio_lab.deploy.registry", None)  # not installed: a clear error
    with pytest.raises(PaperError, match="registry URIs need sentio_lab.deploy.registry"):
        resolve_model("models:/demo@champion")
    # the models paper trading refuses (GARCH risk budget, vol_target anchor, token timeframes):
    # tests/deploy/test_paper_variants.py


def test_the_crash_hook_parses_its_spec_and_fires_only_at_its_point(monkeypatch):
    killed = []
    monkeypatch.setattr(paper.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setenv(paper.CRASH_ENV, "write:cash@12")
    hook = paper._crash_hook()
    hook("write:cash", 11)
    hook("write:equity", 12)
    assert killed == []
    hook("write:cash", 12)
    assert killed == [(paper.os.getpid(), paper.signal.SIGKILL)]
    monkeypatch.setenv(paper.CRASH_ENV, "decide")
    with pytest.raises(PaperError, match="expected <point>@<bar>"):
        paper._crash_hook()
    monkeypatch.delenv(paper.CRASH_ENV)
    paper._crash_hook()("decide", 0)  # no spec: never fires
    assert len(killed) == 1


class RuinousBroker(PaperBroker):
    """A pluggable broker (the Broker protocol) whose fills lose everything on bar ``ruin``."""

    def __init__(self, positions, costs, ruin):
        super().__init__(positions, costs)
        self.ruin = ruin

    def execution(self, account, bar, market, time):
        done = super().execution(account, bar, market, time)
        if bar == self.ruin:
            return dataclasses.replace(done, cash=-1.0 - done.shares * float(market.close[bar]))
        return done


def test_a_ruined_account_stops_deciding_and_a_short_feed_only_warms_up(ppo_checkpoint, feed, tmp_path):
    decider = CheckpointDecider(ppo_checkpoint)
    trader = PaperTrader(ppo_checkpoint, feed, tmp_path / "ledger.db",
                         broker=RuinousBroker(decider.positions, decider.costs, ruin=40))
    try:
        with pytest.raises(PaperError, match="stopped at bar 40 \\(ruined: equity -1\\)"):
            trader.run()
        assert trader.ledger.last_bar("paper") == 40 and trader.ledger.order("paper", 40) is None
        assert trader.ledger.mark("paper", 40).equity == pytest.approx(-1.0)
    finally:
        trader.close()
    short = tmp_path / "short.csv"
    pd.read_csv(feed, index_col=0).iloc[:20].to_csv(short)
    waiting = PaperTrader(ppo_checkpoint, short, tmp_path / "short.db")
    try:
        assert waiting.run() == 0 and waiting.summary() == "account paper: not open yet (warm-up)"
    finally:
        waiting.close()
    gapped = tmp_path / "gapped.db"
    skipping = PaperTrader(ppo_checkpoint, feed, gapped)
    try:
        frame = pd.read_csv(feed, index_col=0, parse_dates=True)
        assert skipping.step(frame.iloc[:28])
        with pytest.raises(PaperError, match="bar 30 arrived after bar 27"):
            skipping.step(frame.iloc[:31])
    finally:
        skipping.close()
