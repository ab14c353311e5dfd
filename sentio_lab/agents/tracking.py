"""Experiment tracking: a thin Weights & Biases wrapper, offline by default, files inside the project.

A :class:`Tracker` is one W&B run. Its id is the run name made safe for W&B (:func:`run_id`), so the offline
folder reads ``<run_dir>/wandb/offline-run-<time>-<run name>`` and ``wandb sync`` uploads it under that name.
Besides training scalars (:meth:`Tracker.log`) it records the run summary (:meth:`Tracker.log_summary`),
artifacts (:meth:`Tracker.log_artifact`: the files are copied into the run's own folder first, so an offline
run is complete by itself and a later overwrite of a checkpoint cannot change what is synced), tables
(:meth:`Tracker.log_table`) and figures (:meth:`Tracker.log_images`). When training ends a variant logs
its outcome through :func:`sentio_lab.evaluation.run_summary.log_run_outcome` (the evaluation summary into the run
summary, the checkpoint and the report as artifacts): evaluation sits a stage above this module.

Orchestration (the experiment runner, sweeps, Tune) opens one run per cell with :func:`shared_run`: a variant's
own ``Tracker`` created inside it logs into that run instead of starting another (:func:`sharing` tells
the caller whether one is open), and the orchestrator adds the cell's record and artifacts before it closes.

``wandb.Api`` cannot read offline runs and wandb 0.31 ships no Python reader of its ``.wandb`` files (the
record log of ``wandb.proto`` records that ``wandb sync`` uploads): :func:`read_offline_run` reads one, checking
every block's CRC, so a run can be checked before (or without) syncing it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: W&B reserves ``:;,#?/'`` in run ids; anything but letters, digits and ``._-`` becomes ``-``.
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_ID = 128

#: The shared run of :func:`shared_run` (process-local: each worker process opens its own).
_SHARED: Tracker | None = None


def run_id(name: str) -> str:
    """The W&B run id of a run called ``name``: the name with characters W&B refuses replaced by ``-``."""
    safe = _UNSAFE_ID.sub("-", name).strip("-.")[:_MAX_ID]
    if not safe:
        raise ValueError(f"run name {name!r} has no character usable in a W&B run id; give --run-name")
    return safe


class Tracker:
    """One W&B run (offline unless ``mode`` says otherwise), or nothing when disabled."""

    def __init__(
        self,
        enabled: bool,
        *,
        project: str,
        run_name: str,
        config: dict[str, Any],
        run_dir: str | Path = "runs",
        mode: str = "offline",
        group: str | None = None,
        job_type: str | None = None,
    ) -> None:
        """Start a W&B run in ``run_dir`` when ``enabled``; ``mode`` is "offline", "online" or "disabled".

        Inside :func:`shared_run` an enabled tracker joins the shared run (its ``config`` is added to the
        run's) and :meth:`finish` leaves it open; the arguments naming a run are then the shared run's.
        """
        self.run = None
        self.owner = True
        if not enabled or mode == "disabled":
            return
        if _SHARED is not None and _SHARED.run is not None:
            self.run, self.owner = _SHARED.run, False
            self.run.config.update(config, allow_val_change=True)
            return
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project,
            name=run_name,
            id=run_id(run_name),
            group=group,
            job_type=job_type,
            config=config,
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    @property
    def directory(self) -> Path | None:
        """Where this run's W&B files live (None when tracking is off)."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step`` (no-op when disabled)."""
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Set run-summary entries (the figures W&B shows in its runs table); numpy scalars become Python ones."""
        if self.run is not None:
            self.run.summary.update({key: _plain(value) for key, value in values.items()})

    def log_artifact(self, paths: Path | str | Sequence[Path | str], *, name: str, type: str,
                     metadata: Mapping[str, Any] | None = None) -> Path | None:
        """Log files (or the files under folders) as one W&B artifact ``name`` of ``type``; returns its staging folder.

        The files are copied into ``<run folder>/artifacts/<name>/`` and added from there without another copy
        (W&B's ``immutable`` policy), so the offline run holds exactly the bytes logged now. Names inside the
        artifact are the file names (relative paths for a folder's files).
        """
        if self.run is None:
            return None
        import wandb

        staging = self.directory / "artifacts" / _UNSAFE_ID.sub("-", name)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        for path in [paths] if isinstance(paths, str | Path) else paths:
            path = Path(path)
            if path.is_dir():
                shutil.copytree(path, staging / path.name, dirs_exist_ok=True)
            elif path.is_file():
                shutil.copy2(path, staging / path.name)
            else:
                raise FileNotFoundError(f"artifact {name}: {path} does not exist")
        artifact = wandb.Artifact(_UNSAFE_ID.sub("-", name), type=type, metadata=dict(metadata or {}))
        artifact.add_dir(str(staging), policy="immutable")
        self.run.log_artifact(artifact)
        return staging

    def log_table(self, key: str, frame: Any) -> None:
        """Log a pandas DataFrame as a ``wandb.Table`` under ``key`` (dates and other objects as text)."""
        if self.run is None:
            return
        import pandas as pd
        import wandb

        table = frame.reset_index(drop=True).copy()
        for column in table.columns:
            if not (pd.api.types.is_numeric_dtype(table[column]) or pd.api.types.is_bool_dtype(table[column])):
                table[column] = table[column].map(lambda v: None if v is None else str(v))
        self.run.log({key: wandb.Table(dataframe=table)})

    def log_images(self, images: Mapping[str, Path | str]) -> None:
        """Log PNG figures (e.g. the report's equity curve) as ``wandb.Image`` under their keys."""
        if self.run is not None and images:
            import wandb

            self.run.log({key: wandb.Image(str(path)) for key, path in images.items()})

    @property
    def logs_outcome(self) -> bool:
        """Whether this tracker records a run's outcome: tracking is on and the run is its own (inside a shared run
        the orchestrator logs its own record). :func:`sentio_lab.evaluation.run_summary.log_run_outcome` asks."""
        return self.run is not None and self.owner

    def finish(self) -> None:
        """Flush and close the run (a shared run is left open for its owner)."""
        if self.run is not None:
            if self.owner:
                self.run.finish()
            self.run = None


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (W&B's JSON would otherwise go through its own encoder)."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


@contextmanager
def shared_run(enabled: bool, **tracker: Any) -> Iterator[Tracker]:
    """Open one run (``Tracker(enabled, **tracker)``) that every ``Tracker`` created inside joins; closed on exit."""
    global _SHARED
    outer = _SHARED
    run = Tracker(enabled, **tracker)
    _SHARED = run if run.run is not None else None
    try:
        yield run
    finally:
        _SHARED = outer
        run.finish()


def sharing() -> bool:
    """Whether a :func:`shared_run` is open (a variant trained inside it should track, to log into it)."""
    return _SHARED is not None


# ------------------------------------------------------------------------------------ reading offline runs
_HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
_RECORD = struct.Struct("<IHB")  # CRC-32 of type byte + data, data length, type (full / first / middle / last)
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _record_bytes(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file (a LevelDB-style log of 32 KiB blocks), CRC-checked."""
    data = path.read_bytes()
    ident, magic, version = _HEADER.unpack_from(data, 0) if len(data) >= _HEADER.size else (b"", 0, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B run file (header {data[:_HEADER.size]!r})")
    position, pending = _HEADER.size, b""
    while position + _RECORD.size <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _RECORD.size:  # a block's tail too short for a header is padding
            position += left
            continue
        checksum, length, kind = _RECORD.unpack_from(data, position)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            position += left
            continue
        chunk = data[position + _RECORD.size : position + _RECORD.size + length]
        if len(chunk) != length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: damaged record at byte {position}")
        position += _RECORD.size + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _set_nested(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    """What an offline W&B run recorded: identity, config, the final summary, history rows and artifacts."""

    run_id: str
    name: str
    project: str
    group: str
    job_type: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """artifact name -> ``{"type": ..., "files": {name in the artifact: local path}}``"""
    finished: bool = False
    """whether the file holds the run's exit record (it finished and was written to the end)"""


def read_offline_run(folder: str | Path, *, wait_s: float = 30.0) -> OfflineRun:
    """Read the ``.wandb`` file of an offline run folder (``.../wandb/offline-run-<time>-<id>``).

    ``run.finish()`` returns before W&B's service has written the end of the file (it flushes when it closes
    the run's stream), so this waits up to ``wait_s`` seconds for the exit record; a run without one (still
    running, or killed) is returned as it stands, with ``finished`` False.
    """
    files = sorted(Path(folder).glob("*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected one .wandb file, found {len(files)}")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = _parse_run_file(files[0])
        except ValueError:  # the tail is being written
            if time.monotonic() >= deadline:
                raise
            run = None
        if run is not None and (run.finished or time.monotonic() >= deadline):
            return run
        time.sleep(0.05)


def _parse_run_file(path: Path) -> OfflineRun | None:
    from wandb.proto import wandb_internal_pb2

    run: OfflineRun | None = None
    for raw in _record_bytes(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = OfflineRun(run_id=r.run_id, name=r.display_name, project=r.project, group=r.run_group,
                             job_type=r.job_type)
            for item in r.config.update:
                _set_nested(run.config, item)
        elif run is None:
            continue
        elif kind == "config":
            for item in record.config.update:
                _set_nested(run.config, item)
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(run.summary, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(row, item)
            run.history.append(row)
        elif kind == "artifact":
            a = record.artifact
            run.artifacts[a.name] = {"type": a.type,
                                     "files": {c.path: c.local_path for c in a.manifest.contents}}
        elif kind == "exit":
            run.finished = True
    return run
