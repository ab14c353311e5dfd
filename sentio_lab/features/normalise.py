"""Normalisation fitted on training rows (robust scaling or an empirical-CDF rank map, then clipping) and greedy
correlation pruning; fitted statistics are plain python lists."""

from __future__ import annotations

import numpy as np

#: Quantile knots of the "rank" normaliser (the empirical CDF is piecewise linear between them).
RANK_KNOTS = 101
#: IQR of a standard normal: dividing the IQR by it makes the robust scale comparable to a std.
_IQR_TO_STD = 1.3489795003921634
NORMALISERS: tuple[str, ...] = ("robust", "rank", "none")


def _fit_normaliser(x: np.ndarray, method: str) -> dict:
    """Per-column statistics of training rows ``x`` (no constant columns) as plain python lists."""
    if method == "robust":
        q25, med, q75 = np.percentile(x, [25, 50, 75], axis=0)
        scale = (q75 - q25) / _IQR_TO_STD
        # Mostly-constant columns (candlestick patterns, flags) have IQR 0; scaling them by their largest
        # training departure from the median keeps their rare events at +-1 instead of blowing them up.
        spread = np.max(np.abs(x - med), axis=0)
        scale = np.where(scale > 0, scale, spread)
        return {"method": "robust", "center": med.tolist(), "scale": scale.tolist()}
    if method == "rank":
        probs = np.linspace(0.0, 1.0, RANK_KNOTS)
        quantiles = np.quantile(x, probs, axis=0)
        knots, levels = [], []
        for j in range(x.shape[1]):
            # Tied quantiles (discrete features) collapse to one knot at the mean of their CDF levels.
            uniq, inverse = np.unique(quantiles[:, j], return_inverse=True)
            level = np.bincount(inverse, weights=2.0 * probs - 1.0) / np.bincount(inverse)
            knots.append(uniq.tolist())
            levels.append(level.tolist())
        return {"method": "rank", "knots": knots, "levels": levels}
    return {"method": "none"}


def _apply_normaliser(x: np.ndarray, params: dict, clip: float) -> np.ndarray:
    """Apply fitted statistics to ``x`` (all rows), then clip."""
    method = params["method"]
    if method == "robust":
        out = (x - np.asarray(params["center"])) / np.asarray(params["scale"])
    elif method == "rank":
        out = np.empty_like(x)
        for j in range(x.shape[1]):
            # Piecewise-linear empirical CDF; outside the training range it saturates at -1 / +1.
            out[:, j] = np.interp(x[:, j], params["knots"][j], params["levels"][j])
    else:
        return x
    return np.clip(out, -clip, clip)


def _prune(x: np.ndarray, threshold: float) -> list[int]:
    """Greedy de-duplication in column order: keep a column unless |corr| with a kept one > threshold."""
    corr = np.abs(np.corrcoef(x, rowvar=False)) if x.shape[1] > 1 else np.ones((1, 1))
    kept: list[int] = []
    for j in range(x.shape[1]):
        if not kept or np.max(corr[j, kept]) <= threshold:
            kept.append(j)
    return kept
