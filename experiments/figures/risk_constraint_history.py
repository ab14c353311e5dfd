"""Figure: the PID multiplier and the measured episode drawdown against the limit over training (issue 8).

Reads the per-iteration ``history.csv`` that ``sentio_lab.ppo_risk`` writes beside each cell's checkpoint under
``runs/experiments/<name>/cells/<agent>__seed<s>__fold<f>/`` and draws, per iteration, the median and
inter-quartile range over every (seed, fold) cell of: the mean maximum drawdown of the training episodes that
ended in the iteration (constrained agent vs an unconstrained one), the limit, and the multiplier lambda.
These are *training* (in-sample, stochastic-policy) drawdowns, labelled so; the out-of-sample ones are in the
evaluation report. Writes ``<out>/constraint_training.png`` and ``<out>/constraint_training.csv``.

Run: ``.venv/bin/python experiments/figures/risk_constraint_history.py --runs runs/experiments/sp500_risk_cpcv
--constrained risk_drawdown --reference risk_neutral --out reports/sp500_risk_cpcv``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def load_histories(runs: Path, agent: str) -> pd.DataFrame:
    """Every cell's history of ``agent``, stacked, with its cell name."""
    frames = []
    for path in sorted((runs / "cells").glob(f"{agent}__seed*__fold*/history.csv")):
        frame = pd.read_csv(path)
        frame["cell"] = path.parent.name
        frames.append(frame)
    if not frames:
        raise FileNotFoundError(f"no history.csv of agent {agent!r} under {runs / 'cells'}")
    return pd.concat(frames, ignore_index=True)


def summarise(history: pd.DataFrame, column: str) -> pd.DataFrame:
    """Median and quartiles of ``column`` per iteration, over cells."""
    grouped = history.groupby("iteration")[column]
    return pd.DataFrame({"median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75),
                         "cells": grouped.count()})


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Draw the figure and write its numbers; returns the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="the experiment's run folder (holds cells/)")
    p.add_argument("--constrained", default="risk_drawdown", help="agent with --cost-limit")
    p.add_argument("--reference", default="risk_neutral", help="unconstrained agent to compare with")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    cli = p.parse_args(argv)
    bound, free = load_histories(cli.runs, cli.constrained), load_histories(cli.runs, cli.reference)
    limit = float(bound["risk/cost_limit"].iloc[0])
    table = pd.concat({
        f"{cli.constrained}_drawdown": summarise(bound, "risk/episode_max_drawdown"),
        f"{cli.reference}_drawdown": summarise(free, "risk/episode_max_drawdown"),
        f"{cli.constrained}_lambda": summarise(bound, "risk/lambda"),
    }, axis=1)
    cli.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(cli.out / "constraint_training.csv")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for name, colour in ((f"{cli.constrained}_drawdown", "tab:blue"), (f"{cli.reference}_drawdown", "tab:grey")):
        part = table[name]
        top.plot(part.index, part["median"], color=colour, label=name[: -len("_drawdown")] + " (median)")
        top.fill_between(part.index, part["q25"], part["q75"], color=colour, alpha=0.2)
    top.axhline(limit, color="tab:red", linestyle="--", label=f"limit {limit:g}")
    top.set_ylabel("mean episode max drawdown")
    top.set_title("Training episodes (in sample, stochastic policy): median and IQR over seeds x folds")
    top.legend(loc="upper right", fontsize=8)
    lam = table[f"{cli.constrained}_lambda"]
    bottom.plot(lam.index, lam["median"], color="tab:blue", label="lambda (median)")
    bottom.fill_between(lam.index, lam["q25"], lam["q75"], color="tab:blue", alpha=0.2)
    bottom.set_ylabel("PID multiplier lambda")
    bottom.set_xlabel("iteration (1024 env steps each)")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(cli.out / "constraint_training.png", dpi=120)
    plt.close(fig)
    return table


if __name__ == "__main__":
    print(main().round(4).to_string())
