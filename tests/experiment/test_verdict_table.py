"""experiments/verdict_table.py: the s6 verdict table read from report files the real producers write.

The fixture reports are built by the same functions the evaluation notebook uses (``strategy_table``,
``gap_table``, ``Inference``), from runs whose median, quartiles and mean all differ, so a number read from the
wrong column or row (a quartile for the median, a placebo floor for the in-sample Sharpe) fails a test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

from sentio_lab.experiment.ensemble import ENSEMBLE_SEED
from sentio_lab.experiment.memorisation import PART_STATS, gap_table
from sentio_lab.experiment.summary import Inference, strategy_table

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "verdict_table.py"
_spec = importlib.util.spec_from_file_location("verdict_table", SCRIPT)
verdict_table = importlib.util.module_from_spec(_spec)
sys.modules["verdict_table"] = verdict_table  # dataclasses resolve their module by name
_spec.loader.exec_module(verdict_table)

CONFIG = """
name = "{name}"
common_args = ["--window", "16", "--total-timesteps", "4096"]
[agents.ppo_default]
variant = "ppo"
args = []
[agents.anchored]
variant = "ppo"
args = ["--anchor", "{anchor}", "--hidden-size", "16"]
ensemble = true
"""

# Per strategy: the out-of-sample Sharpe and max drawdown of its five runs (median != mean != quartiles).
BH = ([0.2, 0.55, 0.6, 0.7, 1.0], [-0.2, -0.3, -0.3, -0.35, -0.6])
ANCHORED = ([0.1, 0.5, 0.61, 0.9, 2.0], [-0.1, -0.2, -0.25, -0.3, -0.5])
DEFAULT = ([-1.0, -0.4, -0.2, 0.0, 0.3], [-0.4, -0.5, -0.55, -0.6, -0.7])
ENSEMBLE = ([0.0, 0.3, 0.62, 0.8, 1.5], [-0.15, -0.2, -0.28, -0.4, -0.5])


def results_frame(anchored: tuple[list[float], list[float]]) -> pd.DataFrame:
    """A tiny results table: five runs per agent (seeds 1-5, paths 0-4), one per baseline path."""
    rows = []

    def add(kind: str, name: str, seeds: list[int], values: tuple[list[float], list[float]]) -> None:
        for i, (sharpe, drawdown) in enumerate(zip(*values, strict=True)):
            rows.append({"kind": kind, "name": name, "seed": seeds[i], "path": i % 3, "start": "2005-01-03",
                         "end": "2018-12-31", "sharpe": sharpe, "max_drawdown": drawdown, "n_trials": 3})

    add("agent", "ppo_default", [1, 2, 3, 4, 5], DEFAULT)
    add("agent", "anchored", [1, 2, 3, 4, 5], anchored)
    add("agent", "anchored_ensemble", [ENSEMBLE_SEED] * 5, ENSEMBLE)
    add("baseline", "buy_and_hold", [-1] * 5, BH)
    add("baseline", "random", [-1] * 5, ([-0.5] * 5, [-0.9] * 5))
    return pd.DataFrame(rows)


def memo_frame(in_sample: list[float]) -> pd.DataFrame:
    """Real runs' parts (anchored: ``in_sample`` per fold) and placebo in-sample runs 0.00, 0.05, .., 1.00
    (95th percentile 0.95); ppo_default's in-sample is 2.0 with the same placebo runs."""
    rows = []
    stats = dict.fromkeys(PART_STATS, 0.0)
    for name, values in (("anchored", in_sample), ("ppo_default", [2.0, 2.0, 2.0])):
        for fold, value in enumerate(values):
            for part in ("in_sample", "validation", "test"):
                rows.append({"kind": "agent", "name": name, "seed": 1, "fold": fold, "placebo": None, "part": part,
                             **stats, "sharpe": value if part == "in_sample" else -3.0})
        for j, value in enumerate([k / 20 for k in range(21)]):  # exact: the 95th percentile is 19 / 20 == 0.95
            rows.append({"kind": "placebo", "name": name, "seed": 1, "fold": j % 3, "placebo": j,
                         "part": "in_sample", **stats, "sharpe": value})
    return pd.DataFrame(rows)


def inference(agent: str, spa: float, dsr: float) -> dict[str, object]:
    """One ``tests.csv`` column, from the real dataclass (its field names are the file's row names)."""
    found = Inference(agent=agent, sharpe=0.0, best_baseline="buy_and_hold", best_baseline_sharpe=0.0,
                      psr_vs_best_baseline=0.5, psr_zero=0.5, dsr=dsr, n_trials=3, pbo=0.5, spa_p_value=spa,
                      spa_reverse_p_value=0.5, spa_rejections=0.0, reverse_rejections=0.0, runs=5, bars=100)
    return vars(found)


def write_report(root: Path, key: str, *, anchored=ANCHORED, in_sample=(1.0, 1.2, 1.3), anchor="buy_and_hold",
                 with_gaps: bool = True) -> None:
    """A report folder as the evaluation notebook writes it, and its experiment file."""
    folder = root / "reports" / key
    folder.mkdir(parents=True)
    results = results_frame(anchored)
    results.to_csv(folder / "results.csv", index=False)
    strategy_table(results, ("sharpe", "max_drawdown")).to_csv(folder / "strategies.csv")
    pd.DataFrame({"ppo_default": inference("ppo_default", 0.9, 0.11),
                  "anchored": inference("anchored", 0.042, 0.77),
                  "anchored_ensemble": inference("anchored_ensemble", 0.3, 0.66)}).to_csv(folder / "tests.csv")
    if with_gaps:
        gap_table(memo_frame(list(in_sample))).to_csv(folder / "generalisation_gap.csv")
    configs = root / "experiments" / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{key}.toml").write_text(CONFIG.format(name=key, anchor=anchor))


def build(root: Path) -> str:
    return verdict_table.build_table(root / "reports", root / "experiments" / "configs")


def table_line(table: str, market: str, name: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.startswith(f"| {market} | {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_numbers_are_read_from_the_right_columns(tmp_path: Path) -> None:
    write_report(tmp_path, "verdict_nasdaq")
    table = build(tmp_path)
    anchored = table_line(table, "nasdaq", "anchored")
    # median [q25, q75] of 0.1 0.5 0.61 0.9 2.0; median drawdown; in-sample median of 1.0 1.2 1.3; floor p95
    assert anchored[2:] == ["0.61 [0.50, 0.90]", "-25.0%", "1.20", "0.95", "yes", "0.042", "0.77"]
    assert table_line(table, "nasdaq", "ppo_default")[2:] == ["-0.20 [-0.40, 0.00]", "-55.0%", "2.00", "0.95",
                                                              "yes", "0.900", "0.11"]
    # the ensemble has no in-sample run of its own; the floor is its configuration's
    assert table_line(table, "nasdaq", "anchored_ensemble")[2:] == ["0.62 [0.30, 0.80]", "-28.0%", "n/a", "0.95",
                                                                    "n/a", "0.300", "0.66"]
    # one benchmark row (both configurations are judged against buy_and_hold); the random baseline is not shown
    assert table_line(table, "nasdaq", "buy_and_hold (benchmark)")[2:4] == ["0.60 [0.55, 0.70]", "-30.0%"]
    assert "random" not in table
    assert "- nasdaq: 2005-01-03 .. 2018-12-31 out of sample, 4096 steps per cell, 5 seeds, 3 paths." in table


def test_goal_per_market_and_overall(tmp_path: Path) -> None:
    write_report(tmp_path, "verdict_nasdaq")  # anchored 0.61 >= 0.60, drawdown 25% < 30%, in sample 1.20 > 0.95
    # sp500: in-sample median 0.95, at the floor -> neither the configuration nor its ensemble meets the goal there
    write_report(tmp_path, "verdict_sp500_1999", in_sample=(0.9, 0.95, 1.3))
    table = build(tmp_path)
    assert "- nasdaq: met (anchored Sharpe >= buy_and_hold: yes, smaller drawdown: yes, in sample outside floor: " \
           "yes; anchored_ensemble Sharpe >= buy_and_hold: yes, smaller drawdown: yes, in sample outside floor: yes)" \
           in table
    assert "- sp500, next-close fills: not met (anchored Sharpe >= buy_and_hold: yes, smaller drawdown: yes, in " \
           "sample outside floor: no; anchored_ensemble Sharpe >= buy_and_hold: yes, smaller drawdown: yes, in " \
           "sample outside floor: no)" in table
    assert "**not met** (1 of 4)" in table
    assert "| sp500_20 pool | report reports/verdict_sp500_20_pool/ not present |" in table
    assert "- eurusd_1h: not met (no report)." in table
    write_report(tmp_path, "verdict_eurusd_1h")
    assert "**met** (2 of 4)" in build(tmp_path)


@pytest.mark.parametrize("change", ["sharpe_equal", "sharpe", "drawdown", "in_sample", "no_placebo"])
def test_each_goal_condition_can_fail_alone(tmp_path: Path, change: str) -> None:
    if change == "sharpe_equal":  # median 0.60, equal to buy_and_hold's: "at least" holds
        write_report(tmp_path, "verdict_nasdaq", anchored=([0.1, 0.5, 0.6, 0.9, 2.0], ANCHORED[1]))
    elif change == "sharpe":  # median 0.59 < buy_and_hold's 0.60
        write_report(tmp_path, "verdict_nasdaq", anchored=([0.1, 0.5, 0.59, 0.9, 2.0], ANCHORED[1]))
    elif change == "drawdown":  # median drawdown 30%: not smaller than buy_and_hold's 30%
        write_report(tmp_path, "verdict_nasdaq", anchored=(ANCHORED[0], [-0.1, -0.2, -0.3, -0.3, -0.5]))
    elif change == "in_sample":  # in-sample median 0.95, exactly the floor: at the floor is inside it
        write_report(tmp_path, "verdict_nasdaq", in_sample=(0.9, 0.95, 1.3))
    else:  # no placebo runs: no floor, so the goal cannot be claimed
        write_report(tmp_path, "verdict_nasdaq", with_gaps=False)
    market = verdict_table.read_market(tmp_path / "reports" / "verdict_nasdaq", "nasdaq",
                                       tmp_path / "experiments" / "configs" / "verdict_nasdaq.toml")
    expected = {"sharpe_equal": (True, True, True), "sharpe": (False, True, True),
                "drawdown": (True, False, True)}.get(change, (True, True, False))
    assert verdict_table.goal_checks(market)["anchored"] == expected


def test_an_unanchored_configuration_never_meets_the_goal(tmp_path: Path) -> None:
    write_report(tmp_path, "verdict_nasdaq")
    config = tmp_path / "experiments" / "configs" / "verdict_nasdaq.toml"
    config.write_text(config.read_text().replace('"--anchor", "buy_and_hold", ', ""))
    market = verdict_table.read_market(config.parents[2] / "reports" / "verdict_nasdaq", "nasdaq", config)
    assert verdict_table.goal_checks(market) == {}
    assert not verdict_table.market_met(market)


def test_a_benchmark_missing_from_the_report_is_an_error(tmp_path: Path) -> None:
    write_report(tmp_path, "verdict_nasdaq", anchor="vol_target")
    with pytest.raises(ValueError, match="'anchored' is judged against 'vol_target'.*add it to the experiment"):
        build(tmp_path)


def test_a_missing_file_names_itself(tmp_path: Path) -> None:
    write_report(tmp_path, "verdict_nasdaq")
    (tmp_path / "reports" / "verdict_nasdaq" / "tests.csv").unlink()
    with pytest.raises(FileNotFoundError, match="verdict_nasdaq/tests.csv: missing"):
        build(tmp_path)


def test_write_replaces_only_the_marked_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_report(tmp_path, "verdict_nasdaq")
    readme = tmp_path / "README.md"
    start, end = verdict_table.START_MARKER, verdict_table.END_MARKER
    readme.write_text(f"# title\n\nbefore\n{start}\nold table\n{end}\nafter\n")
    table = verdict_table.main(["--reports", str(tmp_path / "reports"), "--configs",
                                str(tmp_path / "experiments" / "configs"), "--write", str(readme)])
    assert capsys.readouterr().out.strip() == table.strip()
    written = readme.read_text()
    assert written == f"# title\n\nbefore\n{start}\n{table}\n{end}\nafter\n"
    verdict_table.main(["--reports", str(tmp_path / "reports"), "--configs", str(tmp_path / "experiments" / "configs"),
                        "--write", str(readme)])
    assert readme.read_text() == written  # a rerun changes nothing


@pytest.mark.parametrize("text", ["no markers at all\n",
                                  f"{verdict_table.START_MARKER}\na\n{verdict_table.END_MARKER}\n"
                                  f"{verdict_table.START_MARKER}\nb\n{verdict_table.END_MARKER}\n"])
def test_markers_missing_or_repeated_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="README.md: expected one <!-- verdict-table:start -->"):
        verdict_table.replace_between_markers(text, "table", where="README.md")


def test_rows_are_frozen_records() -> None:
    row = verdict_table.Row(name="a", kind="agent", benchmark="buy_and_hold", anchored=True, sharpe=1.0,
                            sharpe_q25=0.0, sharpe_q75=2.0, max_drawdown=-0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.sharpe = 2.0  # type: ignore[misc]


def test_the_last_repeated_flag_wins_as_in_argparse() -> None:
    # an agent's args come after common_args, so its own --anchor / --total-timesteps override the shared ones
    assert verdict_table._flag(["--anchor", "vol_target", "--x", "--anchor", "buy_and_hold"], "--anchor") == \
        "buy_and_hold"
    assert verdict_table._flag(["--anchor"], "--anchor") is None
