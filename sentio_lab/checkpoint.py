"""Checkpoint bundles: everything needed to resume a run or evaluate its model on the same data.

A bundle is one ``torch.save`` file holding: the variant name, its args, the agent weights (observation
normaliser statistics included, as buffers), the optimizer state, the feature pipeline's fitted state,
every RNG state, the environment state, the step counters and the data fingerprint. Writes are atomic
(temporary file + rename), so an interrupted save never destroys the previous checkpoint.
"""

from __future__ import annotations

import os
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


class CheckpointError(ValueError):
    """A checkpoint file is missing, incomplete, or does not belong to the data / variant at hand."""


def capture_rng() -> dict[str, Any]:
    """States of python's, numpy's and torch's global generators (CPU and, when present, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore generator states captured by :func:`capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    torch.save(bundle, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | Path, *, variant: str | None = None, data_fingerprint: str | None = None
) -> dict[str, Any]:
    """Read a bundle, checking its completeness and, when given, its variant and data fingerprint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    # weights_only=False: the bundle holds numpy RNG state and python objects we wrote ourselves.
    bundle = torch.load(path, map_location="cpu", weights_only=False)
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
