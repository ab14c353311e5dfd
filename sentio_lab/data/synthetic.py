"""Planted-signal markets: synthetic daily OHLCV with a known predictable component and its oracle.

Two families, each seeded and reproducible, each with an *oracle policy* (the best position on the default
levels ``{-1, 0, +1}`` given what is known at the close of bar t) and the oracle's Sharpe ratio computed from the
process parameters:

* :class:`AR1Market`: close-to-close log returns ``x_t`` follow an AR(1), ``x_t = phi x_{t-1} + eps_t``,
  ``eps_t ~ N(0, sigma^2)``.
* :class:`RegimeMarket`: a hidden two-state Markov chain ``S_t`` (stay probability ``p``) sets the drift,
  ``x_t = mu_{S_t} + eps_t`` with ``mu = (+mu, -mu)``.

Timing (why the opens are real)
-------------------------------
The env fills the decision taken at the close of bar t at the **open of bar t+1**. If opens copied the previous
close the stale-open rule would refuse the data, and if the predictable part sat in the overnight gap the env
could never earn it. So every close-to-close return is split into an *overnight gap* ``g_t = log(o_t / c_{t-1})``
and an *intraday* part ``a_t = log(c_t / o_t)``: the gap is pure noise, ``g_t ~ N(0, s_g^2)``, and the whole
predictable mean sits in the intraday part, ``a_t = m_{t-1} + e_t`` with ``e_t ~ N(0, sigma^2 - s_g^2)``
(``s_g^2 = overnight_share * sigma^2``). ``m_{t-1}`` is the forecast known at the close of t-1
(``phi x_{t-1}``, or ``mu_{S_t}`` for the regime market, whose state the agent can only filter). A position
decided at the close of t and filled at the open of t+1 therefore earns the whole predictable mean, and the
env's bar return of t+1 is ``w_{t-1} g_{t+1} + w_t a_{t+1}`` (the old position holds through the gap).

Oracle Sharpe (per bar; annualised by ``sqrt(252)``)
---------------------------------------------------
With ``w_t = sign(forecast_t)``, bar returns ``R_{t+1} = w_{t-1} g_{t+1} + w_t a_{t+1}`` and costs
``c |w_t - w_{t-1}|`` per bar (``c = (fee_bps + slippage_bps) / 1e4``, paid on the traded notional; a flip from
-1 to +1 trades 2), the Sharpe ratio is ``E[N] / sd(N)`` with ``N = R - c D``, ``D = |w_t - w_{t-1}|``:
``E[N] = E[R] - c E[D]`` and ``Var N = Var R + c^2 Var D - 2 c Cov(R, D)``; the gap term is independent of
everything else and adds ``s_g^2`` to ``E[R^2]``. The sample Sharpe of a stationary series converges to this
ratio whatever its autocorrelation.

* AR(1), ``s^2 = sigma^2 / (1 - phi^2)`` the stationary variance of ``x``, ``q = 1/2 - arcsin(phi) / pi`` the
  probability of a sign change between neighbouring returns (orthant probability of a bivariate normal with
  correlation ``phi``): ``E[R] = phi s sqrt(2/pi)``, ``E[R^2] = sigma^2 + phi^2 s^2``, ``E[D] = 2q``,
  ``Var D = 4q(1-q)``, ``E[R D] = 2 phi s (1 - phi) / sqrt(2 pi)`` (from
  ``E[X 1{X>0, Y<0}] = (1 - rho) / (2 sqrt(2 pi))`` for a standard bivariate normal).
* Regime, *true-state* policy ``w_t = sign(mu_{S_t})`` (it knows the hidden state: a reference bound, not an
  achievable policy): ``E[R] = mu (2p - 1)``, ``E[R^2] = sigma^2 + mu^2``, ``E[D] = 2(1-p)``,
  ``Var D = 4p(1-p)``, ``Cov(R, D) = 0`` (the next state depends on the current one only).
* Regime, *filtered* policy ``w_t = sign(P(S_{t+1} = up | x_{<=t}) - 1/2)`` (Hamilton filter): no closed form.
  :meth:`RegimeMarket.filtered_sharpe` computes it by simulation (``SIMULATED_BARS`` bars in independent paths,
  a fixed seed), labelled "simulated"; its standard error is about ``1 / sqrt(bars) * sqrt(252)`` (0.016 with
  1,000,000 bars).

The formulas use additive log returns; the env compounds simple returns and holds shares between trades, a
difference of order ``sigma^2`` per bar that the tests bound. :func:`ar1_for_sharpe` / :func:`regime_for_sharpe`
solve for ``phi`` / ``mu`` so that the oracle's **net** Sharpe (default costs: fee 1 bp + slippage 1 bp per fill)
hits a rung; at rung 0 there is no signal (``phi = 0`` / ``mu = 0``) and the oracle is flat (Sharpe 0).
The oracle is the sign of the forecast, which ignores costs: a cost-aware policy (a no-trade band) can earn a
little more net, so a captured share above 1 is possible in principle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.signal import lfilter
from scipy.special import expit, logit

#: Bars per year of the synthetic daily markets (the lab's convention for daily bars).
BARS_PER_YEAR = 252
#: The oracle (net) Sharpe ratios per year of the ladder.
RUNGS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
#: Cost per unit of traded notional of the default env: fee 1 bp + slippage 1 bp per fill.
DEFAULT_COST_BPS = 2.0
#: Bars simulated by :meth:`RegimeMarket.filtered_sharpe` (in ``SIMULATION_PATHS`` independent paths).
SIMULATED_BARS = 1_000_000
SIMULATION_PATHS = 200
#: Bars a simulated filter path runs before its returns count (the filter forgets its flat prior).
FILTER_BURN_IN = 250


@dataclass(frozen=True)
class SyntheticPath:
    """One simulated market: its OHLCV frame and the hidden quantities behind it."""

    frame: pd.DataFrame
    """Canonical OHLCV (business days from 2000-01-03, float64 ``open high low close volume``)."""
    forecast: np.ndarray
    """Predictable mean of the next bar's intraday return known at each close (``m_t``); for the regime market the
    true-state one, ``mu_{S_{t+1}}``, which no policy can know."""
    state: np.ndarray | None = None
    """Hidden regime per bar (0 up, 1 down); None for AR(1)."""


def _frame(x: np.ndarray, gap: np.ndarray, rng: np.random.Generator, start_price: float = 100.0) -> pd.DataFrame:
    """OHLCV from close-to-close log returns ``x`` and overnight gaps ``gap`` (bar 0: open = close / e^{x_0 - g_0}).

    Highs and lows widen the open-close range by independent half-normal amounts and volume is independent
    lognormal noise: neither carries information about the future.
    """
    log_close = math.log(start_price) + np.cumsum(x)
    log_open = log_close - x + gap
    close, open_ = np.exp(log_close), np.exp(log_open)
    sigma = max(float(np.std(x)), 1e-4)
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0.0, 0.3 * sigma, len(x))))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0.0, 0.3 * sigma, len(x))))
    volume = np.round(1e6 * np.exp(rng.normal(0.0, 0.3, len(x))))
    index = pd.bdate_range("2000-01-03", periods=len(x), name="date")
    return pd.DataFrame({"open": open_, "high": high, "low": low, "close": close, "volume": volume}, index=index)


def _check(n_bars: int, sigma: float, overnight_share: float) -> None:
    if n_bars < 2 or sigma <= 0 or not 0.0 <= overnight_share < 1.0:
        raise ValueError(f"synthetic market: need n_bars >= 2, sigma > 0, 0 <= overnight_share < 1; got "
                         f"{n_bars}, {sigma}, {overnight_share}")


def close_returns(close: np.ndarray) -> np.ndarray:
    """Close-to-close log returns, ``x_0 = 0`` (no previous close)."""
    return np.diff(np.log(np.asarray(close, dtype=np.float64)), prepend=np.log(close[0]))


def _sharpe(mean: float, second: float, cost: float, e_d: float, var_d: float, e_rd: float) -> float:
    """Annualised ``E[R - cD] / sd(R - cD)`` from the moments of R and D (module docstring)."""
    var = (second - mean**2) + cost**2 * var_d - 2.0 * cost * (e_rd - mean * e_d)
    return (mean - cost * e_d) / math.sqrt(var) * math.sqrt(BARS_PER_YEAR)


@dataclass(frozen=True)
class AR1Market:
    """Close-to-close log returns ``x_t = phi x_{t-1} + eps_t``, the mean in the intraday part (module docstring)."""

    phi: float
    sigma: float = 0.01
    """Innovation sd of the daily close-to-close log return."""
    overnight_share: float = 0.25
    """Share of the innovation variance in the overnight gap (pure noise)."""

    def __post_init__(self) -> None:
        if not -1.0 < self.phi < 1.0:
            raise ValueError(f"AR1Market: need |phi| < 1 (stationary), got phi={self.phi}")
        _check(2, self.sigma, self.overnight_share)

    @property
    def name(self) -> str:
        """``ar1_phi0.1234``."""
        return f"ar1_phi{self.phi:.4f}"

    def simulate(self, n_bars: int, seed: int) -> SyntheticPath:
        """``n_bars`` daily bars from the stationary distribution; the same seed gives the same bars."""
        _check(n_bars, self.sigma, self.overnight_share)
        rng = np.random.default_rng(seed)
        s_gap = math.sqrt(self.overnight_share) * self.sigma
        s_day = math.sqrt(1.0 - self.overnight_share) * self.sigma
        gap, day = rng.normal(0.0, s_gap, n_bars), rng.normal(0.0, s_day, n_bars)
        first = rng.normal(0.0, self.sigma / math.sqrt(1.0 - self.phi**2))  # stationary start
        # x_t = phi x_{t-1} + gap_t + day_t as a linear filter (scipy's lfilter), started from x_0 = first
        x = np.r_[first, lfilter([1.0], [1.0, -self.phi], (gap + day)[1:], zi=[self.phi * first])[0]]
        return SyntheticPath(frame=_frame(x, gap, rng), forecast=self.phi * x)

    def oracle_weights(self, close: np.ndarray) -> np.ndarray:
        """``sign(phi x_t)`` from closes ``<= t`` (0 where the forecast is 0: bar 0, or phi = 0)."""
        return np.sign(self.phi * close_returns(close))

    def oracle_sharpe(self, cost_bps: float = DEFAULT_COST_BPS) -> float:
        """Exact annualised Sharpe of :meth:`oracle_weights` net of ``cost_bps`` per unit traded (module doc)."""
        if self.phi == 0:
            return 0.0  # no signal: the oracle is flat
        phi, c = abs(self.phi), cost_bps / 1e4
        s = self.sigma / math.sqrt(1.0 - phi**2)
        q = 0.5 - math.asin(phi) / math.pi
        mean = phi * s * math.sqrt(2.0 / math.pi)
        e_rd = 2.0 * phi * s * (1.0 - phi) / math.sqrt(2.0 * math.pi)
        return _sharpe(mean, self.sigma**2 + phi**2 * s**2, c, 2.0 * q, 4.0 * q * (1.0 - q), e_rd)

    def gross_sharpe(self) -> float:
        """:meth:`oracle_sharpe` without costs."""
        return self.oracle_sharpe(0.0)


def filtered_up_probability(close: np.ndarray, mu: float, p_stay: float, sigma: float) -> np.ndarray:
    """Hamilton filter of :class:`RegimeMarket`: ``P(S_{t+1} = up | closes <= t)`` per bar (rows: bars).

    ``close`` may be ``(T,)`` or ``(T, paths)``. Bar 0 starts from the stationary prior 1/2.
    """
    x = close_returns(close) if np.ndim(close) == 1 else np.diff(np.log(close), axis=0, prepend=np.log(close[:1]))
    # log-likelihood ratio of up vs down for each return: N(mu, sigma) vs N(-mu, sigma)
    llr = 2.0 * mu * x / sigma**2
    out = np.empty_like(x)
    predicted = np.full(x.shape[1:], 0.5)
    for t in range(len(x)):  # sequential by nature; vectorised over paths
        if t == 0:
            filtered = predicted
        else:
            filtered = expit(logit(predicted) + llr[t])
        predicted = p_stay * filtered + (1.0 - p_stay) * (1.0 - filtered)
        out[t] = predicted
    return out


@dataclass(frozen=True)
class RegimeMarket:
    """A hidden two-state Markov chain sets the drift ``+mu`` (state 0) or ``-mu`` (state 1) of the return."""

    mu: float
    p_stay: float = 0.98
    """Probability of staying in the current state per bar (mean regime length ``1 / (1 - p_stay)`` bars)."""
    sigma: float = 0.01
    overnight_share: float = 0.25

    def __post_init__(self) -> None:
        if self.mu < 0 or not 0.5 < self.p_stay < 1.0:
            raise ValueError(f"RegimeMarket: need mu >= 0 and 0.5 < p_stay < 1, got mu={self.mu}, "
                             f"p_stay={self.p_stay}")
        _check(2, self.sigma, self.overnight_share)

    @property
    def name(self) -> str:
        """``regime_mu0.00123``."""
        return f"regime_mu{self.mu:.5f}"

    def _states(self, n_bars: int, rng: np.random.Generator, paths: int | None = None) -> np.ndarray:
        shape = (n_bars,) if paths is None else (n_bars, paths)
        switch = rng.random(shape) >= self.p_stay
        first = rng.integers(0, 2, shape[1:])  # the stationary distribution is (1/2, 1/2)
        switch[0] = first.astype(bool)
        return (np.cumsum(switch, axis=0) % 2).astype(np.int64)

    def _returns(self, states: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s_gap = math.sqrt(self.overnight_share) * self.sigma
        s_day = math.sqrt(1.0 - self.overnight_share) * self.sigma
        gap = rng.normal(0.0, s_gap, states.shape)
        x = np.where(states == 0, self.mu, -self.mu) + gap + rng.normal(0.0, s_day, states.shape)
        return x, gap

    def simulate(self, n_bars: int, seed: int) -> SyntheticPath:
        """``n_bars`` daily bars; ``state`` holds the hidden regime. The same seed gives the same bars."""
        _check(n_bars, self.sigma, self.overnight_share)
        rng = np.random.default_rng(seed)
        states = self._states(n_bars, rng)
        x, gap = self._returns(states, rng)
        drift = np.where(states == 0, self.mu, -self.mu)
        return SyntheticPath(frame=_frame(x, gap, rng), forecast=np.r_[drift[1:], drift[-1]], state=states)

    def oracle_weights(self, close: np.ndarray) -> np.ndarray:
        """The filtered-probability policy: ``sign(P(up next) - 1/2)`` from closes ``<= t``."""
        if self.mu == 0:
            return np.zeros(len(close))
        return np.sign(filtered_up_probability(close, self.mu, self.p_stay, self.sigma) - 0.5)

    @staticmethod
    def true_state_weights(state: np.ndarray) -> np.ndarray:
        """The reference policy that knows the hidden state at t: +1 in the up state, -1 in the down state."""
        return np.where(np.asarray(state) == 0, 1.0, -1.0)

    def true_state_sharpe(self, cost_bps: float = DEFAULT_COST_BPS) -> float:
        """Exact annualised Sharpe of :meth:`true_state_weights` net of ``cost_bps`` (module docstring)."""
        if self.mu == 0:
            return 0.0
        p, c = self.p_stay, cost_bps / 1e4
        mean = self.mu * (2.0 * p - 1.0)
        e_d = 2.0 * (1.0 - p)
        return _sharpe(mean, self.sigma**2 + self.mu**2, c, e_d, 4.0 * p * (1.0 - p), mean * e_d)

    def filtered_sharpe(self, cost_bps: float = DEFAULT_COST_BPS, *, bars: int = SIMULATED_BARS,
                        seed: int = 0) -> float:
        """Annualised Sharpe of :meth:`oracle_weights` net of ``cost_bps``, **simulated** (no closed form):
        ``bars`` bars in :data:`SIMULATION_PATHS` paths, the first :data:`FILTER_BURN_IN` of each dropped."""
        if self.mu == 0:
            return 0.0
        return _simulated_filtered_sharpe(self, cost_bps, bars, seed)

    def oracle_sharpe(self, cost_bps: float = DEFAULT_COST_BPS) -> float:
        """The oracle of this market is the filtered policy: :meth:`filtered_sharpe` (simulated)."""
        return self.filtered_sharpe(cost_bps)


@lru_cache(maxsize=64)
def _simulated_filtered_sharpe(market: RegimeMarket, cost_bps: float, bars: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    length = bars // SIMULATION_PATHS + FILTER_BURN_IN
    states = market._states(length, rng, SIMULATION_PATHS)
    x, gap = market._returns(states, rng)
    close = np.exp(np.cumsum(x, axis=0))
    w = np.sign(filtered_up_probability(close, market.mu, market.p_stay, market.sigma) - 0.5)
    return policy_sharpe(w, x, gap, cost_bps, burn_in=FILTER_BURN_IN)


def policy_sharpe(weights: np.ndarray, x: np.ndarray, gap: np.ndarray, cost_bps: float = DEFAULT_COST_BPS, *,
                  burn_in: int = 1) -> float:
    """Annualised Sharpe of the env's additive bar returns ``w_{t-1} g_{t+1} + w_t a_{t+1} - c|w_t - w_{t-1}|``.

    ``weights`` (decided at each close), close-to-close returns ``x`` and gaps ``gap``: ``(T,)`` or ``(T, paths)``
    (pooled). Decisions from bar ``burn_in`` on count (the position before it is flat).
    """
    w = np.asarray(weights, dtype=np.float64)[burn_in - 1 : -1].copy()
    w[0] = 0.0  # the position held into bar burn_in
    prev, cur = w[:-1], w[1:]  # w_{t-1}, w_t for t = burn_in .. T-2
    gap_next, day_next = gap[burn_in + 1 :], (x - gap)[burn_in + 1 :]
    bar = prev * gap_next + cur * day_next - cost_bps / 1e4 * np.abs(cur - prev)
    bar = bar[1:].ravel()  # the first bar holds the entry from flat
    return float(bar.mean() / bar.std(ddof=1) * math.sqrt(BARS_PER_YEAR))


def ar1_for_sharpe(target: float, *, sigma: float = 0.01, overnight_share: float = 0.25,
                   cost_bps: float = DEFAULT_COST_BPS) -> AR1Market:
    """The AR(1) market whose oracle earns ``target`` Sharpe per year net of ``cost_bps`` (0: ``phi = 0``)."""
    if target == 0:
        return AR1Market(0.0, sigma, overnight_share)
    if target < 0:
        raise ValueError(f"ar1_for_sharpe: the oracle's Sharpe is >= 0 by construction, got target={target}")
    phi = brentq(lambda p: AR1Market(p, sigma, overnight_share).oracle_sharpe(cost_bps) - target, 1e-6, 0.95,
                 xtol=1e-10)
    return AR1Market(float(phi), sigma, overnight_share)


def regime_for_sharpe(target: float, *, p_stay: float = 0.98, sigma: float = 0.01, overnight_share: float = 0.25,
                      cost_bps: float = DEFAULT_COST_BPS) -> RegimeMarket:
    """The regime market whose filtered oracle earns ``target`` Sharpe per year net of ``cost_bps`` (simulated,
    common random numbers across ``mu``, so the root is that of one fixed simulation); 0: ``mu = 0``."""
    if target == 0:
        return RegimeMarket(0.0, p_stay, sigma, overnight_share)
    if target < 0:
        raise ValueError(f"regime_for_sharpe: the oracle's Sharpe is >= 0 by construction, got target={target}")

    def gap(mu: float) -> float:
        return RegimeMarket(mu, p_stay, sigma, overnight_share).filtered_sharpe(cost_bps) - target

    mu = brentq(gap, 1e-5, 0.5 * sigma, xtol=1e-7)
    return RegimeMarket(float(mu), p_stay, sigma, overnight_share)


@dataclass(frozen=True)
class LadderMarket:
    """One rung of the ladder written to disk: the file ``--dataset`` reads and what it was made from."""

    family: str
    rung: float
    market: AR1Market | RegimeMarket
    path: Path
    seed: int
    n_bars: int


def write_ladder(folder: str | Path, *, n_bars: int = 8000, seed: int = 0, rungs: tuple[float, ...] = RUNGS,
                 families: tuple[str, ...] = ("ar1", "regime")) -> list[LadderMarket]:
    """Write one CSV per family and rung (``<family>_sharpe<rung>.csv``, readable by ``--dataset PATH``)."""
    out = []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for family in families:
        for rung in rungs:
            if family == "ar1":
                market: AR1Market | RegimeMarket = ar1_for_sharpe(rung)
            elif family == "regime":
                market = regime_for_sharpe(rung)
            else:
                raise ValueError(f"write_ladder: unknown family {family!r}; choose ar1 or regime")
            path = folder / f"{family}_sharpe{rung:g}.csv"
            market.simulate(n_bars, seed).frame.to_csv(path)
            out.append(LadderMarket(family, rung, market, path, seed, n_bars))
    return out


@dataclass(frozen=True)
class OracleRule:
    """A market's oracle as a baseline rule (the interface :class:`sentio_lab.evaluation.baselines.WeightPolicy`
    reads), so the
    oracle trades through the env like any baseline: ``WeightPolicy(OracleRule(market), history, positions)``."""

    market: AR1Market | RegimeMarket
    name: str = "oracle"
    exposures: tuple[float, ...] = (1.0, -1.0)

    def weights(self, history: object) -> np.ndarray:
        """The oracle's weight per bar from the closes of a :class:`~sentio_lab.evaluation.baselines.PriceHistory`."""
        return self.market.oracle_weights(history.close)  # type: ignore[attr-defined]
