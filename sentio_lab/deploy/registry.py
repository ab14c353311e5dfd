"""The model registry: MLflow's, on a SQLite file by default, with a promotion gate and ``models:/`` discovery.

``python -m sentio_lab.deploy.registry list | show | register | promote | retire [--registry-uri URI]``.

* **Where**: ``--registry-uri`` (a team's MLflow server, ``http://host:5000``) or ``$MLFLOW_TRACKING_URI``; by
  default the embedded ``sqlite:///runs/mlflow/mlflow.db`` (nothing to start), artifacts in ``runs/mlflow/artifacts``.
* :func:`register`: exports the checkpoint (:func:`sentio_lab.deploy.export.export_bundle`; the bundle holds the
  checkpoint), logs the bundle, the evaluation report and ``verdict.json`` as artifacts of one MLflow run, and
  creates a model version whose source is the bundle, tagged with the variant, the data fingerprint, the
  feature-state hash, the git commit, the package version and the evaluation verdict. With
  tracking on, the checkpoint and the report are also W&B artifacts and the version records the W&B run id.
* **Verdict** (:class:`~sentio_lab.deploy.verdict.Verdict`, :mod:`sentio_lab.deploy.verdict`): from an experiment's
  output folder, a ``verdict.json``, or, without either, the checkpoint's own test range against buy-and-hold.
* **Aliases** ``champion`` and ``challenger`` (:func:`promote`). Promotion to ``champion`` must pass a declared
  :class:`~sentio_lab.deploy.verdict.Gate` (default: the reverse SPA test does not find a baseline better than the
  model at 5%, and DSR > 0.5); a refusal (:class:`PromotionRefused`) names every condition that failed.
  :func:`retire` takes a version's aliases away and marks it retired (it cannot be promoted again).
* **Discovery**: :func:`resolve` turns ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a plain path into
  a local bundle folder (downloaded and verified) or the path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sentio_lab.deploy.export import BUNDLE_DIR, export_bundle, load_bundle
from sentio_lab.deploy.verdict import VERDICT_TAG, Gate, Verdict, verdict_from_checkpoint, verdict_from_experiment

#: Where the embedded registry lives when no URI is given: ``runs/mlflow/mlflow.db`` (artifacts beside it).
DEFAULT_DIR = Path("runs") / "mlflow"
#: MLflow experiment that holds the registration runs.
EXPERIMENT = "sentio-lab-registry"
#: The aliases this lifecycle uses.
ALIASES: tuple[str, ...] = ("champion", "challenger")
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
#: Version tags :func:`register` writes itself (besides ``verdict.*``): extra tags may not replace them.
_OWN_TAGS = frozenset({"variant", "data_fingerprint", "feature_state_hash", "git_commit", "git_dirty",
                       "package_version", "global_step", "status"})
#: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


# ------------------------------------------------------------------------------------------ the registry
class PromotionRefused(RuntimeError):
    """A promotion the gate (or the version's status) does not allow; the message names each failed condition."""


def default_registry_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set (a team's server), else ``sqlite:///<cwd>/runs/mlflow/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def _local_dir(registry_uri: str) -> Path:
    """The folder of a SQLite registry file (artifacts, downloads); ``runs/mlflow`` for a server."""
    if registry_uri.startswith("sqlite:///"):
        return Path(registry_uri[len("sqlite:///"):]).parent
    return DEFAULT_DIR.resolve()


def _client(registry_uri: str) -> Any:
    from mlflow import MlflowClient  # mlflow takes seconds to import: only registry calls pay for it

    if registry_uri.startswith("sqlite:///"):
        _local_dir(registry_uri).mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)


def _experiment_id(client: Any, registry_uri: str) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    location = None  # a server decides where its artifacts go; the embedded registry keeps them beside its file
    if registry_uri.startswith("sqlite:///"):
        location = (_local_dir(registry_uri) / "artifacts").resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def model_version(name: str, alias_or_version: str | int, *, registry_uri: str | None = None) -> Any:
    """The MLflow ``ModelVersion`` of ``name`` at an alias (``"champion"``) or a version number (``LookupError``
    naming what is missing)."""
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


def register(checkpoint: str | Path, name: str, *, verdict: Verdict | str | Path | None = None,
             report: str | Path | None = None, alias: str | None = None, registry_uri: str | None = None,
             agent: str | None = None, track: bool = False, wandb_project: str = "sentio-lab",
             wandb_dir: str | Path = "runs", tags: dict[str, str] | None = None) -> Any:
    """Register ``checkpoint`` as a new version of model ``name``; return the MLflow ``ModelVersion`` (module doc).

    ``checkpoint``: a checkpoint file (exported here) or a bundle folder exported before (registered as it is, after
    :func:`~sentio_lab.deploy.export.load_bundle` verified it).

    ``verdict``: a :class:`~sentio_lab.deploy.verdict.Verdict`, an experiment output folder
    (:func:`~sentio_lab.deploy.verdict.verdict_from_experiment`), a ``verdict.json``, or None
    (:func:`~sentio_lab.deploy.verdict.verdict_from_checkpoint`). ``report``: a report folder or file to attach
    (None: the checkpoint's ``python -m sentio_lab.evaluate`` report is written and attached). ``alias``: set
    ``challenger`` at once (``champion`` goes through :func:`promote` and its gate). ``agent``: the configuration
    of an experiment folder with several. ``track``: log the checkpoint
    and the report as W&B artifacts too (offline unless ``WANDB_MODE`` says otherwise) and tag the run id.
    ``tags``: more version tags (e.g. the lineage :mod:`sentio_lab.deploy.online` records); they may not replace
    the tags written here.
    """
    extra_tags = tags or {}
    clash = sorted(k for k in extra_tags if k in _OWN_TAGS or k.startswith(VERDICT_TAG) or k == "wandb_run_id")
    if clash:
        raise ValueError(f"register: tags {clash} are written by the registry itself; use other names")
    if alias is not None and alias != "challenger":
        raise ValueError(f"register sets only the 'challenger' alias, not {alias!r}; promote to champion")
    registry_uri = registry_uri or default_registry_uri()
    source = Path(checkpoint)
    with tempfile.TemporaryDirectory(prefix="sentio-register-") as scratch:
        if source.is_dir():  # a bundle exported before: verified, registered as it is
            bundle = load_bundle(source)
        else:
            bundle = load_bundle(export_bundle(source, Path(scratch) / BUNDLE_DIR))
        checkpoint = bundle.checkpoint
        verdict = _verdict(checkpoint, verdict, agent)
        client = _client(registry_uri)
        report_path = Path(report) if report is not None else _write_report(checkpoint, Path(scratch) / "report")
        if not report_path.exists():
            raise FileNotFoundError(f"{report_path}: no such report")
        verdict_file = Path(scratch) / "verdict.json"
        verdict_file.write_text(json.dumps(dataclasses.asdict(verdict), indent=1, allow_nan=True) + "\n")
        code = bundle.config["code_version"]
        tags = {"variant": bundle.variant, "data_fingerprint": bundle.data_fingerprint,
                "feature_state_hash": bundle.config["feature_state_hash"], "git_commit": str(code["git_commit"]),
                "git_dirty": str(code["git_dirty"]), "package_version": str(code["package_version"]),
                "global_step": str(bundle.config["global_step"]), "status": "registered", **verdict.to_tags()}
        tags.update(extra_tags or {})
        wandb_id = _log_wandb(track, wandb_project, wandb_dir, name, checkpoint, report_path, tags)
        if wandb_id is not None:
            tags["wandb_run_id"] = wandb_id
        run = client.create_run(_experiment_id(client, registry_uri), run_name=f"register-{name}", tags=tags)
        run_id = run.info.run_id
        try:
            client.log_artifacts(run_id, str(bundle.path), BUNDLE_DIR)
            if report_path.is_dir():
                client.log_artifacts(run_id, str(report_path), "report")
            else:
                client.log_artifact(run_id, str(report_path), "report")
            client.log_artifact(run_id, str(verdict_file))
            client.set_terminated(run_id)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="sentio-lab greedy trading policy (ONNX bundle)")
    version = client.create_model_version(name, f"{run.info.artifact_uri}/{BUNDLE_DIR}", run_id=run_id, tags=tags,
                                          description=verdict.source)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def _verdict(checkpoint: Path, verdict: Verdict | str | Path | None, agent: str | None) -> Verdict:
    if isinstance(verdict, Verdict):
        return verdict
    if verdict is None:
        return verdict_from_checkpoint(checkpoint)
    path = Path(verdict)
    return verdict_from_experiment(path, agent) if path.is_dir() else Verdict.from_json(path)


def _write_report(checkpoint: Path, folder: Path) -> Path:
    from sentio_lab.evaluation.agent_report import write_checkpoint_report

    write_checkpoint_report(checkpoint, output=folder)
    return folder


def _log_wandb(track: bool, project: str, run_dir: str | Path, name: str, checkpoint: Path, report: Path,
               tags: dict[str, str]) -> str | None:
    """Log the checkpoint and the report as W&B artifacts of a new run; its id (None when tracking is off)."""
    if not track:
        return None
    from sentio_lab.agents.tracking import Tracker

    tracker = Tracker(True, project=project, run_name=f"register-{name}-{tags['data_fingerprint'][:8]}",
                      config=dict(tags), run_dir=run_dir, mode=os.environ.get("WANDB_MODE", "offline"),
                      job_type="register")
    try:
        tracker.log_artifact(checkpoint, name=f"{name}-checkpoint", type="model", metadata=tags)
        tracker.log_artifact(report, name=f"{name}-report", type="report", metadata=tags)
        return str(tracker.run.id)
    finally:
        tracker.finish()


def promote(name: str, version: str | int, alias: str = "champion", *, gate: Gate | None = None,
            registry_uri: str | None = None) -> Any:
    """Point ``alias`` (``champion`` / ``challenger``) at ``version`` of ``name``; return the ``ModelVersion``.

    ``champion`` requires the version's verdict to pass ``gate`` (default
    :class:`~sentio_lab.deploy.verdict.Gate`): otherwise :class:`PromotionRefused` names each failed condition and
    the alias stays where it was. A retired version is refused for either alias.
    """
    if alias not in ALIASES:
        raise ValueError(f"alias {alias!r}; the lifecycle uses {list(ALIASES)}")
    registry_uri = registry_uri or default_registry_uri()
    current = model_version(name, version, registry_uri=registry_uri)
    if current.tags.get("status") == "retired":
        raise PromotionRefused(f"{name} version {current.version} is retired; register the checkpoint again")
    if alias == "champion":
        failed = (gate or Gate()).failures(Verdict.from_tags(current.tags))
        if failed:
            raise PromotionRefused(f"{name} version {current.version} not promoted to champion: " + "; ".join(failed))
    client = _client(registry_uri)
    client.set_registered_model_alias(name, alias, current.version)
    return client.get_model_version(name, current.version)


def retire(name: str, version: str | int, *, registry_uri: str | None = None) -> Any:
    """Take every alias away from ``version`` of ``name`` and tag it ``status=retired``; return the ``ModelVersion``.

    Retiring the champion leaves the model without one: ``models:/<name>@champion`` then does not resolve until
    another version is promoted (nothing falls back silently).
    """
    registry_uri = registry_uri or default_registry_uri()
    current = model_version(name, version, registry_uri=registry_uri)
    client = _client(registry_uri)
    # tag first: a crash between the two steps leaves a retired-tagged version (promotion refuses it) whose
    # aliases a rerun removes, never an alias-free version that could still be promoted
    client.set_model_version_tag(name, current.version, "status", "retired")
    for alias in current.aliases:
        client.delete_registered_model_alias(name, alias)
    return client.get_model_version(name, current.version)


def list_versions(name: str | None = None, *, registry_uri: str | None = None) -> list[Any]:
    """Every ``ModelVersion`` (of ``name``, or of every model), by model name then version number."""
    client = _client(registry_uri or default_registry_uri())
    found = client.search_model_versions(f"name = '{name}'" if name else None)
    # a search leaves every version's aliases empty (MLflow fills them only on a get)
    return [client.get_model_version(v.name, v.version) for v in sorted(found, key=lambda v: (v.name, int(v.version)))]


def resolve(uri: str | Path, *, registry_uri: str | None = None, cache: str | Path | None = None) -> Path:
    """The local path a model URI points to.

    * ``models:/<name>@<alias>`` (``champion``, ``challenger``) or ``models:/<name>/<version>``: the version's
      export bundle (a folder holding ``model.onnx``, ``manifest.json`` and ``checkpoint.pt``;
      :func:`sentio_lab.deploy.export.load_bundle`), downloaded from the registry at ``registry_uri`` (default
      :func:`default_registry_uri`) into ``cache`` (default: ``downloads/`` beside the registry file), one
      folder per name and version; a verified earlier download is reused, a damaged one is fetched again.
    * anything else: a plain path (a bundle folder or a checkpoint file), returned as it is if it exists.

    Raises ``FileNotFoundError`` for a missing path, ``LookupError`` for an unknown name, alias or version, and
    :class:`~sentio_lab.deploy.export.BundleError` when the registry's bundle does not match its manifest.
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
    progress = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"  # no tqdm bar on stderr for a few small files
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(target),
                                                    tracking_uri=registry_uri)
    finally:
        if progress is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = progress
    load_bundle(local)
    return Path(local)


# ------------------------------------------------------------------------------------------ command line
def describe_version(version: Any) -> str:
    """One line: name, version, aliases, status, variant and the verdict's main numbers."""
    verdict = Verdict.from_tags(version.tags)
    aliases = ",".join(sorted(version.aliases)) or "-"
    return (f"{version.name} v{version.version} [{aliases}] {version.tags.get('status', '?')} "
            f"{version.tags.get('variant', '?')}: median Sharpe {verdict.median_sharpe:.2f}, DSR {verdict.dsr:.2f}, "
            f"PBO {verdict.pbo:.2f}, SPA p {verdict.spa_p_value:.3f} (reverse {verdict.spa_reverse_p_value:.3f}) "
            f"vs {verdict.benchmark or '?'}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sentio_lab.deploy.registry",
                                     description="The model registry (MLflow): list, show, register, promote, retire.")
    parser.add_argument("--registry-uri", default=None,
                        help="MLflow tracking / registry URI (a team server, e.g. http://host:5000); default "
                             "$MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow/mlflow.db")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every version of every model (or of NAME)")
    listing.add_argument("name", nargs="?")
    show = commands.add_parser("show", help="one version's tags, aliases and source (VERSION or an alias)")
    show.add_argument("name")
    show.add_argument("version", help="a version number or an alias (champion, challenger)")
    reg = commands.add_parser("register", help="export and register a checkpoint as a new version")
    reg.add_argument("checkpoint")
    reg.add_argument("name")
    reg.add_argument("--verdict", default=None,
                     help="an experiment output folder (results.parquet) or a verdict.json; default: the "
                          "checkpoint's test range against buy-and-hold")
    reg.add_argument("--agent", default=None,
                     help="the configuration of the experiment the checkpoint belongs to (when it has several)")
    reg.add_argument("--report", default=None, help="report folder to attach (default: written by evaluate)")
    reg.add_argument("--challenger", action="store_true", help="make the new version the challenger")
    reg.add_argument("--track", action="store_true", help="also log checkpoint and report to W&B")
    promote_cmd = commands.add_parser("promote", help="point an alias at a version (champion: through the gate)")
    promote_cmd.add_argument("name")
    promote_cmd.add_argument("version")
    promote_cmd.add_argument("--alias", choices=ALIASES, default="champion")
    defaults = Gate()
    promote_cmd.add_argument("--spa-alpha", type=float, default=defaults.spa_alpha,
                             help="refuse when the reverse SPA p-value is below this (the model is worse than its "
                                  "benchmark); negative: not checked")
    promote_cmd.add_argument("--min-dsr", type=float, default=defaults.min_dsr,
                             help="refuse unless DSR is above this; negative: not checked")
    promote_cmd.add_argument("--min-sharpe", type=float, default=None, help="refuse unless the median Sharpe is "
                             "above this")
    promote_cmd.add_argument("--max-pbo", type=float, default=None, help="refuse unless PBO is below this")
    retire_cmd = commands.add_parser("retire", help="take a version's aliases away and mark it retired")
    retire_cmd.add_argument("name")
    retire_cmd.add_argument("version")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m sentio_lab.deploy.registry`` (module doc); errors are one line and exit 1."""
    from mlflow.exceptions import MlflowException

    args = _parser().parse_args(argv)
    uri = args.registry_uri
    try:
        if args.command == "list":
            for version in list_versions(args.name, registry_uri=uri):
                print(describe_version(version))
        elif args.command == "show":
            version = model_version(args.name, args.version, registry_uri=uri)
            print(describe_version(version))
            print(f"source: {version.source}")
            print(f"run: {version.run_id}")
            for key in sorted(version.tags):
                print(f"  {key}: {version.tags[key]}")
        elif args.command == "register":
            version = register(args.checkpoint, args.name, verdict=args.verdict, report=args.report,
                               alias="challenger" if args.challenger else None, registry_uri=uri, agent=args.agent,
                               track=args.track)
            print(f"registered {describe_version(version)}")
        elif args.command == "promote":
            gate = Gate(spa_alpha=None if args.spa_alpha < 0 else args.spa_alpha,
                        min_dsr=None if args.min_dsr < 0 else args.min_dsr, min_sharpe=args.min_sharpe,
                        max_pbo=args.max_pbo)
            version = promote(args.name, args.version, args.alias, gate=gate, registry_uri=uri)
            print(f"promoted {describe_version(version)}")
        else:
            print(f"retired {describe_version(retire(args.name, args.version, registry_uri=uri))}")
    except (ValueError, LookupError, OSError, PromotionRefused, MlflowException) as err:
        message = err.message if isinstance(err, MlflowException) else err
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from err


if __name__ == "__main__":
    main()
