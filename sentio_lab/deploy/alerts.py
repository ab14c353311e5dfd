"""Drift alerts, where they go, and the thresholds that raise them.

An alert (:class:`DriftAlert`) says what drifted (``kind`` and ``metric``), when (the bar index and its time), by
how much (``value``) and against which ``threshold``. Alerts go to an :class:`AlertSink`: anything with a
``record_alert(alert)`` method. :class:`MemoryAlertSink` keeps them in a list (tests, notebooks);
:class:`LedgerAlertSink` writes them into the paper-trading ledger's ``alerts`` table through the ledger's own
``record_alert(...)`` keyword interface, so this module never imports the ledger.

Thresholds are configuration: :class:`DriftThresholds` (defaults below), read from a TOML file's ``[drift]`` table
by :func:`load_thresholds`; an unknown key or a value out of range is refused with the key's name.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

#: The alert kinds :class:`~sentio_lab.deploy.drift_monitor.DriftMonitor` raises.
ALERT_KINDS: tuple[str, ...] = (
    "feature_psi", "feature_ks", "regime", "action", "volatility_change", "sharpe", "drawdown",
    "performance_change", "parity",
)


@dataclass(frozen=True)
class DriftAlert:
    """One alert: ``kind`` and ``metric`` say what drifted, ``bar`` / ``time`` when, ``value`` by how much against
    ``threshold`` (``direction`` says which side of it is bad), ``message`` says it in words."""

    kind: str
    """One of :data:`ALERT_KINDS`."""
    metric: str
    """What was measured: a feature name, ``"state shares"``, ``"levels"``, ``"window sharpe p-value"`` ..."""
    bar: int
    """Index of the bar whose close raised it (the statistic used bars ``<= bar`` only)."""
    time: str | None
    """That bar's timestamp (ISO text) when known."""
    value: float
    """The statistic (a PSI, a p-value, a gap ...)."""
    threshold: float
    """The configured threshold it crossed."""
    direction: str
    """``"above"`` when values above the threshold alert, ``"below"`` when values below it do."""
    message: str
    """One line for a person."""

    def as_record(self) -> dict[str, Any]:
        """The alert as a plain dict (a row of a table, a JSON object)."""
        return dataclasses.asdict(self)


@runtime_checkable
class AlertSink(Protocol):
    """Where alerts are written: one call per alert, in bar order."""

    def record_alert(self, alert: DriftAlert) -> None:
        """Store ``alert``."""
        ...  # pragma: no cover - a protocol


class MemoryAlertSink:
    """Keeps alerts in :attr:`alerts` (tests, notebooks, a dashboard fed in-process)."""

    def __init__(self) -> None:
        self.alerts: list[DriftAlert] = []

    def record_alert(self, alert: DriftAlert) -> None:
        """Append ``alert``."""
        self.alerts.append(alert)


class LedgerAlertSink:
    """Writes alerts into a ledger for ``account`` through its keyword ``record_alert(account=..., bar=..., ...)``.

    The ledger (``sentio_lab.deploy.ledger.Ledger``) owns the table; this adapter only maps the fields, so the
    drift monitor depends on the call, not on the ledger module.
    """

    def __init__(self, ledger: Any, account: str) -> None:
        if not callable(getattr(ledger, "record_alert", None)):
            raise TypeError(f"{type(ledger).__name__} has no record_alert(...); pass a sentio_lab ledger")
        self.ledger = ledger
        self.account = account

    def record_alert(self, alert: DriftAlert) -> None:
        """Write ``alert`` as one row of the ledger's alerts table (an unknown time as ``""``: the column is text,
        not null)."""
        self.ledger.record_alert(account=self.account, bar=alert.bar, time=alert.time or "", kind=alert.kind,
                                 metric=alert.metric, value=alert.value, threshold=alert.threshold,
                                 message=alert.message)


@dataclass(frozen=True)
class DriftThresholds:
    """Windows and thresholds of every drift check (defaults measured in docs/deployment.md, "Drift detection")."""

    window: int = 250
    """Bars in the rolling window of the feature, regime and action checks (at least 10 per PSI bin)."""
    check_every: int = 5
    """Bars between two evaluations of the windowed checks (the river detectors and parity run every bar)."""
    rearm_bars: int = 50
    """A check that alerted alerts again only after staying inside its threshold this many bars (no flapping)."""
    psi_bins: int = 10
    """Bins per feature, cut at training quantiles."""
    psi_floor: float = 1e-4
    """Share given to an empty bin before the logarithm (PSI is infinite otherwise)."""
    feature_psi: float = 0.25
    """Alert when a feature's PSI over the window exceeds this (the common reading: > 0.25 shifted) and the noise
    bound of ``psi_alpha``."""
    psi_alpha: float = 1e-3
    """A PSI must also exceed what sampling noise reaches with this probability at the effective sample sizes."""
    ks_alpha: float = 1e-4
    """Alert when a feature's KS p-value (effective sample sizes) falls below this."""
    regime_psi: float = 0.25
    """Alert when the PSI of the window's mean filtered state shares against training exceeds this."""
    action_psi: float = 0.25
    """Alert when the PSI of the window's chosen levels against the evaluation's exceeds this."""
    adwin_delta: float = 1e-4
    """ADWIN confidence on the standardised absolute market return (smaller: fewer false alarms, slower)."""
    performance_window: int = 63
    """Bars in the rolling paper Sharpe and drawdown window (about a quarter of daily bars)."""
    performance_alpha: float = 0.001
    """Alert when the empirical p-value of the window's Sharpe (or drawdown) among the evaluation's falls below."""
    page_hinkley_threshold: float = 50.0
    """Page-Hinkley lambda on the paper returns in units of the evaluation's return standard deviation."""
    page_hinkley_delta: float = 0.05
    """Page-Hinkley tolerated drift per bar, in the same units."""
    parity_tolerance: float = 1e-6
    """Alert when ``|log(paper equity / expected equity)|`` exceeds this."""
    feature_names: tuple[str, ...] = field(default=())
    """Features to watch; empty = every feature of the reference."""

    def __post_init__(self) -> None:
        for name in ("window", "check_every", "rearm_bars", "psi_bins", "performance_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"drift threshold {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.psi_bins < 2:
            raise ValueError(f"drift threshold psi_bins must be >= 2, got {self.psi_bins}")
        if self.window < 10 * self.psi_bins:
            # A bin left empty by chance adds floor-sized log terms (about 0.7 each) that no noise bound covers.
            raise ValueError(f"drift threshold window={self.window} holds fewer than 10 values per PSI bin "
                             f"(psi_bins={self.psi_bins}); use a longer window or fewer bins")
        if self.performance_window < 3:
            raise ValueError(f"drift threshold performance_window must be >= 3, got {self.performance_window}")
        for name in ("ks_alpha", "psi_alpha", "performance_alpha", "psi_floor", "adwin_delta"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"drift threshold {name} must lie in (0, 1), got {getattr(self, name)!r}")
        for name in ("feature_psi", "regime_psi", "action_psi", "page_hinkley_threshold", "page_hinkley_delta",
                     "parity_tolerance"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"drift threshold {name} must be a positive number, got {getattr(self, name)!r}")


def load_thresholds(path: str | Path) -> DriftThresholds:
    """:class:`DriftThresholds` from the ``[drift]`` table of a TOML file (missing keys keep their defaults)."""
    path = Path(path)
    with path.open("rb") as handle:
        document = tomllib.load(handle)
    table = document.get("drift")
    if not isinstance(table, dict):
        raise ValueError(f"{path}: no [drift] table; put the thresholds under [drift]")
    known = {f.name for f in dataclasses.fields(DriftThresholds)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"{path}: unknown [drift] key(s) {unknown}; known: {sorted(known)}")
    values = dict(table)
    if "feature_names" in values:
        values["feature_names"] = tuple(values["feature_names"])
    try:
        return DriftThresholds(**values)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
