import os
import pickle
import random

import numpy as np
import pytest
import torch

from sentio_lab.checkpoint import (
    REQUIRED_KEYS,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def bundle(**overrides):
    content = {key: None for key in REQUIRED_KEYS if key != "format_version"}
    content.update(variant="ppo", args={"seed": 1}, agent={"w": torch.arange(3.0)}, data_fingerprint="abc",
                   global_step=10, iteration=1, rng=capture_rng())
    content.update(overrides)
    return content


def test_round_trip_keeps_everything(tmp_path):
    path = save_checkpoint(tmp_path / "deep" / "ck.pt", bundle())
    loaded = load_checkpoint(path, variant="ppo", data_fingerprint="abc")
    assert torch.equal(loaded["agent"]["w"], torch.arange(3.0))
    assert loaded["global_step"] == 10 and loaded["args"] == {"seed": 1}
    assert not list(tmp_path.rglob("*.tmp"))  # the temporary file was renamed into place


def test_incomplete_bundle_is_refused_on_save_and_load(tmp_path):
    incomplete = bundle()
    del incomplete["optimizer"]
    with pytest.raises(CheckpointError, match="optimizer"):
        save_checkpoint(tmp_path / "x.pt", incomplete)
    torch.save({"agent": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_wrong_variant_fingerprint_or_version(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", bundle())
    with pytest.raises(CheckpointError, match="variant 'ppo'"):
        load_checkpoint(path, variant="ppo_risk")
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(path, data_fingerprint="other")
    content = torch.load(path, weights_only=False)
    content["format_version"] = 999
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", bundle(global_step=1))
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_checkpoint(path, bundle(global_step=2, agent=lambda: None))  # lambdas cannot be pickled
    assert load_checkpoint(path)["global_step"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_a_write_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ck.pt", bundle(global_step=1))
    before = path.read_bytes()
    written = []

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip archive")  # some bytes reach the temporary file first
        written.append(handle.name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, bundle(global_step=2))
    assert written == [str(path) + ".tmp"]  # the failure happened while writing the temporary file
    assert path.read_bytes() == before and load_checkpoint(path)["global_step"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_save_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_checkpoint(tmp_path / "ck.pt", bundle())
    assert events[:2] == ["fsync", "replace"]


class RunsCode:
    """Unpickling this calls os.system: what a malicious 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    content = bundle(extra=RunsCode(marker))
    torch.save({"format_version": 1, **content}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # the file really is dangerous: a full (unsafe) unpickle runs the command
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_bundles_need_no_allow_list_and_old_numpy_rng_states_still_load(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", bundle())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []  # plain types only
    # bundles written before the RNG state became plain python hold numpy's (str, ndarray, int, int, float)
    old_rng = {**capture_rng(), "numpy": np.random.get_state()}
    torch.save({"format_version": 1, **bundle(rng=old_rng)}, tmp_path / "old.pt")
    first = np.random.rand()
    restore_rng(load_checkpoint(tmp_path / "old.pt")["rng"])
    assert np.random.rand() == first


def test_a_corrupt_file_is_a_checkpoint_error(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", bundle())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged checkpoint: not a readable zip"):
        load_checkpoint(path)


def test_rng_capture_restore_replays_every_generator(tmp_path):
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state: it must survive the round trip
    state = capture_rng()
    assert isinstance(state["numpy"]["key"], list) and len(state["numpy"]["key"]) == 624
    path = save_checkpoint(tmp_path / "ck.pt", bundle(rng=state))
    first = (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(1).item())
    restore_rng(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(1).item()) == first
