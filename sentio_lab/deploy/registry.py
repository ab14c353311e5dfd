"""The model registry (MLflow, a SQLite file by default): register, promote, retire and resolve exported models.

First published interface (issue 21 s2): :func:`resolve` turns ``models:/<name>@<alias>``,
``models:/<name>/<version>`` or a plain path into a local path. The rest of the module follows.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from sentio_lab.deploy.export import BUNDLE_DIR, load_bundle

#: Where the embedded registry lives when no URI is given: ``runs/mlflow/mlflow.db`` (artifacts beside it).
DEFAULT_DIR = Path("runs") / "mlflow"
#: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def default_registry_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set (a team's server), else ``sqlite:///runs/mlflow/mlflow.db`` (cwd)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def _local_dir(registry_uri: str) -> Path:
    """The folder next to a SQLite registry file (artifacts, downloads); ``runs/mlflow`` for a server."""
    if registry_uri.startswith("sqlite:///"):
        return Path(registry_uri[len("sqlite:///"):]).parent
    return DEFAULT_DIR.resolve()


def _client(registry_uri: str) -> Any:
    from mlflow import MlflowClient  # mlflow takes seconds to import: only registry calls pay for it

    return MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)


def resolve(uri: str | Path, *, registry_uri: str | None = None, cache: str | Path | None = None) -> Path:
    """The local path a model URI points to.

    * ``models:/<name>@<alias>`` (``champion``, ``challenger``) or ``models:/<name>/<version>``: the version's
      export bundle (a folder holding ``model.onnx``, ``manifest.json`` and ``checkpoint.pt``;
      :func:`sentio_lab.deploy.export.load_bundle`), downloaded from the registry at ``registry_uri`` (default
      :func:`default_registry_uri`) into ``cache`` (default: ``downloads/`` beside the registry file), one
      folder per name and version; a verified earlier download is reused.
    * anything else: a plain path (a bundle folder or a checkpoint file), returned as it is if it exists.

    Raises ``FileNotFoundError`` for a missing path, ``LookupError`` for an unknown name, alias or version, and
    :class:`~sentio_lab.deploy.export.BundleError` when the bundle's files do not match its manifest.
    """
    text = str(uri)
    if not text.startswith("models:"):
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such model bundle or checkpoint")
        return path
    match = _MODEL_URI.match(text)
    if match is None:
        raise ValueError(f"{text!r}: not a model URI; use models:/<name>@<alias> or models:/<name>/<version>")
    registry_uri = registry_uri or default_registry_uri()
    version = model_version(match["name"], match["alias"] or match["version"], registry_uri=registry_uri)
    root = Path(cache) if cache is not None else _local_dir(registry_uri) / "downloads"
    target = root / match["name"] / str(version.version)
    bundle = target / BUNDLE_DIR
    if bundle.is_dir():
        try:
            load_bundle(bundle)
            return bundle
        except ValueError:  # a damaged or partial earlier download: fetch it again
            shutil.rmtree(target)
    import mlflow

    target.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(target),
                                                tracking_uri=registry_uri)
    load_bundle(local)
    return Path(local)


def model_version(name: str, alias_or_version: str | int, *, registry_uri: str | None = None) -> Any:
    """The MLflow ``ModelVersion`` of ``name`` at an alias (``"champion"``) or a version number."""
    from mlflow.exceptions import MlflowException

    client = _client(registry_uri or default_registry_uri())
    ref = str(alias_or_version)
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as err:
        kind = "version" if ref.isdigit() else "alias"
        raise LookupError(f"model {name!r} has no {kind} {ref!r} in the registry: {err.message}") from err
