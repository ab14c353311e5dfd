"""What an experiment's results say: per-strategy medians and IQRs, PSR / DSR / PBO / SPA, targets, a verdict.

Everything here reads the runner's two files (``results.parquet``: one row per strategy x seed x path;
``equity.parquet``: the path equity curves), so a report regenerates from them alone.

Conventions (stated once, used everywhere in the report):

* Distribution figures (median, quartiles) are over **paths x seeds** of each configuration; a baseline has
  one row per path (the random policy: the mean over its seeds).
* The statistical tests run on each **run** -- one (seed, backtest path) of the agent, a single honest
  backtest -- against the baselines on the same path, and report medians over the runs (and the share of
  runs that reject). Averaging runs first would bag several models into one, and its Sharpe would not be
  any single agent's. Sharpe ratios in the tests are per bar.
* PSR is against the best baseline's Sharpe (the baseline with the best median over paths); DSR deflates
  the configuration's Sharpe for the number of configurations tried (with one configuration it equals
  PSR(0), nothing having been selected); PBO (CSCV) needs at least two configurations; SPA asks whether the
  agent beats every baseline (:func:`sentio_lab.evaluation.inference.spa_agent_vs_baselines`, small p: it does) and,
  reversed, whether some baseline beats the agent. A clearly worse agent gets an SPA p-value near 0.5, not
  1: arch's consistent statistic is max(0, .), which is 0 then; the reverse test is the one that says it
  loses.
* A/B (:func:`ab_tests`) compares two configurations on their **ensemble** returns (mean over seeds and
  paths at each bar); both sides are averaged alike, so the comparison is fair, but its Sharpe ratios are
  those of the ensembles.
* A configuration's seed ensemble (``ensemble = true``, :mod:`sentio_lab.experiment.ensemble`) is one more agent
  row (seed :data:`~sentio_lab.experiment.ensemble.ENSEMBLE_SEED`, one run per path) and one more trial: in a
  seed's DSR / PBO it sits beside that seed's run of every configuration; its own DSR / PBO is the median over
  the seeds of the same computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sentio_lab.evaluation import inference
from sentio_lab.evaluation.metrics import probabilistic_sharpe_ratio, sharpe_ratio
from sentio_lab.experiment.ensemble import ENSEMBLE_SEED

#: Statistics of the report's per-strategy table (columns of results.parquet).
REPORT_STATS: tuple[str, ...] = ("sharpe", "cagr", "max_drawdown", "cvar_5", "positive_months", "trade_win_rate",
                                 "turnover_per_year")

#: The seed system's targets: statistic, comparison, threshold, as the seed system wrote them.
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("sharpe", ">", 3.0, "Sharpe > 3"),
    ("max_drawdown", ">", -0.08, "max drawdown < 8%"),
    ("trade_win_rate", ">", 0.65, "win rate > 65%"),
    ("positive_months", ">", 0.80, "positive months > 80%"),
)


def strategy_table(results: pd.DataFrame, stats: Sequence[str] = REPORT_STATS) -> pd.DataFrame:
    """Median and interquartile range over paths x seeds of each strategy (rows) and statistic (columns)."""
    grouped = results.groupby(["kind", "name"], sort=False)
    columns = {}
    for stat in stats:
        values = grouped[stat]
        columns[(stat, "median")] = values.median()
        columns[(stat, "q25")] = values.quantile(0.25)
        columns[(stat, "q75")] = values.quantile(0.75)
    columns[("runs", "paths x seeds")] = grouped.size()
    return pd.DataFrame(columns)


def ensemble_returns(curves: pd.DataFrame) -> pd.DataFrame:
    """Bars x strategies: each strategy's mean simple return over its seeds and paths at every common bar."""
    runs = run_returns(curves)
    frame = pd.concat(runs.values(), keys=[name for name, _, _ in runs], names=["name", "timestamp"])
    wide = frame.groupby(["timestamp", "name"]).mean().unstack("name")
    return wide.dropna()  # bars every strategy traded


def run_returns(curves: pd.DataFrame) -> dict[tuple[str, int, int], pd.Series]:
    """Simple returns of every run: ``(name, seed, path) -> returns`` indexed by bar time (baselines: seed -1)."""
    out = {}
    for (name, seed, path), curve in curves.groupby(["name", "seed", "path"], sort=False):
        equity = pd.Series(curve["equity"].to_numpy(), index=pd.DatetimeIndex(curve["timestamp"])).sort_index()
        out[(str(name), int(seed), int(path))] = equity.pct_change().iloc[1:]
    return out


@dataclass(frozen=True)
class Inference:
    """The report's statistical tests for one agent configuration against the baselines.

    Each test runs on every (seed, path) of the agent against the baselines on the same path -- one honest
    backtest each, never an average of models -- and the fields are medians over those runs.
    """

    agent: str
    sharpe: float
    """Median per-bar Sharpe of the agent's runs."""
    best_baseline: str
    """The baseline with the highest median per-bar Sharpe over the paths."""
    best_baseline_sharpe: float
    psr_vs_best_baseline: float
    """Median over runs of PSR against the best baseline's Sharpe on the same path."""
    psr_zero: float
    dsr: float
    """Median over runs of the DSR for the configurations tried (PSR(0) with a single configuration)."""
    n_trials: int
    pbo: float
    """Median over runs of PBO (CSCV) across configurations; NaN with a single configuration."""
    spa_p_value: float
    """Median consistent SPA p-value that the agent does not beat every baseline (small: it beats them all)."""
    spa_reverse_p_value: float
    """Median consistent SPA p-value that no baseline beats the agent (small: some baseline beats it)."""
    spa_rejections: float
    """Share of runs in which SPA says the agent beats every baseline at the 5% level."""
    reverse_rejections: float
    """Share of runs in which the reverse SPA says some baseline beats the agent at the 5% level."""
    runs: int
    bars: int
    """Median bars per run."""
    undefined_runs: int = 0
    """Runs whose returns never varied (the agent never traded): their Sharpe, PSR and DSR are undefined (NaN) and
    every median above is over the other ``runs - undefined_runs`` runs."""


def infer(results: pd.DataFrame, curves: pd.DataFrame, agent: str, *, reps: int = 1000, seed: int = 0,
          pbo_blocks: int = 16, alpha: float = 0.05) -> Inference:
    """PSR, DSR, PBO and SPA of configuration ``agent``, per (seed, path) run, as medians (module docstring)."""
    kinds = results.drop_duplicates("name").set_index("name")["kind"]
    returns = run_returns(curves)
    agents = [n for n in kinds.index if kinds[n] == "agent"]
    baselines = [n for n in kinds.index if kinds[n] == "baseline"]
    if agent not in agents:
        raise KeyError(f"{agent!r} is not an agent of these results; agents: {agents}")
    if not baselines:
        raise ValueError("infer: the results hold no baseline to compare with")
    n_trials = int(results["n_trials"].iloc[0])
    baseline_sharpe = {b: np.median([sharpe_ratio(r.to_numpy()) for (n, _, _), r in returns.items() if n == b])
                       for b in baselines}
    best = max(baseline_sharpe, key=baseline_sharpe.get)
    rows = []
    for (name, run_seed, path), r in returns.items():
        if name != agent:
            continue
        frame = pd.concat({agent: r, **{b: returns[(b, -1, path)] for b in baselines}}, axis=1).dropna()
        mine, base = frame[agent], frame[baselines]
        against = inference.psr_against_benchmarks(mine, base[[best]])
        spa = inference.spa_agent_vs_baselines(frame[[agent]], base, reps=reps, seed=seed)
        row = {"sharpe": sharpe_ratio(mine.to_numpy()), "psr_best": against.psr,
               "psr_zero": probabilistic_sharpe_ratio(mine.to_numpy(), 0.0), "spa": spa.consistent,
               "reverse": spa.reverse[agent].consistent, "bars": len(frame)}
        # DSR / PBO across the configurations tried, on this run's seed; a seed ensemble (one run per path) sits
        # beside every seed, and its own run is compared seed by seed (median over the seeds)
        seeds = [run_seed] if run_seed != ENSEMBLE_SEED else sorted(
            {s for (n, s, _) in returns if n in agents and s != ENSEMBLE_SEED})
        trials = [_trial_stats(agent, {a: returns.get((a, s, path), returns.get((a, ENSEMBLE_SEED, path)))
                                       for a in agents}, max(n_trials, len(agents)), pbo_blocks, row["psr_zero"])
                  for s in seeds]
        row["dsr"] = float(pd.Series([dsr for dsr, _ in trials], dtype=float).median())
        row["pbo"] = float(pd.Series([pbo for _, pbo in trials], dtype=float).median())
        rows.append(row)
    table = pd.DataFrame(rows)
    return Inference(
        agent=agent, sharpe=float(table["sharpe"].median()), best_baseline=best,
        best_baseline_sharpe=float(baseline_sharpe[best]), psr_vs_best_baseline=float(table["psr_best"].median()),
        psr_zero=float(table["psr_zero"].median()), dsr=float(table["dsr"].median()), n_trials=n_trials,
        pbo=float(table["pbo"].median()), spa_p_value=float(table["spa"].median()),
        spa_reverse_p_value=float(table["reverse"].median()), spa_rejections=float((table["spa"] < alpha).mean()),
        reverse_rejections=float((table["reverse"] < alpha).mean()), runs=len(table),
        bars=int(table["bars"].median()), undefined_runs=int(table["sharpe"].isna().sum()),
    )


def _trial_stats(agent: str, peers: dict[str, pd.Series | None], n_trials: int, pbo_blocks: int,
                 psr_zero: float) -> tuple[float, float]:
    """``(DSR, PBO)`` of ``agent`` among ``peers`` (every configuration's returns on one path and seed; None: not
    run there): PSR(0) and NaN when there is nothing to compare with."""
    if len(peers) < 2 or any(v is None for v in peers.values()):
        return psr_zero, float("nan")
    trials = pd.concat(peers, axis=1).dropna()
    # A configuration that never traded in this run has no Sharpe ratio: it is left out of the DSR's variance and
    # of PBO (its trial still counts in n_trials); the agent's own flat run has no DSR.
    traded = [a for a in trials.columns if trials[a].std() > 0]
    if agent not in traded:
        return float("nan"), float("nan")
    if len(traded) < 2:
        return psr_zero, float("nan")
    dsr = inference.deflated_sharpe_of_trials(trials[traded], selected=agent, n_trials=n_trials).dsr
    return dsr, inference.probability_of_backtest_overfitting(trials[traded], n_blocks=pbo_blocks).pbo


def targets_table(results: pd.DataFrame, agent: str) -> pd.DataFrame:
    """The seed system's four targets beside the agent's median over paths x seeds, and whether each is met."""
    rows = results[results["name"] == agent]
    out = []
    for stat, op, threshold, label in TARGETS:
        value = float(rows[stat].median())
        met = value > threshold if op == ">" else value < threshold
        out.append({"target": label, "measured (median)": value, "met": bool(met)})
    return pd.DataFrame(out).set_index("target")


def verdict(results: pd.DataFrame, found: Inference, *, alpha: float = 0.05) -> str:
    """One plain sentence: does the agent beat the baselines out of sample, net of costs, after the search?"""
    rows = results[results["name"] == found.agent]
    median = float(rows["sharpe"].median())
    bh = results[results["name"] == "buy_and_hold"]["sharpe"]
    bh_text = f", buy-and-hold {bh.median():.2f}" if len(bh) else ""
    if found.spa_p_value < alpha and found.psr_vs_best_baseline > 1 - alpha:
        head = f"{found.agent} beats every baseline"
    elif found.spa_reverse_p_value < alpha:
        head = f"{found.agent} loses to at least one baseline ({found.best_baseline} is the best)"
    else:
        head = f"{found.agent} does not beat the baselines"
    defined = int(rows["sharpe"].notna().sum())
    over = f"{len(rows)} paths x seeds" if defined == len(rows) else (
        f"the {defined} of {len(rows)} paths x seeds that traded (the other {len(rows) - defined} never traded: "
        "Sharpe undefined)")
    return (f"{head}: out of sample, net of costs, median annualised Sharpe {median:.2f} over "
            f"{over}{bh_text}; PSR vs the best baseline ({found.best_baseline}) "
            f"{found.psr_vs_best_baseline:.2f}, SPA p = {found.spa_p_value:.3f} "
            f"(reverse {found.spa_reverse_p_value:.3f}), "
            f"DSR {found.dsr:.2f} ({found.n_trials} configuration{'s' if found.n_trials != 1 else ''} tried); "
            f"medians over {found.runs - found.undefined_runs} runs.")


def sharpe_distribution(results: pd.DataFrame) -> dict[str, np.ndarray]:
    """Every strategy's annualised Sharpe over its paths x seeds, for the distribution figure."""
    return {name: group["sharpe"].to_numpy() for name, group in results.groupby("name", sort=False)}


def ab_tests(curves: pd.DataFrame, results: pd.DataFrame, *, reps: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Paired A/B of every pair of configurations on the same bars: the stationary-bootstrap confidence
    interval and p-value of their per-bar Sharpe difference (ensemble returns;
    :func:`sentio_lab.evaluation.inference.sharpe_difference_test`).

    Empty with fewer than two configurations.
    """
    wide = ensemble_returns(curves)
    kinds = results.drop_duplicates("name").set_index("name")["kind"]
    agents = [n for n in wide.columns if kinds.get(n) == "agent"]
    rows = []
    for i, a in enumerate(agents):
        for b in agents[i + 1:]:
            test = inference.sharpe_difference_test(wide[a], wide[b], reps=reps, seed=seed)
            rows.append({"a": a, "b": b, "sharpe_a": test.sharpe_a, "sharpe_b": test.sharpe_b,
                         "difference": test.difference, "ci_low": test.ci_low, "ci_high": test.ci_high,
                         "p_value": test.p_value, "block_size": test.block_size})
    return pd.DataFrame(rows, columns=["a", "b", "sharpe_a", "sharpe_b", "difference", "ci_low", "ci_high",
                                       "p_value", "block_size"])


def rule_table(rules: pd.DataFrame) -> pd.DataFrame:
    """How often each mask rule fired, per configuration: the share of decisions in which it masked at least one
    level (``binding``) and the share of chosen actions it masked (``masked``); empty without masked variants."""
    columns = [c for c in rules.columns if c.startswith(("binding:", "masked:"))]
    if rules.empty or not columns:
        return pd.DataFrame()
    masked = rules.groupby("name", sort=False)[columns].apply(lambda g: g.notna().any().any())
    rules = rules[rules["name"].isin(masked[masked].index)].fillna(0)  # configurations without rules: left out
    totals = rules.groupby("name", sort=False)[["decisions", *columns]].sum()
    shares = totals[columns].div(totals["decisions"].where(totals["decisions"] > 0), axis=0)
    shares.columns = pd.MultiIndex.from_tuples([tuple(c.split(":", 1)[::-1]) for c in columns], names=["rule", ""])
    return shares.sort_index(axis=1).assign(decisions=totals["decisions"])
