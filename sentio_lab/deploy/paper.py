"""Paper trading: bars arrive one at a time, the model decides, the paper broker fills at the next bar, the
ledger records it; restartable at any instruction.

``python -m sentio_lab.deploy.paper --model CHECKPOINT --feed FILE --account LEDGER.db [--account-name NAME]
[--speed S] [--follow [--poll SECONDS] [--idle-exit SECONDS]] [--start TIME]``

Bars come from ``--feed``, a CSV or Parquet OHLCV file (the format of :func:`sentio_lab.data.loading.read_ohlcv_file`):
replayed at ``--speed`` bars per second (default: as fast as possible), or with ``--follow`` a CSV that another
process appends to, polled every ``--poll`` seconds (only complete lines are read; rows already traded must not
change). Each bar t is handled in this order (the timing of :mod:`sentio_lab.env.trading`):

1. the order decided at bar t-1 fills on bar t (:class:`~sentio_lab.deploy.broker.PaperBroker`: bar t's open, or
   close for next-close markets, with the model's cost model) and the account is marked at bar t's close;
2. the model decides at bar t from the bars ``<= t`` (features computed on that history with the checkpoint's
   fitted feature state, nothing refit) and the account marked at t;
3. the fill, the mark and the new order are written in **one** ledger transaction (:mod:`sentio_lab.deploy.ledger`);
4. the order is sent to the broker (after it is durable: a restart resends it, the broker dedups by bar).

The account opens at the first bar with a complete observation (the feature warm-up plus the window; or the first
bar at or after ``--start``), flat with equity 1.0, as :func:`sentio_lab.evaluation.episodes.evaluate_policy` starts an
episode. The equity the ledger records at every bar therefore equals ``evaluate_policy`` on the same bars with the
same model (tests/deploy/test_ledger_paper.py checks it to 1e-9 on a real file).

Restarts: the trader reads the ledger's last bar and order and goes on from the next bar; bars already recorded
are skipped (idempotent per ``(account, bar)``), so a trader killed at any point (``kill -9``) and restarted ends
with the same ledger, row for row, as one that was never interrupted (tests/deploy/test_paper_crash.py). One trader
per account: a second is refused by the ledger's account lock.

Decisions: this module builds the greedy policy from the checkpoint itself
(:class:`~sentio_lab.deploy.paper_decisions.CheckpointDecider`: the agent, its feature state, position levels and
cost model). Supported variants: ``ppo``; ``ppo_risk`` (its drawdown state comes from the ledger's equity, peak and
maximum drawdown); ``ppo_masked`` (the rules of :mod:`sentio_lab.env.masks`, run by the env's own
:class:`~sentio_lab.env.masks.Masker`; their state -- peak, drawdown guard, decisions since the last trade, trades
in the current window -- is replayed from the ledger's positions and equity,
:class:`~sentio_lab.deploy.paper_decisions.MaskReplay`, never kept only in memory); benchmark-anchored models of
every variant (``--anchor``: the benchmark weight ``b_t`` is computed from the feed's bars ``<= t`` by the env's own
rule, the order's target is ``clip(b_t + tilt)`` and the position held is the ledger's weight); and
``ppo_transformer`` without token timeframes. Refused, each with one line saying why: token timeframes, the GARCH
risk budget and the ``vol_target`` anchor. Each of them fits something on the training range of the market it is
evaluated on (the token normaliser on the model's training rows, the GARCH(1,1) and the training volatility on the
first ``train_fraction`` of the bars), which, on a feed, are bars the trader has not seen yet: no causal trader can
equal that backtest.
Registry URIs (``models:/<name>@<alias>``) are resolved by ``sentio_lab.deploy.registry.resolve`` where that
module exists.

Test hook: ``SENTIO_PAPER_CRASH=<point>@<bar>`` makes the process kill itself (SIGKILL) at ``<point>`` of bar
``<bar>``: ``fill`` (fill computed), ``decide`` (decision computed, nothing written), ``write:<table>`` (inside the
bar's transaction, after that table's row), ``commit`` (bar written, order not yet sent) or ``sent`` (between bars).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time as _time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from sentio_lab.data import DataValidationError, canonicalize, read_ohlcv_file
from sentio_lab.deploy.broker import Broker, PaperBroker
from sentio_lab.deploy.ledger import Account, Ledger, LedgerError, Mark, Order, check_account_name
from sentio_lab.deploy.paper_decisions import CheckpointDecider, MaskReplay, PaperError
from sentio_lab.env.market import PreparedMarket
from sentio_lab.features.registry import bank_optional_columns

#: The environment variable of the crash test hook (module doc).
CRASH_ENV = "SENTIO_PAPER_CRASH"
#: A registry URI names a model in the registry (``models:/<name>@<alias>``).
REGISTRY_SCHEME = "models:/"


def _crash_hook() -> Callable[[str, int], None]:
    """The test hook of :data:`CRASH_ENV`: a function ``(point, bar)`` that SIGKILLs this process at the chosen one."""
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return lambda point, bar: None
    point, _, bar = spec.rpartition("@")
    if not point or not bar.isdigit():
        raise PaperError(f"{CRASH_ENV}={spec!r}: expected <point>@<bar>, e.g. decide@120")
    target = int(bar)

    def hook(at: str, at_bar: int) -> None:
        if at == point and at_bar == target:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def resolve_model(uri: str) -> Path:
    """A checkpoint path for ``uri``: a file, a folder holding one ``*.pt``, or a registry URI (module doc)."""
    path: Path
    if uri.startswith(REGISTRY_SCHEME):
        try:
            registry = importlib.import_module("sentio_lab.deploy.registry")
        except ImportError as err:
            raise PaperError(f"{uri}: registry URIs need sentio_lab.deploy.registry ({err}); give a checkpoint "
                             "path to --model") from err
        path = Path(registry.resolve(uri))
    else:
        path = Path(uri)
    if path.is_dir():
        found = sorted(path.glob("*.pt"))
        if len(found) != 1:
            raise PaperError(f"{path}: expected one checkpoint (*.pt) in the folder, found {len(found)}; "
                             "give --model a checkpoint file")
        path = found[0]
    if not path.is_file():
        raise PaperError(f"{uri}: no such checkpoint; give --model a checkpoint file or models:/<name>@<alias>")
    return path


# ------------------------------------------------------------------------------------------------- the feed
class Feed:
    """OHLCV bars from a file: all of it at once (a replay), or, with ``follow``, whatever complete lines a CSV
    that another process appends to holds at each :meth:`poll`."""

    def __init__(self, path: str | Path, *, follow: bool = False, optional: tuple[str, ...] = ()) -> None:
        """Read from ``path``; ``optional`` columns may be absent (close-only data, as the model's feature bank)."""
        self.path, self.follow, self.optional = Path(path), follow, optional
        if not self.path.exists():
            raise PaperError(f"{self.path}: no such feed file (--feed)")
        if follow and self.path.suffix.lower() != ".csv":
            raise PaperError(f"{self.path}: --follow reads a CSV that another process appends to; got a "
                             f"{self.path.suffix} file")

    def poll(self) -> pd.DataFrame:
        """Every complete bar in the file now, canonical (validated) and oldest first."""
        if self.follow:  # a writer may be mid-line: read up to the last newline only
            text = self.path.read_bytes()
            complete = text[: text.rfind(b"\n") + 1]
            if complete.count(b"\n") < 2:  # a header and no complete row yet
                return pd.DataFrame()
            scratch = self.path.with_name(f".{self.path.name}.complete.csv")
            scratch.write_bytes(complete)
            try:
                raw = read_ohlcv_file(scratch)
            finally:
                scratch.unlink()
        else:
            raw = read_ohlcv_file(self.path)
        try:
            return canonicalize(raw, source=str(self.path), min_rows=1, optional=self.optional)
        except DataValidationError as err:
            raise PaperError(str(err)) from err


# ----------------------------------------------------------------------------------------------- the trader
class PaperTrader:
    """One account traded by one model on one feed (module doc); :meth:`step` handles one bar, :meth:`run` a feed."""

    def __init__(self, model: str | Path, feed: str | Path, ledger: str | Path, *, account: str = "paper",
                 broker: Broker | None = None, start: str | pd.Timestamp | None = None) -> None:
        """Load the model, open the ledger and take the account's lock (a second trader is refused)."""
        checkpoint = resolve_model(str(model))
        self.model = str(checkpoint.resolve())  # the file itself: an alias moved to another version is another model
        self.decider = CheckpointDecider(checkpoint)
        self.feed_path = Path(feed).resolve()
        self.account = check_account_name(account)
        self.ledger = Ledger(ledger)
        self.ledger.lock_account(account)
        self.broker: Broker = broker if broker is not None else PaperBroker(
            self.decider.positions, self.decider.costs, anchored=self.decider.anchor is not None)
        self.mask_replay = MaskReplay()
        existing = self.ledger.account(account)
        if existing is not None:  # a restart: the same model, feed and trading rules (the first bar aside)
            wanted = self._settings(existing.first_bar)
            for field in ("model", "feed", "positions", "fill_price", "capital"):
                if getattr(existing, field) != getattr(wanted, field):
                    raise LedgerError(f"account {account!r} in {self.ledger.path} trades {field}="
                                      f"{getattr(existing, field)!r}, not {getattr(wanted, field)!r}; restart it with "
                                      "the same settings or use another --account-name")
        self.start = None if start is None else pd.Timestamp(start)
        self.crash = _crash_hook()
        self._seen: pd.DataFrame | None = None
        self._resubmitted = False

    def close(self) -> None:
        """Close the ledger (releasing the account lock)."""
        self.ledger.close()

    def _settings(self, first_bar: int) -> Account:
        return Account(account=self.account, model=self.model, feed=str(self.feed_path),
                       positions=self.decider.positions, fill_price=self.decider.fill_price,
                       capital=self.decider.costs.capital, first_bar=first_bar)

    def _check_history(self, frame: pd.DataFrame) -> None:
        """Refuse a feed whose already traded rows changed (or a ledger written from another feed)."""
        last = self.ledger.last_bar(self.account)
        if last is None:
            return
        mark = self.ledger.mark(self.account, last)
        if last >= len(frame):
            raise PaperError(f"feed {self.feed_path}: {len(frame)} bars, but account {self.account!r} is recorded up "
                             f"to bar {last}; the feed changed under the account (use a new --account-name)")
        if str(frame.index[last]) != mark.time:
            raise PaperError(f"feed {self.feed_path}: bar {last} is {frame.index[last]}, the ledger recorded it as "
                             f"{mark.time}; the feed changed under account {self.account!r} (use a new --account-name)")
        if self._seen is not None and not frame.iloc[: len(self._seen)].equals(self._seen):
            raise PaperError(f"feed {self.feed_path}: rows already traded changed; bars must only be appended")

    def step(self, frame: pd.DataFrame) -> bool:
        """Handle the newest bar of ``frame`` (the history up to it); False when there was nothing to write (warm-up,
        or a bar the ledger holds already)."""
        bar = len(frame) - 1
        time = str(frame.index[-1])
        last = self.ledger.last_bar(self.account)
        if last is not None and bar <= last:
            return False  # recorded before a restart: idempotent
        if last is None and (bar < self.decider.warmup(frame) or (self.start is not None
                                                                 and frame.index[-1] < self.start)):
            return False  # warm-up: no complete observation yet (or before --start)
        market = self.decider.market(frame, str(self.feed_path))
        if last is None:
            flat = int(np.argmin(np.abs(np.asarray(self.decider.positions))))
            mark = Mark(bar=bar, time=time, level=flat, shares=0.0, weight=0.0, pending=False, cash=1.0, borrow=0.0,
                        equity=1.0, peak=1.0, max_drawdown=0.0)
            order = self._decide(market, mark, first_bar=bar)
            self.crash("decide", bar)
            self.ledger.open_account(self._settings(bar), mark, order)
            self.crash("commit", bar)
            self._send(order, mark)
            return True
        if bar != last + 1:
            raise PaperError(f"account {self.account!r}: bar {bar} arrived after bar {last}; the feed skipped bars")
        held = self.ledger.mark(self.account, last)
        open_order = self.ledger.order(self.account, last)
        if open_order is None:
            raise PaperError(f"account {self.account!r} stopped at bar {last} (ruined: equity {held.equity:.3g}); "
                             "open a new account to trade on")
        if not self._resubmitted:  # after a restart: the last recorded order again (the broker dedups it by bar)
            self._send(open_order, held)
        execution = self.broker.execution(self.account, bar, market.arrays, time)
        self.crash("fill", bar)
        equity = execution.cash + execution.shares * float(market.arrays.close[bar])
        peak = max(held.peak, equity)
        level = open_order.level  # an anchored model's order holds its own target (its level is the tilt's index)
        weight = open_order.target_weight if self.decider.anchor else self.decider.positions[level]
        mark = Mark(bar=bar, time=time, level=level, shares=execution.shares, weight=weight,
                    pending=execution.pending, cash=execution.cash, borrow=execution.borrow, equity=equity, peak=peak,
                    max_drawdown=max(held.max_drawdown, 1.0 - equity / peak))
        order = self._decide(market, mark) if equity > 0 else None  # ruin: nothing left to trade
        self.crash("decide", bar)
        self.ledger.record_bar(self.account, execution.fill, mark, order,
                               between_writes=lambda table: self.crash(f"write:{table}", bar))
        self.crash("commit", bar)
        if order is not None:
            self._send(order, mark)
        return True

    def _decide(self, market: PreparedMarket, held: Mark, first_bar: int | None = None) -> Order:
        masker = self.decider.masker(market)
        if masker is not None:  # the mask state at this bar, from the ledger (MaskReplay)
            first = self.ledger.account(self.account).first_bar if first_bar is None else first_bar
            self.mask_replay.advance(masker, self.ledger, self.account, first, held)
        return self.decider.decide(market, held, masker)

    def _send(self, order: Order, held: Mark) -> None:
        self.broker.submit(self.account, order, held)
        self._resubmitted = True
        self.crash("sent", order.bar)

    def run(self, *, speed: float | None = None, follow: bool = False, poll: float = 1.0,
            idle_exit: float | None = None, log: Callable[[str], None] | None = None) -> int:
        """Trade every bar of the feed (module doc); returns the number of bars written. With ``follow`` the feed
        is polled until ``idle_exit`` seconds pass without a new bar (forever when None)."""
        feed = Feed(self.feed_path, follow=follow, optional=bank_optional_columns(self.decider.feature_config.bank))
        written, idle_since, done = 0, _time.monotonic(), 0
        while True:
            frame = feed.poll()
            self._check_history(frame)
            for stop in self._arrivals(done, len(frame), speed):
                written += self.step(frame.iloc[:stop])
            if len(frame) > done:
                idle_since, done = _time.monotonic(), len(frame)
                self._seen = frame
                if log is not None:
                    log(self.summary())
            if not follow or (idle_exit is not None and _time.monotonic() - idle_since >= idle_exit):
                return written
            _time.sleep(poll)

    @staticmethod
    def _arrivals(done: int, available: int, speed: float | None) -> Iterator[int]:
        """History lengths ``done + 1 .. available``, one per bar, paced at ``speed`` bars per second."""
        for stop in range(done + 1, available + 1):
            if speed:
                _time.sleep(1.0 / speed)
            yield stop

    def summary(self) -> str:
        """One line: the account's last bar, its equity and the level held."""
        last = self.ledger.last_bar(self.account)
        if last is None:
            return f"account {self.account}: not open yet (warm-up)"
        mark = self.ledger.mark(self.account, last)
        return (f"account {self.account}: bar {last} ({mark.time}) equity {mark.equity:.6f} level "
                f"{mark.weight:+g}")


# -------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m sentio_lab.deploy.paper`` (module doc)."""
    parser = argparse.ArgumentParser(prog="python -m sentio_lab.deploy.paper", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint file, bundle folder or models:/<name>@<alias>")
    parser.add_argument("--feed", required=True, help="OHLCV CSV / Parquet file of bars (appended to with --follow)")
    parser.add_argument("--account", required=True, help="the ledger file (SQLite; created when missing)")
    parser.add_argument("--account-name", default="paper", help="the account inside the ledger (default: paper)")
    parser.add_argument("--speed", type=float, default=None, help="replay speed in bars per second (default: max)")
    parser.add_argument("--follow", action="store_true", help="poll the feed for appended bars")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between polls with --follow")
    parser.add_argument("--idle-exit", type=float, default=None,
                        help="with --follow: stop after this many seconds without a new bar (default: never)")
    parser.add_argument("--start", default=None, help="first decision at or after this timestamp")
    args = parser.parse_args(argv)
    if args.speed is not None and not args.speed > 0:
        parser.error(f"--speed must be > 0 bars per second, got {args.speed}")
    if not args.poll > 0:
        parser.error(f"--poll must be > 0 seconds, got {args.poll}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the paper trader; errors are one line on stderr and exit status 2."""
    args = parse_args(argv)
    try:
        trader = PaperTrader(args.model, args.feed, args.account, account=args.account_name, start=args.start)
        try:
            written = trader.run(speed=args.speed, follow=args.follow, poll=args.poll, idle_exit=args.idle_exit,
                                 log=print if args.follow else None)
            print(f"{written} bars written; {trader.summary()}")
        finally:
            trader.close()
    except (PaperError, LedgerError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - the module's command line
    sys.exit(main())


__all__ = ["CRASH_ENV", "REGISTRY_SCHEME", "CheckpointDecider", "Feed", "MaskReplay", "PaperError", "PaperTrader",
           "main", "parse_args", "resolve_model"]
