"""The ``"slow"`` bank: a handful of regime-normalised, multi-horizon features from closes only.

A small input set for capacity control (issue 19 s3): the full banks give a policy 10 to 150+ inputs per bar,
enough to memorise a few hundred training decisions; this bank gives six, each a slow quantity measured in
units of the market's own recent volatility, so one value means the same in a calm and in a volatile regime:

* ``slow_ret_{5,20,60}``: the log return over k bars divided by ``sigma_60 * sqrt(k)`` (a k-bar z-score);
* ``slow_dist_sma_{50,200}``: log(close / mean of the last n closes) divided by ``sigma_60 * sqrt(n)``;
* ``slow_vol_ratio``: sigma_20 / sigma_100, where the volatility regime is heading.

``sigma_w`` is the standard deviation of the last ``w`` one-bar log returns (bars ``t-w+1 .. t``), so every value
at bar ``t`` reads closes ``<= t`` only (tests/features/test_lookahead.py iterates the registry). A market that
did not move over the volatility window has no volatility unit: a return or distance is defined as 0 there (the
volatility ratio as 1), as the basic bank's close location is on a flat bar. Only closes are read, so the bank
runs on close-only data too.
"""

from __future__ import annotations

import numpy as np

from sentio_lab.features.arrays import _lag, _rolling, _safe_div
from sentio_lab.features.registry import Bars, register_feature

#: Bars of the volatility that normalises the returns and distances.
VOL_WINDOW = 60
#: Volatility windows of the regime ratio: short over long.
VOL_RATIO_WINDOWS = (20, 100)


def _log_returns(close: np.ndarray) -> np.ndarray:
    """One-bar log returns (NaN on the first bar)."""
    return np.diff(np.log(close), prepend=np.nan)


def _sigma(close: np.ndarray, window: int) -> np.ndarray:
    """Realised volatility: std of the last ``window`` one-bar log returns (defined from row ``window``)."""
    return _rolling(_log_returns(close), window, np.std)


for _k in (5, 20, 60):

    def _slow_ret(b: Bars, k: int = _k) -> dict[str, np.ndarray]:
        """Log return over k bars in units of its volatility: log(close_t / close_{t-k}) / (sigma_60 sqrt(k))."""
        logc = np.log(b.close)
        return {f"slow_ret_{k}": _safe_div(logc - _lag(logc, k), _sigma(b.close, VOL_WINDOW) * np.sqrt(k))}

    register_feature(f"slow_ret_{_k}", lookback=max(_k, VOL_WINDOW), bank="slow")(_slow_ret)

for _n in (50, 200):

    def _dist_sma(b: Bars, n: int = _n) -> dict[str, np.ndarray]:
        """Distance of the close to its n-bar mean in volatility units: log(close / SMA_n) / (sigma_60 sqrt(n))."""
        distance = np.log(b.close / _rolling(b.close, n, np.mean))
        return {f"slow_dist_sma_{n}": _safe_div(distance, _sigma(b.close, VOL_WINDOW) * np.sqrt(n))}

    register_feature(f"slow_dist_sma_{_n}", lookback=max(_n - 1, VOL_WINDOW), bank="slow")(_dist_sma)


@register_feature("slow_vol_ratio", lookback=max(VOL_RATIO_WINDOWS), bank="slow")
def _vol_ratio(b: Bars) -> dict[str, np.ndarray]:
    """Volatility regime: sigma_20 / sigma_100 (1, no change of regime, when the market did not move at all)."""
    short, long = (_sigma(b.close, w) for w in VOL_RATIO_WINDOWS)
    return {"slow_vol_ratio": _safe_div(short, long, undefined=1.0)}
