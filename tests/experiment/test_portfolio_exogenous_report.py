"""reports/sp500_20_portfolio_exogenous_cpcv (issue 20 s5, the portfolio ablation): the config is an A/B of one
difference (--exogenous) on the same seeds, folds and costs; the committed tables are today's from the committed
inputs, and ablation.md quotes the A/B test and DSRs of the committed tables, with the verdict its rule gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sentio_lab.data.exogenous import bundled_exogenous
from sentio_lab.evaluation.portfolio_report import asset_table, concentration_table
from sentio_lab.experiment.portfolio_config import load_portfolio_config
from sentio_lab.experiment.portfolio_summary import memorisation_table

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "sp500_20_portfolio_exogenous_cpcv.toml"
REPORT = ROOT / "reports" / "sp500_20_portfolio_exogenous_cpcv"
AGENTS = ("ppo_prices", "ppo_exogenous")


def test_the_config_differs_in_the_alternative_data_only():
    config = load_portfolio_config(CONFIG)
    agents = {a.name: a for a in config.agents}
    assert tuple(agents) == AGENTS and {a.variant for a in config.agents} == {"ppo_portfolio"}
    assert agents["ppo_prices"].args == () and agents["ppo_exogenous"].args == ("--exogenous", "vix", "credit_spread")
    assert len(config.seeds) >= 5 and "--total-timesteps" in config.common_args
    vix = bundled_exogenous("vix")  # the range is the bundled VIX's: no bar would see a stale value
    assert vix.dates[0] <= pd.Timestamp(config.data_start) + pd.Timedelta(days=7)
    assert pd.Timestamp(config.data_end) <= vix.dates[-1]


def test_committed_tables_are_todays_from_their_inputs():
    paths = pd.read_csv(REPORT / "paths.csv")
    memo = pd.read_csv(REPORT / "memorisation_cells.csv")
    contribution = asset_table(paths, "contrib").assign(costs=paths.groupby("name", sort=False)["costs"].median())
    expected = {"asset_contribution": contribution, "asset_turnover": asset_table(paths, "turnover"),
                "concentration": concentration_table(paths), "memorisation": memorisation_table(memo)}
    for stem, table in expected.items():
        committed = pd.read_csv(REPORT / f"{stem}.csv", index_col=0)
        pd.testing.assert_frame_equal(table, committed, check_names=False, rtol=1e-12)
    contributions = paths[[c for c in paths if c.startswith("contrib:")]].sum(axis=1) - paths["costs"]
    np.testing.assert_allclose(contributions, paths["total_return"], atol=1e-10)
    # same seeds and folds for both agents; same paths
    cells = {name: set(zip(part["seed"], part["fold"], strict=True)) for name, part in memo.groupby("name")}
    assert set(cells) == set(AGENTS) and cells["ppo_prices"] == cells["ppo_exogenous"]
    assert len(cells["ppo_prices"]) == 5 * 3
    agents = paths[paths["kind"] == "agent"]
    runs = {name: set(zip(part["seed"], part["path"], strict=True)) for name, part in agents.groupby("name")}
    assert runs["ppo_prices"] == runs["ppo_exogenous"]


def test_ablation_md_quotes_the_committed_ab_test_and_dsrs():
    ab = pd.read_csv(REPORT / "ab_tests.csv")
    assert len(ab) == 1 and {ab.loc[0, "a"], ab.loc[0, "b"]} == set(AGENTS)
    row = ab.iloc[0]
    assert row["ci_low"] <= row["difference"] <= row["ci_high"] and 0 <= row["p_value"] <= 1
    tests = pd.read_csv(REPORT / "tests.csv", index_col=0)
    assert set(tests.columns) == set(AGENTS) and (tests.loc["n_trials"].astype(int) == 2).all()
    text = (REPORT / "ablation.md").read_text()
    assert (f"SR({row['a']}) - SR({row['b']}) {row['difference']:+.2e} per bar, 95 % CI [{row['ci_low']:+.2e}, "
            f"{row['ci_high']:+.2e}], p = {row['p_value']:.3f}") in text
    for agent in AGENTS:
        assert f"DSR {agent} {float(tests.loc['dsr', agent]):.2f}" in text
    exogenous_minus_prices = row["difference"] * (1 if row["a"] == "ppo_exogenous" else -1)
    helps = exogenous_minus_prices > 0 and row["p_value"] < 0.05
    assert ("**helps**" if helps else "**does not help**") in text
