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


def test_rng_capture_restore_replays_every_generator():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
