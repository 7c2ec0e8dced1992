"""Operator actions on the hub's adapter store: promote, roll back, export a merged checkpoint.

Promote and rollback never move ``current`` backwards: they store a NEW version whose content is
an older one's (same files and tensors, new manifest with its own version and parent), so
version numbers only grow and agents take it like any other update. A running distribution
server follows ``current.json`` and announces it within a loop tick.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loguru import logger

from zk0.shared.artifact import (
    TENSORS_FILE,
    ArtifactError,
    Manifest,
    load_tensors,
    reversion_artifact,
    verify_artifact,
)
from zk0.shared.features import PolicyFeatures
from zk0.shared.fsutil import publish_dir, staging_dir_for
from zk0.shared.store import AdapterStore


def _require(store: AdapterStore, version: int) -> Path:
    folder = store.path(version)
    if not folder.is_dir():
        raise ArtifactError(f"{store.root}: no version {version} (zk0-hub adapters list)")
    return folder


def content_id(manifest: Manifest) -> str:
    """What makes two versions the same adapter: their tensors file (base and LoRA in the id)."""
    return manifest.files[TENSORS_FILE].sha256


def promote(store: AdapterStore, version: int) -> Manifest:
    """Store a new version with ``version``'s content and make it current."""
    source = _require(store, version)
    with store.allocate() as (new_version, path):
        manifest = reversion_artifact(source, path, version=new_version, parent_version=version)
    store.set_current(new_version)
    logger.info("promoted version {} as version {}", version, new_version)
    return manifest


def rollback_target(store: AdapterStore) -> int:
    """The version before the current one whose content differs: follow ``parent_version``
    past every copy of the current content (an earlier promote or rollback)."""
    pointer = store.current()
    if pointer is None:
        raise ArtifactError(f"{store.root}: no current version to roll back from")
    current = store.manifest(pointer.version)
    candidate = current.parent_version
    seen = {pointer.version}
    while candidate is not None and candidate not in seen:
        seen.add(candidate)
        if not store.path(candidate).is_dir():
            raise ArtifactError(
                f"version {candidate} (an ancestor of {pointer.version}) was pruned"
            )
        manifest = store.manifest(candidate)
        if content_id(manifest) != content_id(current):
            return candidate
        candidate = manifest.parent_version
    raise ArtifactError(f"version {pointer.version} has no earlier, different version")


def rollback(store: AdapterStore) -> tuple[int, Manifest]:
    """Promote ``rollback_target``: returns (the version whose content returns, the new one)."""
    target = rollback_target(store)
    return target, promote(store, target)


def _features_from_checkpoint_config(config_json: Path) -> PolicyFeatures:
    """Feature shapes from the LeRobot policy config an artifact carries (``config.json``)."""
    raw = json.loads(config_json.read_text())
    inputs, outputs = raw.get("input_features", {}), raw.get("output_features", {})
    try:
        return PolicyFeatures(
            state_dim=int(inputs["observation.state"]["shape"][0]),
            action_dim=int(outputs["action"]["shape"][0]),
            images={
                key: tuple(int(v) for v in value["shape"])  # type: ignore[misc]
                for key, value in sorted(inputs.items())
                if key.startswith("observation.images.")
            },
        )
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ArtifactError(f"{config_json}: no usable input/output features ({error})") from None


def export_merged(store: AdapterStore, version: int, out_dir: Path) -> Manifest:
    """Write ``version`` merged into its base as a plain LeRobot SmolVLA checkpoint at ``out_dir``
    (``config.json``, ``model.safetensors`` and the pre/post processors with the artifact's
    normalization), loadable by ``SmolVLAPolicy.from_pretrained(out_dir)``."""
    from zk0.shared.lora import merged_copy
    from zk0.shared.normalization import NORMALIZATION_FILE, loads, to_lerobot
    from zk0.shared.policy_factory import build_policy, make_processors

    folder = _require(store, version)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ArtifactError(f"{out_dir}: already exists; choose a new folder")
    manifest = store.verify(version)
    features = _features_from_checkpoint_config(folder / "config.json")
    loaded = build_policy(manifest.base.spec, features, device="cpu")
    if loaded.base.base_id != manifest.base.id:
        raise ArtifactError(
            f"version {version} was built on {manifest.base.id}, but {manifest.base.spec!r} "
            f"resolves to {loaded.base.base_id} here"
        )
    verify_artifact(folder, manifest.artifact_id, loaded.base)
    try:  # refuses missing, unexpected or wrongly shaped tensors
        merged = merged_copy(loaded.policy, manifest.lora, load_tensors(folder))
    except (ValueError, RuntimeError) as error:
        raise ArtifactError(f"version {version} does not fit its base: {error}") from None
    stats = None
    if NORMALIZATION_FILE in manifest.files:
        stats = to_lerobot(loads((folder / NORMALIZATION_FILE).read_bytes()))
    preprocessor, postprocessor = make_processors(merged.config, stats)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_for(out_dir)
    try:
        merged.save_pretrained(staging)
        preprocessor.save_pretrained(staging)
        postprocessor.save_pretrained(staging)
        publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported version {} merged into {} at {}", version, manifest.base.spec, out_dir)
    return manifest
