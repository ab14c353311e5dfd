"""Stage 5, judging agents out of sample: episodes, metrics, baselines, statistical inference, replays, reports.

:mod:`~sentio_lab.evaluation.episodes` (greedy episodes of one or many agents), :mod:`~sentio_lab.evaluation.metrics`,
:mod:`~sentio_lab.evaluation.baselines` (baselines as policies), :mod:`~sentio_lab.evaluation.inference`
(DSR, PBO, SPA, bootstrap), :mod:`~sentio_lab.evaluation.backtest` (vectorbt replay and the plain ledger),
:mod:`~sentio_lab.evaluation.report`, :mod:`~sentio_lab.evaluation.agent_report` and
:mod:`~sentio_lab.evaluation.run_summary` (the reports of one checkpoint or run). Experiments over folds, seeds and
placebos are orchestrated by :mod:`sentio_lab.experiment`.
"""
