"""The market-impact notebook runs end to end (fast) and writes its figure and fitted Y."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "market_impact.ipynb"


def test_committed_notebook_has_parameters_and_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    papermill = pytest.importorskip("papermill")
    assert {"paths", "sizes", "horizon", "output_dir"} <= set(papermill.inspect_notebook(str(NOTEBOOK)))


def test_notebook_executes_and_fits_a_concave_impact(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "impact"
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "executed.ipynb"),
                               parameters={"paths": 12, "output_dir": str(out)}, kernel_name="python3",
                               cwd=str(NOTEBOOK.parent), progress_bar=False)
    assert (out / "impact_vs_size.png").stat().st_size > 5_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["concave"] and 0 < summary["delta"] < 1 and summary["Y"] > 0
