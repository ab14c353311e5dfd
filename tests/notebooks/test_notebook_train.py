import json
import logging
import os
import re

import papermill as pm
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "train_and_report.ipynb")


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


USER_PARAMETERS = {"data_start", "data_end", "stale_opens", "positions", "progress"}


def test_the_demo_notebook_takes_a_users_range_policy_and_positions():
    assert USER_PARAMETERS <= set(pm.inspect_notebook(NOTEBOOK))  # papermill would warn "Passed unknown parameter"


def user_csv(tmp_path):
    """A user's file: sp500 bars 2011..2016 as plain CSV columns; 2012-06-08 .. 2013-05-09 has stale opens."""
    from sentio_lab.data import BUNDLED_DATASETS

    raw = BUNDLED_DATASETS["sp500"]().loc["2011-01-01":"2016-12-31", ["Open", "High", "Low", "Close", "Volume"]]
    path = tmp_path / "my_bars.csv"
    raw.rename_axis("Date").to_csv(path)
    return path


@pytest.mark.slow
def test_the_demo_notebook_runs_on_a_users_csv_with_stale_opens(tmp_path, caplog):
    from sentio_lab.agents.checkpoint import load_checkpoint

    csv = user_csv(tmp_path)
    out_dir = tmp_path / "my_report"
    common = {"dataset": str(csv), "data_start": "2012-01-03", "data_end": "2016-06-30", "total_timesteps": 5000,
              "num_seeds": 1, "num_envs": 16, "output_dir": str(out_dir), "track": False}
    # the default policy refuses the stale-open stretch inside the range: the parameter is what makes it run
    with pytest.raises(pm.PapermillExecutionError, match="stale"):
        pm.execute_notebook(NOTEBOOK, str(tmp_path / "refused.ipynb"), parameters={**common, "progress": "none"},
                            kernel_name="python3", progress_bar=False)
    with caplog.at_level(logging.INFO, logger="papermill"):
        pm.execute_notebook(
            NOTEBOOK, str(tmp_path / "executed.ipynb"),
            parameters={**common, "stale_opens": "allow", "positions": [0.0, 1.0], "progress": "text"},
            kernel_name="python3", progress_bar=False, log_output=True,
        )
    meta = json.loads((out_dir / "meta.json").read_text())
    quality = meta["data_quality"]
    assert quality["stale_opens_policy"] == "allow" and quality["stale_stretches"]
    assert quality["first_timestamp"].startswith("2012-01-03") and quality["last_timestamp"].startswith("2016-06-30")
    # 5000 requested; whole rollouts of 16 envs x 256 steps ran: meta.json records what ran, not what was asked
    assert meta["total_timesteps_requested"] == 5000
    assert meta["total_timesteps_per_seed"] == meta["runs"][0]["steps"] == 4096
    assert meta["positions"] == [0.0, 1.0]
    bundle = load_checkpoint(meta["runs"][0]["checkpoint"])
    assert tuple(bundle["args"]["env"]["positions"]) == (0.0, 1.0) and bundle["args"]["data"]["stale_opens"] == "allow"
    assert bundle["args"]["data"]["data_start"] == "2012-01-03" and bundle["args"]["data"]["dataset"] == str(csv)
    # papermill --log-output relays the training cell's text progress bar while it runs
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert re.search(r"\| 4096/4096 \[", logged), logged[-2000:]
