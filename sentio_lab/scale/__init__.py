"""Stage 6, scale-out: papermill sweeps (:mod:`~sentio_lab.scale.sweep`), Ray Tune and PBT
(:mod:`~sentio_lab.scale.tune`) and data-parallel training (:mod:`~sentio_lab.scale.distributed`)."""
