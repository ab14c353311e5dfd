"""User panels in a portfolio experiment file (``dataset = "files"``, ``files``, ``missing``): three CSVs written here
load as the runner's panel; a missing bar is an error naming the asset, the date and the policy to change, or, with
``missing = "ffill"``, a recorded fill in ``plan.json`` and the report; bad fields get one-line errors naming them."""

from __future__ import annotations

import json

import pytest

from sentio_lab.data import DataValidationError
from sentio_lab.experiment import portfolio_plan
from sentio_lab.experiment import portfolio_runner as runner
from sentio_lab.experiment.config import AgentSpec
from sentio_lab.experiment.portfolio_config import PortfolioExperimentConfig, load_portfolio_config
from sentio_lab.experiment.portfolio_summary import write_portfolio_report
from tests.data.test_panel import synthetic_frames
from tests.experiment.test_portfolio_runner import COMMON, TINY_ARGS


def _write_panel(folder, drop_row: int | None = None) -> list[str]:
    frames = synthetic_frames(3, n_bars=300, seed=11)
    folder.mkdir(exist_ok=True)
    names = []
    for name, frame in frames.items():
        if drop_row is not None and name == "A1":
            frame = frame.drop(frame.index[drop_row])
        frame.rename_axis("date").to_csv(folder / f"{name.lower()}.csv")
        names.append(f"data/{name.lower()}.csv")
    return names


def _toml(tmp_path, files: list[str], missing: str) -> object:
    path = tmp_path / "panel.toml"
    path.write_text("\n".join([
        'kind = "portfolio"', 'name = "user_panel"', 'dataset = "files"', f"files = {json.dumps(files)}",
        f'missing = "{missing}"', f"common_args = {json.dumps(list(COMMON))}", "n_groups = 3", "n_test_groups = 2",
        "seeds = [1]", 'baselines = ["equal_weight"]', "rebalance_every = 10", "lookback = 100",
        "min_returns = 20", "bootstrap_samples = 50",
        "[agents.pp]", 'variant = "ppo_portfolio"', f"args = {json.dumps(list(TINY_ARGS))}"]))
    return path


@pytest.fixture(autouse=True)
def _fresh_panel_cache():
    portfolio_plan._PANELS.clear()
    yield
    portfolio_plan._PANELS.clear()


def test_user_files_refuse_a_missing_bar_naming_asset_and_date(tmp_path):
    files = _write_panel(tmp_path / "data", drop_row=150)
    config = load_portfolio_config(_toml(tmp_path, files, "refuse"))
    assert config.files == tuple(str(tmp_path / f) for f in files)  # read from the experiment file's folder
    with pytest.raises(DataValidationError, match=r"asset 'a1' has no bar at .*missing='ffill'"):
        portfolio_plan.plan_portfolio(config)


@pytest.mark.slow
def test_user_files_run_with_ffill_and_the_fills_are_recorded(tmp_path):
    files = _write_panel(tmp_path / "data", drop_row=150)
    config = load_portfolio_config(_toml(tmp_path, files, "ffill"))
    plan = portfolio_plan.plan_portfolio(config)
    assert plan.assets == ("a0", "a1", "a2") and plan.n_bars == 300
    assert plan.panel["missing_policy"] == "ffill" and plan.panel["filled_bars"] == {"a1": 1}
    results = runner.run_portfolio_experiment(plan, tmp_path / "out")
    assert set(results["name"]) == {"pp", "equal_weight"}
    recorded = json.loads((tmp_path / "out" / "plan.json").read_text())["panel"]
    assert recorded["filled_bars"] == {"a1": 1} and len(recorded["filled"]) == 1
    write_portfolio_report(tmp_path / "out", tmp_path / "report", labels={"range": "synthetic"}, reps=100)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "policy 'ffill', forward-filled bars per asset: {'a1': 1}" in text


def test_user_panel_fields_are_checked_by_name(tmp_path):
    agent = (AgentSpec("a", "ppo_portfolio"),)
    for changes, match in [({"dataset": "files"}, "files = \\[...\\] goes with dataset"),
                           ({"files": ("a.csv", "b.csv")}, "files = \\[...\\] goes with dataset"),
                           ({"dataset": "files", "files": ("a.csv",)}, "at least 2 files"),
                           ({"dataset": "files", "files": ("x/a.csv", "y/a.csv")}, "distinct names"),
                           ({"missing": "zero"}, "missing 'zero'")]:
        with pytest.raises(ValueError, match=match):
            PortfolioExperimentConfig(**{"name": "x", "agents": agent, **changes})
    config = PortfolioExperimentConfig(name="x", agents=agent, dataset="files",
                                       files=(str(tmp_path / "a.csv"), str(tmp_path / "b.csv")))
    with pytest.raises(FileNotFoundError, match="files: .*a.csv does not exist"):
        portfolio_plan.load_experiment_panel(config)
