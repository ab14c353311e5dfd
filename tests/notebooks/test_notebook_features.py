"""The features-and-regimes notebook runs end to end with CI-sized parameters and writes its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "features_and_regimes.ipynb"
FIGURES = ("warmup.png", "correlation_heatmap.png", "regimes.png", "multi_timeframe.png")


def test_committed_notebook_has_parameters_and_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    papermill = pytest.importorskip("papermill")
    inferred = papermill.inspect_notebook(str(NOTEBOOK))
    assert {"dataset", "fx_dataset", "regimes", "hmm_restarts", "max_bars", "output_dir"} <= set(inferred)
    assert inferred["max_bars"]["default"] == "None" and inferred["dataset"]["default"] == '"sp500"'
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_notebook_executes_and_writes_its_figures(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    out = tmp_path / "report"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        parameters={"max_bars": 1500, "regimes": 2, "hmm_restarts": 1, "output_dir": str(out)},
        kernel_name="python3",
        cwd=str(NOTEBOOK.parent),
        progress_bar=False,
    )
    for name in FIGURES:
        figure = out / name
        assert figure.exists() and figure.stat().st_size > 5_000, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["observation_columns"] >= 150
    assert len(summary["regime"]["vol_mean_by_state"]) == 2
    assert set(summary["multi_timeframe"]["blocks"]) == {"base", "4h", "1D"}
