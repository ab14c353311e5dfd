"""The monitoring dashboard: a Panel page over a paper-trading ledger and the model registry that refreshes as the
trader writes.

It shows, for one account: the latest equity (the figure a reader checks first), its drawdown from the running
peak, the equity curve against what was expected of it (the backtest-parity curve of the account's own model on
its own feed, and the band of the model's out-of-sample evaluation: :mod:`sentio_lab.deploy.equity_expectation`),
the versions of the model in the registry with their verdicts and which is champion or challenger, the latest
position, the fills with their costs, and the drift alerts (:mod:`sentio_lab.deploy.drift_monitor` writes them
through :class:`~sentio_lab.deploy.alerts.LedgerAlertSink`).

The ledger is opened read-only (SQLite ``mode=ro``) on every refresh, so the page never blocks or alters the
trader's writes; it reads the tables ``equity``, ``positions``, ``fills`` and ``alerts`` of the paper ledger
(``sentio_lab.deploy.ledger``) by SQL, and ``accounts`` (the model and feed the account trades) where present.
The slower sources are re-read at most every ``slow_refresh_s`` seconds: the registry, and the backtest
expectation, recomputed only once the ledger has bars it does not cover yet. A source that is missing or fails
leaves its part of the page out and says why on the page; the rest is still shown.

``make dashboard LEDGER=runs/paper/ledger.sqlite ACCOUNT=paper`` (or ``python -m sentio_lab.deploy.dashboard
--ledger FILE --account NAME [--model-name NAME] [--registry-uri URI] [--oos EXPERIMENT_FOLDER]``) serves it on
http://localhost:5006. In a notebook, ``dashboard(ledger, account)`` renders inline. Tables are plain HTML (no
JavaScript grid), so the page works offline.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
from matplotlib.figure import Figure  # the object-oriented API: no pyplot global state inside a server

from sentio_lab.deploy.equity_expectation import (
    MIN_WINDOWS,
    EquityBand,
    experiment_paths,
    oos_band,
    parity_expectation,
)
from sentio_lab.deploy.export import BUNDLE_DIR
from sentio_lab.deploy.registry import list_versions
from sentio_lab.deploy.verdict import Gate, Verdict

#: Ledger tables the page needs.
TABLES: tuple[str, ...] = ("equity", "positions", "fills", "alerts")
#: Refresh period of the served page, in milliseconds.
REFRESH_MS = 1000
#: Seconds between reads of the slow sources (registry, backtest expectation).
SLOW_REFRESH_S = 15.0
#: Rows of the fills and alerts tables shown (newest first).
SHOWN_ROWS = 20
#: Colour of the out-of-sample band (the browser test finds its pixels).
BAND_COLOR = "#2ca02c"
#: Opacity of the band.
BAND_ALPHA = 0.2


@dataclass(frozen=True)
class LedgerView:
    """One account's rows of the ledger tables the page shows, each sorted by bar, and its ``accounts`` row."""

    equity: pd.DataFrame
    positions: pd.DataFrame
    fills: pd.DataFrame
    alerts: pd.DataFrame
    account: dict[str, Any] | None = None
    """The account's settings (model, feed, first_bar, ...); None before it opens or in a ledger without them."""

    @property
    def last_equity(self) -> float | None:
        """The equity marked at the latest bar (None before the first mark)."""
        return None if self.equity.empty else float(self.equity["equity"].iloc[-1])

    @property
    def last_bar(self) -> int | None:
        """The latest marked bar (None before the first mark)."""
        return None if self.equity.empty else int(self.equity["bar"].iloc[-1])


def read_ledger(path: str | Path, account: str) -> LedgerView:
    """The account's rows of :data:`TABLES` and ``accounts``, read through a read-only connection."""
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
            settings = None
            if "accounts" in present:
                rows = pd.read_sql_query("SELECT * FROM accounts WHERE account = ?", db, params=(account,))
                settings = None if rows.empty else rows.iloc[0].to_dict()
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise ValueError(f"{path}: cannot be read as a SQLite ledger ({err})") from err
    return LedgerView(**frames, account=settings)


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


# ------------------------------------------------------------------------------------------------ the registry
def registry_model_of(model: str) -> tuple[str, str] | None:
    """``(name, version)`` of a checkpoint that :func:`sentio_lab.deploy.registry.resolve` downloaded (the paper
    trader records that path for a ``models:/`` URI: ``.../<name>/<version>/bundle/checkpoint.pt``); None for any
    other path."""
    parts = Path(model).parts
    if len(parts) >= 4 and parts[-2] == BUNDLE_DIR and parts[-3].isdigit():
        return parts[-4], parts[-3]
    return None


def versions_table(versions: Sequence[Any], gate: Gate | None = None, trading: str | None = None) -> pd.DataFrame:
    """One row per registry version, newest first: its role (champion / challenger), status, variant, the verdict's
    numbers, whether ``gate`` (default :class:`~sentio_lab.deploy.verdict.Gate`) passes it, and ``trading`` marks
    the version the account trades."""
    gate = gate or Gate()
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        verdict = Verdict.from_tags(version.tags)
        failed = gate.failures(verdict)
        rows.append({"version": int(version.version), "role": ", ".join(sorted(version.aliases)) or "-",
                     "status": version.tags.get("status", "?"), "variant": version.tags.get("variant", "?"),
                     "median Sharpe": _number(verdict.median_sharpe), "DSR": _number(verdict.dsr),
                     "PBO": _number(verdict.pbo), "SPA p": _number(verdict.spa_p_value, 3),
                     "reverse SPA p": _number(verdict.spa_reverse_p_value, 3),
                     "gate": "pass" if not failed else "fail: " + "; ".join(failed),
                     "trading": "yes" if trading == str(version.version) else ""})
    return pd.DataFrame(rows)


def _number(value: float, digits: int = 2) -> str:
    """A verdict number as text; "n/a" where it was not measured (NaN)."""
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------ the page
class Dashboard:
    """The page's panes and their refresh from the ledger, the registry and the evaluation (:meth:`refresh`).

    ``model_name``: the registry model whose versions are shown (default: the one the account trades, when it was
    started from a ``models:/`` URI); ``oos`` / ``oos_name``: the experiment folder (and configuration) whose
    out-of-sample paths give the band; ``expectation``: compute the backtest-parity curve."""

    def __init__(self, ledger: str | Path, account: str, *, model_name: str | None = None,
                 registry_uri: str | None = None, oos: str | Path | None = None, oos_name: str | None = None,
                 expectation: bool = True, slow_refresh_s: float = SLOW_REFRESH_S) -> None:
        self.ledger = Path(ledger)
        self.account = account
        self.model_name, self.registry_uri = model_name, registry_uri
        self.expectation_on, self.slow_refresh_s = expectation, slow_refresh_s
        self.expected: pd.Series | None = None
        self.expectation_note = "No backtest expectation yet." if expectation else \
            "No backtest expectation (turned off)."
        self._expected_at = -math.inf
        self._versions_at = -math.inf
        self.versions = pd.DataFrame()
        self.versions_note = ""
        self.paths: list[pd.Series] = []
        self.band: EquityBand | None = None
        self.band_note = "No band: no out-of-sample evaluation given (--oos EXPERIMENT_FOLDER)."
        self._band_source = ""
        if oos is not None:
            try:
                self.paths, found = experiment_paths(oos, oos_name)
                self._band_source = f"{len(self.paths)} out-of-sample paths of `{found}` in `{oos}`"
                self.band_note = "No band yet: the account has no first bar in the ledger."
            except (OSError, ValueError) as err:
                self.band_note = f"No band: {err}"
        self.headline = pn.pane.Markdown("", css_classes=["equity-now"])
        self.expectations = pn.pane.Markdown("", css_classes=["expectation-status"])
        self.curve = pn.pane.Matplotlib(None, dpi=90, tight=True, height=300, sizing_mode="stretch_width",
                                        css_classes=["equity-chart"])
        self.position = pn.pane.Markdown("", css_classes=["position-now"])
        self.registry = pn.pane.Markdown("", css_classes=["versions-status"])
        self.versions_pane = pn.pane.DataFrame(pd.DataFrame(), index=False, css_classes=["versions-table"])
        self.fills = pn.pane.DataFrame(pd.DataFrame(), index=False, css_classes=["fills-table"])
        self.alerts = pn.pane.DataFrame(pd.DataFrame(), index=False, css_classes=["alerts-table"])
        self.layout = pn.Column(
            pn.pane.Markdown(f"# Paper account `{account}`\nLedger: `{self.ledger}`"),
            self.headline, self.expectations, self.curve, self.position,
            pn.pane.Markdown("## Model versions"), self.registry, self.versions_pane,
            pn.pane.Markdown("## Drift alerts"), self.alerts,
            pn.pane.Markdown("## Fills and costs"), self.fills,
            sizing_mode="stretch_width",
        )
        self.refresh()

    def refresh(self) -> None:
        """Re-read the ledger (and the slow sources when due) and update every pane."""
        view = read_ledger(self.ledger, self.account)
        now = time.monotonic()
        self._update_expectation(view, now)
        self._update_band(view)
        self._update_versions(view, now)
        self.headline.object = equity_text(view)
        self.expectations.object = self._expectation_text(view)
        self.curve.object = equity_figure(view.equity, self.expected, self._placed_band(view))
        if view.positions.empty:
            self.position.object = "No position yet."
        else:
            last = view.positions.iloc[-1]
            self.position.object = (f"Position at bar {int(last['bar'])}: level {int(last['level'])}, "
                                    f"weight {float(last['weight']):.3f}, shares {float(last['shares']):.6f}")
        self.registry.object = self.versions_note
        self.versions_pane.object = self.versions
        self.fills.object = _newest(view.fills, ["bar", "time", "order_bar", "shares", "price", "executed_price",
                                                 "fee", "capped"])
        self.alerts.object = _newest(view.alerts, ["bar", "time", "kind", "metric", "value", "threshold",
                                                   "message"])

    # -------------------------------------------------------------------------------------- slow sources
    def _update_expectation(self, view: LedgerView, now: float) -> None:
        """Recompute the backtest expectation once the ledger has bars past it (at most every slow period)."""
        if not self.expectation_on or view.last_bar is None:
            return
        if self.expected is not None and self.expected.index[-1] >= view.last_bar:
            return
        if now - self._expected_at < self.slow_refresh_s:
            return
        self._expected_at = now
        if view.account is None:
            self.expectation_note = "No backtest expectation: the ledger has no accounts row for this account."
            return
        try:
            self.expected = parity_expectation(view.account["model"], view.account["feed"],
                                               int(view.account["first_bar"]))
            self.expectation_note = (f"backtest of `{Path(view.account['model']).name}` on "
                                     f"`{Path(view.account['feed']).name}`")
        except Exception as err:  # any failure of the backtest leaves the page up and says why
            self.expected = None
            self.expectation_note = f"No backtest expectation: {type(err).__name__}: {err}"

    def _update_band(self, view: LedgerView) -> None:
        """(Re)compute the band when the ledger has outgrown it and the paths may reach further."""
        if not self.paths or view.account is None or view.last_bar is None:
            return
        needed = view.last_bar - int(view.account["first_bar"])
        if self.band is not None and (self.band.horizon >= needed or not self.band.complete):
            return
        horizon = max(needed, 64, 2 * (self.band.horizon if self.band is not None else 0))
        self.band = oos_band(self.paths, horizon)
        low, high = self.band.quantiles
        self.band_note = (f"band: {low:.0%}-{high:.0%} of the equity ratio over h bars, every window of the "
                          f"{self._band_source}")

    def _update_versions(self, view: LedgerView, now: float) -> None:
        """Re-read the registry's versions of the model (at most every slow period)."""
        if now - self._versions_at < self.slow_refresh_s:
            return
        self._versions_at = now
        trading = None if view.account is None else registry_model_of(str(view.account["model"]))
        name = self.model_name or (trading[0] if trading else None)
        if name is None:
            self.versions_note = ("No registry model: the account does not trade a `models:/` URI; give "
                                  "--model-name NAME.")
            return
        try:
            versions = list_versions(name, registry_uri=self.registry_uri)
        except Exception as err:  # an unreachable registry leaves the page up and says why
            self.versions, self.versions_note = pd.DataFrame(), f"Registry unavailable: {type(err).__name__}: {err}"
            return
        mine = trading[1] if trading and trading[0] == name else None
        self.versions = versions_table(versions, trading=mine)
        champion = [str(v.version) for v in versions if "champion" in v.aliases]
        self.versions_note = (f"`{name}`: {len(versions)} version(s); champion "
                              f"{'v' + champion[0] if champion else 'none'}; gate: the default promotion gate")

    # -------------------------------------------------------------------------------------- text and chart
    def _expectation_text(self, view: LedgerView) -> str:
        """Parity gap and band coverage in words, each part saying why where it is missing."""
        lines = []
        if self.expected is not None and view.last_bar is not None:
            paper = view.equity.set_index("bar")["equity"]
            common = paper.index.intersection(self.expected.index)
            gap = np.abs(np.log(paper.loc[common].to_numpy() / self.expected.loc[common].to_numpy()))
            lines.append(f"Backtest parity: max |log(paper / backtest)| **{gap.max():.2e}** over {len(common)} bars "
                         f"({self.expectation_note}).")
        else:
            lines.append(self.expectation_note)
        placed = self._placed_band(view)
        if placed is None or self.band is None:
            lines.append(self.band_note)
        else:
            text = f"Out-of-sample {self.band_note}"
            if view.last_bar is not None and placed.index[-1] < view.last_bar:
                text += (f"; it ends at bar {placed.index[-1]} (fewer than {MIN_WINDOWS} windows of a longer "
                         "stretch)")
            lines.append(text + ".")
        return "\n\n".join(lines)

    def _placed_band(self, view: LedgerView) -> pd.DataFrame | None:
        """The band on the ledger's bars up to the latest one, or None."""
        if self.band is None or view.account is None or view.last_bar is None:
            return None
        return self.band.from_bar(int(view.account["first_bar"])).loc[: view.last_bar]


def equity_figure(equity: pd.DataFrame, expected: pd.Series | None = None,
                  band: pd.DataFrame | None = None) -> Figure:
    """The paper equity curve (by bar) with the backtest expectation (dashed, up to the latest bar) and the
    out-of-sample band (shaded) where given; a blank figure before the first mark."""
    figure = Figure(figsize=(8, 3.0))
    axes = figure.add_subplot()
    if band is not None and len(band) > 1:
        axes.fill_between(band.index.to_numpy(), band["lower"].to_numpy(), band["upper"].to_numpy(),
                          color=BAND_COLOR, alpha=BAND_ALPHA, lw=0, label="out-of-sample band")
    if not equity.empty:
        last = int(equity["bar"].iloc[-1])
        axes.plot(equity["bar"].to_numpy(), equity["equity"].to_numpy(), color="tab:blue", lw=1.2, label="paper")
        if expected is not None:  # dashed on top: where the two agree (they should), both stay visible
            shown = expected.loc[:last]
            axes.plot(shown.index.to_numpy(), shown.to_numpy(), color="tab:orange", lw=1.2, ls=(0, (4, 4)),
                      label="backtest")
        axes.legend(loc="upper left", fontsize=8, frameon=False)
    axes.set_xlabel("bar")
    axes.set_ylabel("equity")
    axes.grid(alpha=0.3)
    return figure


def dashboard(ledger: str | Path, account: str, refresh_ms: int = REFRESH_MS, **sources: Any) -> pn.Column:
    """The page for ``account`` of ``ledger``, refreshing every ``refresh_ms`` milliseconds while served;
    ``sources`` are :class:`Dashboard`'s keywords (registry model, out-of-sample folder, ...)."""
    board = Dashboard(ledger, account, **sources)
    if refresh_ms > 0:
        pn.state.add_periodic_callback(board.refresh, period=refresh_ms)
    return board.layout


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve the dashboard of one ledger account on localhost."""
    parser = argparse.ArgumentParser(description="Serve the paper-trading monitoring dashboard.")
    parser.add_argument("--ledger", required=True, help="the paper ledger file (SQLite)")
    parser.add_argument("--account", required=True, help="the account to show")
    parser.add_argument("--model-name", default=None,
                        help="the registry model whose versions are shown (default: the one the account trades)")
    parser.add_argument("--registry-uri", default=None, help="MLflow registry URI (default: as the registry CLI)")
    parser.add_argument("--oos", default=None,
                        help="experiment output folder whose out-of-sample paths give the band (its equity.parquet)")
    parser.add_argument("--oos-name", default=None, help="the configuration in --oos (default: its only agent)")
    parser.add_argument("--no-expectation", action="store_true", help="do not compute the backtest expectation")
    parser.add_argument("--slow-refresh-s", type=float, default=SLOW_REFRESH_S,
                        help="seconds between reads of the registry and the backtest")
    parser.add_argument("--port", type=int, default=5006)
    parser.add_argument("--refresh-ms", type=int, default=REFRESH_MS)
    args = parser.parse_args(argv)
    read_ledger(args.ledger, args.account)  # refuse a missing or foreign file before serving
    sources = dict(model_name=args.model_name, registry_uri=args.registry_uri, oos=args.oos, oos_name=args.oos_name,
                   expectation=not args.no_expectation, slow_refresh_s=args.slow_refresh_s)
    pn.serve({"/": lambda: dashboard(args.ledger, args.account, args.refresh_ms, **sources)}, port=args.port,
             address="127.0.0.1", show=False, title=f"sentio-lab paper: {args.account}")


if __name__ == "__main__":  # pragma: no cover
    main()
