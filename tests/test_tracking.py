from sentio_lab.tracking import Tracker


def test_disabled_tracker_does_nothing(tmp_path):
    tracker = Tracker(False, project="p", run_name="r", config={}, run_dir=tmp_path)
    tracker.log({"x": 1.0}, step=1)
    tracker.finish()
    assert tracker.directory is None and not any(tmp_path.iterdir())


def test_offline_tracker_writes_inside_run_dir(tmp_path):
    tracker = Tracker(True, project="p", run_name="r", config={"seed": 1}, run_dir=tmp_path)
    tracker.log({"x": 1.0}, step=1)
    directory = tracker.directory
    tracker.finish()
    assert directory is not None and directory.is_relative_to(tmp_path)
    assert directory.name.startswith("offline-run-") and any(directory.glob("*.wandb"))
