"""Summary of experiment results on synthetic paths whose answers are known by construction."""

import base64
import dataclasses
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from sentio_lab.evaluation.metrics import summary_stats
from sentio_lab.experiment.figures import plot_path_equity, plot_sharpe_distribution, write_html
from sentio_lab.experiment.summary import (
    TARGETS,
    ab_tests,
    ensemble_returns,
    infer,
    strategy_table,
    targets_table,
    verdict,
)

BARS = pd.bdate_range("2015-01-02", periods=600)


def synthetic(edges: dict[str, float], seeds=(1, 2), paths=(0, 1)):
    """Curves and results: a market return plus each strategy's daily edge; agents get seeds, baselines not."""
    rng = np.random.default_rng(0)
    market = rng.normal(0.0003, 0.01, len(BARS))
    curve_rows, result_rows = [], []
    for name, edge in edges.items():
        kind = "baseline" if name in ("buy_and_hold", "sma_crossover") else "agent"
        for seed in (seeds if kind == "agent" else (-1,)):
            for path in paths:
                noise = rng.normal(0, 0.001, len(BARS)) if kind == "agent" else 0.0
                rets = market + edge + noise
                rets[0] = 0.0
                equity = pd.Series(np.cumprod(1 + rets), index=BARS)
                curve_rows.append(pd.DataFrame({"name": name, "seed": seed, "path": path, "timestamp": BARS,
                                                "equity": equity.to_numpy()}))
                stats = summary_stats(equity, pd.Series(1.0, index=BARS[:-1]))
                result_rows.append({"kind": kind, "name": name, "seed": seed, "path": path, "n_trials": 2, **stats})
    return pd.concat(curve_rows, ignore_index=True), pd.DataFrame(result_rows)


@pytest.fixture(scope="module")
def two_agents():
    return synthetic({"strong": 0.002, "weak": -0.003, "buy_and_hold": 0.0, "sma_crossover": -0.0002})


def test_strategy_table_is_median_and_iqr_over_paths_x_seeds(two_agents):
    curves, results = two_agents
    table = strategy_table(results)
    strong = results[results["name"] == "strong"]["sharpe"]
    assert table.loc[("agent", "strong"), ("sharpe", "median")] == pytest.approx(strong.median())
    assert table.loc[("agent", "strong"), ("sharpe", "q25")] == pytest.approx(strong.quantile(0.25))
    assert table.loc[("agent", "strong"), ("runs", "paths x seeds")] == 4
    assert table.loc[("baseline", "buy_and_hold"), ("runs", "paths x seeds")] == 2


def test_ensemble_returns_average_seeds_and_paths(two_agents):
    curves, _ = two_agents
    wide = ensemble_returns(curves)
    strong = curves[curves["name"] == "strong"]
    by_run = [g.set_index("timestamp")["equity"].pct_change() for _, g in strong.groupby(["seed", "path"])]
    expected = pd.concat(by_run, axis=1).mean(axis=1).dropna()
    np.testing.assert_allclose(wide["strong"].to_numpy(), expected.to_numpy(), rtol=1e-12)
    assert len(wide) == len(BARS) - 1


def test_infer_and_verdict_tell_a_strong_agent_from_a_weak_one(two_agents):
    curves, results = two_agents
    strong = infer(results, curves, "strong", reps=300)
    weak = infer(results, curves, "weak", reps=300)
    assert strong.best_baseline == weak.best_baseline == "buy_and_hold"
    assert strong.spa_p_value < 0.05 and strong.psr_vs_best_baseline > 0.95
    # a clearly worse agent: SPA never says it wins (arch's consistent p sits near 0.5, not 1), the reverse
    # test says a baseline beats it in every run
    assert weak.spa_p_value > 0.3 and weak.spa_rejections == 0.0
    assert weak.spa_reverse_p_value < 0.05 and weak.reverse_rejections == 1.0
    assert strong.runs == weak.runs == 4 and strong.spa_rejections == 1.0
    assert 0.0 <= strong.pbo <= 1.0 and strong.n_trials == 2 and 0 <= strong.dsr <= 1
    assert verdict(results, strong).startswith("strong beats every baseline")
    assert verdict(results, weak).startswith("weak loses to at least one baseline (buy_and_hold")
    with pytest.raises(KeyError, match="not an agent"):
        infer(results, curves, "buy_and_hold")


def test_tests_run_on_single_runs_not_on_an_average_of_models():
    """Averaging 4 runs with independent noise would raise the Sharpe; each run is tested on its own."""
    curves, results = synthetic({"noisy": 0.0, "buy_and_hold": 0.0})
    found = infer(results, curves, "noisy", reps=100)
    per_run = []
    for _, curve in curves[curves["name"] == "noisy"].groupby(["seed", "path"]):
        r = curve["equity"].pct_change().dropna().to_numpy()
        per_run.append(r.mean() / r.std(ddof=1))
    assert found.sharpe == pytest.approx(np.median(per_run), rel=1e-9)
    assert found.runs == 4 and found.bars == len(BARS) - 1


def test_one_configuration_has_no_pbo_and_dsr_is_psr0():
    curves, results = synthetic({"only": 0.0, "buy_and_hold": 0.0})
    found = infer(results, curves, "only", reps=200)
    assert np.isnan(found.pbo) and found.dsr == found.psr_zero
    undecided = dataclasses.replace(found, spa_p_value=0.5, spa_reverse_p_value=0.5)
    assert verdict(results, undecided).startswith("only does not beat the baselines: ")
    assert ab_tests(curves, results).empty
    no_baselines = results[results["kind"] == "agent"]
    with pytest.raises(ValueError, match="no baseline"):
        infer(no_baselines, curves[curves["name"] == "only"], "only")


def test_targets_compare_the_median_with_the_seed_system_thresholds(two_agents):
    _, results = two_agents
    table = targets_table(results, "strong")
    assert list(table.index) == [label for *_, label in TARGETS]
    median_sharpe = results[results["name"] == "strong"]["sharpe"].median()
    assert table.loc["Sharpe > 3", "measured (median)"] == pytest.approx(median_sharpe)
    assert table.loc["Sharpe > 3", "met"] == (median_sharpe > 3)


def test_ab_tests_find_the_better_configuration(two_agents):
    curves, results = two_agents
    ab = ab_tests(curves, results, reps=300)
    (row,) = ab.to_dict("records")
    assert (row["a"], row["b"]) == ("strong", "weak")
    assert row["difference"] > 0 and row["ci_low"] > 0 and row["p_value"] < 0.05


def test_figures_and_html_are_written(two_agents, tmp_path):
    curves, results = two_agents
    found = {"strong": infer(results, curves, "strong", reps=100)}
    eq = plot_path_equity(curves, results, tmp_path / "eq.png")
    sh = plot_sharpe_distribution(results, tmp_path / "sh.png")
    assert eq.stat().st_size > 5000 and sh.stat().st_size > 5000
    page = write_html(tmp_path, title="t", verdict="v", table=strategy_table(results), inference=found,
                      targets={"strong": targets_table(results, "strong")},
                      figures={"Equity": eq.name, "Sharpe": str(sh)},  # relative to the page, or absolute
                      meta={"dataset": "synthetic"})
    text = page.read_text()
    assert "strong" in text and "synthetic" in text
    # The page embeds its figures: copied alone to another folder it still holds both images, byte for byte.
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    shutil.copy(page, moved)
    sources = re.findall(r'<img src="([^"]*)"', moved.read_text())
    assert len(sources) == 2 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert [base64.b64decode(src.split(",", 1)[1]) for src in sources] == [eq.read_bytes(), sh.read_bytes()]
    assert not re.findall(r'(?:src|href)="(?!data:)', moved.read_text())  # nothing links a file
    with pytest.raises(FileNotFoundError, match="figure 'missing.png' not found"):
        write_html(tmp_path, title="t", verdict="v", table=strategy_table(results), inference=found, targets={},
                   figures={"Equity": "missing.png"}, meta={})


def test_a_configuration_that_never_trades_is_left_out_not_propagated():
    """A run of zero-variance returns has no Sharpe ratio: the flat configuration gets NaN statistics and is left
    out of its peers' DSR variance and PBO (it still counts as a trial); the peers keep their own numbers."""
    curves, results = synthetic({"strong": 0.002, "flat": 0.0, "weak": -0.003, "buy_and_hold": 0.0})
    flat = curves["name"] == "flat"
    curves.loc[flat, "equity"] = 1.0  # never trades: equity stays at its start
    results.loc[results["name"] == "flat", "sharpe"] = np.nan
    results["n_trials"] = 3
    found = infer(results, curves, "strong", reps=100)
    keep_results, keep_curves = results["name"] != "flat", curves["name"] != "flat"
    reference = infer(results[keep_results], curves[keep_curves], "strong", reps=100)
    # the same DSR as if the flat configuration had not been there (3 trials counted in both)
    assert found.dsr == pytest.approx(reference.dsr, rel=1e-12) and np.isfinite(found.dsr)
    assert found.pbo == pytest.approx(reference.pbo, rel=1e-12) and found.undefined_runs == 0
    assert found.dsr <= found.psr_zero + 1e-12  # with N >= 2 trials the deflated threshold is above 0
    flat_found = infer(results, curves, "flat", reps=100)
    assert np.isnan(flat_found.dsr) and np.isnan(flat_found.sharpe) and flat_found.undefined_runs == 4
    assert "the 0 of 4 paths x seeds that traded (the other 4 never traded" in verdict(results, flat_found)
    assert "medians over 0 runs" in verdict(results, flat_found)
