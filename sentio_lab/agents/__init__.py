"""Stage 4, the agents: networks, the PPO maths shared by the variants, and what a training run keeps.

:mod:`~sentio_lab.agents.nets` (MLP, quantile critic, transformer), :mod:`~sentio_lab.agents.rollout` (GAE, PPO
losses), :mod:`~sentio_lab.agents.training` (training env, optimiser, minibatches),
:mod:`~sentio_lab.agents.arguments` (the shared argument groups), :mod:`~sentio_lab.agents.checkpoint` (verified
checkpoints, exact resume), :mod:`~sentio_lab.agents.constraints` (PID Lagrangian, adaptive KL),
:mod:`~sentio_lab.agents.tracking` (W&B), :mod:`~sentio_lab.agents.progress` (progress bars) and
:mod:`~sentio_lab.agents.variants` (the variant table and each variant's hooks, read by evaluation and orchestration).
The variants themselves are the single files a user runs (``python -m sentio_lab.ppo``); their shared run loop is
:mod:`sentio_lab.run_loop`.
"""
