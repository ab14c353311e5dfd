"""Stage 3, the market an agent trades: the batched torch env and its numpy reference, costs, masks and anchors.

* :mod:`~sentio_lab.env.market`: a dataset prepared for trading (features fitted on training bars, ranges);
  :mod:`~sentio_lab.env.splits`: chronological ranges, purged walk-forward and CPCV folds, episode samplers.
* :mod:`~sentio_lab.env.arrays`: the market arrays both envs read, fills, valid starts;
  :mod:`~sentio_lab.env.trading`: :class:`TradingEnv` (batched, torch); :mod:`~sentio_lab.env.reference`:
  :class:`NumpyTradingEnv` (one episode, gymnasium).
* :mod:`~sentio_lab.env.costs` (fees, slippage, spread, impact, participation, borrow),
:mod:`~sentio_lab.env.orderbook`,
  :mod:`~sentio_lab.env.masks` (action masks), :mod:`~sentio_lab.env.anchor` (benchmark-anchored tilts).

The env's names are re-exported here, so ``from sentio_lab.env import TradingEnv`` works.
"""

from sentio_lab.env.arrays import (
    _MIN_EQUITY,
    DEFAULT_POSITIONS,
    FILL_PRICES,
    WINDOW_MATRIX_MAX_BYTES,
    FillPrice,
    MarketArrays,
    StartSampler,
    check_positions,
    check_ruin_fraction,
    episode_start_bounds,
    fill_arrays,
)
from sentio_lab.env.reference import NumpyTradingEnv
from sentio_lab.env.trading import TradingEnv

__all__ = [
    "DEFAULT_POSITIONS", "FILL_PRICES", "WINDOW_MATRIX_MAX_BYTES", "FillPrice", "MarketArrays", "NumpyTradingEnv",
    "StartSampler", "TradingEnv", "_MIN_EQUITY", "check_positions", "check_ruin_fraction", "episode_start_bounds",
    "fill_arrays",
]
