"""Checkpoint bundles: everything needed to resume a run or evaluate its model on the same data.

A bundle is one ``torch.save`` file holding: the variant name, its args, the agent weights (observation
normaliser statistics included, as buffers), the optimizer state, the feature pipeline's fitted state,
every RNG state, the environment state, the step counters and the data fingerprint. Writes are atomic
(temporary file, fsync, rename), so an interrupted or failed save never destroys the previous checkpoint.

Loading never runs code from the file: ``torch.load(weights_only=True)`` accepts tensors, plain python
containers and scalars, and nothing else but the few numpy types on :data:`SAFE_GLOBALS` (numpy arrays of
plain dtypes, which checkpoints written before the RNG state became plain python still hold). What we
save is plain already: :func:`capture_rng` stores numpy's generator state as a dict of ints and a list.
A file that needs anything else (a pickle that would call a function, say) is refused with
:class:`CheckpointError`.

Loading also verifies the file before trusting it (:func:`verify_archive`, then :func:`check_finite`): a damaged
checkpoint is refused with one :class:`CheckpointError` naming the file and what is wrong, never trained on,
evaluated or saved back.

* The CRC-32 of every zip member (``zipfile.testzip``) catches damaged bytes anywhere in the archive: tensor
  data, the pickle, the records torch writes. An empty or truncated file is not a readable zip archive.
* A member marked as a directory (a name ending in ``/`` or the MS-DOS directory bit of its external attributes,
  one flipped bit of the central directory) is refused: Python's zipfile still reads and CRC-checks its bytes, but
  torch's reader reads none and leaves the tensor uninitialised (finite garbage the finiteness check cannot see).
* A SHA-256 of every other member (names and contents, in archive order), written at save time as one more
  member, :data:`DIGEST_MEMBER`, catches a file whose CRCs agree with wrong content (a member rewritten by a
  tool that updated its CRC). Files written before the digest existed have none: their CRCs must be fine.
* Every floating-point (or complex) tensor or numpy array anywhere in the bundle -- weights, normaliser
  statistics, optimizer moments, env state -- must be finite: a NaN weight makes a flat, normal-looking policy.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
#: Name (inside the archive's top folder) of the member holding the SHA-256 of every other member.
DIGEST_MEMBER = "sentio_sha256"
REQUIRED_KEYS = (
    "format_version",
    "variant",
    "args",
    "agent",
    "optimizer",
    "feature_state",
    "rng",
    "env_state",
    "global_step",
    "iteration",
    "data_fingerprint",
)


#: The only non-builtin globals a checkpoint may name: what a numpy array of a plain dtype unpickles with.
#: Older bundles hold numpy's RNG state as an array; object arrays still go through the same restricted
#: unpickler for their elements, so nothing here can call arbitrary code.
SAFE_GLOBALS: list[Any] = [
    np.ndarray,
    np.dtype,
    (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct,  # numpy 2 renamed core
    type(np.dtype(np.uint32)),  # the dtype of the legacy RNG key array
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, incomplete, unsafe, or does not belong to the data / variant at hand."""


def capture_rng() -> dict[str, Any]:
    """States of python's, numpy's and torch's global generators (CPU and, when present, CUDA), as safe types.

    numpy's legacy state tuple is stored as a dict of a string, ints, a float and a list of ints, so that
    a weights-only load needs no numpy types; python's state is a tuple of ints already.
    """
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"bit_generator": str(name), "key": [int(k) for k in key], "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore generator states captured by :func:`capture_rng` (or by its older numpy-tuple form)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"], np.asarray(numpy_state["key"], dtype=np.uint32),
                       numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def save_checkpoint(path: str | Path, bundle: dict[str, Any]) -> Path:
    """Atomically write ``bundle`` (must hold ``REQUIRED_KEYS`` but ``format_version``) to ``path``."""
    bundle = {"format_version": FORMAT_VERSION, **bundle}
    missing = [k for k in REQUIRED_KEYS if k not in bundle]
    if missing:
        raise CheckpointError(f"save_checkpoint: bundle lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w+b") as handle:
            torch.save(bundle, handle)
            handle.flush()
            _append_digest(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file must not linger (the old checkpoint is untouched)
        raise
    _fsync_directory(path.parent)
    return path


def _payload_digest(archive: zipfile.ZipFile) -> tuple[str, str | None]:
    """SHA-256 over every member but the digest (name, size and content, in archive order), and the recorded
    digest (None when the archive has no digest member)."""
    sha = hashlib.sha256()
    recorded = None
    for info in archive.infolist():
        if info.filename.rsplit("/", 1)[-1] == DIGEST_MEMBER:
            recorded = archive.read(info).decode("ascii", errors="replace").strip()
            continue
        name = info.filename.encode()
        sha.update(len(name).to_bytes(8, "little") + name + info.file_size.to_bytes(8, "little"))
        with archive.open(info) as member:
            for block in iter(lambda: member.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest(), recorded


def _append_digest(handle: Any) -> None:
    # torch names every member "<top folder>/..."; the digest joins that folder, which torch's reader ignores.
    handle.seek(0)
    with zipfile.ZipFile(handle, "a") as archive:
        top = archive.infolist()[0].filename.split("/", 1)[0]
        digest, _ = _payload_digest(archive)
        archive.writestr(f"{top}/{DIGEST_MEMBER}", digest + "\n")


def verify_archive(path: str | Path) -> None:
    """Refuse (:class:`CheckpointError`) a file that is not an intact zip archive: empty, truncated, a member
    whose CRC-32 fails, or content that differs from the SHA-256 recorded at save time (when recorded)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: damaged checkpoint: the file is empty (0 bytes)")
    try:
        with zipfile.ZipFile(path) as archive:
            folders = [i.filename for i in archive.infolist() if i.filename.endswith("/") or i.external_attr & 0x10]
            if folders:  # torch's reader (miniz) reads no bytes for such a member: the tensor is left uninitialised
                raise CheckpointError(
                    f"{path}: damaged checkpoint: member {folders[0]!r} is marked as a directory (its zip header "
                    "changed after saving); restore the file from a copy or retrain"
                )
            bad = archive.testzip()
            if bad is not None:
                raise CheckpointError(
                    f"{path}: damaged checkpoint: member {bad!r} fails its CRC check (its bytes changed after "
                    "saving); restore the file from a copy or retrain"
                )
            digest, recorded = _payload_digest(archive)
    # RuntimeError: a damaged header that reads as encrypted; NotImplementedError (a RuntimeError): as an unknown
    # compression method
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"{path}: damaged checkpoint: not a readable zip archive ({size} bytes; truncated, overwritten or not "
            f"a torch checkpoint): {err}"
        ) from err
    if recorded is not None and recorded != digest:
        raise CheckpointError(
            f"{path}: damaged checkpoint: its content does not match the SHA-256 recorded when it was saved "
            f"(recorded {recorded[:16]}..., now {digest[:16]}...): a member was changed after saving"
        )


def _floating_arrays(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(location, array) for every floating / complex tensor and numpy array inside nested dicts, lists, tuples."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            yield where, value
    elif isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.inexact):
            yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floating_arrays(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _floating_arrays(item, f"{where}[{i}]")


def _plain_floats(value: Any, where: str) -> Iterator[tuple[str, float]]:
    """(location, value) for every python float inside nested dicts, lists and tuples."""
    if isinstance(value, float):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _plain_floats(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _plain_floats(item, f"{where}[{i}]")


def check_finite(bundle: dict[str, Any], source: str | Path) -> None:
    """Refuse (:class:`CheckpointError`) a bundle holding a NaN or infinite value in any floating tensor or array,
    naming the first such tensor and how many of its values are not finite, or in the normaliser's statistics
    (``feature_state["normaliser"]``: plain python floats; other plain floats, such as arguments, may be NaN)."""
    normaliser = bundle.get("feature_state", None)
    normaliser = normaliser.get("normaliser") if isinstance(normaliser, dict) else None
    for where, number in _plain_floats(normaliser, "bundle['feature_state']['normaliser']"):
        if not np.isfinite(number):
            raise CheckpointError(f"{source}: damaged checkpoint: {where} is {number} (the normaliser's statistics "
                                  "must be finite)")
    for where, array in _floating_arrays(bundle, "bundle"):
        finite = torch.isfinite(array) if isinstance(array, torch.Tensor) else np.isfinite(array)
        if not bool(finite.all()):
            bad, total = int((~finite).sum()), int(np.prod(tuple(finite.shape)))
            raise CheckpointError(
                f"{source}: damaged checkpoint: {where} has {bad} non-finite value(s) of {total} "
                "(NaN / inf); a checkpoint this code wrote never does (a non-finite update stops the run before saving)"
            )


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform dependent
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platform dependent
        pass
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | Path, *, variant: str | None = None, data_fingerprint: str | None = None
) -> dict[str, Any]:
    """Read a bundle, checking its integrity (:func:`verify_archive`, :func:`check_finite`), its completeness and,
    when given, its variant and data fingerprint. Every refusal is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    verify_archive(path)
    try:
        # map_location="cpu": a bundle written on CUDA loads anywhere; the caller moves tensors to its device.
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            bundle = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: it needs more than tensors and plain python values (a checkpoint this "
            f"code wrote never does; a file that does could run code when unpickled). torch said: {err}"
        ) from err
    except (RuntimeError, EOFError, ValueError) as err:  # ValueError: e.g. a record torch parses as a number
        raise CheckpointError(f"{path}: unreadable (truncated, corrupt or not a torch file): {err}") from err
    if not isinstance(bundle, dict):
        raise CheckpointError(f"{path}: not a sentio-lab checkpoint (holds a {type(bundle).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in bundle]
    if missing:
        raise CheckpointError(f"{path}: not a complete sentio-lab checkpoint, missing {missing}")
    check_finite(bundle, path)
    if bundle["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {bundle['format_version']}, expected {FORMAT_VERSION}")
    if variant is not None and bundle["variant"] != variant:
        raise CheckpointError(f"{path}: written by variant {bundle['variant']!r}, not {variant!r}")
    if data_fingerprint is not None and bundle["data_fingerprint"] != data_fingerprint:
        raise CheckpointError(
            f"{path}: trained on data {bundle['data_fingerprint']}, but the data given has fingerprint "
            f"{data_fingerprint} (a different or modified dataset)"
        )
    return bundle
