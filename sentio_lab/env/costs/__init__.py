"""Transaction costs shared by both environments and the vectorbt replay.

* :mod:`~sentio_lab.env.costs.model`: :class:`CostModel` (fee, slippage, borrow, and the options below) and the
  closed-form :func:`rebalance` of the flat fee + slippage model (the default, unchanged);
* :mod:`~sentio_lab.env.costs.estimators`: causal half-spread (Corwin-Schultz, Abdi-Ranaldo), sigma_daily and ADV;
* :mod:`~sentio_lab.env.costs.execution`: :func:`execute`, fills with half-spread, square-root or Almgren-Chriss
  impact on the capital in currency, and a participation cap.
"""

from sentio_lab.env.costs.estimators import (
    CostInputs,
    abdi_ranaldo,
    average_daily_volume,
    bars_per_day,
    corwin_schultz,
    cost_inputs,
    cost_reach,
    daily_volatility,
)
from sentio_lab.env.costs.execution import FILL_REASONS, Fill, execute, fill_cap, fill_reason, impact_eta
from sentio_lab.env.costs.model import (
    BPS,
    CAP_VOLUMES,
    IMPACT_MODELS,
    REMAINDERS,
    SPREAD_MODELS,
    VOLUME_KINDS,
    YEAR,
    ArrayT,
    CostModel,
    borrow_cost,
    rebalance,
    year_fractions,
)

__all__ = [
    "BPS", "CAP_VOLUMES", "FILL_REASONS", "IMPACT_MODELS", "REMAINDERS", "SPREAD_MODELS", "VOLUME_KINDS", "YEAR",
    "ArrayT", "CostInputs", "CostModel", "Fill", "abdi_ranaldo", "average_daily_volume", "bars_per_day",
    "borrow_cost", "corwin_schultz", "cost_inputs", "cost_reach", "daily_volatility", "execute", "fill_cap",
    "fill_reason", "impact_eta", "rebalance", "year_fractions",
]
