"""Papermill batch sweeps: one notebook, a grid or a random set of its parameters, one report per cell.

A sweep file (TOML, see ``experiments/sweeps/``) names a notebook and the parameter sets to run it with::

    name = "sp500_fees"                      # reports go to <out>/<name>/<cell>/
    notebook = "notebooks/train_and_report.ipynb"
    output_parameter = "output_dir"          # the notebook parameter that receives the cell's folder
    workers = 2

    [parameters]                             # passed to every cell
    total_timesteps = 4096

    [grid]                                   # every combination (a cartesian product) ...
    fee_bps = [0.5, 1.0]

    [random]                                 # ... and / or `samples` draws (seeded) from a space
    samples = 4
    seed = 0
    [random.space]
    slippage_bps = {uniform = [0.5, 2.0]}    # also loguniform = [a, b], int = [a, b] (inclusive), or a list

    [headline]                               # figures the index shows, read from a file each cell writes
    file = "stats.csv"                       # a CSV (first column = row names) or a JSON file
    column = "ppo mean of seeds"             # CSV: the column; rows = its rows; JSON: keys = dotted paths
    rows = ["sharpe", "total_return", "max_drawdown", "psr"]

    [dsr]                                    # optional: deflated Sharpe of the best cell over all cells
    file = "returns.csv"                     # per-period returns each cell writes (first column = index)
    column = "ppo"

``python -m sentio_lab.scale.sweep <file> [--workers N] [--out reports]`` executes every cell with papermill in
parallel worker processes (each runs its own kernel). A cell whose ``cell.json`` says ``ok`` is skipped when
the sweep is run again (resumable); a cell that raises is recorded with its error (``status = "failed"``) while
the others go on, and is retried on the next run. The index (``index.csv``, ``index.html`` and ``sweep.json``)
lists every cell with its parameters, headline figures and links to its executed notebook and report.

Every cell is a trial: ``n_trials`` in ``sweep.json`` (and the deflated Sharpe ratio when ``[dsr]`` is given) counts
all of them, failed ones included, because choosing the best of N reports is a selection over N configurations.
Papermill does the notebook execution (parameter injection, kernel, output notebook); this module only fans the
cells out, remembers which finished, and collects what they wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import itertools
import json
import math
import multiprocessing
import re
import time
import tomllib
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Per-cell record file: its ``status`` ("ok" or "failed") decides whether a re-run skips the cell.
CELL_FILE = "cell.json"
_KNOWN_KEYS = {"name", "notebook", "output_parameter", "workers", "kernel", "parameters", "grid", "random",
               "headline", "dsr", "description"}


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    name: str
    """sweep name: the cells' reports go to ``<out>/<name>/<cell>/``"""
    notebook: Path
    """the notebook every cell executes"""
    cells: tuple[dict[str, Any], ...]
    """the parameter set of each cell (shared parameters merged in), in order"""
    output_parameter: str | None = "output_dir"
    """notebook parameter set to the cell's folder (None: the notebook is not told where to write)"""
    workers: int = 1
    """parallel worker processes"""
    kernel: str | None = None
    """Jupyter kernel name (None: the notebook's own)"""
    headline: dict[str, Any] = field(default_factory=dict)
    """where the index reads each cell's headline figures (``file`` and ``column`` / ``rows`` or ``keys``)"""
    dsr: dict[str, Any] = field(default_factory=dict)
    """where each cell's per-period returns are (``file``, ``column``) for the deflated Sharpe ratio"""


def _draw(spec: Any, rng: np.random.Generator, key: str) -> Any:
    """One random value of a parameter: a list (uniform choice) or {uniform | loguniform | int = [lo, hi]}."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"random.space.{key}: empty list")
        return spec[int(rng.integers(len(spec)))]
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), = spec.items()
        if not (isinstance(bounds, list) and len(bounds) == 2 and bounds[0] <= bounds[1]):
            raise ValueError(f"random.space.{key}: {kind} needs [low, high] with low <= high, got {bounds!r}")
        lo, hi = bounds
        if kind == "uniform":
            return float(rng.uniform(lo, hi))
        if kind == "loguniform":
            if lo <= 0:
                raise ValueError(f"random.space.{key}: loguniform needs low > 0, got {lo}")
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if kind == "int":
            return int(rng.integers(int(lo), int(hi) + 1))
    raise ValueError(f"random.space.{key}: expected a list or {{uniform|loguniform|int = [low, high]}}, got {spec!r}")


def expand_cells(parameters: dict[str, Any], grid: dict[str, list], random: dict[str, Any] | None) -> list[dict]:
    """The parameter sets of a sweep: the grid's cartesian product, then the random draws, each on ``parameters``.

    With both a grid and a random section, every grid point is combined with every random draw.
    """
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid.{key}: expected a non-empty list, got {values!r}")
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] or [{}]
    draws: list[dict[str, Any]] = [{}]
    if random:
        samples, space = random.get("samples"), random.get("space", {})
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"random.samples: expected a positive integer, got {samples!r}")
        if not space:
            raise ValueError("random.space: no parameters to draw")
        rng = np.random.default_rng(random.get("seed", 0))
        draws = [{key: _draw(spec, rng, key) for key, spec in space.items()} for _ in range(samples)]
    return [{**parameters, **point, **draw} for point in points for draw in draws]


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; the notebook path is taken relative to the working directory."""
    path = Path(path)
    raw = tomllib.loads(path.read_text())
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(_KNOWN_KEYS)})")
    for key in ("name", "notebook"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{path}: '{key}' must be a non-empty string")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", raw["name"]):
        raise ValueError(f"{path}: name {raw['name']!r} must be a plain folder name (letters, digits, _ . -)")
    if "grid" not in raw and "random" not in raw:
        raise ValueError(f"{path}: give a [grid] or a [random] section (or both)")
    cells = expand_cells(raw.get("parameters", {}), raw.get("grid", {}), raw.get("random"))
    headline = raw.get("headline", {})
    if headline and "file" not in headline:
        raise ValueError(f"{path}: [headline] needs 'file'")
    dsr = raw.get("dsr", {})
    if dsr and not {"file", "column"} <= set(dsr):
        raise ValueError(f"{path}: [dsr] needs 'file' and 'column'")
    return Sweep(
        name=raw["name"], notebook=Path(raw["notebook"]), cells=tuple(cells),
        output_parameter=raw.get("output_parameter", "output_dir") or None, workers=int(raw.get("workers", 1)),
        kernel=raw.get("kernel"), headline=headline, dsr=dsr,
    )


def cell_name(params: dict[str, Any], varying: Sequence[str]) -> str:
    """A folder name for a cell: its varying parameters (readable, shortened) and a hash of all its parameters.

    The hash makes the name stable across runs and unique per parameter set, so a re-run finds finished cells
    even when the sweep file gains cells.
    """
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = []
    for key in varying:
        value = params[key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}-{text}")
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts))[:80]
    return f"{slug}__{digest}" if slug else digest


def varying_keys(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Parameters that differ between cells (what names and the index show)."""
    keys = sorted({k for cell in cells for k in cell})
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in cells}) > 1]


def _run_cell(notebook: str, cell_dir: str, params: dict[str, Any], kernel: str | None,
              output_parameter: str | None) -> dict[str, Any]:
    """Execute one cell with papermill in this (worker) process; never raises: errors are recorded."""
    import papermill

    from sentio_lab.experiment.cells import write_json_atomic  # the runner's: a killed worker leaves no half file

    out = Path(cell_dir)
    out.mkdir(parents=True, exist_ok=True)
    parameters = dict(params)
    if output_parameter:
        parameters[output_parameter] = str(out)
    record: dict[str, Any] = {"parameters": params, "started": time.time()}
    try:
        papermill.execute_notebook(
            notebook, str(out / Path(notebook).name), parameters=parameters, kernel_name=kernel,
            progress_bar=False, log_output=False,
        )
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001 -- any failure of a cell is recorded, the sweep goes on
        record["status"] = "failed"
        # papermill's PapermillExecutionError carries the notebook's exception name and message
        ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
        record["error"] = f"{ename}: {evalue}"
        record["traceback"] = traceback.format_exc(limit=5)
    record["duration_s"] = time.time() - record["started"]
    write_json_atomic(out / CELL_FILE, record)
    return record


def read_headline(cell_dir: Path, headline: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one cell, from the file it wrote (empty when none is configured or it is missing)."""
    if not headline:
        return {}
    path = cell_dir / headline["file"]
    if not path.exists():
        return {}
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        figures = {}
        for key in headline.get("keys", []):
            value: Any = data
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            figures[key] = value
        return figures
    table = pd.read_csv(path, index_col=0)
    column = headline.get("column", table.columns[0])
    rows = headline.get("rows", list(table.index))
    return {row: _number(table.at[row, column]) if row in table.index else None for row in rows}


def _number(value: Any) -> Any:
    """A CSV cell as a float where it is one (stats tables mix dates and numbers in one column)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _read_returns(cell_dir: Path, dsr: dict[str, Any]) -> pd.Series | None:
    path = cell_dir / dsr["file"]
    if not path.exists():
        return None
    return pd.read_csv(path, index_col=0)[dsr["column"]].dropna()


def sweep_dsr(returns: dict[str, pd.Series], n_trials: int) -> dict[str, Any]:
    """Deflated Sharpe ratio of the best cell, counting ``n_trials`` (every cell of the sweep) as trials."""
    from sentio_lab.evaluation.inference import deflated_sharpe_of_trials

    if len(returns) < 2:
        return {"dsr": None, "note": f"needs returns of >= 2 cells, have {len(returns)}"}
    try:
        result = deflated_sharpe_of_trials(returns, n_trials=n_trials)
    except ValueError as err:
        return {"dsr": None, "note": str(err)}
    return {"dsr": result.dsr, "selected": result.selected, "sharpe_per_period": result.sharpe, "sr0": result.sr0,
            "n_trials": result.n_trials}


def write_index(sweep: Sweep, root: Path, names: Sequence[str]) -> pd.DataFrame:
    """Write ``index.csv``, ``index.html`` and ``sweep.json`` under ``root`` from the cells' records."""
    varying = varying_keys(sweep.cells)
    rows, returns = [], {}
    for name, params in zip(names, sweep.cells, strict=True):
        cell_dir = root / name
        record = json.loads((cell_dir / CELL_FILE).read_text()) if (cell_dir / CELL_FILE).exists() else {}
        status = record.get("status", "not run")
        row: dict[str, Any] = {"cell": name, "status": status, **{k: params.get(k) for k in varying}}
        if status == "ok":
            row.update(read_headline(cell_dir, sweep.headline))
            if sweep.dsr:
                series = _read_returns(cell_dir, sweep.dsr)
                if series is not None:
                    returns[name] = series
        row["duration_s"] = record.get("duration_s")
        row["error"] = record.get("error", "")
        row["notebook"] = f"{name}/{sweep.notebook.name}"
        report = cell_dir / "report.html"
        row["report"] = f"{name}/report.html" if report.exists() else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(root / "index.csv", index=False)
    n_trials = len(sweep.cells)
    summary: dict[str, Any] = {
        "name": sweep.name, "notebook": str(sweep.notebook), "n_trials": n_trials,
        "n_ok": int((table["status"] == "ok").sum()), "n_failed": int((table["status"] == "failed").sum()),
        "varying": varying, "cells": [dict(cell=n, parameters=p) for n, p in zip(names, sweep.cells, strict=True)],
    }
    if sweep.dsr:
        summary["dsr"] = sweep_dsr(returns, n_trials)
    (root / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    (root / "index.html").write_text(_index_html(sweep, table, summary))
    return table


def _index_html(sweep: Sweep, table: pd.DataFrame, summary: dict[str, Any]) -> str:
    """A self-contained index page: one row per cell, links to its notebook and report, errors shown."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns if c not in ("notebook", "report"))
    body = []
    for _, row in table.iterrows():
        cells = []
        for column in table.columns:
            if column in ("notebook", "report"):
                continue
            value = row[column]
            text = f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else (
                "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value))
            if column == "cell":
                links = [f'<a href="{html.escape(row["notebook"])}">notebook</a>']
                if row["report"]:
                    links.append(f'<a href="{html.escape(row["report"])}">report</a>')
                text = f"{html.escape(text)} ({', '.join(links)})"
            else:
                text = html.escape(text)
            style = ' class="failed"' if column == "status" and value == "failed" else ""
            cells.append(f"<td{style}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    dsr = summary.get("dsr")
    dsr_line = (f"<p>Deflated Sharpe ratio of the best cell over all {summary['n_trials']} cells: "
                f"{html.escape(json.dumps(dsr, default=str))}</p>") if dsr else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>sweep {html.escape(sweep.name)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:2px 6px;font-size:13px}.failed{background:#fdd}</style></head><body>"
        f"<h1>Sweep {html.escape(sweep.name)}</h1>"
        f"<p>Notebook <code>{html.escape(str(sweep.notebook))}</code>; {summary['n_trials']} cells "
        f"(the trial count for DSR), {summary['n_ok']} ok, {summary['n_failed']} failed. The figures are what each "
        "cell's notebook wrote (read its report for range, costs and seeds); picking the best row is a selection "
        "over every cell.</p>"
        f"{dsr_line}<table><tr>{head}</tr>{''.join(body)}</table></body></html>"
    )


def log_sweep(sweep: Sweep, root: Path, names: Sequence[str], ran: Sequence[str], table: pd.DataFrame, *,
              project: str = "sentio-lab", mode: str = "offline") -> None:
    """W&B runs of a sweep, in group ``sweep.name`` under ``root/wandb``: one ``job_type="train"`` run per cell
    run now (``ran``; its parameters as config, its index row as summary, the report files and executed notebook
    it wrote as a ``report`` artifact) and ``<name>__index``, ``job_type="evaluate"``: the index as a
    ``wandb.Table``, ``sweep.json``'s counts and DSR as summary, the index files as an artifact."""
    from sentio_lab.agents.tracking import Tracker
    from sentio_lab.evaluation.report import REPORT_FILES

    def tracker(name: str, job_type: str, config: dict[str, Any]) -> Tracker:
        return Tracker(True, project=project, run_name=f"{sweep.name}__{name}", config=config, run_dir=root,
                       mode=mode, group=sweep.name, job_type=job_type)

    rows = table.set_index("cell")
    for name, params in zip(names, sweep.cells, strict=True):
        if name not in ran:
            continue
        run = tracker(name, "train", {"cell": name, **params})
        run.log_summary({k: v for k, v in rows.loc[name].items() if k not in params and not pd.isna(v)})
        cell_dir = root / name
        files = [cell_dir / f for f in (*REPORT_FILES.values(), sweep.notebook.name) if (cell_dir / f).exists()]
        if files:
            run.log_artifact(files, name=f"{run.run.id}-report", type="report")
        run.finish()
    summary = json.loads((root / "sweep.json").read_text())
    run = tracker("index", "evaluate", {"notebook": str(sweep.notebook), "varying": summary["varying"]})
    run.log_table("index", table)
    run.log_summary({k: summary[k] for k in ("n_trials", "n_ok", "n_failed")})
    if "dsr" in summary:
        run.log_summary({f"dsr/{k}": v for k, v in summary["dsr"].items()})
    run.log_artifact([root / f for f in ("index.csv", "index.html", "sweep.json")], name=f"{run.run.id}-files",
                     type="results")
    run.finish()


def run_sweep(sweep: Sweep, out: str | Path = "reports", *, workers: int | None = None, track: bool = False,
              wandb_project: str = "sentio-lab", wandb_mode: str = "offline") -> pd.DataFrame:
    """Run every unfinished cell of ``sweep`` (``workers`` processes), then write the index; returns it.

    With ``track`` the cells run now and the index are logged to W&B (:func:`log_sweep`).
    """
    root = Path(out) / sweep.name
    root.mkdir(parents=True, exist_ok=True)
    varying = varying_keys(sweep.cells)
    names = [cell_name(params, varying) for params in sweep.cells]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep {sweep.name}: two cells have the same parameters")
    todo = []
    for name, params in zip(names, sweep.cells, strict=True):
        record_path = root / name / CELL_FILE
        if record_path.exists() and json.loads(record_path.read_text()).get("status") == "ok":
            continue  # finished in an earlier run
        todo.append((name, params))
    n_workers = max(1, min(workers or sweep.workers, len(todo) or 1))
    print(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(sweep.cells) - len(todo)} already finished, "
          f"running {len(todo)} on {n_workers} workers")
    if todo:
        # spawn: a clean interpreter per worker (no forked torch / thread state); each starts its own kernel
        with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(_run_cell, str(sweep.notebook), str(root / name), params, sweep.kernel,
                            sweep.output_parameter): name
                for name, params in todo
            }
            for future in as_completed(futures):
                record = future.result()
                extra = f": {record['error']}" if record["status"] != "ok" else ""
                print(f"  {futures[future]}: {record['status']} in {record['duration_s']:.1f}s{extra}")
    table = write_index(sweep, root, names)
    if track and wandb_mode != "disabled":
        log_sweep(sweep, root, names, [name for name, _ in todo], table, project=wandb_project, mode=wandb_mode)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m sentio_lab.scale.sweep <file>``."""
    parser = argparse.ArgumentParser(prog="python -m sentio_lab.scale.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("file", help="sweep file (TOML), e.g. experiments/sweeps/sp500_fees.toml")
    parser.add_argument("--workers", type=int, default=None, help="parallel workers (default: the file's)")
    parser.add_argument("--out", default="reports", help="reports root: cells go to <out>/<name>/<cell>/")
    parser.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                        help="log each cell and the index as W&B runs in one group (offline: <out>/<name>/wandb; "
                             "upload later with `wandb sync`)")
    parser.add_argument("--wandb-project-name", default="sentio-lab", help="W&B project")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "online", "disabled"), help="W&B mode")
    options = parser.parse_args(argv)
    sweep = load_sweep(options.file)
    table = run_sweep(sweep, options.out, workers=options.workers, track=options.track,
                      wandb_project=options.wandb_project_name, wandb_mode=options.wandb_mode)
    failed = int((table["status"] == "failed").sum())
    print(f"index: {Path(options.out) / sweep.name / 'index.html'} ({len(table)} cells, {failed} failed)")


if __name__ == "__main__":
    main()
