"""What the evaluation said of a model (:class:`Verdict`), where it comes from, and the promotion :class:`Gate`.

A verdict comes from one of (in order of strength):

* an experiment's output folder (:func:`verdict_from_experiment`): the runner's ``results.parquet`` and
  ``equity.parquet`` through the report's own tests (:func:`sentio_lab.experiment.summary.infer`), the placebo gap
  from ``memorisation.parquet`` when the placebo control ran;
* a ``verdict.json`` (:meth:`Verdict.from_json`);
* the checkpoint's own test range against buy-and-hold (:func:`verdict_from_checkpoint`: the greedy run ``python -m
  sentio_lab.evaluate`` reports; one path, one configuration).

The registry (:mod:`sentio_lab.deploy.registry`) tags each version with its verdict and lets a version become
``champion`` only when :meth:`Gate.failures` is empty.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Tag prefix of the verdict's fields on a model version.
VERDICT_TAG = "verdict."


@dataclass(frozen=True)
class Verdict:
    """What the evaluation said of a model, as tagged on its version (NaN / None: not measured)."""

    median_sharpe: float
    """Median out-of-sample Sharpe ratio (annualised, net of costs) over paths x seeds."""
    dsr: float
    """Deflated Sharpe ratio (median over runs; PSR(0) with one configuration tried)."""
    pbo: float
    """Probability of backtest overfitting (CSCV; NaN with one configuration)."""
    spa_p_value: float
    """Consistent SPA p-value of "the model does not beat every baseline" (small: it beats them all)."""
    spa_reverse_p_value: float
    """Consistent SPA p-value of "no baseline beats the model" (small: a baseline is better: the model is worse)."""
    benchmark: str
    """The benchmark of the tests (the best baseline)."""
    source: str
    """Where the numbers come from (an experiment folder, a checkpoint's test range, a file)."""
    placebo_gap: float | None = None
    """Median in-sample Sharpe minus the placebo floor (None: no placebo control ran)."""

    def to_tags(self) -> dict[str, str]:
        """The version tags (``verdict.<field>``, values as text)."""
        return {VERDICT_TAG + k: "" if v is None else str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Verdict:
        """The verdict recorded in version tags (:meth:`to_tags`); a missing number reads NaN."""
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            text = tags.get(VERDICT_TAG + item.name, "")
            if item.name in ("benchmark", "source"):
                values[item.name] = text
            elif item.name == "placebo_gap":
                values[item.name] = float(text) if text else None
            else:
                values[item.name] = float(text) if text else math.nan
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> Verdict:
        """Read a ``verdict.json`` (the fields of this class; unknown keys are an error naming them)."""
        data = json.loads(Path(path).read_text())
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown verdict field(s) {unknown}")
        data.setdefault("source", str(path))
        return cls(**{k: (math.nan if v is None and k not in ("placebo_gap",) else v) for k, v in data.items()})


#: How :func:`verdict_from_checkpoint` begins a verdict's ``source``: one path, one trial.
SINGLE_PATH_SOURCE = "checkpoint "


@dataclass(frozen=True)
class Gate:
    """The conditions a version must meet to become ``champion`` (each None: not checked)."""

    spa_alpha: float | None = 0.05
    """Not worse than its benchmark by the SPA test: the reverse SPA p-value must be >= this."""
    min_dsr: float | None = 0.5
    """The deflated Sharpe ratio must be above this."""
    min_sharpe: float | None = None
    """The median out-of-sample Sharpe must be above this."""
    max_pbo: float | None = None
    """The probability of backtest overfitting must be below this (NaN: one configuration, fails)."""
    allow_single_path: bool = False
    """Accept a verdict read off one checkpoint's single test path (:func:`verdict_from_checkpoint`). Off by
    default: there the DSR is PSR(0) of one path over one trial, so "DSR > 0.5" means little more than "Sharpe > 0";
    a champion needs an experiment's verdict (CPCV paths x seeds, :func:`verdict_from_experiment`)."""

    def failures(self, verdict: Verdict) -> list[str]:
        """Each failed condition as a sentence (empty: the gate passes); an unmeasured number fails its condition."""
        failed = []
        if self.spa_alpha is not None and not verdict.spa_reverse_p_value >= self.spa_alpha:
            failed.append(f"SPA: worse than its benchmark {verdict.benchmark or '?'} (reverse SPA p = "
                          f"{verdict.spa_reverse_p_value:.3f} < {self.spa_alpha})"
                          if np.isfinite(verdict.spa_reverse_p_value) else "SPA: no SPA result in the verdict")
        if self.min_dsr is not None and not verdict.dsr > self.min_dsr:
            failed.append(f"DSR {verdict.dsr:.3f} is not above {self.min_dsr}")
        if self.min_sharpe is not None and not verdict.median_sharpe > self.min_sharpe:
            failed.append(f"median Sharpe {verdict.median_sharpe:.3f} is not above {self.min_sharpe}")
        if self.max_pbo is not None and not verdict.pbo < self.max_pbo:
            failed.append(f"PBO {verdict.pbo:.3f} is not below {self.max_pbo}")
        if not self.allow_single_path and verdict.source.startswith(SINGLE_PATH_SOURCE):
            failed.append("the verdict is one checkpoint's single test path: register it with --verdict <experiment "
                          "folder> (CPCV paths x seeds)")
        return failed


def verdict_from_experiment(folder: str | Path, agent: str | None = None, *, reps: int = 1000,
                            seed: int = 0) -> Verdict:
    """The verdict of configuration ``agent`` (default: the only agent) of an experiment's output folder.

    Reads the runner's ``results.parquet`` and ``equity.parquet`` (:mod:`sentio_lab.experiment.assembly`) and runs
    :func:`sentio_lab.experiment.summary.infer` (the report's tests: DSR, PBO, SPA both ways, medians over runs); the
    placebo gap is the configuration's median in-sample Sharpe minus its placebo floor
    (:func:`sentio_lab.experiment.memorisation.gap_table`) when ``memorisation.parquet`` holds placebo runs.
    """
    import pandas as pd

    from sentio_lab.experiment.assembly import EQUITY_FILE, RESULTS_FILE
    from sentio_lab.experiment.memorisation import MEMORISATION_FILE, gap_table
    from sentio_lab.experiment.summary import infer

    folder = Path(folder)
    for name in (RESULTS_FILE, EQUITY_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name}; is it an experiment's output folder "
                                    "(python -m sentio_lab.experiment --config ...)?")
    results, curves = pd.read_parquet(folder / RESULTS_FILE), pd.read_parquet(folder / EQUITY_FILE)
    agents = list(dict.fromkeys(results.loc[results["kind"] == "agent", "name"]))
    if agent is None:
        if len(agents) != 1:
            raise ValueError(f"{folder}: {len(agents)} agent configurations {agents}; name one (--agent)")
        agent = agents[0]
    found = infer(results, curves, agent, reps=reps, seed=seed)
    placebo_gap = None
    if (folder / MEMORISATION_FILE).is_file():
        table = gap_table(pd.read_parquet(folder / MEMORISATION_FILE))
        if agent in table.index and "placebo_floor" in table.columns and np.isfinite(table.loc[agent, "placebo_floor"]):
            placebo_gap = float(table.loc[agent, "sharpe:in_sample"] - table.loc[agent, "placebo_floor"])
    median = float(results.loc[results["name"] == agent, "sharpe"].median())
    return Verdict(median_sharpe=median, dsr=found.dsr, pbo=found.pbo, spa_p_value=found.spa_p_value,
                   spa_reverse_p_value=found.spa_reverse_p_value, benchmark=found.best_baseline,
                   source=f"experiment {folder.resolve()} ({agent}, {found.runs} runs)", placebo_gap=placebo_gap)


def verdict_from_checkpoint(checkpoint: str | Path, range_name: str = "test", *, reps: int = 1000,
                            seed: int = 0) -> Verdict:
    """A one-path verdict: the checkpoint's greedy run over ``range_name`` against buy-and-hold on the same bars and
    costs (:func:`sentio_lab.evaluation.agent_report.compare_with_buy_and_hold`, what ``python -m
    sentio_lab.evaluate`` reports); DSR is PSR(0) (one configuration), PBO is NaN, SPA runs on the per-bar log
    returns of the two (:func:`sentio_lab.evaluation.inference.spa_agent_vs_baselines`)."""
    import pandas as pd

    from sentio_lab.agents.variants import load_trained
    from sentio_lab.evaluation.agent_report import compare_with_buy_and_hold
    from sentio_lab.evaluation.inference import spa_agent_vs_baselines
    from sentio_lab.evaluation.metrics import probabilistic_sharpe_ratio

    trained = load_trained(checkpoint)
    comparison = compare_with_buy_and_hold(trained.agent, trained.args, trained.market, range_name,
                                           agent_name=str(trained.bundle["variant"]))
    mine = np.log(comparison.agent.equity).diff().dropna().rename("agent")
    base = np.log(comparison.benchmark.equity).diff().dropna().rename("buy_and_hold")
    frame = pd.concat([mine, base], axis=1).dropna()
    spa = spa_agent_vs_baselines(frame[["agent"]], frame[["buy_and_hold"]], reps=reps, seed=seed)
    return Verdict(median_sharpe=float(comparison.agent.summary["sharpe"]),
                   dsr=float(probabilistic_sharpe_ratio(frame["agent"].to_numpy(), 0.0)), pbo=math.nan,
                   spa_p_value=float(spa.consistent), spa_reverse_p_value=float(spa.reverse["agent"].consistent),
                   benchmark="buy_and_hold",
                   source=f"{SINGLE_PATH_SOURCE}{Path(checkpoint).resolve()} on its {range_name} range against "
                   "buy-and-hold (one path)")
