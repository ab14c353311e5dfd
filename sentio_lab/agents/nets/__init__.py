"""Networks shared by the PPO variants, one module per family.

* :mod:`sentio_lab.agents.nets.core`: layer init, the running observation normaliser, masked categorical
  distributions and the MLP actor-critic of ``ppo`` / ``ppo_masked``;
* further modules (quantile critics, multi-timeframe transformers) sit beside it and are imported from there.
"""

from sentio_lab.agents.nets.core import (
    MaskedCategorical,
    MLPActorCritic,
    RunningObsNorm,
    check_mask,
    favour_action,
    layer_init,
    masked_argmax,
    mlp,
)

__all__ = [
    "MLPActorCritic",
    "MaskedCategorical",
    "RunningObsNorm",
    "check_mask",
    "favour_action",
    "layer_init",
    "masked_argmax",
    "mlp",
]
