"""The report of a portfolio experiment, from the run's files alone (:mod:`sentio_lab.experiment.portfolio_runner`).

The single-asset report's tables, computed by the same code (:mod:`sentio_lab.experiment.summary`: the
per-strategy medians, PSR / DSR / PBO / SPA against the baselines, the verdict, the targets), plus the portfolio's
own (:mod:`sentio_lab.evaluation.portfolio_report`): per-asset contribution to the return, turnover per asset,
concentration (effective number of assets) and the memorisation gap (in-sample vs out-of-sample Sharpe per cell),
with a placebo control its floor (:func:`sentio_lab.experiment.portfolio_placebo.placebo_table`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from sentio_lab.evaluation.portfolio_report import asset_table, concentration_table
from sentio_lab.experiment.assembly import EQUITY_FILE, RESULTS_FILE
from sentio_lab.experiment.figures import plot_path_equity, plot_sharpe_distribution
from sentio_lab.experiment.portfolio_placebo import placebo_table
from sentio_lab.experiment.portfolio_runner import MEMORISATION_FILE, PATHS_FILE, PLACEBO_FILE
from sentio_lab.experiment.summary import ab_tests, infer, strategy_table, targets_table, verdict


def memorisation_table(memo: pd.DataFrame) -> pd.DataFrame:
    """Per configuration, over seeds x folds: median in-sample Sharpe (greedy on the fold's training segments),
    median out-of-sample Sharpe (its test groups) and the median gap (in-sample minus out-of-sample, per cell)."""
    memo = memo.assign(gap=memo["in_sample_sharpe"] - memo["test_sharpe"])
    grouped = memo.groupby("name", sort=False)
    return pd.DataFrame({"in_sample_sharpe": grouped["in_sample_sharpe"].median(),
                         "test_sharpe": grouped["test_sharpe"].median(), "gap": grouped["gap"].median(),
                         "gap_q25": grouped["gap"].quantile(0.25), "gap_q75": grouped["gap"].quantile(0.75),
                         "cells": grouped.size()})


def panel_labels(output: Path) -> dict[str, str]:
    """The panel the run in ``output`` read, from its ``plan.json``: name, assets and calendar, and the missing-bar
    policy with the number of forward-filled bars per asset (empty for a run without that record)."""
    plan = output / "plan.json"
    panel = json.loads(plan.read_text()).get("panel") if plan.exists() else None
    if not panel:
        return {}
    filled = panel["filled_bars"]
    return {"panel": f"{panel['name']}: {len(panel['assets'])} assets, {panel['bars']} bars {panel['first']} .. "
                     f"{panel['last']}",
            "missing bars": f"policy {panel['missing_policy']!r}, forward-filled bars per asset: "
                            f"{filled if filled else 'none'}"}


def write_portfolio_report(output: str | Path, report: str | Path, *, labels: Mapping[str, object],
                           reps: int = 1000, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Write the report of the finished run in ``output`` to the folder ``report``; ``labels`` (range, steps, seeds,
    costs...) head ``report.md`` so every figure is read with what produced it. Returns the tables by file stem."""
    output, report = Path(output), Path(report)
    report.mkdir(parents=True, exist_ok=True)
    labels = {**labels, **panel_labels(output)}
    results = pd.read_parquet(output / RESULTS_FILE)
    curves = pd.read_parquet(output / EQUITY_FILE)
    paths = pd.read_parquet(output / PATHS_FILE)
    memo = pd.read_parquet(output / MEMORISATION_FILE)
    agents = list(dict.fromkeys(results.loc[results["kind"] == "agent", "name"]))
    found = {agent: infer(results, curves, agent, reps=reps, seed=seed) for agent in agents}
    tables = {
        "results": results.set_index("experiment"), "strategies": strategy_table(results),
        "tests": pd.DataFrame({name: dataclasses.asdict(f) for name, f in found.items()}),
        "ab_tests": ab_tests(curves, results, reps=reps, seed=seed),
        "asset_contribution": asset_table(paths, "contrib").assign(costs=paths.groupby("name", sort=False)["costs"]
                                                                   .median()),
        "asset_turnover": asset_table(paths, "turnover"), "concentration": concentration_table(paths),
        "memorisation": memorisation_table(memo),
        # the inputs of the three tables above, so a test recomputes them from the committed report
        "paths": paths.set_index("kind"), "memorisation_cells": memo.set_index("name"),
        **{f"targets_{agent}": targets_table(results, agent) for agent in agents},
    }
    if (output / PLACEBO_FILE).exists():  # the memorisation floor beside the real in-sample Sharpe
        placebo = pd.read_parquet(output / PLACEBO_FILE)
        tables.update(placebo=placebo_table(placebo, memo), placebo_cells=placebo.set_index("name"))
    for stem, table in tables.items():
        table.to_csv(report / f"{stem}.csv", index=stem != "ab_tests")
    lines = [verdict(results, f) for f in found.values()]
    (report / "verdict.txt").write_text("\n".join(lines) + "\n")
    plot_path_equity(curves, results, report / "equity_paths.png")
    plot_sharpe_distribution(results, report / "sharpe_distribution.png")
    (report / "report.md").write_text(_markdown(labels, lines, tables))
    return tables


def _markdown(labels: Mapping[str, object], lines: list[str], tables: Mapping[str, pd.DataFrame]) -> str:
    def block(title: str, stem: str) -> list[str]:
        return [f"## {title}", "", "```", tables[stem].to_string(float_format=lambda v: f"{v:.4g}"), "```", ""]
    head = ["# Portfolio experiment report", "", *[f"* **{k}**: {v}" for k, v in labels.items()], "",
            "## Verdict", "", *lines, "", "![equity per backtest path](equity_paths.png)", ""]
    return "\n".join([
        *head,
        *block("Strategies: median [q25, q75] over paths x seeds (annualised Sharpe, net of costs)", "strategies"),
        *block("PSR / DSR / PBO / SPA against the baselines (medians over seed x path runs)", "tests"),
        *block("Concentration and trading (medians over paths x seeds)", "concentration"),
        *block("Contribution of each asset to the path's total return (medians; costs as a return)",
               "asset_contribution"),
        *block("Turnover per asset per year (medians)", "asset_turnover"),
        *block("Memorisation: in-sample (training segments) vs out-of-sample (test groups) Sharpe per cell",
               "memorisation"),
        *(block("Placebo floor: 95th percentile of the in-sample Sharpe of agents retrained on block-bootstrapped "
                "training bars, beside the real cells' in-sample Sharpe", "placebo") if "placebo" in tables else []),
    ])
