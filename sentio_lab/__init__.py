"""sentio-lab: reproducible research on PPO trading agents.

Data and causal features (:mod:`sentio_lab.data`, :mod:`sentio_lab.features`), the batched trading env and its
costs (:mod:`sentio_lab.env`, :mod:`sentio_lab.env.costs`), the PPO variants that a user runs as single files
(``python -m sentio_lab.ppo``, ``ppo_masked``, ``ppo_risk``, ``ppo_transformer``), honest out-of-sample evaluation
(:mod:`sentio_lab.evaluation.episodes`, :mod:`sentio_lab.experiment`) and scale-out (:mod:`sentio_lab.scale.sweep`,
:mod:`sentio_lab.scale.tune`, :mod:`sentio_lab.scale.distributed`).
"""
