import os
import pickle
import random
import re

import numpy as np
import pytest
import torch

from sentio_lab.agents.checkpoint import (
    REQUIRED_KEYS,
    CheckpointError,
    capture_rng,
    check_finite,
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


# ------------------------------------------------------------------------------------ damaged files (issue 17 §1)
def _member_offset(path, name):
    """Byte offset in the file of the first byte of a stored zip member's data."""
    import zipfile

    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        content = archive.read(name)
    offset = raw.find(content)
    assert offset > 0 and raw.find(content, offset + 1) == -1  # unique: the member's own bytes
    return offset, len(content)


def _flip(path, offset, n=8):
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _largest_tensor_member(path):
    import zipfile

    with zipfile.ZipFile(path) as archive:
        tensors = [i for i in archive.infolist() if "/data/" in i.filename]
    return max(tensors, key=lambda i: i.file_size).filename


def damage(path, how):
    """Damage a checkpoint file in place, as the issue's reproductions do; returns the member named, if any."""
    if how == "tensor":
        name = _largest_tensor_member(path)
        offset, size = _member_offset(path, name)
        _flip(path, offset + size // 2)
        return name
    if how == "pickle":
        name = next(n for n in __import__("zipfile").ZipFile(path).namelist() if n.endswith("/data.pkl"))
        offset, size = _member_offset(path, name)
        _flip(path, offset + size // 2, 2)
        return name
    if how == "random_4k":  # the issue's reproduction: 4 KB of random bytes at a third of the file
        raw = bytearray(path.read_bytes())
        start = len(raw) // 3
        raw[start : start + 4096] = np.random.default_rng(0).bytes(min(4096, len(raw) - start))
        path.write_bytes(bytes(raw))
        return None
    if how in ("compression_method", "encrypted_flag"):  # a damaged field of the central directory's first entry
        raw = bytearray(path.read_bytes())
        entry = raw.find(b"PK\x01\x02")
        offset, value = (10, 99) if how == "compression_method" else (8, 1)
        raw[entry + offset : entry + offset + 2] = value.to_bytes(2, "little")
        path.write_bytes(bytes(raw))
        return None
    if how == "directory_flag":  # one bit of a tensor's central-directory entry: torch's reader sees a directory
        name = _largest_tensor_member(path)
        raw = bytearray(path.read_bytes())
        entry = raw.find(b"PK\x01\x02")
        while raw[entry + 46 : entry + 46 + len(name)] != name.encode():
            entry = raw.find(b"PK\x01\x02", entry + 4)
        raw[entry + 38] |= 0x10  # external attributes: the MS-DOS directory bit
        path.write_bytes(bytes(raw))
        return name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
        return None
    assert how == "empty"
    path.write_bytes(b"")
    return None


DAMAGE = {
    "tensor": "fails its CRC check",
    "pickle": "fails its CRC check",
    "random_4k": "damaged checkpoint",
    "truncated": "not a readable zip archive",
    "compression_method": "not a readable zip archive",  # zipfile: NotImplementedError
    "encrypted_flag": "not a readable zip archive",  # zipfile: RuntimeError (password required)
    "directory_flag": "marked as a directory",  # zipfile reads it; torch would load uninitialised memory
    "empty": "the file is empty",
}


def big_bundle():
    # a tensor large enough that its bytes are unique in the file and a third of the file lies inside tensor data
    return bundle(agent={"w": torch.arange(4096.0), "b": torch.ones(3)})


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_damage(tmp_path, how):
    path = save_checkpoint(tmp_path / "ck.pt", big_bundle())
    member = damage(path, how)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=DAMAGE[how]) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    if member is not None:
        assert repr(member) in str(err.value)  # which member is damaged
    assert path.read_bytes() == before  # loading never writes


def test_the_issue_reproduction_is_refused_where_torch_alone_loads_a_nan_agent(tmp_path):
    """Without the checks, torch loads the damaged file and the weights are silently wrong."""
    path = save_checkpoint(tmp_path / "ck.pt", big_bundle())
    name = _largest_tensor_member(path)
    offset, size = _member_offset(path, name)
    raw = bytearray(path.read_bytes())
    raw[offset + 8 : offset + 16] = np.array([np.nan, np.inf], dtype=np.float32).tobytes()
    path.write_bytes(bytes(raw))
    loaded = torch.load(path, weights_only=True)  # torch itself does not check CRCs
    assert not torch.isfinite(loaded["agent"]["w"]).all()
    with pytest.raises(CheckpointError, match=f"member '{name}' fails its CRC check"):
        load_checkpoint(path)


def _rewrite_member(path, name, content, keep_digest=True):
    """Rewrite the archive with one member's content replaced and a correct CRC (what a zip tool would do)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        members = [(i, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            if info.filename.endswith("sentio_sha256") and not keep_digest:
                continue
            archive.writestr(info, content if info.filename == name else data)


def test_a_consistent_but_wrong_file_fails_the_digest(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", big_bundle())
    name = _largest_tensor_member(path)
    wrong = torch.arange(4096.0)
    wrong[7] = 1e6  # finite, plausible, wrong
    _rewrite_member(path, name, wrong.numpy().tobytes())
    assert __import__("zipfile").ZipFile(path).testzip() is None  # every CRC agrees
    assert torch.load(path, weights_only=True)["agent"]["w"][7] == 1e6  # torch loads the wrong weight
    with pytest.raises(CheckpointError, match="does not match the SHA-256 recorded when it was saved"):
        load_checkpoint(path)


def test_a_record_torch_cannot_parse_is_a_checkpoint_error(tmp_path):
    # an intact zip without a digest (as before the digest existed) whose storage-alignment record is not a number
    path = save_checkpoint(tmp_path / "ck.pt", big_bundle())
    _rewrite_member(path, "archive/.storage_alignment", b"xx", keep_digest=False)
    with pytest.raises(ValueError, match="invalid literal"):
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: unreadable")):
        load_checkpoint(path)


def test_old_checkpoints_without_a_digest_load_when_their_crcs_are_fine(tmp_path):
    import zipfile

    path = save_checkpoint(tmp_path / "ck.pt", big_bundle())
    names = zipfile.ZipFile(path).namelist()
    assert names[-1] == "archive/sentio_sha256"
    _rewrite_member(path, None, b"", keep_digest=False)  # as written before the digest existed
    assert not any(n.endswith("sentio_sha256") for n in zipfile.ZipFile(path).namelist())
    assert torch.equal(load_checkpoint(path)["agent"]["w"], torch.arange(4096.0))
    damage(path, "tensor")
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        load_checkpoint(path)


@pytest.mark.parametrize("where, content, named", [
    ("agent", {"w": torch.tensor([1.0, float("nan")])}, "bundle['agent']['w'] has 1 non-finite value(s) of 2"),
    ("optimizer", {"state": {0: {"exp_avg": torch.full((2, 2), float("inf"))}}},
     "bundle['optimizer']['state'][0]['exp_avg'] has 4 non-finite"),
    ("env_state", {"equity": [torch.ones(1), torch.tensor([1.0, -np.inf])]}, "bundle['env_state']['equity'][1] has 1"),
    ("agent", {"w": torch.tensor([1.0, float("nan")], dtype=torch.float64)}, "bundle['agent']['w']"),
])
def test_non_finite_tensors_anywhere_are_refused_and_named(tmp_path, where, content, named):
    path = save_checkpoint(tmp_path / "ck.pt", bundle(**{where: content}))
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_checkpoint(path)


def test_non_finite_normaliser_statistics_are_refused(tmp_path):
    # the normaliser's centre / scale are plain python floats (not tensors): a NaN there makes every observation NaN
    state = {"normaliser": {"center": [0.0, float("nan")], "scale": [1.0, 1.0]}, "config": {"clip": float("inf")}}
    path = save_checkpoint(tmp_path / "ck.pt", bundle(feature_state=state))
    with pytest.raises(CheckpointError, match=re.escape("bundle['feature_state']['normaliser']['center'][1]")):
        load_checkpoint(path)
    state["normaliser"]["center"][1] = 0.5  # finite statistics load; the config's plain floats are not checked
    assert load_checkpoint(save_checkpoint(tmp_path / "ok.pt", bundle(feature_state=state)))["feature_state"] == state


def test_integer_and_boolean_tensors_are_not_checked_and_finite_bundles_load(tmp_path):
    content = {"steps": torch.tensor([2**62]), "mask": torch.tensor([True]), "w": torch.zeros(2)}
    path = save_checkpoint(tmp_path / "ck.pt", bundle(agent=content, env_state={"key": (1, 2)}))
    assert load_checkpoint(path)["agent"]["steps"].item() == 2**62


def test_numpy_arrays_are_checked_too():
    # a weights-only load admits only plain-dtype numpy arrays of the legacy RNG state; the check covers any
    check_finite({"rng": {"numpy": ("MT19937", np.arange(3, dtype=np.uint32))}}, "x.pt")
    with pytest.raises(CheckpointError, match=re.escape("x.pt: damaged checkpoint: bundle['a'][0] has 1")):
        check_finite({"a": (np.array([np.nan, 1.0]),)}, "x.pt")


# ------------------------------------------------------------------ through every variant's --resume (issue 17 §1)
VARIANTS = ("ppo", "ppo_masked", "ppo_risk", "ppo_transformer")
TINY = dict(total_timesteps=8 * 16 * 3, num_envs=8, num_steps=16, num_minibatches=2, update_epochs=1, window=8,
            episode_length=24, hidden_size=8, track=False, progress=False, run_name="tiny", checkpoint_every=0,
            feature_cache_dir=None)
TRANSFORMER = dict(dataset="eurusd_1h", data_end="2017-03-15", token_timeframes=("4h", "1D"), token_counts=(4, 3),
                   d_model=8, n_heads=2, ff_size=16)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, synthetic_market):
    """A real checkpoint of a tiny finished ppo run (on the synthetic market)."""
    from sentio_lab import ppo

    folder = tmp_path_factory.mktemp("good")
    result = ppo.train(ppo.Args.from_flat(**TINY, run_dir=str(folder)), market=synthetic_market)
    return result.checkpoint_path.read_bytes()


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_refuses_to_resume_a_damaged_checkpoint_and_leaves_it(
    variant, how, good_checkpoint, tmp_path, monkeypatch
):
    import sys

    from sentio_lab.agents.variants import load_variant

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(good_checkpoint)
    damage(path, how)
    before = path.read_bytes()
    module = load_variant(variant)
    monkeypatch.setattr(sys, "argv", [variant, "--resume", str(path), "--no-track", "--no-progress"])
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(path))}: damaged checkpoint") as err:
        module.main()  # the variants' own command line: one line, no traceback
    assert DAMAGE[how] in str(err.value) or how == "random_4k"
    with pytest.raises(CheckpointError, match="damaged checkpoint"):
        module.train(module.Args.from_flat(resume=str(path), track=False, progress=False))
    assert path.read_bytes() == before  # nothing was written over the damaged file
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture(scope="module")
def transformer_market():
    from sentio_lab import ppo_transformer

    return ppo_transformer.market_for(ppo_transformer.Args.from_flat(**TRANSFORMER, feature_cache_dir=None))


@pytest.mark.parametrize("variant", VARIANTS)
def test_resuming_a_finished_run_leaves_its_file_and_a_larger_total_continues_it(
    variant, tmp_path, synthetic_market, request
):
    from sentio_lab.agents.variants import load_variant

    module = load_variant(variant)
    extra = dict(TRANSFORMER) if variant == "ppo_transformer" else {}
    if variant == "ppo_risk":
        extra["num_quantiles"] = 4
    market = request.getfixturevalue("transformer_market") if variant == "ppo_transformer" else synthetic_market
    path = tmp_path / "checkpoint.pt"
    args = module.Args.from_flat(**TINY, **extra, run_dir=str(tmp_path), checkpoint_path=str(path))
    first = module.train(args, market=market)
    assert first.finished and first.global_step == 384 and first.checkpoint_path == path
    before = path.read_bytes()
    resume = dict(resume=str(path), track=False, progress=False)

    again = module.train(module.Args.from_flat(**resume), market=market)
    assert again.finished and again.global_step == 384 and again.history == []  # nothing to do ...
    assert again.checkpoint_path == path and path.read_bytes() == before  # ... and nothing rewritten
    with pytest.raises(CheckpointError, match=r"total_timesteps: given 256, checkpoint 384 \(it can only grow"):
        module.train(module.Args.from_flat(**resume, total_timesteps=256), market=market)
    assert path.read_bytes() == before

    longer = module.train(module.Args.from_flat(**resume, total_timesteps=384 + 2 * 128 + 100), market=market)
    assert longer.finished and longer.global_step == 640 and len(longer.history) == 2  # 740 // 128 = 5 iterations
    assert longer.args.ppo.total_timesteps == 740 and longer.args.ppo.num_iterations == 5
    assert load_checkpoint(path)["global_step"] == 640 and load_checkpoint(path)["iteration"] == 5
    # the remaining iterations anneal over the new total: iteration 4 of 5 runs at lr * (1 - 3/5)
    lr = args.ppo.learning_rate
    assert [h["charts/learning_rate"] for h in longer.history] == pytest.approx([lr * 2 / 5, lr * 1 / 5])


def test_an_intact_zip_that_is_not_a_torch_bundle_is_refused(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:
        archive.writestr("notes/readme.txt", "not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        load_checkpoint(tmp_path / "list.pt")
