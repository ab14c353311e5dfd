"""Export a trained greedy policy to ONNX, as a bundle folder that carries everything a decision needs.

A bundle (:func:`export_bundle`) is a folder:

* ``model.onnx``: raw observation ``obs`` (float32 ``(B, obs_dim)``, ``B`` dynamic) -> ``logits`` (float32
  ``(B, num_actions)``). The observation normaliser (the running statistics saved with the weights) is inside the
  graph, so the graph takes exactly what :class:`~sentio_lab.env.TradingEnv` observes. Action masks are not: the
  greedy action is :func:`sentio_lab.agents.nets.masked_argmax` of the logits and a mask computed by the same
  :mod:`sentio_lab.env.masks` code the env runs (:meth:`OnnxPolicy.act_greedy`), as ``agent.act_greedy`` does.
* ``config.json``: the variant and its arguments, the position levels, the cost model, the mask configuration
  (and what an invalid action does), the anchor configuration if any, the feature configuration, the
  observation layout, the data fingerprint, the hash of the fitted feature state and the code version (git
  commit and package version).
* ``feature_state.json``: the fitted feature state (columns kept, normaliser statistics, regime model), exactly
  the checkpoint's (plain python values; JSON round-trips them bit for bit).
* ``checkpoint.pt``: the checkpoint it was exported from (to rebuild the torch agent and its market).
* ``manifest.json``: format version and the SHA-256 and size of every file above. :func:`load_bundle` checks
  them all and refuses a bundle with a missing, changed or extra listed file with one :class:`BundleError` line.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript), for every variant the
transformer included; the TorchScript exporter is not used (:func:`export_onnx` says so if the dynamo one fails).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sentio_lab.agents.checkpoint import load_checkpoint
from sentio_lab.agents.nets import masked_argmax
from sentio_lab.agents.variants import env_options, load_trained, load_variant
from sentio_lab.env.anchor import AnchorConfig
from sentio_lab.env.costs import CostModel
from sentio_lab.env.masks import MaskConfig
from sentio_lab.features.config import FeatureConfig
from sentio_lab.features.observation_layout import observation_layout

#: Bundle format written by this code (``manifest.json``'s ``format_version``).
FORMAT_VERSION = 1
#: The folder a registered model version's bundle sits in (``<run artifacts>/bundle``).
BUNDLE_DIR = "bundle"
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
FEATURE_STATE_FILE = "feature_state.json"
CHECKPOINT_FILE = "checkpoint.pt"
MANIFEST_FILE = "manifest.json"
#: Files every bundle holds (besides the manifest).
BUNDLE_FILES: tuple[str, ...] = (MODEL_FILE, CONFIG_FILE, FEATURE_STATE_FILE, CHECKPOINT_FILE)
#: ONNX opset of the exported graph (onnxruntime >= 1.16 runs it).
OPSET = 18


class BundleError(ValueError):
    """An export bundle is missing, incomplete, damaged (a file differs from its manifest) or of another format."""


# ------------------------------------------------------------------------------------------ the graph
class GreedyLogits(nn.Module):
    """The part of an agent the exported graph holds: raw observation -> actor logits (float32).

    The same operations as the agent's own ``act_greedy`` before its argmax: ``actor(normalise(obs))`` for the MLP
    actor-critics (``ppo``, ``ppo_masked``, ``ppo_risk``), ``actor(encode(normalise(obs)))`` for the transformer.
    """

    def __init__(self, agent: nn.Module) -> None:
        """Wrap ``agent`` (not copied: export it in eval mode, as :func:`export_bundle` does)."""
        super().__init__()
        self.agent = agent

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_actions)`` for raw observations ``(B, obs_dim)``."""
        x = self.agent.normalise(obs)
        if hasattr(self.agent, "encode"):  # the transformer: the trunk, uncompiled (export traces the eager code)
            x = self.agent.encode(x)
        return self.agent.actor(x).float()


def export_onnx(agent: nn.Module, obs_dim: int, path: str | Path, *, example: torch.Tensor | None = None) -> Path:
    """Write ``agent``'s :class:`GreedyLogits` to ``path`` as ONNX with a dynamic batch dimension.

    Uses the dynamo exporter (``torch.onnx.export(dynamo=True)``, onnxscript); a failure is raised as it is
    (with the exporter's report), not retried with the TorchScript exporter: that one is deprecated, and every
    variant exports with dynamo. ``example`` (float32 ``(B, obs_dim)``, ``B >= 2``) is the tracing input
    (default: standard normal rows, seed 0).
    """
    path = Path(path)
    module = GreedyLogits(agent).eval()
    if example is None:
        example = torch.randn(4, obs_dim, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    # the exporter logs a warning per torchvision operator it cannot register (torchvision is not installed, and
    # no policy uses one) and warns about deprecations: neither is the user's business
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example.float(),), dynamo=True, input_names=["obs"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},), opset_version=OPSET,
                                        optimize=True, verbose=False)
    finally:
        quiet.setLevel(level)
    program.save(str(path))
    return path


# ------------------------------------------------------------------------------------------ bundle contents
def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def feature_state_hash(state: dict[str, Any]) -> str:
    """SHA-256 of a fitted feature state as canonical JSON (sorted keys): equal states, equal hashes."""
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def code_version() -> dict[str, Any]:
    """The code that exported: git commit of the source tree (None outside a checkout), whether the tree had
    uncommitted changes, and the installed ``sentio-lab`` package version."""
    root = Path(__file__).resolve().parents[2]
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True, timeout=10).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):  # pragma: no cover - no git, or not a checkout
        pass
    try:
        package = importlib.metadata.version("sentio-lab")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare source tree
        package = None
    return {"git_commit": commit, "git_dirty": dirty, "package_version": package}


def _jsonable(value: Any) -> Any:
    """Dataclass / numpy values as plain JSON types (tuples become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True, allow_nan=True) + "\n")


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Write ``manifest.json`` over :data:`BUNDLE_FILES` in ``folder`` (SHA-256 and size of each) and return it."""
    folder = Path(folder)
    files = {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
             for name in BUNDLE_FILES}
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    _write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def verify_bundle(folder: str | Path) -> dict[str, Any]:
    """The manifest of the bundle in ``folder`` after checking every file against it (:class:`BundleError`)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        version = manifest["format_version"]
    except FileNotFoundError as err:
        raise BundleError(f"{folder}: not an export bundle (no {MANIFEST_FILE})") from err
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{folder}: damaged bundle: {MANIFEST_FILE} is not a readable manifest ({err!r})") from err
    if version != FORMAT_VERSION:
        raise BundleError(f"{folder}: bundle format {version}, this code reads {FORMAT_VERSION}; re-export it")
    missing = [name for name in BUNDLE_FILES if name not in files]
    if missing:
        raise BundleError(f"{folder}: damaged bundle: the manifest lists no {missing}")
    for name in sorted(files):
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder}: damaged bundle: {name} is missing")
        digest = sha256_file(path)
        if digest != files[name]["sha256"]:
            raise BundleError(f"{folder}: damaged bundle: {name} does not match its manifest (sha256 {digest[:16]}..."
                              f", recorded {str(files[name]['sha256'])[:16]}...); re-export or download it again")
    return manifest


# ------------------------------------------------------------------------------------------ export
def export_bundle(checkpoint: str | Path, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Export the checkpoint's greedy policy and what a decision needs into the bundle ``folder`` (module doc).

    The checkpoint is loaded and verified (:func:`sentio_lab.agents.variants.load_trained`: its dataset is reloaded
    and must match its fingerprint). The bundle is written into a temporary sibling folder and renamed into place,
    so ``folder`` is either complete or absent; an existing ``folder`` is replaced only with ``overwrite``.
    """
    checkpoint, folder = Path(checkpoint), Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: exists; pass overwrite=True (or --overwrite) to replace it")
    trained = load_trained(checkpoint)
    args, market, bundle = trained.args, trained.market, trained.bundle
    variant = load_variant(bundle["variant"])
    options = env_options(args, market)
    anchor: AnchorConfig | None = options.get("anchor")
    blocks = tuple(options.get("token_blocks", ())) + ((anchor.token_block(),) if anchor is not None else ())
    layout = observation_layout(market.arrays.features.shape[1], args.features.window, blocks,
                                options.get("drawdown_obs", False))
    obs_dim = max(part.stop for part in layout.values())
    masks = getattr(args, "masks", None)
    feature_state = bundle["feature_state"]
    if json.loads(json.dumps(feature_state, allow_nan=True)) != _jsonable(feature_state):
        raise BundleError(f"{checkpoint}: its feature state does not round-trip through JSON")  # pragma: no cover
    config = {
        "variant": bundle["variant"],
        "args": _jsonable(bundle["args"]),
        "positions": [float(p) for p in args.env.positions],
        "num_actions": len(args.env.positions),
        "window": int(args.features.window),
        "obs_dim": int(obs_dim),
        "observation_layout": {name: [part.start, part.stop] for name, part in layout.items()},
        "token_blocks": [[b.name, int(b.index.shape[1]), int(b.table.shape[1])] for b in blocks],
        "drawdown_obs": bool(options.get("drawdown_obs", False)),
        "cost_model": _jsonable(variant.cost_model(args)),
        "fill_price": market.arrays.fill_price,
        "masks": None if masks is None else _jsonable(masks),
        "invalid_action": getattr(args, "invalid_action", None) if masks is not None else None,
        "anchor": None if anchor is None else _jsonable(anchor),
        "feature_config": _jsonable(variant.feature_config(args)),
        "feature_state_hash": feature_state_hash(feature_state),
        "data_fingerprint": bundle["data_fingerprint"],
        "dataset": str(args.data.dataset),
        "global_step": int(bundle["global_step"]),
        "code_version": code_version(),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        export_onnx(trained.agent, obs_dim, staging / MODEL_FILE)
        _write_json(staging / CONFIG_FILE, config)
        _write_json(staging / FEATURE_STATE_FILE, feature_state)
        shutil.copyfile(checkpoint, staging / CHECKPOINT_FILE)
        write_manifest(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# ------------------------------------------------------------------------------------------ loading
class OnnxPolicy:
    """The exported greedy policy on ONNX Runtime (CPU): :meth:`logits`, :meth:`act_greedy`.

    One ``InferenceSession`` per policy; ``run`` on it is thread-safe (ONNX Runtime's documented guarantee), so one
    policy may serve concurrent callers.
    """

    def __init__(self, model_path: str | Path, *, threads: int | None = None) -> None:
        """Open ``model_path``; ``threads`` caps ONNX Runtime's intra-op threads (None: its default)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.num_actions = int(self.session.get_outputs()[0].shape[-1])

    def logits(self, obs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Float32 logits ``(B, num_actions)`` of raw observations ``(B, obs_dim)`` (or one ``(obs_dim,)`` row)."""
        x = obs.detach().cpu().numpy() if isinstance(obs, torch.Tensor) else np.asarray(obs)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        return self.session.run(None, {"obs": x})[0]

    def act_greedy(self, obs: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Greedy actions ``(B,)``: the best valid action under a bool ``mask`` ``(B, num_actions)`` (None: all
        valid), by :func:`sentio_lab.agents.nets.masked_argmax` (the agents' own rule; a row with no valid action is
        a ``ValueError``)."""
        logits = torch.from_numpy(self.logits(obs))
        if mask is not None:
            mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            if mask.ndim == 1:
                mask = mask[None]
        return masked_argmax(logits, mask).numpy()


@dataclass
class ExportBundle:
    """A verified bundle folder (:func:`load_bundle`): its manifest, configuration and fitted feature state."""

    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    feature_state: dict[str, Any]

    @property
    def variant(self) -> str:
        """The variant that trained the model."""
        return self.config["variant"]

    @cached_property
    def args(self) -> Any:
        """The variant's ``Args``, rebuilt from the bundled checkpoint (``config.json`` holds a JSON view of them, its
        tuples as lists)."""
        return load_variant(self.variant).Args.from_dict(load_checkpoint(self.checkpoint)["args"])

    @property
    def positions(self) -> tuple[float, ...]:
        """The position levels the actions index."""
        return tuple(self.config["positions"])

    @property
    def cost_model(self) -> CostModel:
        """The cost model the model was trained and evaluated with."""
        return CostModel(**self.config["cost_model"])

    @property
    def masks(self) -> MaskConfig | None:
        """The mask rules of a masked variant (None: no masks)."""
        masks = self.config["masks"]
        return None if masks is None else MaskConfig(**masks)

    @property
    def feature_config(self) -> FeatureConfig:
        """The feature pipeline the variant's arguments asked for (its ``session_close`` None: the market's, as
        :func:`sentio_lab.env.market.prepare_market` fills it)."""
        saved = dict(self.config["feature_config"])
        saved["timeframes"] = tuple(saved["timeframes"])
        return FeatureConfig(**saved)

    @property
    def data_fingerprint(self) -> str:
        """Fingerprint of the data the model was trained on."""
        return self.config["data_fingerprint"]

    @property
    def checkpoint(self) -> Path:
        """The checkpoint the bundle was exported from (inside the bundle)."""
        return self.path / CHECKPOINT_FILE

    @cached_property
    def policy(self) -> OnnxPolicy:
        """The ONNX Runtime policy of ``model.onnx`` (opened once)."""
        return OnnxPolicy(self.path / MODEL_FILE)


def load_bundle(path: str | Path) -> ExportBundle:
    """Verify (:func:`verify_bundle`) and read the bundle folder at ``path``; damaged: a :class:`BundleError`."""
    path = Path(path)
    manifest = verify_bundle(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    feature_state = json.loads((path / FEATURE_STATE_FILE).read_text())
    return ExportBundle(path=path, manifest=manifest, config=config, feature_state=feature_state)
