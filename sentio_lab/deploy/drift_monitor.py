"""The streaming drift monitor: fed one closed bar at a time, it runs the checks of :mod:`sentio_lab.deploy.drift`
against a :class:`~sentio_lab.deploy.drift.DriftReference` and writes each alert to a sink.

:meth:`DriftMonitor.update` takes what is known at the close of bar t: the bar's feature row, its filtered regime
probabilities, the level the policy chose, the paper account's equity, the equity the backtest replay expects and
the market's log return. Any of them may be left out (a check whose inputs never arrive never alerts). Nothing
looks ahead: the statistics at bar t use the inputs of bars <= t, and each alert names the bar it was raised on.
The monitor lives in memory; after a restart feed it the ledger's bars again to rebuild its windows.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np
from river import drift as river_drift

from sentio_lab.deploy.alerts import AlertSink, DriftAlert, DriftThresholds, MemoryAlertSink
from sentio_lab.deploy.drift import (
    DriftReference,
    bin_shares,
    effective_size,
    empirical_p_value,
    ks_p_value,
    level_indices,
    psi,
    psi_noise_bound,
    window_drawdown,
    window_sharpe,
)


class DriftMonitor:
    """Runs every drift check a :class:`~sentio_lab.deploy.drift.DriftReference` supports, bar by bar.

    :attr:`metrics` keeps one row per evaluated statistic (bar, time, kind, metric, value, threshold) for a
    dashboard; :attr:`sink` receives the alerts (a :class:`~sentio_lab.deploy.alerts.MemoryAlertSink` by default).
    """

    def __init__(self, reference: DriftReference, thresholds: DriftThresholds | None = None,
                 sink: AlertSink | None = None) -> None:
        self.reference = reference
        self.thresholds = thresholds = thresholds or DriftThresholds()
        self.sink: AlertSink = sink if sink is not None else MemoryAlertSink()
        names = reference.feature_names
        watched = thresholds.feature_names or tuple(names)
        unknown = [n for n in watched if n not in names]
        if unknown:
            raise ValueError(f"drift feature_names {unknown} are not reference features; known: {names}")
        self._watched = [names.index(n) for n in watched]
        w = thresholds.window
        # A PSI alerts above its configured threshold and above what noise reaches at the effective sizes.
        self.feature_psi_thresholds = {
            f.name: max(thresholds.feature_psi, psi_noise_bound(
                len(f.edges) + 1, effective_size(len(f.sample), f.autocorrelation_time),
                effective_size(w, f.autocorrelation_time), thresholds.psi_alpha))
            for f in reference.features}
        self.regime_psi_threshold = self.action_psi_threshold = math.nan
        if reference.regime_shares is not None:
            tau = reference.regime_time
            self.regime_psi_threshold = max(thresholds.regime_psi, psi_noise_bound(
                len(reference.regime_shares), effective_size(reference.regime_rows, tau), effective_size(w, tau),
                thresholds.psi_alpha))
        if reference.level_shares is not None:
            tau = reference.level_time
            self.action_psi_threshold = max(thresholds.action_psi, psi_noise_bound(
                len(reference.level_shares), effective_size(reference.level_rows, tau), effective_size(w, tau),
                thresholds.psi_alpha))
        perf = reference.performance
        if perf is not None:
            if perf.window != thresholds.performance_window:
                raise ValueError(f"the reference's performance windows have {perf.window} bars but "
                                 f"performance_window is {thresholds.performance_window}; refit the reference")
            smallest = 1.0 / (1 + len(perf.sharpe))
            if smallest >= thresholds.performance_alpha:
                raise ValueError(f"the evaluation has {len(perf.sharpe)} windows of {perf.window} bars, so no "
                                 f"p-value can fall below performance_alpha={thresholds.performance_alpha}; "
                                 "give more out-of-sample paths, a shorter performance_window or a larger alpha")
        self._features: deque[np.ndarray] = deque(maxlen=thresholds.window)
        self._regime: deque[np.ndarray] = deque(maxlen=thresholds.window)
        self._levels: deque[int] = deque(maxlen=thresholds.window)
        self._returns: deque[float] = deque(maxlen=thresholds.performance_window)
        self._adwin = river_drift.ADWIN(delta=thresholds.adwin_delta)
        self._page_hinkley = river_drift.PageHinkley(
            min_instances=thresholds.performance_window, delta=thresholds.page_hinkley_delta,
            threshold=thresholds.page_hinkley_threshold, mode="down")
        self._last_bar: int | None = None
        self._last_equity: float | None = None
        self._seen = 0
        self._active: set[tuple[str, str]] = set()
        self._inside_since: dict[tuple[str, str], int] = {}
        self.metrics: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ input
    def update(self, bar: int, *, time: Any = None, features: np.ndarray | None = None,
               regime: np.ndarray | None = None, level: float | None = None, equity: float | None = None,
               expected_equity: float | None = None, market_return: float | None = None) -> list[DriftAlert]:
        """Feed the closed bar ``bar`` (strictly after the previous one) and return the alerts it raised.

        Every input is checked before any state changes: a refused bar (a ``ValueError`` naming it) leaves the
        monitor as it was."""
        if self._last_bar is not None and bar <= self._last_bar:
            raise ValueError(f"bar {bar} arrives after bar {self._last_bar}; the monitor takes each bar once, "
                             "in order (rebuild a fresh monitor to replay)")
        row, probs, level_index = self._checked(bar, features, regime, level, equity, expected_equity, market_return)
        self._last_bar = bar
        self._seen += 1
        stamp = None if time is None else str(time)
        raised: list[DriftAlert] = []
        if row is not None:
            self._features.append(row)
        if probs is not None:
            self._regime.append(probs)
        if level_index is not None:
            self._levels.append(level_index)
        if equity is not None:
            if self._last_equity is not None:
                self._returns.append(math.log(equity / self._last_equity))
                if self.reference.performance is not None:
                    raised += self._performance_change(bar, stamp, self._returns[-1])
            self._last_equity = float(equity)
        if market_return is not None:
            raised += self._volatility_change(bar, stamp, float(market_return))
        if equity is not None and expected_equity is not None:
            raised += self._parity(bar, stamp, float(equity), float(expected_equity))
        if self._seen % self.thresholds.check_every == 0:
            raised += self._windowed(bar, stamp)
        for alert in raised:
            self.sink.record_alert(alert)
        return raised

    def _checked(self, bar: int, features: np.ndarray | None, regime: np.ndarray | None, level: float | None,
                 equity: float | None, expected_equity: float | None, market_return: float | None,
                 ) -> tuple[np.ndarray | None, np.ndarray | None, int | None]:
        """One bar's inputs validated against the reference: the feature row, the regime probabilities and the
        level's index (None where not given); a ``ValueError`` naming the bar otherwise."""
        ref = self.reference
        missing = [name for name, given, known in (
            ("regime", regime, ref.regime_shares), ("level", level, ref.levels),
            ("market_return", market_return, ref.market_abs_return)) if given is not None and known is None]
        if missing:
            raise ValueError(f"bar {bar}: {missing} given but the reference has nothing to compare them with; pass "
                             "them to fit_reference (regime_probabilities, levels, market_returns) or leave them out")
        row = probs = index = None
        if features is not None:
            row = np.asarray(features, dtype=np.float64)
            if row.shape != (len(ref.features),) or not np.all(np.isfinite(row)):
                raise ValueError(f"bar {bar}: features must be {len(ref.features)} finite values "
                                 f"({ref.feature_names}), got {row.tolist()}")
        if regime is not None:
            probs = np.asarray(regime, dtype=np.float64)
            if probs.shape != ref.regime_shares.shape or not np.all(np.isfinite(probs)):
                raise ValueError(f"bar {bar}: regime probabilities must be {len(ref.regime_shares)} finite values, "
                                 f"got {probs.tolist()}")
        if level is not None:
            try:
                index = int(level_indices(np.asarray([level]), ref.levels)[0])
            except ValueError as err:
                raise ValueError(f"bar {bar}: {err}") from err
        for name, value in (("paper equity", equity), ("expected equity", expected_equity)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"bar {bar}: {name} must be finite and positive, got {value!r}")
        if market_return is not None and not math.isfinite(market_return):
            raise ValueError(f"bar {bar}: market return must be finite, got {market_return!r}")
        return row, probs, index

    # ------------------------------------------------------------------ checks
    def _record(self, bar: int, time: str | None, kind: str, metric: str, value: float, threshold: float,
                breached: bool, direction: str, message: str) -> list[DriftAlert]:
        """Log a statistic; an alert when it breaches while armed. A check that alerted re-arms only after it has
        stayed inside its threshold for ``rearm_bars`` bars, so a statistic hovering at the line alerts once."""
        self.metrics.append({"bar": bar, "time": time, "kind": kind, "metric": metric, "value": value,
                             "threshold": threshold})
        key = (kind, metric)
        if not breached:
            inside = self._inside_since.setdefault(key, bar)
            if bar - inside >= self.thresholds.rearm_bars:
                self._active.discard(key)
            return []
        self._inside_since.pop(key, None)
        if key in self._active:
            return []
        self._active.add(key)
        return [DriftAlert(kind=kind, metric=metric, bar=bar, time=time, value=value, threshold=threshold,
                           direction=direction, message=message)]

    def _windowed(self, bar: int, time: str | None) -> list[DriftAlert]:
        """The rolling-window checks: feature PSI and KS, regime and action PSI, window Sharpe and drawdown."""
        th, ref = self.thresholds, self.reference
        out: list[DriftAlert] = []
        if len(self._features) == th.window:
            window = np.stack(self._features)
            for j in self._watched:
                feature = ref.features[j]
                value = psi(feature.shares, bin_shares(window[:, j], feature.edges), th.psi_floor)
                limit = self.feature_psi_thresholds[feature.name]
                out += self._record(bar, time, "feature_psi", feature.name, value, limit, value > limit, "above",
                                    f"{feature.name}: PSI {value:.3f} over {th.window} bars > {limit:.3f}")
                statistic, p = ks_p_value(feature.sample, window[:, j], feature.autocorrelation_time)
                out += self._record(bar, time, "feature_ks", feature.name, p, th.ks_alpha, p < th.ks_alpha, "below",
                                    f"{feature.name}: KS D={statistic:.3f}, p={p:.2e} < {th.ks_alpha} "
                                    f"(effective sizes, tau={feature.autocorrelation_time:.1f} bars)")
        if ref.regime_shares is not None and len(self._regime) == th.window:
            shares = np.stack(self._regime).mean(axis=0)
            value, limit = psi(ref.regime_shares, shares, th.psi_floor), self.regime_psi_threshold
            out += self._record(bar, time, "regime", "state shares", value, limit, value > limit,
                                "above", f"regime occupancy {np.round(shares, 3).tolist()} against training "
                                f"{np.round(ref.regime_shares, 3).tolist()}: PSI {value:.3f} > {limit:.3f}")
        if ref.level_shares is not None and len(self._levels) == th.window:
            shares = np.bincount(np.asarray(self._levels), minlength=len(ref.levels)) / th.window
            value, limit = psi(ref.level_shares, shares, th.psi_floor), self.action_psi_threshold
            out += self._record(bar, time, "action", "levels", value, limit, value > limit, "above",
                                f"chosen levels {np.round(shares, 3).tolist()} against the evaluation's "
                                f"{np.round(ref.level_shares, 3).tolist()}: PSI {value:.3f} > {limit:.3f}")
        perf = ref.performance
        if perf is not None and len(self._returns) == th.performance_window:
            returns = np.asarray(self._returns)
            sharpe = float(window_sharpe(returns))
            p = empirical_p_value(perf.sharpe, sharpe, "lower")
            out += self._record(bar, time, "sharpe", "window sharpe p-value", p, th.performance_alpha,
                                p < th.performance_alpha, "below",
                                f"paper Sharpe {sharpe:.3f}/bar over {th.performance_window} bars: only {p:.4f} of "
                                f"the evaluation's {len(perf.sharpe)} windows were as bad")
            drawdown = float(window_drawdown(returns))
            p = empirical_p_value(perf.drawdown, drawdown, "higher")
            out += self._record(bar, time, "drawdown", "window drawdown p-value", p, th.performance_alpha,
                                p < th.performance_alpha, "below",
                                f"paper drawdown {drawdown:.2%} over {th.performance_window} bars: only {p:.4f} of "
                                f"the evaluation's {len(perf.drawdown)} windows were as deep")
        return out

    def _volatility_change(self, bar: int, time: str | None, market_return: float) -> list[DriftAlert]:
        """ADWIN on the absolute market return in training units: an alert on every detection."""
        scale = self.reference.market_abs_return
        self._adwin.update(abs(market_return) / scale)
        if not self._adwin.drift_detected:
            return []
        level = float(self._adwin.estimation)
        self.metrics.append({"bar": bar, "time": time, "kind": "volatility_change", "metric": "abs return",
                             "value": level, "threshold": self.thresholds.adwin_delta})
        return [DriftAlert(kind="volatility_change", metric="abs return", bar=bar, time=time, value=level,
                           threshold=self.thresholds.adwin_delta, direction="above",
                           message=f"ADWIN (delta={self.thresholds.adwin_delta}) found a change in the absolute "
                                   f"market return: the window it keeps after the cut has {level:.2f}x the training "
                                   "mean")]

    def _performance_change(self, bar: int, time: str | None, log_return: float) -> list[DriftAlert]:
        """Page-Hinkley on the paper return in units of the evaluation's: an alert on every detection."""
        perf = self.reference.performance
        self._page_hinkley.update((log_return - perf.return_mean) / perf.return_std)
        if not self._page_hinkley.drift_detected:
            return []
        th = self.thresholds
        recent = float(np.mean(self._returns))
        self.metrics.append({"bar": bar, "time": time, "kind": "performance_change", "metric": "paper return",
                             "value": recent, "threshold": th.page_hinkley_threshold})
        return [DriftAlert(kind="performance_change", metric="paper return", bar=bar, time=time,
                           value=recent, threshold=th.page_hinkley_threshold, direction="below",
                           message=f"Page-Hinkley (lambda={th.page_hinkley_threshold}, delta={th.page_hinkley_delta} "
                                   f"sd) found a fall in the paper returns; their recent mean is {recent:.2e}/bar")]

    def _parity(self, bar: int, time: str | None, equity: float, expected: float) -> list[DriftAlert]:
        """Paper equity against the backtest replay's expectation."""
        gap = abs(math.log(equity / expected))
        tol = self.thresholds.parity_tolerance
        return self._record(bar, time, "parity", "log equity gap", gap, tol, gap > tol, "above",
                            f"paper equity {equity:.6f} differs from the backtest's {expected:.6f} "
                            f"(|log ratio| {gap:.2e} > {tol})")
