"""A papermill sweep over a portfolio experiment (issue 20 s2: the portfolio variant "works with ... sweeps"):
``notebooks/portfolio_report.ipynb`` runs a ``kind = "portfolio"`` file through the runner once per sweep cell, with
the cell's ``extra_args`` reaching every agent's command line, and writes the report whose ``tests.csv`` the sweep's
index reads."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sentio_lab.scale import sweep as sw
from tests.experiment.test_portfolio_panels import _toml, _write_panel

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_sweep_over_the_anchor_runs_each_portfolio_cell_with_its_own_arguments(tmp_path):
    files = _write_panel(tmp_path / "data")
    config = _toml(tmp_path, files, "refuse")
    sweep_file = tmp_path / "anchors.toml"
    sweep_file.write_text("\n".join([
        'name = "anchors"', f'notebook = "{ROOT / "notebooks/portfolio_report.ipynb"}"',
        'output_parameter = "output_dir"', "workers = 1", 'kernel = "python3"',
        "[parameters]", f'config = "{config}"', f'run_dir = "{tmp_path / "runs"}"',
        "[grid]", 'extra_args = ["", "--anchor equal_weight"]',
        "[headline]", 'file = "tests.csv"', 'column = "pp"', 'rows = ["sharpe", "dsr"]']))
    index = sw.run_sweep(sw.load_sweep(sweep_file), tmp_path / "reports", workers=1).set_index("extra_args")
    assert (index["status"] == "ok").all(), index
    assert json.loads((tmp_path / "reports" / "anchors" / "sweep.json").read_text())["n_trials"] == 2
    sharpe = {}
    for extra in ("", "--anchor equal_weight"):
        report = tmp_path / "reports" / "anchors" / index.loc[extra, "cell"]
        run = Path((report / "run_folder.txt").read_text())
        commands = [json.loads(p.read_text())["command"] for p in run.glob("cells/*/cell.json")]
        assert commands and all(("--anchor equal_weight" in c) == bool(extra) for c in commands)
        tests = pd.read_csv(report / "tests.csv", index_col=0)
        assert float(tests.loc["sharpe", "pp"]) == pytest.approx(float(index.loc[extra, "sharpe"]))
        sharpe[extra] = float(tests.loc["sharpe", "pp"])
    # two runs of one file, kept apart: the anchored agent is another strategy (untrained, it is equal weight)
    assert sharpe[""] != sharpe["--anchor equal_weight"]
