"""sentio-lab: reproducible research on PPO trading agents.

The package is laid out by the way data flows; a stage imports only the stages before it:

1. :mod:`sentio_lab.data` -- bundled and user OHLCV data, validation, quality, sessions, timeframes;
2. :mod:`sentio_lab.features` -- the causal feature bank, HMM regimes, token sequences, look-back spans;
3. :mod:`sentio_lab.env` -- the prepared market and its splits, the batched torch env and its numpy reference,
   costs, masks and benchmark anchors;
4. :mod:`sentio_lab.agents` -- networks, the PPO maths, argument groups, checkpoints, tracking, the variant table;
5. :mod:`sentio_lab.evaluation` -- greedy episodes, metrics, baselines, DSR/PBO/SPA, replays and reports;
6. :mod:`sentio_lab.experiment` -- the runner: CPCV folds x seeds x configurations, placebos, capacity;
7. :mod:`sentio_lab.scale` -- papermill sweeps, Ray Tune PBT, data-parallel training;
8. :mod:`sentio_lab.deploy` -- export, registry, decision service, paper trading, monitoring.

On top sit the files a user runs: the variants (``python -m sentio_lab.ppo``, ``ppo_masked``, ``ppo_risk``,
``ppo_transformer``), their shared :mod:`sentio_lab.run_loop`, and ``python -m sentio_lab.evaluate``.
"""
