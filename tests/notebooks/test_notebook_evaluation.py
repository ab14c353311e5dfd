"""The evaluation report notebook: parameters, a golden copy made from it, and nbval catching a moved number."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "evaluation_report.ipynb"
GOLDEN = ROOT / "reports" / "golden" / "evaluation_report.ipynb"
SANITIZE = ROOT / "reports" / "golden" / "sanitize.cfg"


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_notebook_has_one_parameters_cell_and_no_outputs():
    papermill = pytest.importorskip("papermill")
    cells = code_cells(NOTEBOOK)
    assert [("parameters" in c["metadata"].get("tags", [])) for c in cells].count(True) == 1
    assert all(not c["outputs"] and c["execution_count"] is None for c in cells)
    params = papermill.inspect_notebook(str(NOTEBOOK))
    expected = {"config", "overrides", "extra_args", "workers", "run_dir", "output_dir", "spa_reps", "progress"}
    assert expected <= set(params)


def test_golden_was_executed_from_this_notebook():
    """`make golden` regenerates the golden copy; a notebook edit without it fails here, not silently."""
    source = [c["source"] for c in code_cells(NOTEBOOK)]
    golden = [c for c in code_cells(GOLDEN) if "injected-parameters" not in c["metadata"].get("tags", [])]
    assert [c["source"] for c in golden] == source
    assert all(c["outputs"] for c in golden[1:])  # executed: every cell after the defaults printed something
    text = json.dumps(golden)
    assert "does not beat the baselines" in text or "beats every baseline" in text or "loses to" in text


def test_nbval_fails_when_a_reported_number_moves(tmp_path):
    """nbval with the golden's sanitize rules catches a moved number in the golden's own report lines. The lines
    are replayed from one-cell notebooks (printing exactly the stored text) rather than by re-executing the whole
    golden, which `make test`'s second command already does: what is checked here is that a moved number is
    compared, i.e. that no sanitize rule hides it."""
    import nbformat

    golden = json.loads(GOLDEN.read_text())
    texts = [text for text in golden_texts(GOLDEN) if "median annualised Sharpe" in text]
    assert len(texts) == 2  # the diagnostics line and the verdict

    def replay(stored_texts: list[str]) -> nbformat.NotebookNode:
        """Cells printing the golden's lines, with ``stored_texts`` as their stored outputs."""
        cells = []
        for number, (printed, stored) in enumerate(zip(texts, stored_texts, strict=True), start=1):
            cell = nbformat.v4.new_code_cell(f"print({printed.removesuffix(chr(10))!r})", execution_count=number)
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
            cells.append(cell)
        return nbformat.v4.new_notebook(cells=cells, metadata=golden["metadata"])

    moved = [text.replace("median annualised Sharpe ", "median annualised Sharpe 9") for text in texts]
    assert moved != texts
    nbformat.write(replay(texts), tmp_path / "faithful.ipynb")
    nbformat.write(replay(moved), tmp_path / "tampered.ipynb")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "--nbval",
                          "faithful.ipynb", "tampered.ipynb", "--nbval-sanitize-with", str(SANITIZE)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1, run.stdout[-2000:]
    assert re.search(r"\b2 failed, 2 passed", run.stdout), run.stdout[-2000:]  # each moved line, nothing else
    assert run.stdout.startswith("..FF"), run.stdout[-2000:]  # the faithful cells pass, the tampered ones fail
    # Each failure is a mismatch on the moved number's comparison. How often the number is echoed in a section
    # varies (pytest shows the compared strings in full when it detects CI), so each section is checked for it.
    sections = run.stdout.split("short test summary info")[0].split("mismatch 'stdout'")[1:]
    assert len(sections) == 2 and all("Sharpe 9" in section for section in sections), run.stdout[-2000:]


def tiny_experiment(tmp_path: Path) -> Path:
    """A CI-sized experiment file (2 walk-forward folds, 1 seed, buy-and-hold only)."""
    path = tmp_path / "reuse.toml"
    args = ["--total-timesteps", "256", "--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2",
            "--update-epochs", "1", "--hidden-size", "8"]
    path.write_text(f"""
name = "reuse"
dataset = "nasdaq"
data_end = "2003-12-31"
split = "walk_forward"
n_groups = 2
seeds = [1]
baselines = ["buy_and_hold"]
common_args = ["--window", "4", "--episode-length", "16", "--feature-cache-dir", "{tmp_path / 'cache'}"]
[agents.tiny]
args = {args!r}
""".replace("'", '"'))
    return path


@pytest.mark.slow
def test_the_notebook_reports_a_finished_command_line_run_without_retraining(tmp_path):
    import pandas as pd
    import papermill as pm

    from sentio_lab.experiment.__main__ import main
    from sentio_lab.experiment.runner import RESULTS_FILE

    config = tiny_experiment(tmp_path)
    runs = main(["--config", str(config), "--output-root", str(tmp_path / "runs"), "--no-progress"])
    assert runs == tmp_path / "runs" / "reuse"
    trained = {p: p.stat().st_mtime_ns for folder in ("cells", "evaluations", "baselines")
               for p in (runs / folder).rglob("*") if p.is_file()}
    assert any(p.name == "checkpoint.pt" for p in trained)
    cli_results = pd.read_parquet(runs / RESULTS_FILE)
    report = tmp_path / "not" / "yet" / "there"  # the notebook creates its output folder
    executed = tmp_path / "executed.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(executed), kernel_name="python3", progress_bar=False,
                        parameters={"config": str(config), "run_dir": str(runs), "output_dir": str(report),
                                    "spa_reps": 100, "progress": "none"})
    # nothing retrained or re-evaluated: the same files, untouched
    after = {p: p.stat().st_mtime_ns for folder in ("cells", "evaluations", "baselines")
             for p in (runs / folder).rglob("*") if p.is_file()}
    assert after == trained
    assert f"cells in {runs}: 2 of 2 already trained (reused as they are), 0 to train" in executed.read_text()
    # and the report is the command line's results, bit for bit
    assert (report / "results.csv").read_text() == cli_results.to_csv(index=False)
    assert {"strategies.csv", "tests.csv", "verdict.txt", "report.html"} <= {p.name for p in report.iterdir()}


def golden_texts(path: Path) -> list[str]:
    """Every text nbval compares in the golden notebook: streams and text/plain of results."""
    texts = []
    for cell in code_cells(path):
        for output in cell["outputs"]:
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            texts.append("".join(text))
    return texts


def assert_every_number_shown(path: Path) -> None:
    texts = golden_texts(path)
    assert not [t for t in texts if "..." in t]  # pandas elides wide tables with "...": nbval never compares those
    table = next(t for t in texts if "paths x seeds" in t and "median" in t)
    from sentio_lab.experiment.summary import REPORT_STATS

    assert table.count("q25") == table.count("q75") == len(REPORT_STATS)  # cvar_5 q25 / q75 included


def test_golden_shows_every_number_of_its_tables():
    assert_every_number_shown(GOLDEN)  # the golden made before display.max_columns had cvar_5 q25 / q75 as "..."
