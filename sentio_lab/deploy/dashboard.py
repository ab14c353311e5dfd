"""The monitoring dashboard: a Panel page over a paper-trading ledger that refreshes as the trader writes.

It shows, for one account: the latest equity (the figure a reader checks first), its drawdown from the running
peak, the equity curve, the latest position, the fills with their costs, and the drift alerts
(:mod:`sentio_lab.deploy.drift_monitor` writes them through :class:`~sentio_lab.deploy.alerts.LedgerAlertSink`).
The ledger is opened read-only (SQLite ``mode=ro``) on every refresh, so the page never blocks or alters the
trader's writes; it reads the tables ``equity``, ``positions``, ``fills`` and ``alerts`` of the paper ledger
(``sentio_lab.deploy.ledger``) by SQL, and needs nothing else from it.

``make dashboard LEDGER=runs/paper/ledger.sqlite ACCOUNT=paper`` (or ``python -m sentio_lab.deploy.dashboard
--ledger FILE --account NAME``) serves it on http://localhost:5006. In a notebook, ``dashboard(ledger,
account)`` renders inline. Tables are plain HTML (no JavaScript grid), so the page works offline.
"""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import panel as pn
from matplotlib.figure import Figure  # the object-oriented API: no pyplot global state inside a server

#: Ledger tables the page reads.
TABLES: tuple[str, ...] = ("equity", "positions", "fills", "alerts")
#: Refresh period of the served page, in milliseconds.
REFRESH_MS = 1000
#: Rows of the fills and alerts tables shown (newest first).
SHOWN_ROWS = 20


@dataclass(frozen=True)
class LedgerView:
    """One account's rows of the ledger tables the page shows, each sorted by bar."""

    equity: pd.DataFrame
    positions: pd.DataFrame
    fills: pd.DataFrame
    alerts: pd.DataFrame

    @property
    def last_equity(self) -> float | None:
        """The equity marked at the latest bar (None before the first mark)."""
        return None if self.equity.empty else float(self.equity["equity"].iloc[-1])


def read_ledger(path: str | Path, account: str) -> LedgerView:
    """The account's rows of :data:`TABLES`, read through a read-only connection."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger; start the paper trader (python -m sentio_lab.deploy.paper)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            present = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = [t for t in TABLES if t not in present]
            if missing:
                raise ValueError(f"{path}: not a paper ledger (tables {missing} are missing)")
            frames = {t: pd.read_sql_query(f"SELECT * FROM {t} WHERE account = ? ORDER BY bar", db, params=(account,))
                      for t in TABLES}
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path}: cannot be read as a SQLite ledger ({err})") from err
    return LedgerView(**frames)


def equity_text(view: LedgerView) -> str:
    """The headline: latest equity and its drawdown from the running peak, or a waiting note."""
    if view.last_equity is None:
        return "No bars yet."
    equity = view.equity["equity"].to_numpy(dtype=float)
    drawdown = 1.0 - equity[-1] / equity.max()
    row = view.equity.iloc[-1]
    return f"Equity **{view.last_equity:.6f}** at bar {int(row['bar'])} ({row['time']}); drawdown {drawdown:.2%}"


def _newest(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The newest :data:`SHOWN_ROWS` rows of ``columns`` (those present), newest first."""
    keep = [c for c in columns if c in frame.columns]
    return frame[keep].iloc[::-1].head(SHOWN_ROWS).reset_index(drop=True)


class Dashboard:
    """The page's panes and their refresh from the ledger (:meth:`refresh`)."""

    def __init__(self, ledger: str | Path, account: str) -> None:
        self.ledger = Path(ledger)
        self.account = account
        self.headline = pn.pane.Markdown("", css_classes=["equity-now"])
        self.curve = pn.pane.Matplotlib(None, dpi=90, tight=True, height=280, sizing_mode="stretch_width")
        self.position = pn.pane.Markdown("", css_classes=["position-now"])
        self.fills = pn.pane.DataFrame(pd.DataFrame(), index=False, css_classes=["fills-table"])
        self.alerts = pn.pane.DataFrame(pd.DataFrame(), index=False, css_classes=["alerts-table"])
        self.layout = pn.Column(
            pn.pane.Markdown(f"# Paper account `{account}`\nLedger: `{self.ledger}`"),
            self.headline, self.curve, self.position,
            pn.pane.Markdown("## Drift alerts"), self.alerts,
            pn.pane.Markdown("## Fills and costs"), self.fills,
            sizing_mode="stretch_width",
        )
        self.refresh()

    def refresh(self) -> None:
        """Re-read the ledger and update every pane."""
        view = read_ledger(self.ledger, self.account)
        self.headline.object = equity_text(view)
        self.curve.object = _equity_figure(view.equity)
        if view.positions.empty:
            self.position.object = "No position yet."
        else:
            last = view.positions.iloc[-1]
            self.position.object = (f"Position at bar {int(last['bar'])}: level {int(last['level'])}, "
                                    f"weight {float(last['weight']):.3f}, shares {float(last['shares']):.6f}")
        self.fills.object = _newest(view.fills, ["bar", "time", "order_bar", "shares", "price", "executed_price",
                                                 "fee", "capped"])
        self.alerts.object = _newest(view.alerts, ["bar", "time", "kind", "metric", "value", "threshold",
                                                   "message"])


def _equity_figure(equity: pd.DataFrame) -> Figure:
    """The equity curve (by bar) as a matplotlib figure; a blank one before the first mark."""
    figure = Figure(figsize=(8, 2.8))
    axes = figure.add_subplot()
    if not equity.empty:
        axes.plot(equity["bar"].to_numpy(), equity["equity"].to_numpy(), color="tab:blue", lw=1.2)
    axes.set_xlabel("bar")
    axes.set_ylabel("equity")
    axes.grid(alpha=0.3)
    return figure


def dashboard(ledger: str | Path, account: str, refresh_ms: int = REFRESH_MS) -> pn.Column:
    """The page for ``account`` of ``ledger``, refreshing every ``refresh_ms`` milliseconds while served."""
    board = Dashboard(ledger, account)
    if refresh_ms > 0:
        pn.state.add_periodic_callback(board.refresh, period=refresh_ms)
    return board.layout


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve the dashboard of one ledger account on localhost."""
    parser = argparse.ArgumentParser(description="Serve the paper-trading monitoring dashboard.")
    parser.add_argument("--ledger", required=True, help="the paper ledger file (SQLite)")
    parser.add_argument("--account", required=True, help="the account to show")
    parser.add_argument("--port", type=int, default=5006)
    parser.add_argument("--refresh-ms", type=int, default=REFRESH_MS)
    args = parser.parse_args(argv)
    read_ledger(args.ledger, args.account)  # refuse a missing or foreign file before serving
    pn.serve({"/": lambda: dashboard(args.ledger, args.account, args.refresh_ms)}, port=args.port,
             address="127.0.0.1", show=False, title=f"sentio-lab paper: {args.account}")


if __name__ == "__main__":  # pragma: no cover
    main()
