import json
import os

import papermill as pm
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "train_and_report.ipynb")


@pytest.mark.slow
def test_train_and_report_notebook_runs_under_papermill(tmp_path):
    out_dir = tmp_path / "report"
    pm.execute_notebook(
        NOTEBOOK,
        str(tmp_path / "executed.ipynb"),
        parameters={"total_timesteps": 4096, "num_seeds": 2, "num_envs": 16, "output_dir": str(out_dir),
                    "track": False},
        kernel_name="python3",
        cwd=os.path.dirname(NOTEBOOK),
        progress_bar=False,
    )
    for name in ("stats.csv", "stats.md", "report.html", "equity.png", "drawdown.png", "meta.json", "data_quality.md"):
        assert (out_dir / name).stat().st_size > 0, name
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["seeds"] == [1, 2] and meta["label"].startswith("Out of sample")
    assert all(run["replay_max_rel_error"] < 1e-9 for run in meta["runs"])
    # the demo trains and tests on real opens only: no stale-open stretch in the bars it loaded
    quality = meta["data_quality"]
    assert quality["stale_stretches"] == [] and quality["stale_opens_policy"] == "refuse"
    assert quality["first_timestamp"] >= "2013-05-10" and quality["default_start_used"]
    assert "stale session opens" in (out_dir / "data_quality.md").read_text()
    stats = (out_dir / "stats.csv").read_text()
    assert "buy and hold" in stats and "ppo seed 2" in stats
