"""What the mask rules read besides env state: the volatility forecasts of the risk budget (EWMA and GARCH(1,1),
restarted per training segment on CPCV folds) and the regime probability, computed once per market
(:class:`MaskInputs`; the formulas are in :mod:`sentio_lab.env.masks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sentio_lab.env.masks import MaskConfig


def log_returns(close: np.ndarray) -> np.ndarray:
    """``r_t = log(C_t / C_{t-1})`` with ``r_0 = 0``."""
    close = np.asarray(close, dtype=np.float64)
    return np.r_[0.0, np.diff(np.log(close))]


def ewma_volatility(close: np.ndarray, lam: float = 0.94) -> np.ndarray:
    """``sigma_t`` of the EWMA recursion ``s2_t = lam s2_{t-1} + (1 - lam) r_t^2``, ``s2_1 = r_1^2``, ``sigma_0 = 0``.

    Row t uses closes ``<= t`` only (a forward recursion).
    """
    r = log_returns(close)
    s2 = np.zeros(len(r))
    if len(r) > 1:
        s2[1] = r[1] ** 2
    for t in range(2, len(r)):
        s2[t] = lam * s2[t - 1] + (1.0 - lam) * r[t] ** 2
    return np.sqrt(s2)


def fit_garch(close: np.ndarray, fit_range: tuple[int, int]) -> dict[str, float]:
    """GARCH(1,1) parameters ``mu, omega, alpha, beta`` (returns in percent) fitted by ``arch`` on the returns of
    bars ``fit_range = [a, b)`` only (``r_{a+1} .. r_{b-1}``: both closes inside the range)."""
    from arch import arch_model

    a, b = fit_range
    if not 0 <= a < b <= len(close) or b - a < 50:
        raise ValueError(f"fit_garch: fit_range {fit_range} must lie in the {len(close)} bars and hold >= 50 bars")
    r = 100.0 * log_returns(close)[a + 1 : b]
    result = arch_model(r, mean="Constant", vol="GARCH", p=1, q=1, dist="normal", rescale=False).fit(disp="off")
    if result.convergence_flag != 0:  # never silently: a failed fit would give wrong risk-budget masks
        raise ValueError(f"fit_garch: the GARCH(1,1) fit on bars {fit_range} did not converge "
                         f"(arch convergence flag {result.convergence_flag}); use vol_model='ewma' or more data")
    p = result.params
    return {"mu": float(p["mu"]), "omega": float(p["omega"]), "alpha": float(p["alpha[1]"]),
            "beta": float(p["beta[1]"])}


def garch_volatility(close: np.ndarray, params: dict[str, float]) -> np.ndarray:
    """``sigma_t = sqrt(h_{t+1}) / 100`` by the causal filter ``h_{t+1} = omega + alpha (100 r_t - mu)^2 +
    beta h_t`` from ``h_1 = omega / (1 - alpha - beta)`` (the long-run variance; ``h_1`` if not stationary is
    ``omega``); ``sigma_0 = 0`` (bar 0 has no return)."""
    r = 100.0 * log_returns(close)
    mu, omega, alpha, beta = params["mu"], params["omega"], params["alpha"], params["beta"]
    persistence = alpha + beta
    h = omega / (1.0 - persistence) if persistence < 1 else omega
    out = np.zeros(len(r))
    for t in range(1, len(r)):
        h = omega + alpha * (r[t] - mu) ** 2 + beta * h
        out[t] = np.sqrt(h) / 100.0
    return out


def restarted_per_segment(
    close: np.ndarray, segments: Sequence[tuple[int, int]], recursion: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """``recursion`` (a causal forecast over closes, e.g. :func:`ewma_volatility`) restarted at each segment:
    rows ``[s, e)`` hold ``recursion(close[s:e])``, so they read the closes of their own segment only; rows outside
    every segment are NaN (a training env never decides there).

    Why: on a CPCV fold the training segments have test groups between them, and a recursion over the whole series
    carries a test group's bars into every later training decision (an EWMA's memory is hundreds of bars).
    """
    close = np.asarray(close, dtype=np.float64)
    out = np.full(len(close), np.nan)
    for s, e in segments:
        if not 0 <= s < e <= len(close):
            raise ValueError(f"segment [{s}, {e}) outside the market's {len(close)} bars")
        out[s:e] = recursion(close[s:e])
    return out


@dataclass(frozen=True)
class MaskInputs:
    """Per-bar series the market-dependent rules read: ``vol[t] = sigma_t``, ``regime_prob[t] = p_t`` (float64 (T,))."""

    vol: np.ndarray | None = None
    regime_prob: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        config: MaskConfig,
        close: np.ndarray,
        features: np.ndarray,
        *,
        fit_range: tuple[int, int] | None = None,
        regime_prob: np.ndarray | None = None,
        restart_segments: Sequence[tuple[int, int]] | None = None,
    ) -> MaskInputs:
        """The series ``config`` needs from a market's closes and features.

        ``fit_range`` (bars ``[a, b)``, the training range) is where the GARCH model is fitted; it is required for
        ``vol_model="garch"`` so that a test env never fits on its own bars. ``regime_prob`` overrides
        ``config.regime_column``. With ``restart_segments`` (a fold's training segments) the volatility recursion
        restarts at each segment (:func:`restarted_per_segment`): a training decision then reads no bar outside
        its own segment, so no test group between segments reaches it.
        """
        vol = None
        if config.risk_budget is not None:
            if config.vol_model == "ewma":
                def recursion(c: np.ndarray) -> np.ndarray:
                    return ewma_volatility(c, config.ewma_lambda)
            else:
                if fit_range is None:
                    raise ValueError(
                        "MaskConfig(vol_model='garch') is fitted on the training range only: pass "
                        "mask_inputs=MaskInputs.build(config, close, features, fit_range=(train_start, train_stop))"
                    )
                params = fit_garch(close, fit_range)

                def recursion(c: np.ndarray) -> np.ndarray:
                    return garch_volatility(c, params)
            if restart_segments is None:
                vol = recursion(np.asarray(close, dtype=np.float64))
            else:
                vol = restarted_per_segment(close, restart_segments, recursion)
        prob = None
        if config.regime_threshold is not None:
            if regime_prob is not None:
                prob = np.asarray(regime_prob, dtype=np.float64)
            elif config.regime_column is not None:
                prob = np.asarray(features[:, config.regime_column], dtype=np.float64)
            else:
                raise ValueError("the regime rule needs MaskConfig.regime_column or MaskInputs(regime_prob=...)")
            if prob.shape != (len(close),):
                raise ValueError(f"regime probabilities must have shape ({len(close)},), got {prob.shape}")
        return cls(vol=vol, regime_prob=prob)


def market_mask_inputs(config: MaskConfig | None, market: Any, *, training: bool = False) -> MaskInputs | None:
    """What a variant's env and its evaluation read for ``config`` on a prepared market (``sentio_lab.env.market``).

    The GARCH forecast is fitted on the longest training segment only (the ``"train"`` range of a chronological
    market), never on an evaluated range. The regime rule reads the most volatile state's filtered probability,
    the last column of the market's ``"regime"`` block (states are ordered by volatility), unless
    ``config.regime_column`` names another. None when the env's own defaults serve every rule.

    ``training=True`` on a fold market (``market.train_segments`` set: CPCV / purged walk-forward) gives the
    training env's inputs: the EWMA / GARCH recursion restarts at each training segment, so no training decision
    depends on a test group's bars (issue 17). Evaluation envs (``training=False``) read the whole-series causal
    forecast: a test decision may read every earlier bar.
    """
    if config is None:
        return None
    restart = training and getattr(market, "train_segments", None) is not None and config.risk_budget is not None
    garch = config.risk_budget is not None and config.vol_model == "garch"
    regime = config.regime_threshold is not None and config.regime_column is None
    if not (garch or regime or restart):
        return None
    fit_range = max(market.training_segments(), key=lambda seg: (seg[1] - seg[0], -seg[0]))
    arrays = market.arrays
    prob = None
    if regime:
        if "regime" not in market.features.blocks:
            raise ValueError("the regime mask rule needs regime features: pass --regimes N (N >= 2)")
        prob = arrays.features[:, market.features.blocks["regime"].stop - 1]
    segments = tuple((int(s), int(e)) for s, e in market.training_segments()) if restart else None
    return MaskInputs.build(config, arrays.close, arrays.features, fit_range=(int(fit_range[0]), int(fit_range[1])),
                            regime_prob=prob, restart_segments=segments)
