"""Experiment runner (issue 6, in progress): variants x configurations x seeds x paths, plus the baselines.

Done so far: :mod:`~sentio_lab.experiment.config` (experiment TOML files) and :mod:`~sentio_lab.experiment.cells`
(one resumable training cell with optional model selection on a validation slice). The runner itself
(``python -m sentio_lab.experiment``: folds, worker processes, results table) is not written yet.
"""
