"""What the portfolio envs read (:class:`PortfolioArrays`, built from a panel by :func:`build_portfolio_arrays`), the
weight checks of both allocation modes and the one fill formula of a whole portfolio (:func:`portfolio_fill`),
written once for numpy and torch alike (the torch env, the numpy reference env and the vectorbt replay share it).

Sizing (the portfolio form of :func:`sentio_lab.env.costs.rebalance`'s rule). Target weights ``w_i`` are weights of
the equity *after* the rebalance's own costs, ``E'``: asset i ends holding ``w_i E'`` of notional at the fill price
``p_i``. With ``V = cash + sum_i s_i p_i`` the equity at the fill prices, the trade of asset i is the notional
``y_i = |w_i E' - s_i p_i|`` (capped: ``min(., cap_i)``) and costs ``C_i(y_i) = y_i c_i(y_i)`` where, as in
:mod:`sentio_lab.env.costs.execution`, ``rate_i(y) = slippage + half_spread_i + eta_i phi(y)`` is the price concession
and ``c = (1 + fee)(1 + rate) - 1`` buying, ``1 - (1 - fee)(1 - rate)`` selling. So ``E'`` solves

    E' = V - sum_i C_i(|w_i E' - s_i p_i|),

solved by Newton's method from ``E' = V`` (``g(E') = E' + sum_i C_i - V`` is increasing, its slope
``1 + sum_i +-w_i C_i'`` near 1, smooth between the kinks where a gap changes sign and that asset's cost is ~0):
:data:`SIZING_STEPS` steps, a fixed count (no data-dependent branch: the torch env never syncs). Measured against
a 200-step bisection (tests/env/test_portfolio_ledger.py): 3 steps reach rounding for costs up to ~11 % of the
traded notional (Almgren-Chriss on a large capital), 2 do not (4e-7). A plain fixed-point iteration needed 10.
With every ``w_i`` in
``[0, 1]`` summing to at most 1 the account never borrows cash; a long-short book holds the short proceeds as cash.

Per-asset cost inputs (half-spread, impact coefficient ``eta``, participation cap) are each asset's own, computed by
:func:`sentio_lab.env.arrays.fill_arrays` on that asset's bars exactly as for a single market. A capped order fills
``cap_i`` and stops; ``remainder="carry"`` is refused (every step re-targets every asset, so there is no order left
to carry).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from sentio_lab.data.panel import PanelData
from sentio_lab.env.arrays import FILL_PRICES, FillPrice, MarketArrays, fill_arrays
from sentio_lab.env.costs import CostModel, bars_per_day, year_fractions
from sentio_lab.features import FeatureConfig, build_observation_features
from sentio_lab.features.exogenous import EXOGENOUS_BLOCK, shared_exogenous

#: Newton steps of the post-cost equity (module doc: 3 reach rounding in the steepest case measured).
SIZING_STEPS = 6
#: ``"long_only"``: weights on the simplex with a cash weight; ``"long_short"``: signed weights, sum |w| <= gross.
Allocation = Literal["long_only", "long_short"]
ALLOCATIONS: tuple[str, ...] = ("long_only", "long_short")
#: What a weight vector outside the allowed set does: ``"refuse"`` (ValueError) or ``"project"`` (mapped onto it).
InvalidWeights = Literal["refuse", "project"]
INVALID_WEIGHTS: tuple[str, ...] = ("refuse", "project")
#: Long-only weights may miss the simplex by this much (a float32 softmax sums to 1 within ~1e-7) and are rescaled.
SIMPLEX_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PortfolioArrays:
    """Prices ``(T, A)`` and per-asset causal features ``(T, A, F)`` of a panel, for the portfolio envs."""

    open: np.ndarray
    """float64 (T, A) opens (NaN allowed with next-close fills)."""
    close: np.ndarray
    """float64 (T, A) closes: the portfolio is marked here."""
    features: np.ndarray
    """float32 (T, A, F): row t depends on bars <= t only; finite from ``first_valid`` on."""
    assets: tuple[str, ...]
    """Asset names (axis 1)."""
    feature_names: tuple[str, ...] = ()
    """Names of the F feature columns (per asset; cross-sectional ones are ``"xs_rank:<name>"``)."""
    first_valid: int = 0
    """First row where every asset's features are defined."""
    year_fraction: np.ndarray | None = None
    """float64 (T,) calendar years from bar t-1's close to bar t's (borrow); None without timestamps."""
    high: np.ndarray | None = None
    """float64 (T, A) highs (spread models only), or None."""
    low: np.ndarray | None = None
    """float64 (T, A) lows (spread models only), or None."""
    volume: np.ndarray | None = None
    """float64 (T, A) volumes (impact, participation caps; never observed), or None."""
    bars_per_day: float | np.ndarray = 1.0
    """Bars per day known at each bar (:func:`sentio_lab.env.costs.bars_per_day`)."""
    fill_price: FillPrice = "next_open"
    """Where decision t fills: bar t+1's open or its close (``"next_close"``: close-only panels)."""

    def __post_init__(self) -> None:
        """Check shapes and finiteness once."""
        t, a = self.close.shape
        if self.open.shape != (t, a) or self.features.ndim != 3 or self.features.shape[:2] != (t, a):
            raise ValueError(f"PortfolioArrays: open {self.open.shape}, close {self.close.shape} and features "
                             f"{self.features.shape} must share (T, A)")
        if len(self.assets) != a:
            raise ValueError(f"PortfolioArrays: {len(self.assets)} asset names for {a} columns")
        if self.fill_price not in FILL_PRICES:
            raise ValueError(f"PortfolioArrays: fill_price={self.fill_price!r}; choose from {list(FILL_PRICES)}")
        if not 0 <= self.first_valid < t:
            raise ValueError(f"PortfolioArrays: first_valid={self.first_valid} outside [0, {t})")
        prices = self.fill[self.first_valid:], self.close[self.first_valid:]
        for name, values in zip(("fill", "close"), prices, strict=True):
            bad = ~(np.isfinite(values) & (values > 0))
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise ValueError(f"PortfolioArrays: {name} price of asset {self.assets[col]!r} at row "
                                 f"{row + self.first_valid} is {values[row, col]} (must be finite and > 0)")
        bad = ~np.isfinite(self.features[self.first_valid:]).all(axis=(1, 2))
        if bad.any():
            rows = np.flatnonzero(bad)[:5] + self.first_valid
            raise ValueError(f"PortfolioArrays: non-finite features at rows {rows}")

    @property
    def fill(self) -> np.ndarray:
        """float64 (T, A): the price a fill *on* bar t happens at (open or close, ``fill_price``)."""
        return self.close if self.fill_price == "next_close" else self.open

    @property
    def num_assets(self) -> int:
        """A."""
        return self.close.shape[1]

    def asset_market(self, asset: int) -> MarketArrays:
        """Asset ``asset``'s bars as a single-asset :class:`~sentio_lab.env.MarketArrays` (its first feature only):
        the cost inputs of each asset come from the single-asset functions."""
        def col(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else np.ascontiguousarray(x[:, asset])
        return MarketArrays(open=col(self.open), close=col(self.close),
                            features=np.ascontiguousarray(self.features[:, asset, :1]), first_valid=self.first_valid,
                            year_fraction=self.year_fraction, high=col(self.high), low=col(self.low),
                            volume=col(self.volume), bars_per_day=self.bars_per_day, fill_price=self.fill_price)


def cross_sectional_ranks(values: np.ndarray) -> np.ndarray:
    """float32 (T, A, F): each feature's rank across the A assets at bar t (ties averaged), scaled to [-1, 1].

    Row t reads row t of ``values`` only, so ranks are as causal as the features they rank."""
    ranks = rankdata(values, axis=1, method="average")
    return (2.0 * (ranks - 1.0) / (values.shape[1] - 1) - 1.0).astype(np.float32)


def build_portfolio_arrays(
    panel: PanelData,
    feature_config: FeatureConfig = FeatureConfig(bank="close"),
    *,
    train_stop: int | None = None,
    train_rows: np.ndarray | None = None,
    cross_sectional: bool = False,
    fill_price: FillPrice | None = None,
) -> tuple[PortfolioArrays, dict[str, dict]]:
    """Per-asset causal features fitted on the training rows only (``train_stop`` or the boolean ``train_rows``,
    as :func:`sentio_lab.features.build_observation_features` takes them), optionally joined by their cross-sectional
    ranks (:func:`cross_sectional_ranks`); returns the arrays and each asset's fitted feature state.

    ``fill_price`` defaults to next open, next close for a close-only panel (which refuses next open).

    Exogenous series (``feature_config.exogenous``) are market-wide: their block is computed once on the panel's
    calendar and z-scored once on the training rows (:func:`sentio_lab.features.exogenous.shared_exogenous`), then
    appended, identical, to every asset's features after the cross-sectional ranks (a rank of a value every asset
    shares is a constant); each asset's state records the shared fit under ``"exogenous"``.
    """
    fill_price = fill_price or ("next_close" if panel.close_only else "next_open")
    if panel.close_only and fill_price == "next_open":
        raise ValueError(f"{panel.name} is close-only (no opens): fill at the next close (fill_price='next_close')")
    if panel.close_only and feature_config.bank != "close":
        raise ValueError(f"{panel.name} is close-only: build its features with FeatureConfig(bank='close') "
                         "(--feature-bank close)")
    blocks, states, names, first_valid = [], {}, None, 0
    per_asset = dataclasses.replace(feature_config, exogenous=())  # the market-wide block is built once, below
    for asset in panel.assets:
        built = build_observation_features(panel.frames[asset], train_stop, per_asset, train_rows=train_rows)
        if names is None:
            names = built.names
        elif built.names != names:
            raise ValueError(f"asset {asset!r}: its features {built.names} differ from {panel.assets[0]!r}'s "
                             f"{names} (a column constant or pruned on one asset's training rows); drop prune_corr "
                             "or widen the training range")
        blocks.append(built.values)
        states[asset] = built.state
        first_valid = max(first_valid, built.first_valid)
    features = np.stack(blocks, axis=1)
    features[:first_valid] = 0.0
    names = tuple(names or ())
    if cross_sectional:
        ranks = cross_sectional_ranks(features)
        ranks[:first_valid] = 0.0
        features = np.concatenate([features, ranks], axis=2)
        names = names + tuple(f"xs_rank:{n}" for n in names)
    if feature_config.exogenous:
        features, names, first_valid = _with_shared_exogenous(panel, feature_config, features, names, first_valid,
                                                              states, train_stop, train_rows)
    index = panel.index
    column = panel.column
    known = not panel.close_only
    arrays = PortfolioArrays(
        open=column("open"), close=column("close"), features=np.ascontiguousarray(features, dtype=np.float32),
        assets=panel.assets, feature_names=names, first_valid=first_valid,
        year_fraction=year_fractions(index) if isinstance(index, pd.DatetimeIndex) else None,
        high=column("high") if known else None, low=column("low") if known else None,
        volume=column("volume") if known else None,
        bars_per_day=bars_per_day(index, len(index)), fill_price=fill_price,
    )
    return arrays, states


def _with_shared_exogenous(panel: PanelData, config: FeatureConfig, features: np.ndarray, names: tuple[str, ...],
                           first_valid: int, states: dict[str, dict], train_stop: int | None,
                           train_rows: np.ndarray | None) -> tuple[np.ndarray, tuple[str, ...], int]:
    """``features`` with the shared exogenous block appended to every asset (:func:`build_portfolio_arrays`)."""
    n = len(panel.index)
    rows = np.arange(n) < train_stop if train_rows is None else np.asarray(train_rows, dtype=bool)
    base_freq = pd.Timedelta(int(next(iter(states.values()))["base_freq_ns"]), unit="ns")  # from training rows
    shared = shared_exogenous(panel.index, config.exogenous, base_freq, rows, warmup=first_valid,
                              normalise=config.normalise != "none", clip=config.clip)
    for state in states.values():
        state[EXOGENOUS_BLOCK] = shared.state
    block = np.broadcast_to(shared.values[:, None, :], (n, features.shape[1], shared.values.shape[1]))
    features = np.concatenate([features, block], axis=2)
    features[:shared.first_valid] = 0.0
    return features, names + tuple(shared.names), max(first_valid, shared.first_valid)


def asset_fill_arrays(arrays: PortfolioArrays, costs: CostModel, first: int, last: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per decision bar and asset, float64 (T, A) each: (half-spread, impact eta, fill cap) from each asset's own bars
    (:func:`sentio_lab.env.arrays.fill_arrays`); None for the flat model. Errors name the asset."""
    if costs.remainder == "carry" and costs.participation is not None:
        raise ValueError("CostModel.remainder='carry' cannot apply to a portfolio: every step re-targets every "
                         "asset, so no capped order is left to carry; use remainder='cancel'")
    if costs.is_flat:
        return None
    per_asset = []
    for a, asset in enumerate(arrays.assets):
        try:
            per_asset.append(fill_arrays(arrays.asset_market(a), costs, first, last))
        except ValueError as err:
            raise ValueError(f"asset {asset!r}: {err}") from err
    return tuple(np.column_stack([p[k] for p in per_asset]) for k in range(3))


def check_weights(weights, allocation: str, gross_limit: float, invalid: str, num_assets: int):
    """Asset weights ``(..., A)`` from an action (numpy or torch, float): long-only takes ``(..., A + 1)`` with the
    cash weight last, non-negative and summing to 1 (within :data:`SIMPLEX_TOLERANCE`, then rescaled); long-short
    takes ``(..., A)`` with ``sum |w| <= gross_limit``. Outside: ValueError (``invalid="refuse"``) or the nearest
    allowed vector by a simple map (``"project"``: long-only clips below 0 and rescales, all zero -> all cash;
    long-short scales down to the gross limit)."""
    is_torch = isinstance(weights, torch.Tensor)
    width = num_assets + 1 if allocation == "long_only" else num_assets
    if weights.shape[-1] != width:
        what = f"{num_assets} asset weights + cash" if allocation == "long_only" else f"{num_assets} asset weights"
        raise ValueError(f"step: expected actions of width {width} ({what}, allocation={allocation!r}), "
                         f"got shape {tuple(weights.shape)}")
    if not (weights.isfinite().all() if is_torch else np.isfinite(weights).all()):
        raise ValueError("step: non-finite target weights")
    if allocation == "long_only":
        total = weights.sum(-1, keepdim=True) if is_torch else weights.sum(-1, keepdims=True)
        bad = (weights < 0).any(-1) | (abs(total[..., 0] - 1.0) > SIMPLEX_TOLERANCE)
        if invalid == "project":
            weights = weights.clamp_min(0.0) if is_torch else np.maximum(weights, 0.0)
            total = weights.sum(-1, keepdim=True) if is_torch else weights.sum(-1, keepdims=True)
            cash = weights[..., -1:] + (total == 0)  # all zero -> all cash
            weights = (torch.cat if is_torch else np.concatenate)([weights[..., :-1], cash], -1)
            total = weights.sum(-1, keepdim=True) if is_torch else weights.sum(-1, keepdims=True)
        elif bool(bad.any()):
            raise ValueError("step: long-only target weights must be >= 0 and sum to 1 (assets + cash), got sums "
                             f"{_shown(total[..., 0][bad])}; pass invalid_weights='project' to map them")
        return (weights / total)[..., :-1]
    gross = abs(weights).sum(-1)
    over = gross > gross_limit * (1.0 + 1e-12)
    if invalid == "project":
        floor = gross.clamp_min(gross_limit) if is_torch else np.maximum(gross, gross_limit)
        return weights * (gross_limit / floor)[..., None]
    if bool(over.any()):
        raise ValueError(f"step: gross exposure sum |w| = {_shown(gross[over])} above gross_limit {gross_limit}; "
                         "pass invalid_weights='project' to scale them down")
    return weights


def _shown(values) -> list[float]:
    return [round(float(v), 6) for v in values.reshape(-1)[:5].tolist()]


class PortfolioFill(NamedTuple):
    """One rebalance of each account: the account after it and what it cost."""

    cash: object
    shares: object
    """Shares held after the fill (..., A)."""
    delta: object
    """Shares traded per asset (buy > 0)."""
    rate: object
    """Price concession per asset (slippage + half-spread + impact)."""
    capped: object
    """Where the participation cap stopped an asset's fill short of its target (bool)."""
    cost: object
    """Costs paid (fees and concessions), in equity units."""


def _where(cond, a, b):
    return torch.where(cond, a, b) if isinstance(cond, torch.Tensor) else np.where(cond, a, b)


def _minimum(a, b):
    return torch.minimum(a, b) if isinstance(a, torch.Tensor) else np.minimum(a, b)


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else np.sqrt(x)


def portfolio_fill(cash, shares, price, weights, costs: CostModel, half, eta, cap, hold=None) -> PortfolioFill:
    """Rebalance to ``weights`` (of the post-cost equity, module doc) at ``price``; numpy or torch, any leading
    batch shape: ``cash`` (...), ``shares`` / ``price`` / ``weights`` / ``half`` / ``eta`` / ``cap`` (..., A).
    ``hold`` (bool (...), optional): accounts that do not trade at all this step (their ``weights`` are ignored)."""
    if hold is not None:  # a held account trades nothing: a zero cap on every asset, the target its own weights
        cap = _where(hold[..., None], 0.0 * weights, cap)  # (0 x an infinite cap would be NaN)
    fee, slippage = costs.fee, costs.slippage
    sqrt_impact, impact = costs.impact == "sqrt", costs.impact != "none"
    value = shares * price
    at_price = cash + value.sum(-1)
    base = slippage + half

    alpha = 0.5 if sqrt_impact else 1.0

    def trade(target):
        """Each asset's gap, traded notional and cost at the post-cost equity ``target``, and d(cost)/d(target)."""
        gap = weights * target[..., None] - value
        size = _minimum(abs(gap), cap)
        buy = gap > 0
        if impact:
            phi = _sqrt(size) if sqrt_impact else size
            rate = base + eta * phi
            steep = alpha * eta * phi  # size x d(rate)/d(size)
        else:
            rate, steep = base + 0.0 * size, 0.0 * size
        cost = _where(buy, size * ((1.0 + fee) * (1.0 + rate) - 1.0), size * (1.0 - (1.0 - fee) * (1.0 - rate)))
        marginal = _where(buy, (1.0 + fee) * (1.0 + rate + steep) - 1.0, 1.0 - (1.0 - fee) * (1.0 - rate - steep))
        slope = _where(abs(gap) < cap, marginal * _where(buy, weights, -weights), 0.0 * size)
        return gap, size, cost, slope

    # Newton on g(E') = E' + sum_i C_i(E') - V from E' = V: g is increasing (the slope 1 + sum_i +-w_i C_i' stays
    # near 1) and smooth between the kinks where a gap changes sign (where that asset's cost is ~0 anyway).
    target = at_price
    for _ in range(SIZING_STEPS):
        _, _, cost, slope = trade(target)
        target = target - (target + cost.sum(-1) - at_price) / (1.0 + slope.sum(-1))
    gap, size, _, _ = trade(target)
    capped = abs(gap) > cap
    sign = _where(gap > 0, 1.0 + 0.0 * gap, -1.0 + 0.0 * gap)
    # A complete move to flat sells exactly the shares held (no rounding residue), as costs.rebalance does.
    delta = _where((weights == 0) & ~capped, -shares + 0.0 * gap, sign * size / price)
    traded = abs(delta) * price
    rate = base + eta * (_sqrt(traded) if sqrt_impact else traded) if impact else base + 0.0 * traded
    executed = _where(delta > 0, price * (1.0 + rate), price * (1.0 - rate))
    traded_value = delta * executed
    fee_paid = abs(traded_value) * fee
    new_cash = cash - traded_value.sum(-1) - fee_paid.sum(-1)
    paid = (traded_value - delta * price + fee_paid).sum(-1)
    if hold is not None:  # a held account was not capped: it placed no order
        capped = capped & ~hold[..., None]
    return PortfolioFill(new_cash, shares + delta, delta, rate, capped, paid)


def asset_weights(cash, shares, close):
    """Held weights at the mark, (..., A + 1): each asset's ``shares x close / equity`` and the cash weight last."""
    value = shares * close
    equity = cash + value.sum(-1)
    held = value / equity[..., None]
    cash_weight = (cash / equity)[..., None]
    return torch.cat([held, cash_weight], -1) if isinstance(held, torch.Tensor) else np.concatenate(
        [held, cash_weight], -1)


def check_allocation(allocation: str, gross_limit: float, invalid: str) -> None:
    """Validate the env's allocation options, naming the bad one."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r}; choose from {ALLOCATIONS}")
    if invalid not in INVALID_WEIGHTS:
        raise ValueError(f"invalid_weights={invalid!r}; choose from {INVALID_WEIGHTS}")
    if not (np.isfinite(gross_limit) and gross_limit > 0):
        raise ValueError(f"gross_limit must be finite and > 0, got {gross_limit}")
    if allocation == "long_only" and gross_limit != 1.0:
        raise ValueError(f"gross_limit={gross_limit} applies to allocation='long_short' only (long-only weights sum "
                         "to 1 with cash)")
