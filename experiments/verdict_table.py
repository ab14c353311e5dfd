"""The verdict table of issue 19 s6, read from the committed verdict reports (``reports/verdict_<market>/``).

One markdown table: per market and configuration (and the configuration's benchmark) the median out-of-sample
Sharpe [IQR over paths x seeds], the median max drawdown, the median in-sample Sharpe, the placebo floor (the 95th
percentile of the placebo runs' in-sample Sharpe), whether in-sample lies outside it, and SPA p / DSR; then the
goal line of s6, per market and overall::

    python experiments/verdict_table.py                      # print the table
    python experiments/verdict_table.py --write README.md    # also replace the text between the markers

Every number is read from the files the evaluation report notebook writes (``strategies.csv``, ``tests.csv``,
``generalisation_gap.csv``, ``results.csv``) and the experiment file ``experiments/configs/<report name>.toml``
(anchors and steps); nothing is recomputed. Conventions:

- A configuration's *benchmark* is the baseline its ``--anchor`` names (for an unanchored one, ``buy_and_hold``);
  a seed ensemble (``<name>_ensemble``) or gated strategy (``<name>_gated``) has its configuration's anchor.
- "Smaller max drawdown" compares the medians over paths x seeds of the drawdown's depth.
- In sample is *outside the placebo floor* when the median over seeds x folds of the real runs' in-sample Sharpe is
  above the floor. A seed ensemble is not trained (its members are), so it has no in-sample run of its own: its
  row shows none and the goal reads its configuration's in-sample check.
- SPA p is the median consistent SPA p-value that the configuration does not beat every baseline (the benchmark
  is one of them); DSR is the median deflated Sharpe ratio for the configurations tried (``tests.csv``).
- The goal (s6): an anchored configuration whose median OOS Sharpe is at least its benchmark's AND whose max
  drawdown is smaller AND whose in-sample Sharpe is outside the placebo floor, on at least two of the four markets.
"""

from __future__ import annotations

import argparse
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

#: The four markets of s6 in table order: report folder name and the label the table shows.
MARKETS: tuple[tuple[str, str], ...] = (
    ("verdict_sp500_1999", "sp500, next-close fills"),
    ("verdict_nasdaq", "nasdaq"),
    ("verdict_sp500_20_pool", "sp500_20 pool"),
    ("verdict_eurusd_1h", "eurusd_1h"),
)
#: Markets on which the goal must be met.
GOAL_MARKETS = 2
START_MARKER = "<!-- verdict-table:start -->"
END_MARKER = "<!-- verdict-table:end -->"
#: Default benchmark of a configuration without ``--anchor``.
DEFAULT_BENCHMARK = "buy_and_hold"
SUFFIXES = ("_ensemble", "_gated")


@dataclass(frozen=True)
class Row:
    """One configuration (or benchmark) of one market, as the table shows it."""

    name: str
    kind: str
    """"agent" or "baseline" (a benchmark row)"""
    benchmark: str | None
    """the baseline this configuration is judged against (None for a baseline row)"""
    anchored: bool
    sharpe: float
    sharpe_q25: float
    sharpe_q75: float
    max_drawdown: float
    in_sample: float = math.nan
    floor: float = math.nan
    spa_p: float = math.nan
    dsr: float = math.nan
    goal_in_sample: float = math.nan
    """the in-sample Sharpe the goal reads (an ensemble's: its configuration's)"""


@dataclass(frozen=True)
class MarketReport:
    """What the table needs of one market's report."""

    key: str
    label: str
    rows: tuple[Row, ...]
    description: str
    """range, steps, seeds and paths, as measured from the report"""

    def row(self, name: str) -> Row:
        """The row named ``name``."""
        return next(r for r in self.rows if r.name == name)


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _read_csv(path: Path, **kwargs: object) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; regenerate the report (docs/evaluation.md, 'The verdict, re-run')")
    return pd.read_csv(path, **kwargs)


def _agent_args(config_path: Path) -> dict[str, list[str]]:
    """Each configuration's full command line (``common_args`` then its ``args``) from the experiment file."""
    if not config_path.exists():
        return {}
    raw = tomllib.loads(config_path.read_text())
    common = [str(a) for a in raw.get("common_args", [])]
    return {name: common + [str(a) for a in table.get("args", [])] for name, table in raw.get("agents", {}).items()}


def _flag(args: list[str], flag: str) -> str | None:
    """The value of the last ``flag`` in ``args`` (argparse semantics: the last one wins)."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    return values[-1] if values else None


def _base_name(name: str, configurations: dict[str, list[str]]) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in configurations:
            return name[: -len(suffix)]
    return name


def read_market(folder: Path, label: str, config_path: Path) -> MarketReport:
    """One market's rows from its report folder and experiment file (module docstring for the conventions)."""
    strategies = _read_csv(folder / "strategies.csv", header=[0, 1], index_col=[0, 1])
    tests = _read_csv(folder / "tests.csv", index_col=0)
    results = _read_csv(folder / "results.csv")
    gap_path = folder / "generalisation_gap.csv"
    gaps = pd.read_csv(gap_path, index_col=0) if gap_path.exists() else pd.DataFrame()
    for column in [("sharpe", "median"), ("sharpe", "q25"), ("sharpe", "q75"), ("max_drawdown", "median")]:
        if column not in strategies.columns:
            raise ValueError(f"{folder / 'strategies.csv'}: no column {column}; is it the runner's strategy table?")
    configurations = _agent_args(config_path)
    agents = [name for kind, name in strategies.index if kind == "agent"]
    baselines = {name for kind, name in strategies.index if kind == "baseline"}

    def stats(kind: str, name: str) -> dict[str, float]:
        line = strategies.loc[(kind, name)]
        return {"sharpe": _number(line[("sharpe", "median")]), "sharpe_q25": _number(line[("sharpe", "q25")]),
                "sharpe_q75": _number(line[("sharpe", "q75")]),
                "max_drawdown": _number(line[("max_drawdown", "median")])}

    def gap(name: str, column: str) -> float:
        return _number(gaps.loc[name, column]) if name in gaps.index and column in gaps.columns else math.nan

    rows, benchmarks = [], []
    for name in agents:
        base = _base_name(name, configurations)
        anchor = _flag(configurations.get(base, []), "--anchor")
        benchmark = anchor or DEFAULT_BENCHMARK
        if benchmark not in baselines:
            raise ValueError(f"{folder}: configuration {name!r} is judged against {benchmark!r}, which the report "
                             f"does not hold (baselines: {sorted(baselines)}); add it to the experiment's baselines")
        test = tests[name] if name in tests.columns else pd.Series(dtype=object)
        rows.append(Row(name=name, kind="agent", benchmark=benchmark, anchored=anchor is not None,
                        **stats("agent", name), in_sample=gap(name, "sharpe:in_sample"),
                        floor=gap(base, "placebo_floor"), spa_p=_number(test.get("spa_p_value")),
                        dsr=_number(test.get("dsr")), goal_in_sample=gap(base, "sharpe:in_sample")))
        benchmarks.append(benchmark)
    rows += [Row(name=b, kind="baseline", benchmark=None, anchored=False, **stats("baseline", b))
             for b in dict.fromkeys(benchmarks)]
    return MarketReport(key=folder.name, label=label, rows=tuple(rows), description=_describe(results, configurations))


def _describe(results: pd.DataFrame, configurations: dict[str, list[str]]) -> str:
    """Range, PPO steps per cell, seeds and backtest paths, as the report and experiment file say."""
    agents = results[results["kind"] == "agent"]
    seeds = sorted({int(s) for s in agents["seed"] if int(s) >= 0})
    steps = sorted({_flag(args, "--total-timesteps") or "default" for args in configurations.values()})
    return (f"{str(results['start'].min())[:10]} .. {str(results['end'].max())[:10]} out of sample, "
            f"{'/'.join(steps)} steps per cell, {len(seeds)} seeds, {results['path'].nunique()} paths")


def goal_checks(market: MarketReport) -> dict[str, tuple[bool, bool, bool]]:
    """Per anchored configuration: (median OOS Sharpe >= its benchmark's, smaller max drawdown, in sample
    outside the placebo floor)."""
    checks = {}
    for row in market.rows:
        if row.kind != "agent" or not row.anchored:
            continue
        bench = market.row(row.benchmark or DEFAULT_BENCHMARK)
        checks[row.name] = (row.sharpe >= bench.sharpe, abs(row.max_drawdown) < abs(bench.max_drawdown),
                            row.goal_in_sample > row.floor)  # NaN (no placebo floor) compares False: not shown
    return checks


def market_met(market: MarketReport) -> bool:
    """Whether some anchored configuration meets all three conditions of the goal on this market."""
    return any(all(check) for check in goal_checks(market).values())


def _fmt(value: float, spec: str = ".2f") -> str:
    return "n/a" if not math.isfinite(value) else format(value, spec)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def market_table(markets: list[MarketReport], missing: list[tuple[str, str]]) -> str:
    """The markdown table and the goal lines."""
    lines = ["| market | configuration | OOS Sharpe median [IQR] | max drawdown | in-sample Sharpe | placebo floor "
             "(p95) | in sample outside floor | SPA p | DSR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for market in markets:
        for row in market.rows:
            agent = row.kind == "agent"
            outside = (_yes(row.in_sample > row.floor) if math.isfinite(row.in_sample) and math.isfinite(row.floor)
                       else "n/a")
            name = row.name if agent else f"{row.name} (benchmark)"
            lines.append(
                f"| {market.label} | {name} | {_fmt(row.sharpe)} [{_fmt(row.sharpe_q25)}, {_fmt(row.sharpe_q75)}] | "
                f"{_fmt(100 * row.max_drawdown, '.1f')}% | {_fmt(row.in_sample)} | {_fmt(row.floor)} | "
                f"{outside if agent else ''} | {_fmt(row.spa_p, '.3f') if agent else ''} | "
                f"{_fmt(row.dsr) if agent else ''} |")
    for key, label in missing:
        lines.append(f"| {label} | report reports/{key}/ not present | | | | | | | |")
    lines.append("")
    for market in markets:
        lines.append(f"- {market.label}: {market.description}.")
    lines.append("")
    met = [m for m in markets if market_met(m)]
    lines.append(f"**Goal (issue 19 s6)**: an anchored configuration with median OOS Sharpe >= its benchmark's, a "
                 f"smaller max drawdown and in-sample Sharpe outside the placebo floor, on >= {GOAL_MARKETS} of "
                 f"{len(MARKETS)} markets: **{'met' if len(met) >= GOAL_MARKETS else 'not met'}** "
                 f"({len(met)} of {len(MARKETS)}).")
    for market in markets:
        parts = [f"{name} Sharpe >= {market.row(name).benchmark}: {_yes(s)}, smaller drawdown: {_yes(d)}, "
                 f"in sample outside floor: {_yes(f)}" for name, (s, d, f) in goal_checks(market).items()]
        lines.append(f"- {market.label}: {'met' if market_met(market) else 'not met'} "
                     f"({'; '.join(parts) or 'no anchored configuration'}).")
    for _, label in missing:
        lines.append(f"- {label}: not met (no report).")
    return "\n".join(lines)


def build_table(reports: Path, configs: Path) -> str:
    """The verdict table of every market whose report folder exists under ``reports``."""
    markets, missing = [], []
    for key, label in MARKETS:
        folder = reports / key
        if folder.exists():
            markets.append(read_market(folder, label, configs / f"{key}.toml"))
        else:
            missing.append((key, label))
    return market_table(markets, missing)


def replace_between_markers(text: str, table: str, *, where: str = "text") -> str:
    """``text`` with everything between the start and end markers replaced by ``table`` (markers kept)."""
    pattern = re.compile(re.escape(START_MARKER) + r".*?" + re.escape(END_MARKER), flags=re.DOTALL)
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(f"{where}: expected one {START_MARKER} ... {END_MARKER} block, found {len(found)}")
    return pattern.sub(lambda _: f"{START_MARKER}\n{table}\n{END_MARKER}", text)


def main(argv: list[str] | None = None) -> str:
    """Print the table; with ``--write FILE`` also put it between the markers in FILE."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="folder holding verdict_<market>/")
    parser.add_argument("--configs", type=Path, default=Path("experiments/configs"), help="experiment files")
    parser.add_argument("--write", type=Path, default=None, help="replace the marked block of this file")
    args = parser.parse_args(argv)
    table = build_table(args.reports, args.configs)
    print(table)
    if args.write is not None:
        args.write.write_text(replace_between_markers(args.write.read_text(), table, where=str(args.write)))
    return table


if __name__ == "__main__":
    main()
