"""Papermill batch sweeps: cells expand, run in parallel, fail alone, resume, and are indexed with figures."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from sentio_lab.agents.tracking import read_offline_run
from sentio_lab.scale import sweep as sw

# A 2-cell notebook: parameters, then a cell that writes stats.csv / returns.csv / a JSON, and fails when x == 3.
_BODY = """
from pathlib import Path
import json
import numpy as np
import pandas as pd
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
if x == 3:
    raise RuntimeError("x three is broken")
rng = np.random.default_rng(int(x * 10))
r = rng.normal(0.001 * x, 0.01, 200)
pd.DataFrame({"agent": [float(r.mean() / r.std()), "2020-01-01"]}, index=["sharpe", "start"]).to_csv(out / "stats.csv")
pd.DataFrame({"agent": r}).to_csv(out / "returns.csv")
(out / "metrics.json").write_text(json.dumps({"val": {"sharpe": float(x)}}))
(out / "runs.txt").open("a").write("ran\\n")
"""


@pytest.fixture()
def notebook(tmp_path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('x = 1\noutput_dir = "."\nlabel = "a"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(_BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    return path


def _write_sweep(tmp_path: Path, notebook: Path, body: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(f'name = "tiny"\nnotebook = "{notebook}"\nworkers = 2\n' + body)
    return path


def test_expand_grid_random_and_combined():
    assert sw.expand_cells({"a": 0}, {"x": [1, 2], "y": ["p", "q"]}, None) == [
        {"a": 0, "x": 1, "y": "p"}, {"a": 0, "x": 1, "y": "q"}, {"a": 0, "x": 2, "y": "p"}, {"a": 0, "x": 2, "y": "q"}]
    space = {"u": {"uniform": [0.0, 1.0]}, "l": {"loguniform": [1e-4, 1e-2]}, "i": {"int": [3, 5]}, "c": ["a", "b"]}
    draws = sw.expand_cells({}, {}, {"samples": 50, "seed": 7, "space": space})
    assert len(draws) == 50 and draws == sw.expand_cells({}, {}, {"samples": 50, "seed": 7, "space": space})
    assert all(0 <= d["u"] <= 1 and 1e-4 <= d["l"] <= 1e-2 and d["i"] in (3, 4, 5) and d["c"] in "ab" for d in draws)
    assert {d["i"] for d in draws} == {3, 4, 5}
    both = sw.expand_cells({}, {"x": [1, 2]}, {"samples": 3, "space": {"u": {"uniform": [0, 1]}}})
    assert len(both) == 6 and [d["x"] for d in both] == [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize(("grid", "random", "match"), [
    ({"x": []}, None, "non-empty list"),
    ({}, {"samples": 0, "space": {"u": [1]}}, "positive integer"),
    ({}, {"samples": 2}, "no parameters"),
    ({}, {"samples": 2, "space": {"u": {"uniform": [2, 1]}}}, "low <= high"),
    ({}, {"samples": 2, "space": {"u": {"loguniform": [0, 1]}}}, "low > 0"),
    ({}, {"samples": 2, "space": {"u": {"normal": [0, 1]}}}, "expected a list"),
    ({}, {"samples": 2, "space": {"u": []}}, "empty list"),
])
def test_expand_refuses_bad_sections(grid, random, match):
    with pytest.raises(ValueError, match=match):
        sw.expand_cells({}, grid, random)


@pytest.mark.parametrize(("body", "match"), [
    ('name = "a"\nnotebook = "n.ipynb"\n', "grid"),
    ('name = "a b"\nnotebook = "n.ipynb"\n[grid]\nx = [1]\n', "plain folder"),
    ('notebook = "n.ipynb"\n[grid]\nx = [1]\n', "'name'"),
    ('name = "a"\nnotebook = "n.ipynb"\ntypo = 1\n[grid]\nx = [1]\n', "unknown keys"),
    ('name = "a"\nnotebook = "n.ipynb"\n[grid]\nx = [1]\n[headline]\nrows = ["s"]\n', "needs 'file'"),
    ('name = "a"\nnotebook = "n.ipynb"\n[grid]\nx = [1]\n[dsr]\nfile = "r.csv"\n', "'file' and 'column'"),
])
def test_load_sweep_refuses_bad_files(tmp_path, body, match):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        sw.load_sweep(path)


def test_cell_names_are_stable_unique_and_readable():
    cells = sw.expand_cells({"n": 5}, {"x": [1, 2], "lr": [0.0001234]}, None)
    varying = sw.varying_keys(cells)
    assert varying == ["x"]
    names = [sw.cell_name(c, varying) for c in cells]
    assert names[0].startswith("x-1__") and len(set(names)) == 2
    assert names == [sw.cell_name(c, varying) for c in cells]
    assert sw.cell_name({"a": 1}, []) == sw.cell_name({"a": 1}, [])  # hash only
    assert sw.cell_name({"f": 0.123456}, ["f"]).startswith("f-0.1235__")


def test_sweep_runs_fails_alone_resumes_and_indexes(tmp_path, notebook, capsys):
    sweep_file = _write_sweep(tmp_path, notebook, (
        '[parameters]\nlabel = "z"\n[grid]\nx = [1, 2, 3]\n'
        '[headline]\nfile = "stats.csv"\ncolumn = "agent"\nrows = ["sharpe", "start", "missing"]\n'
        '[dsr]\nfile = "returns.csv"\ncolumn = "agent"\n'
    ))
    out = tmp_path / "reports"
    sw.main([str(sweep_file), "--out", str(out)])
    root = out / "tiny"
    table = pd.read_csv(root / "index.csv")
    assert list(table["x"]) == [1, 2, 3]
    assert list(table["status"]) == ["ok", "ok", "failed"]
    failed = table.iloc[2]
    assert "RuntimeError" in failed["error"] and "x three is broken" in failed["error"]
    ok = table.iloc[0]
    r = np.random.default_rng(10).normal(0.001, 0.01, 200)
    assert ok["sharpe"] == pytest.approx(r.mean() / r.std())
    assert ok["start"] == "2020-01-01" and np.isnan(ok["missing"])
    assert ok["notebook"].endswith("/tiny.ipynb") and (root / ok["notebook"]).exists()
    summary = json.loads((root / "sweep.json").read_text())
    assert summary["n_trials"] == 3 and summary["n_ok"] == 2 and summary["n_failed"] == 1
    # every cell counts as a trial, failed ones too: N = 3 though only two return series exist
    assert summary["dsr"]["n_trials"] == 3 and 0 <= summary["dsr"]["dsr"] <= 1
    assert summary["dsr"]["selected"] == table.iloc[int(np.argmax(table["sharpe"].fillna(-9)))]["cell"]
    page = (root / "index.html").read_text()
    assert "x three is broken" in page and 'class="failed"' in page and "3 cells" in page
    # W&B (offline, on by default): a train run per cell and an evaluate run with the index, one group
    runs = {run.name: run for run in map(read_offline_run, (root / "wandb").glob("offline-run-*"))}
    assert sorted(runs) == sorted([f"tiny__{name}" for name in table["cell"]] + ["tiny__index"])
    assert {run.group for run in runs.values()} == {"tiny"} and runs["tiny__index"].job_type == "evaluate"
    first = runs[f"tiny__{ok['cell']}"]
    assert first.job_type == "train" and first.config["x"] == 1 and first.config["label"] == "z"
    assert first.summary["sharpe"] == ok["sharpe"] and first.summary["status"] == "ok"
    assert runs[f"tiny__{failed['cell']}"].summary["status"] == "failed"
    staged = first.artifacts[f"tiny__{ok['cell']}-report"]["files"]
    assert set(staged) == {"stats.csv", "tiny.ipynb"}
    assert open(staged["stats.csv"]).read() == (root / ok["cell"] / "stats.csv").read_text()
    index = runs["tiny__index"]
    assert index.summary["n_trials"] == 3 and index.summary["dsr/dsr"] == summary["dsr"]["dsr"]
    assert index.summary["index"]["nrows"] == 3

    # re-run: finished cells are skipped (their notebooks do not run again), the failed one is retried
    sw.main([str(sweep_file), "--out", str(out), "--workers", "1"])
    assert "2 already finished, running 1" in capsys.readouterr().out
    for name in table["cell"][:2]:
        assert (root / name / "runs.txt").read_text() == "ran\n"
    assert list(pd.read_csv(root / "index.csv")["status"]) == ["ok", "ok", "failed"]
    # only the cell run again is logged again (plus the index)
    assert len(list((root / "wandb").glob(f"offline-run-*-tiny__{failed['cell']}"))) == 2
    assert len(list((root / "wandb").glob(f"offline-run-*-tiny__{ok['cell']}"))) == 1


def test_json_headline_random_sweep_and_no_output_parameter(tmp_path, notebook):
    sweep_file = _write_sweep(tmp_path, notebook, (
        '[random]\nsamples = 2\nseed = 3\n[random.space]\nx = [1, 2]\nlabel = ["p", "q", "r"]\n'
        '[headline]\nfile = "metrics.json"\nkeys = ["val.sharpe", "val.nothing"]\n'
    ))
    sweep = sw.load_sweep(sweep_file)
    table = sw.run_sweep(sweep, tmp_path / "out")
    assert (table["status"] == "ok").all()
    assert list(table["val.sharpe"]) == [float(c["x"]) for c in sweep.cells]
    assert table["val.nothing"].isna().all()
    # a headline file that was not written leaves the figures out; no [dsr] section: no dsr entry
    assert sw.read_headline(tmp_path, {"file": "absent.csv"}) == {}
    assert sw.read_headline(tmp_path, {}) == {}
    assert "dsr" not in json.loads((tmp_path / "out" / "tiny" / "sweep.json").read_text())


def test_duplicate_cells_and_dsr_notes(tmp_path, notebook):
    sweep = sw.Sweep(name="dup", notebook=notebook, cells=({"x": 1}, {"x": 1}))
    with pytest.raises(ValueError, match="same parameters"):
        sw.run_sweep(sweep, tmp_path)
    assert sw.sweep_dsr({"a": pd.Series([0.1, 0.2])}, 3)["dsr"] is None
    flat = {"a": pd.Series([0.0, 0.0, 0.0]), "b": pd.Series([0.0, 0.0, 0.0])}
    assert "finite" in sw.sweep_dsr(flat, 2)["note"]


def test_example_sweep_files_parse():
    files = sorted(Path("experiments/sweeps").glob("*.toml"))
    assert files
    for path in files:
        sweep = sw.load_sweep(path)
        assert sweep.notebook.exists() and len(sweep.cells) >= 2


def test_run_cell_in_process_records_ok_and_failure(tmp_path, notebook):
    # the worker function itself (the sweep runs it in spawned processes, which coverage does not follow)
    ok = sw._run_cell(str(notebook), str(tmp_path / "ok"), {"x": 2}, None, "output_dir")
    assert ok["status"] == "ok" and (tmp_path / "ok" / "stats.csv").exists()
    (tmp_path / "ok" / "report.html").write_text("<html></html>")
    bad = sw._run_cell(str(notebook), str(tmp_path / "bad"), {"x": 3}, "python3", "output_dir")
    assert bad["status"] == "failed" and "x three is broken" in bad["error"] and "Traceback" in bad["traceback"]
    assert json.loads((tmp_path / "bad" / sw.CELL_FILE).read_text())["status"] == "failed"
    sweep = sw.Sweep(name="t", notebook=notebook, cells=({"x": 2}, {"x": 3}), dsr={"file": "absent.csv", "column": "a"})
    table = sw.write_index(sweep, tmp_path, ["ok", "bad"])
    assert list(table["report"]) == ["ok/report.html", ""]
    assert 'href="ok/report.html"' in (tmp_path / "index.html").read_text()
    assert json.loads((tmp_path / "sweep.json").read_text())["dsr"]["dsr"] is None
