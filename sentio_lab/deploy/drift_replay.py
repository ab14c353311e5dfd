"""Planted-shift replays that measure the drift monitor: how many bars after a known change it alerts, and how
often it alerts on a stationary stream.

A replay is a synthetic daily market, ``x_t = mu_t + sigma_t eps_t`` (close-to-close log returns, a pure-noise
overnight gap), whose first ``train_bars`` bars are the training range: the project's observation features
(:func:`sentio_lab.features.observation.build_observation_features`, basic bank, a 2-state filtered HMM) are
fitted there and applied causally to the rest. The policy is a fixed rule on the normalised 5-bar return: ``+1``
unless it is below ``-0.5`` (then flat) or below ``-2`` (then short), so its levels react to the scale of the
features as a trained policy's would. Its "evaluation" is the same rule on an independent stationary market of the
same process, cut into ``oos_paths`` paths (the stand-in for the CPCV out-of-sample paths). The live stream then
either stays stationary or changes at ``shift_bar`` (bars after the training range): ``"volatility"`` multiplies
sigma by ``factor``, ``"drift"`` flips the sign of mu.

``python -m sentio_lab.deploy.drift_replay --seeds 0 1 2 3 4 5 6 7`` prints the figures quoted in
docs/deployment.md ("Drift detection").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sentio_lab.deploy.alerts import DriftAlert, DriftThresholds, MemoryAlertSink
from sentio_lab.deploy.drift import fit_reference, observation_blocks
from sentio_lab.deploy.drift_monitor import DriftMonitor
from sentio_lab.features import FeatureConfig, build_observation_features

#: The rule policy's levels.
LEVELS: tuple[float, ...] = (-1.0, 0.0, 1.0)
#: Kinds that a volatility shift should raise, and kinds that a flipped drift should raise.
VOLATILITY_KINDS = ("feature_psi", "feature_ks", "regime", "action", "volatility_change")
PERFORMANCE_KINDS = ("sharpe", "drawdown", "performance_change")


def planted_market(n_bars: int, seed: int, *, shift: str | None = None, shift_at: int | None = None,
                   sigma: float = 0.01, mu: float = 0.001, factor: float = 2.0) -> pd.DataFrame:
    """OHLCV of ``x_t = mu_t + sigma_t eps_t``; from row ``shift_at`` on sigma is ``factor`` times larger
    (``shift="volatility"``) or mu changes sign (``shift="drift"``)."""
    if shift not in (None, "volatility", "drift"):
        raise ValueError(f"shift must be None, 'volatility' or 'drift', got {shift!r}")
    if (shift is None) != (shift_at is None):
        raise ValueError("give shift and shift_at together")
    rng = np.random.default_rng(seed)
    mus = np.full(n_bars, mu)
    sigmas = np.full(n_bars, sigma)
    if shift == "volatility":
        sigmas[shift_at:] *= factor
    elif shift == "drift":
        mus[shift_at:] *= -1.0
    x = mus + sigmas * rng.standard_normal(n_bars)
    gap = 0.5 * sigmas * rng.standard_normal(n_bars)
    close = 100.0 * np.exp(np.cumsum(x))
    open_ = close * np.exp(gap - x)
    spread = np.exp(np.abs(rng.normal(0.0, 0.3 * sigma, (2, n_bars))))
    frame = pd.DataFrame({"open": open_, "high": np.maximum(open_, close) * spread[0],
                          "low": np.minimum(open_, close) / spread[1], "close": close,
                          "volume": np.round(1e6 * np.exp(rng.normal(0.0, 0.3, n_bars)))},
                         index=pd.bdate_range("2000-01-03", periods=n_bars, name="date"))
    return frame


def rule_levels(features: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The replay's policy: +1, flat below -0.5, short below -2 on the normalised ``ret_5`` feature."""
    signal = np.asarray(features)[:, list(names).index("ret_5")]
    return np.where(signal < -2.0, -1.0, np.where(signal < -0.5, 0.0, 1.0))


def policy_equity(levels: np.ndarray, close: np.ndarray) -> np.ndarray:
    """Equity of holding ``levels[t]`` from close t to close t+1 (no costs), starting at 1.0."""
    x = np.diff(np.log(np.asarray(close, dtype=np.float64)))
    return np.exp(np.concatenate([[0.0], np.cumsum(np.asarray(levels)[:-1] * x)]))


@dataclass(frozen=True)
class ReplayResult:
    """A replay's alerts, where the shift was planted (row of the live frame) and how many live bars ran."""

    alerts: list[DriftAlert]
    shift_bar: int | None
    live_bars: int

    def first_delay(self, kinds: Sequence[str]) -> int | None:
        """Bars from the shift to the first alert of ``kinds`` at or after it; None when none came."""
        bars = [a.bar for a in self.alerts if a.kind in kinds and self.shift_bar is not None
                and a.bar >= self.shift_bar]
        return None if not bars else min(bars) - self.shift_bar

    def false_alarms(self) -> int:
        """Alerts before the shift (every alert of a stationary replay)."""
        return sum(1 for a in self.alerts if self.shift_bar is None or a.bar < self.shift_bar)


def run_replay(seed: int, *, shift: str | None = None, live_bars: int = 1500, shift_after: int = 500,
               train_bars: int = 1000, oos_paths: int = 10, oos_bars: int = 500,
               thresholds: DriftThresholds | None = None, factor: float = 2.0, mu: float = 0.001) -> ReplayResult:
    """Fit the reference on the training range and the evaluation market, stream the live bars through a
    :class:`~sentio_lab.deploy.drift_monitor.DriftMonitor` and return its alerts (``shift_after`` live bars
    before the shift, when there is one)."""
    thresholds = thresholds or DriftThresholds()
    n = train_bars + live_bars
    shift_bar = None if shift is None else train_bars + shift_after
    frame = planted_market(n, seed, shift=shift, shift_at=shift_bar, factor=factor, mu=mu)
    observation = build_observation_features(frame, train_bars, FeatureConfig(regimes=2))
    features, names, regime = observation_blocks(observation)
    train = slice(observation.first_valid, train_bars)
    # The evaluation: the same rule on an independent stationary market, features from the training state.
    evaluation_frame = planted_market(oos_paths * oos_bars + observation.first_valid, seed + 10_000, mu=mu)
    evaluation = build_observation_features(evaluation_frame, len(evaluation_frame), FeatureConfig(regimes=2),
                                            observation.state)
    eval_features, _, _ = observation_blocks(evaluation)
    eval_rows = slice(evaluation.first_valid, None)
    eval_levels = rule_levels(eval_features[eval_rows], names)
    eval_close = evaluation_frame["close"].to_numpy()[eval_rows]
    paths = [policy_equity(eval_levels[i * oos_bars:(i + 1) * oos_bars], eval_close[i * oos_bars:(i + 1) * oos_bars])
             for i in range(oos_paths)]
    market_returns = np.diff(np.log(frame["close"].to_numpy()))
    reference = fit_reference(
        features[train], names, psi_bins=thresholds.psi_bins, regime_probabilities=regime[train], levels=LEVELS,
        evaluation_levels=eval_levels, market_returns=market_returns[:train_bars - 1], oos_paths=paths,
        performance_window=thresholds.performance_window)
    sink = MemoryAlertSink()
    monitor = DriftMonitor(reference, thresholds, sink)
    levels = rule_levels(features, names)
    equity = policy_equity(levels[train_bars:], frame["close"].to_numpy()[train_bars:])
    for k, t in enumerate(range(train_bars, n)):
        monitor.update(t, time=frame.index[t], features=features[t], regime=regime[t], level=levels[t],
                       equity=equity[k], expected_equity=equity[k], market_return=market_returns[t - 1])
    return ReplayResult(alerts=sink.alerts, shift_bar=shift_bar, live_bars=live_bars)


def _delays_line(delays: Sequence[int | None]) -> str:
    """``[...] bars (median m, worst w, missed k)`` for a list of detection delays (None: never detected)."""
    found = [d for d in delays if d is not None]
    summary = f"median {int(np.median(found))}, worst {max(found)}" if found else "none detected"
    return f"{list(delays)} bars ({summary}, missed {len(delays) - len(found)} of {len(delays)})"


def _figures(seeds: Sequence[int], live_bars: int, shift_after: int, mu: float) -> None:
    """Print detection delays and false-alarm rates over ``seeds``."""
    for shift, kinds in (("volatility", VOLATILITY_KINDS), ("drift", PERFORMANCE_KINDS)):
        runs = [run_replay(s, shift=shift, live_bars=live_bars, shift_after=shift_after, mu=mu) for s in seeds]
        print(f"{shift} shift at live bar {shift_after} (mu={mu}): first alert of {kinds} after "
              f"{_delays_line([r.first_delay(kinds) for r in runs])}")
        for kind in kinds:
            print(f"  {kind:>20}: {_delays_line([r.first_delay((kind,)) for r in runs])}")
    runs = [run_replay(s, live_bars=live_bars, mu=mu) for s in seeds]
    total = sum(r.live_bars for r in runs)
    alarms = [a for r in runs for a in r.alerts]
    print(f"stationary: {len(alarms)} alerts over {total} live bars ({1000 * len(alarms) / total:.2f} per 1000 bars)")
    for kind in sorted({a.kind for a in alarms}):
        print(f"  {kind:>20}: {sum(a.kind == kind for a in alarms)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: measure the monitor's detection delays and false alarms over seeds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--live-bars", type=int, default=3000)
    parser.add_argument("--shift-after", type=int, default=1000)
    parser.add_argument("--mu", type=float, default=0.001, help="drift per bar (flipped by the drift shift)")
    args = parser.parse_args(argv)
    _figures(args.seeds, args.live_bars, args.shift_after, args.mu)


if __name__ == "__main__":  # pragma: no cover
    main()
