"""The notebook tooling a new user needs is installed, and the make targets call it as the docs say."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_the_installed_jupyter_has_the_lab_app_and_nbconvert():
    import jupyterlab
    import nbconvert

    lab = subprocess.run([str(BIN / "jupyter"), "lab", "--version"], capture_output=True, text=True, timeout=120)
    assert lab.returncode == 0, lab.stderr[-2000:]
    assert lab.stdout.strip() == jupyterlab.__version__
    convert = subprocess.run([str(BIN / "jupyter"), "nbconvert", "--version"], capture_output=True, text=True,
                             timeout=120)
    assert convert.returncode == 0 and convert.stdout.strip() == nbconvert.__version__


def test_pyproject_and_constraints_name_them():
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    for name in ("jupyterlab", "nbconvert"):
        assert f'"{name}>=' in pyproject
        assert any(line.startswith(f"{name}==") for line in pins), name


def make_dry_run(target: str) -> str:
    """What ``make <target>`` would run with this interpreter's venv (install step left out)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    run = subprocess.run(["make", "-n", "-s", target, "STAMP=", f"VENV={BIN.parent}"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return run.stdout


def test_make_lab_opens_the_notebooks_in_jupyterlab():
    assert make_dry_run("lab").strip() == f"{BIN / 'jupyter'} lab notebooks/"


def test_make_demo_shows_a_text_progress_bar_through_papermill():
    demo = make_dry_run("demo")
    assert "--log-output" in demo and "-p progress text" in demo


def test_make_report_creates_the_folder_papermill_writes_into():
    report = make_dry_run("report").splitlines()
    assert report[0] == "mkdir -p reports/sp500_cpcv"  # papermill: "output folder ... doesn't exist" otherwise
    command = " ".join(report[1:])
    assert "notebooks/evaluation_report.ipynb reports/sp500_cpcv/evaluation_report.ipynb" in command
    assert "-p output_dir reports/sp500_cpcv" in command and "--log-output" in command
