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
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
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
        with open(tmp, "wb") as handle:
            torch.save(bundle, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file must not linger (the old checkpoint is untouched)
        raise
    _fsync_directory(path.parent)
    return path


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
    """Read a bundle, checking its completeness and, when given, its variant and data fingerprint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        # map_location="cpu": a bundle written on CUDA loads anywhere; the caller moves tensors to its device.
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            bundle = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: it needs more than tensors and plain python values (a checkpoint this "
            f"code wrote never does; a file that does could run code when unpickled). torch said: {err}"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable (truncated, corrupt or not a torch file): {err}") from err
    if not isinstance(bundle, dict):
        raise CheckpointError(f"{path}: not a sentio-lab checkpoint (holds a {type(bundle).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in bundle]
    if missing:
        raise CheckpointError(f"{path}: not a complete sentio-lab checkpoint, missing {missing}")
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
