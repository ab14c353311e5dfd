"""A stylised limit order book: the Santa Fe zero-intelligence model, vectorised over many books, for execution.

The model (Daniels, Farmer, Gillemot, Iori, Smith 2003; Farmer, Patelli, Zovko 2005): order flow is random.
On a grid of ``levels`` price ticks, each book receives, per unit of event time,

* limit orders of one unit at rate ``limit_rate`` per tick per side, placed uniformly on the ``width`` ticks
  behind the opposite best quote (buys on ``[ask - width, ask - 1]``, sells on ``[bid + 1, bid + width]``);
* market orders of one unit at rate ``market_rate`` per side, which take the best opposite quote;
* cancellations at rate ``cancel_rate`` per resting unit (a uniformly chosen resting unit leaves).

The books are simulated one event per book per step (a uniformised Gillespie scheme: each book draws which
event happens with probability proportional to its rates), so ``B`` books advance together by numpy array
operations on ``(B, levels)`` depth arrays; time is counted in events. Written here rather than taken from a
library: no maintained package ships a vectorised zero-intelligence book (the ABIDES / PyLOB simulators are
event-driven, one book at a time, and far slower for thousands of books).

:func:`execute_parent` runs a parent (meta) order of ``Q`` units in every book, split into equal child market
orders at regular intervals over a horizon, alongside the random flow, and measures its impact: the move of
the mid price from the start to the end of the execution, and the average fill price against the starting mid.
Books with ``Q = 0`` measure the unperturbed volatility and the volume the rest of the market trades over the
same horizon, so that the measured impact can be set against ``Y sigma sqrt(Q / V)``.

The default rates give books whose memory (``1 / cancel_rate`` = 500 events) is longer than the default execution
horizon (100 events): the regime where a metaorder's impact in this model is concave (it walks a depth profile
that thickens away from the quotes). Executed slowly against a book that renews itself many times, the Santa Fe
model's impact becomes linear instead (Toth et al. 2011: the square root needs liquidity with long memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ZIParams:
    """Rates of the Santa Fe model (per unit of event time) and the price grid."""

    limit_rate: float = 0.02
    """limit-order rate per tick level per side"""
    market_rate: float = 0.2
    """market-order rate per side (units per event time)"""
    cancel_rate: float = 0.002
    """cancellation rate per resting unit"""
    width: int = 40
    """ticks behind the opposite best quote on which limit orders land"""
    levels: int = 500
    """ticks on the price grid (the mid starts in the middle)"""
    tick: float = 0.01
    """price of one tick (the mid starts at ``levels / 2`` ticks)"""

    def __post_init__(self) -> None:
        """Reject rates that are not positive and grids too small for the placement width."""
        if min(self.limit_rate, self.market_rate, self.cancel_rate, self.tick) <= 0:
            raise ValueError(f"ZIParams: rates and tick must be positive, got {self}")
        if not (1 <= self.width and 4 * self.width <= self.levels):
            raise ValueError(f"ZIParams: need 1 <= width and 4 * width <= levels, got {self.width}, {self.levels}")


class ZIBooks:
    """``n_books`` independent Santa Fe books (depth arrays ``bids``, ``asks`` of shape ``(n_books, levels)``)."""

    def __init__(self, n_books: int, params: ZIParams = ZIParams(), seed: int = 0, streams: int | None = None) -> None:
        """Start every book symmetric around the middle of the grid with its mean-field depth on ``width`` ticks.

        ``streams``: number of distinct random order flows; book ``b`` receives flow ``b % streams`` (common random
        numbers: books that differ only by a parent order then see the same random events, and their difference
        is the parent's impact with most of the noise removed). None: every book its own flow.
        """
        self.params, self.n = params, int(n_books)
        self.streams = self.n if streams is None else int(streams)
        if not 1 <= self.streams <= self.n:
            raise ValueError(f"ZIBooks: streams must be in [1, {self.n}], got {streams}")
        self.rng = np.random.default_rng(seed)
        self._stream = np.arange(self.n) % self.streams
        p = params
        self.price = np.arange(p.levels) * p.tick
        mid = p.levels // 2
        depth = p.limit_rate / p.cancel_rate  # stationary depth far from the quotes
        self.bids = np.zeros((self.n, p.levels))
        self.asks = np.zeros((self.n, p.levels))
        self.bids[:, mid - p.width : mid] = depth
        self.asks[:, mid + 1 : mid + 1 + p.width] = depth
        self.volume = np.zeros(self.n)
        """units traded by the random market orders so far (both sides)"""
        self._rows = np.arange(self.n)

    # ----------------------------------------------------------------------------------------- quotes
    def best_bid(self) -> np.ndarray:
        """Level of the best bid per book (-1 when the bid side is empty)."""
        has = self.bids > 0
        last = self.params.levels - 1 - np.argmax(has[:, ::-1], axis=1)
        return np.where(has.any(axis=1), last, -1)

    def best_ask(self) -> np.ndarray:
        """Level of the best ask per book (``levels`` when the ask side is empty)."""
        has = self.asks > 0
        return np.where(has.any(axis=1), np.argmax(has, axis=1), self.params.levels)

    def mid(self) -> np.ndarray:
        """Mid price per book (in price units)."""
        return 0.5 * (self.best_bid() + self.best_ask()) * self.params.tick

    # ------------------------------------------------------------------------------------------ orders
    def market_buy(self, size: np.ndarray) -> np.ndarray:
        """Take ``size`` units (per book, may be fractional) from the asks upward; return the cost paid per book."""
        return self._take(self.asks, np.asarray(size, dtype=np.float64))

    def market_sell(self, size: np.ndarray) -> np.ndarray:
        """Hit ``size`` units from the bids downward; return the proceeds per book."""
        return self._take(self.bids[:, ::-1], np.asarray(size, dtype=np.float64), reverse=True)

    def _take(self, side: np.ndarray, size: np.ndarray, reverse: bool = False) -> np.ndarray:
        before = np.cumsum(side, axis=1) - side  # depth in front of each level
        take = np.clip(size[:, None] - before, 0.0, side)
        side -= take  # side may be a reversed view: writes through
        prices = self.price[::-1] if reverse else self.price
        return take @ prices

    def step(self) -> None:
        """One random event per book (limit buy / sell, market buy / sell, or cancellation), drawn by its rate."""
        p, n, rng = self.params, self.n, self.rng
        resting = self.bids.sum(axis=1) + self.asks.sum(axis=1)
        rates = np.stack([np.full(n, p.limit_rate * p.width)] * 2 + [np.full(n, p.market_rate)] * 2
                         + [p.cancel_rate * resting], axis=1)
        cumulative = np.cumsum(rates, axis=1)
        draws = rng.random((3, self.streams))[:, self._stream]  # event, placement, cancellation
        u = draws[0] * cumulative[:, -1]
        event = (u[:, None] >= cumulative).sum(axis=1)
        bid, ask = self.best_bid(), self.best_ask()
        offset = 1 + np.minimum((draws[1] * p.width).astype(np.int64), p.width - 1)
        rows = self._rows
        buy = event == 0
        level = np.clip(ask - offset, 0, p.levels - 1)
        self.bids[rows[buy], level[buy]] += 1.0
        sell = event == 1
        level = np.clip(bid + offset, 0, p.levels - 1)
        self.asks[rows[sell], level[sell]] += 1.0
        one = np.ones(n)
        mbuy, msell = event == 2, event == 3
        if mbuy.any():
            self._take_rows(self.asks, mbuy, one)
        if msell.any():
            self._take_rows(self.bids, msell, one, reverse=True)
        self.volume += (mbuy | msell)
        cancel = np.flatnonzero(event == 4)
        if len(cancel):
            depth = np.concatenate([self.bids[cancel], self.asks[cancel]], axis=1)
            total = np.cumsum(depth, axis=1)
            pick = (draws[2][cancel] * total[:, -1])[:, None] >= total
            column = pick.sum(axis=1)
            on_bid = column < p.levels
            amount = np.minimum(1.0, depth[np.arange(len(cancel)), column])
            self.bids[cancel[on_bid], column[on_bid]] -= amount[on_bid]
            self.asks[cancel[~on_bid], column[~on_bid] - p.levels] -= amount[~on_bid]

    def _take_rows(self, side: np.ndarray, rows: np.ndarray, size: np.ndarray, reverse: bool = False) -> None:
        sub = side[rows][:, ::-1] if reverse else side[rows]
        before = np.cumsum(sub, axis=1) - sub
        sub = sub - np.clip(size[rows][:, None] - before, 0.0, sub)
        side[rows] = sub[:, ::-1] if reverse else sub


@dataclass
class ParentExecution:
    """What :func:`execute_parent` measured, per book."""

    size: np.ndarray
    """parent order size Q (units; 0 for control books)"""
    mid_move: np.ndarray
    """mid at the end of the execution minus mid at its start (price units)"""
    shortfall: np.ndarray
    """average fill price minus the starting mid (price units; NaN for control books)"""
    start_mid: np.ndarray
    """mid when the execution started"""
    market_volume: np.ndarray
    """units the random market orders traded over the execution horizon"""


def execute_parent(
    sizes: np.ndarray,
    *,
    params: ZIParams = ZIParams(),
    warmup: int = 1500,
    horizon: int = 100,
    children: int = 20,
    seed: int = 0,
    streams: int | None = None,
) -> ParentExecution:
    """Buy ``sizes[b]`` units in book ``b`` as ``children`` equal market orders spread evenly over ``horizon``
    events, after ``warmup`` events of random flow (module doc). ``sizes`` of 0 are control books; ``streams``
    as :class:`ZIBooks` (e.g. ``sizes = np.repeat(levels, paths)`` with ``streams = paths``: every size on the
    same ``paths`` random flows)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    books = ZIBooks(len(sizes), params, seed=seed, streams=streams)
    for _ in range(warmup):
        books.step()
    start_mid, start_volume = books.mid(), books.volume.copy()
    child = sizes / children
    every = max(1, horizon // children)
    paid = np.zeros(len(sizes))
    for k in range(horizon):
        books.step()
        if k % every == 0 and k // every < children:
            paid += books.market_buy(child)
    end_mid = books.mid()
    with np.errstate(invalid="ignore", divide="ignore"):
        shortfall = np.where(sizes > 0, paid / sizes - start_mid, np.nan)
    return ParentExecution(size=sizes, mid_move=end_mid - start_mid, shortfall=shortfall, start_mid=start_mid,
                           market_volume=books.volume - start_volume)


def fit_impact(result: ParentExecution) -> dict[str, float]:
    """Fit the measured impact against ``Y sigma sqrt(Q / V)`` (module doc).

    ``sigma`` is the standard deviation of the control books' mid move over the horizon, ``V`` their mean market
    volume; the impact of a size is the mean mid move of its books less the controls' mean. Returns the free
    exponent ``delta`` of ``impact ~ (Q / V)^delta`` (a log-log least-squares slope: 0.5 is the square root, 1 is
    linear), and ``Y`` fitted with the exponent fixed at 0.5 (least squares of impact on ``sigma sqrt(Q / V)``).
    """
    control = result.size == 0
    if not control.any() or control.all():
        raise ValueError("fit_impact: need control books (size 0) and books that traded")
    sigma = float(np.std(result.mid_move[control], ddof=1))
    volume = float(np.mean(result.market_volume[control]))
    sizes = np.unique(result.size[~control])
    base = result.mid_move[control]
    # same-flow pairs (common random numbers) when every size has as many books as the controls; else means
    paired = all(np.count_nonzero(result.size == q) == len(base) for q in sizes)
    impact = np.array([np.mean(result.mid_move[result.size == q] - base) if paired
                       else np.mean(result.mid_move[result.size == q]) - np.mean(base) for q in sizes])
    x = sizes / volume
    keep = impact > 0
    slope = float(np.polyfit(np.log(x[keep]), np.log(impact[keep]), 1)[0])
    regressor = sigma * np.sqrt(x)
    y = float(regressor @ impact / (regressor @ regressor))
    return {"Y": y, "delta": slope, "sigma": sigma, "volume": volume}
