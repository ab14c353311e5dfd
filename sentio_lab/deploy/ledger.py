"""The paper-trading ledger: one SQLite file (WAL mode) holding accounts, orders, fills, positions, cash, equity
and alerts, written one transaction per bar and idempotent per ``(account, bar)``.

Why SQLite: a paper trader is one process per account that must survive ``kill -9`` at any instruction. SQLite's
write-ahead log gives atomic, durable transactions in a single file with nothing to start; a transaction either
commits whole or is rolled back when the file is next opened, so a bar is never half written.

Units: ``bar`` is the position of a bar in the feed (0 = its first row), ``time`` its ISO timestamp. Cash, the
position's value and equity are in units of the account's starting capital (equity starts at 1.0, as in the
environment; :attr:`~sentio_lab.env.costs.CostModel.capital` is the currency amount it stands for), shares are
in units of the instrument per unit of starting capital.

Tables (all keyed by ``(account, bar)`` except ``accounts`` and ``alerts``):

* ``accounts``: one row per account: the model it trades, its feed, position levels and fill convention;
* ``orders``: the target each decision bar chose (level index and target weight), keyed by the decision bar;
* ``fills``: the trade of the order decided at ``order_bar`` filled on ``bar`` (shares traded, reference and
  executed price, fee, whether a participation cap bound);
* ``positions`` / ``cash`` / ``equity``: the account marked at each bar's close (equity with its running peak);
* ``alerts``: monitoring alerts (drift, performance) written through :meth:`Ledger.record_alert`, unique per
  ``(account, bar, kind, metric)``.

Refusals, each one line: a file that is not SQLite, or SQLite without this schema's marker
(:data:`SCHEMA_NAME` in the ``meta`` table) or with another :data:`SCHEMA_VERSION`; and a second trader on an
account (:meth:`Ledger.lock_account`: an exclusive ``flock`` on ``<file>.<account>.lock``, released by the
kernel when its process dies, so a killed trader never leaves a stale lock behind).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

#: The marker in the ``meta`` table that says a SQLite file is a sentio-lab paper ledger.
SCHEMA_NAME = "sentio_lab.paper_ledger"
#: The schema version this code writes and reads; another version is refused, never migrated silently.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE accounts (
    account TEXT PRIMARY KEY, model TEXT NOT NULL, feed TEXT NOT NULL, positions TEXT NOT NULL,
    fill_price TEXT NOT NULL, capital REAL NOT NULL, first_bar INTEGER NOT NULL);
CREATE TABLE orders (
    account TEXT NOT NULL, bar INTEGER NOT NULL, time TEXT NOT NULL, level INTEGER NOT NULL,
    target_weight REAL NOT NULL, PRIMARY KEY (account, bar));
CREATE TABLE fills (
    account TEXT NOT NULL, bar INTEGER NOT NULL, time TEXT NOT NULL, order_bar INTEGER NOT NULL,
    shares REAL NOT NULL, price REAL NOT NULL, executed_price REAL NOT NULL, fee REAL NOT NULL,
    capped INTEGER NOT NULL, PRIMARY KEY (account, bar));
CREATE TABLE positions (
    account TEXT NOT NULL, bar INTEGER NOT NULL, time TEXT NOT NULL, level INTEGER NOT NULL,
    shares REAL NOT NULL, weight REAL NOT NULL, pending INTEGER NOT NULL, PRIMARY KEY (account, bar));
CREATE TABLE cash (
    account TEXT NOT NULL, bar INTEGER NOT NULL, time TEXT NOT NULL, cash REAL NOT NULL, borrow REAL NOT NULL,
    PRIMARY KEY (account, bar));
CREATE TABLE equity (
    account TEXT NOT NULL, bar INTEGER NOT NULL, time TEXT NOT NULL, equity REAL NOT NULL, peak REAL NOT NULL,
    max_drawdown REAL NOT NULL, PRIMARY KEY (account, bar));
CREATE TABLE alerts (
    account TEXT NOT NULL, bar INTEGER NOT NULL, time TEXT NOT NULL, kind TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, threshold REAL, message TEXT NOT NULL, PRIMARY KEY (account, bar, kind, metric));
"""
#: The tables of the schema, in the order :meth:`Ledger.dump` lists them.
TABLES = ("accounts", "orders", "fills", "positions", "cash", "equity", "alerts")


class LedgerError(RuntimeError):
    """A ledger file that cannot be used (foreign, corrupted, another schema version) or an account in use."""


@dataclass(frozen=True)
class Account:
    """What an account trades and how: fixed when it is opened, checked on every restart."""

    account: str
    model: str
    feed: str
    positions: tuple[float, ...]
    fill_price: str
    capital: float
    first_bar: int
    """The first decision bar (its equity row is the starting 1.0)."""


@dataclass(frozen=True)
class Order:
    """The target a decision at ``bar`` chose: position level index and its target weight."""

    bar: int
    time: str
    level: int
    target_weight: float


@dataclass(frozen=True)
class FillRecord:
    """The trade that filled the order of ``order_bar`` on ``bar`` (zero shares when the level was held)."""

    bar: int
    time: str
    order_bar: int
    shares: float
    price: float
    executed_price: float
    fee: float
    capped: bool


@dataclass(frozen=True)
class Mark:
    """The account marked at the close of ``bar``: position, cash (after borrow) and equity."""

    bar: int
    time: str
    level: int
    shares: float
    weight: float
    pending: bool
    """A capped order's remainder still trades on the next bar (``CostModel.remainder == "carry"``)."""
    cash: float
    borrow: float
    equity: float
    peak: float
    max_drawdown: float


@dataclass(frozen=True)
class Alert:
    """A monitoring alert: what (``kind``, ``metric``), when (``bar``, ``time``), by how much (``value``) against
    which ``threshold``, and a one-line ``message``."""

    account: str
    bar: int
    time: str
    kind: str
    metric: str
    value: float | None
    threshold: float | None
    message: str


def _check_file(path: Path) -> None:
    """Refuse a file that is not SQLite before sqlite3 touches it (sqlite3 would only fail at the first query)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as handle:
        head = handle.read(16)
    if head != b"SQLite format 3\x00":
        raise LedgerError(f"{path}: not a SQLite file, so not a paper ledger; give --account a new path or an "
                          "existing ledger")


def check_account_name(account: str) -> str:
    """``account`` when it is a usable account name (letters, digits, ``_``, ``-``, ``.``; it names a lock file),
    else a ValueError saying so."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", account) or account.startswith("."):
        raise ValueError(f"account name {account!r}: use 1-64 letters, digits, '_', '-' or '.' (not leading) "
                         "(--account-name)")
    return account


class Ledger:
    """A paper-trading ledger file (module doc). Opening a missing or empty file creates the schema; any other
    file must carry :data:`SCHEMA_NAME` and :data:`SCHEMA_VERSION` or is refused with :class:`LedgerError`."""

    def __init__(self, path: str | Path) -> None:
        """Open (or create) the ledger at ``path`` in WAL mode with full synchronous commits."""
        self.path = Path(path)
        _check_file(self.path)
        if not self.path.exists():  # a new ledger may name a new folder (``--account runs/paper/ledger.sqlite``)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise LedgerError(f"{self.path}: cannot make its folder ({error.strerror}); give --account a path in "
                                  "a folder") from error
        self._locks: dict[str, Any] = {}
        try:
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), one per bar
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            names = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path}: unreadable as a paper ledger ({error}); give --account a new path "
                              "or an intact ledger") from error
        if not names:
            with self.transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(statement)
                self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                                    [("schema", SCHEMA_NAME), ("version", str(SCHEMA_VERSION))])
            return
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in names else {}
        if meta.get("schema") != SCHEMA_NAME:
            raise LedgerError(f"{self.path}: a SQLite file without the paper-ledger schema marker ({SCHEMA_NAME!r} "
                              "in table meta); it is not a sentio-lab ledger: give --account another path")
        if meta.get("version") != str(SCHEMA_VERSION):
            raise LedgerError(f"{self.path}: ledger schema version {meta.get('version')}, this code reads version "
                              f"{SCHEMA_VERSION}; open it with the sentio-lab version that wrote it")

    # ---------------------------------------------------------------------------------------------- plumbing
    def close(self) -> None:
        """Close the connection and release this process's account locks."""
        for handle in self._locks.values():
            handle.close()
        self._locks.clear()
        self.db.close()

    def __enter__(self) -> Ledger:
        """The ledger itself (closed on exit)."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the ledger."""
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: ``BEGIN IMMEDIATE`` (takes the write lock now), ``COMMIT`` on success, else rollback."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def lock_account(self, account: str) -> None:
        """Take the exclusive trader lock of ``account`` for this process, or raise :class:`LedgerError` naming the
        process that holds it. The lock is an ``flock`` on ``<ledger>.<account>.lock``: the kernel drops it when
        the process exits or is killed, so no stale lock survives a crash."""
        check_account_name(account)
        if account in self._locks:
            return
        lock_path = self.path.with_name(f"{self.path.name}.{account}.lock")
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LedgerError(f"account {account!r} in {self.path} is being traded by pid {holder} (lock "
                              f"{lock_path}); one trader per account: stop it first or choose another account"
                              ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._locks[account] = handle

    # ---------------------------------------------------------------------------------------------- accounts
    def account(self, account: str) -> Account | None:
        """The account's settings, or None when it was never opened."""
        row = self.db.execute("SELECT account, model, feed, positions, fill_price, capital, first_bar FROM accounts "
                              "WHERE account = ?", (account,)).fetchone()
        if row is None:
            return None
        return Account(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4], row[5], row[6])

    def open_account(self, settings: Account, first: Mark, order: Order | None) -> bool:
        """Create the account with its starting mark (and the first decision's order) in one transaction.

        An account that exists already must have the same settings (else :class:`LedgerError` naming the field);
        then nothing is written and the result is False."""
        check_account_name(settings.account)
        existing = self.account(settings.account)
        if existing is not None:
            for field, value in asdict(settings).items():
                if getattr(existing, field) != (tuple(value) if field == "positions" else value):
                    raise LedgerError(f"account {settings.account!r} in {self.path} was opened with {field}="
                                      f"{getattr(existing, field)!r}, not {value!r}; use another --account name "
                                      "or the same settings")
            return False
        with self.transaction() as db:
            db.execute("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (settings.account, settings.model, settings.feed, json.dumps(list(settings.positions)),
                        settings.fill_price, settings.capital, settings.first_bar))
            self._write_bar(db, settings.account, None, first, order)
        return True

    # -------------------------------------------------------------------------------------------------- bars
    def last_bar(self, account: str) -> int | None:
        """The last bar the account has been marked at (None for an unknown account)."""
        row = self.db.execute("SELECT MAX(bar) FROM equity WHERE account = ?", (account,)).fetchone()
        return None if row[0] is None else int(row[0])

    def mark(self, account: str, bar: int) -> Mark | None:
        """The account's mark at ``bar`` (None when that bar is not recorded)."""
        row = self.db.execute(
            "SELECT p.bar, p.time, p.level, p.shares, p.weight, p.pending, c.cash, c.borrow, e.equity, e.peak, "
            "e.max_drawdown FROM positions p JOIN cash c USING (account, bar) JOIN equity e USING (account, bar) "
            "WHERE p.account = ? AND p.bar = ?", (account, bar)).fetchone()
        if row is None:
            return None
        return Mark(int(row[0]), row[1], int(row[2]), row[3], row[4], bool(row[5]), row[6], row[7], row[8], row[9],
                    row[10])

    def order(self, account: str, bar: int) -> Order | None:
        """The order decided at ``bar`` (None when that bar decided nothing or is not recorded)."""
        row = self.db.execute("SELECT bar, time, level, target_weight FROM orders WHERE account = ? AND bar = ?",
                              (account, bar)).fetchone()
        return None if row is None else Order(int(row[0]), row[1], int(row[2]), row[3])

    def record_bar(self, account: str, fill: FillRecord | None, mark: Mark, order: Order | None,
                   between_writes: Callable[[str], None] | None = None) -> bool:
        """Write one bar in one transaction: the fill on it, the mark at its close and the order decided there.

        Idempotent per ``(account, bar)``: a bar that is recorded already writes nothing and returns False (a
        restarted trader replaying it); a bar that does not follow the last recorded one is refused.
        ``between_writes(table)`` runs after each insert inside the transaction (a test hook: a process killed
        there leaves nothing of the bar behind)."""
        last = self.last_bar(account)
        if last is None:
            raise LedgerError(f"account {account!r} is not open in {self.path}")
        if mark.bar <= last:
            return False
        if mark.bar != last + 1:
            raise LedgerError(f"account {account!r}: bar {mark.bar} does not follow the last recorded bar {last}")
        with self.transaction() as db:
            self._write_bar(db, account, fill, mark, order, between_writes)
        return True

    @staticmethod
    def _write_bar(db: sqlite3.Connection, account: str, fill: FillRecord | None, mark: Mark, order: Order | None,
                   between_writes: Callable[[str], None] | None = None) -> None:
        hook = between_writes or (lambda table: None)
        if fill is not None:
            db.execute("INSERT INTO fills VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (account, fill.bar, fill.time, fill.order_bar, fill.shares, fill.price, fill.executed_price,
                        fill.fee, int(fill.capped)))
            hook("fills")
        db.execute("INSERT INTO positions VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (account, mark.bar, mark.time, mark.level, mark.shares, mark.weight, int(mark.pending)))
        hook("positions")
        db.execute("INSERT INTO cash VALUES (?, ?, ?, ?, ?)", (account, mark.bar, mark.time, mark.cash, mark.borrow))
        hook("cash")
        db.execute("INSERT INTO equity VALUES (?, ?, ?, ?, ?, ?)",
                   (account, mark.bar, mark.time, mark.equity, mark.peak, mark.max_drawdown))
        hook("equity")
        if order is not None:
            db.execute("INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
                       (account, order.bar, order.time, order.level, order.target_weight))
            hook("orders")

    # ------------------------------------------------------------------------------------------------ alerts
    def record_alert(self, account: str, bar: int, time: str, kind: str, metric: str, value: float | None,
                     threshold: float | None, message: str) -> bool:
        """Write one monitoring alert (drift, performance, ...) in its own transaction; idempotent per
        ``(account, bar, kind, metric)``: a repeated alert writes nothing and returns False."""
        with self.transaction() as db:
            cursor = db.execute("INSERT OR IGNORE INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (account, int(bar), str(time), kind, metric,
                                 None if value is None else float(value),
                                 None if threshold is None else float(threshold), message))
        return cursor.rowcount == 1

    def alerts(self, account: str | None = None) -> list[Alert]:
        """The alerts of ``account`` (all accounts when None), by account, bar, kind and metric."""
        query = "SELECT * FROM alerts" + ("" if account is None else " WHERE account = ?")
        rows = self.db.execute(query + " ORDER BY account, bar, kind, metric",
                               () if account is None else (account,)).fetchall()
        return [Alert(*row) for row in rows]

    # ----------------------------------------------------------------------------------------------- reading
    def table(self, name: str, account: str | None = None) -> pd.DataFrame:
        """One table as a frame, sorted by its key (``account`` filters it)."""
        if name not in TABLES:
            raise KeyError(f"unknown ledger table {name!r}; choose from {list(TABLES)}")
        key = "account" if name == "accounts" else "account, bar" + (", kind, metric" if name == "alerts" else "")
        query = f"SELECT * FROM {name}" + ("" if account is None else " WHERE account = ?") + f" ORDER BY {key}"
        return pd.read_sql_query(query, self.db, params=() if account is None else (account,))

    def equity(self, account: str) -> pd.Series:
        """The account's equity at each recorded bar's close, indexed by bar (name ``equity``)."""
        frame = self.table("equity", account)
        return pd.Series(frame["equity"].to_numpy(), index=pd.Index(frame["bar"].to_numpy(), name="bar"),
                         name="equity")

    def dump(self, account: str | None = None) -> dict[str, list[tuple]]:
        """Every row of every table (of ``account``), in key order: two ledgers are equal row for row when their
        dumps are equal."""
        out = {}
        for name in TABLES:
            frame = self.table(name, account)
            out[name] = [tuple(row) for row in frame.itertuples(index=False)]
        return out


__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "TABLES", "Account", "Alert", "FillRecord", "Ledger", "LedgerError",
           "Mark", "Order", "check_account_name"]
