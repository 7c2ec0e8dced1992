"""The adapter artifact: the unit that travels between agents and hub.

A folder that PEFT and LeRobot load as it is, plus a manifest that covers every byte::

    adapter_config.json         PEFT's config (base_model_name_or_path names the base)
    adapter_model.safetensors   lora_A / lora_B tensors, bfloat16 (``STORED_DTYPE``)
    config.json                 the base policy's LeRobot config
    manifest.json               canonical JSON: versions, base, LoRA config, hashes, tensors
    manifest.json.sha256        the artifact id (sha256 of manifest.json), to catch edits

The artifact id is the sha256 of the canonical ``manifest.json``; since the manifest holds the
sha256 of every other file, the id covers the whole artifact. Loading verifies everything before
any tensor reaches a model, and refuses with one line saying what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zk0.shared.fsutil import publish_dir, sha256_file, staging_dir_for
from zk0.shared.lora import LoraSpec, adapter_state, load_adapter_state
from zk0.shared.policy_factory import BaseRef
from zk0.shared.safetensors_file import (
    SafetensorsError,
    TensorEntry,
    as_bf16,
    read_float_tensors,
    safetensors_header,
)

FORMAT = "zk0-adapter/1"
#: How a version stores (and so sends) its tensors: bfloat16 halves a full-size version, 5.2 MB
#: to 2.6 MB, and every check runs on the tensors as stored. Loading widens them to float32
#: (exact); the hub keeps its float32 master of each version beside the store
#: (``zk0.hub.server_app``), which the next round trains from. Artifacts stored in float32 by
#: earlier hubs still load.
STORED_DTYPE = "BF16"
LOADABLE_DTYPES = ("F32", STORED_DTYPE)
MANIFEST = "manifest.json"
ID_FILE = "manifest.json.sha256"
TENSORS_FILE = "adapter_model.safetensors"
Metric = int | float | str | bool | None


class ArtifactError(ValueError):
    """An artifact is missing, tampered with, truncated or built for another base."""


class ArtifactContentError(ArtifactError):
    """The artifact's bytes are the ones its id names, yet what they hold is unusable (a
    malformed tensor header, tensors unlike the manifest's or this model's, another base):
    fetching it again gives the same answer, so an agent refuses it for good."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class BaseEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    spec: str
    name_or_path: str
    id: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = FORMAT
    version: int = Field(ge=0)
    parent_version: int | None = Field(default=None, ge=0)
    base: BaseEntry
    lora: LoraSpec
    round: int | None = Field(default=None, ge=0)
    created_at: str
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    metrics: dict[str, Metric] = Field(default_factory=dict)

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @property
    def artifact_id(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def adapter_bytes(self) -> int:
        return self.files[TENSORS_FILE].size


def canonical_json(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A staging folder beside ``out_dir`` that the caller fills and publishes; removed if
    anything fails, so a half-written artifact never appears."""
    if out_dir.exists():
        raise ArtifactError(f"{out_dir}: already exists; artifacts are never overwritten")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_for(out_dir)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_adapter(
    peft_model: Any,
    out_dir: Path,
    *,
    version: int,
    base: BaseRef,
    lora: LoraSpec,
    parent_version: int | None = None,
    round_: int | None = None,
    metrics: dict[str, Metric] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    """Write ``peft_model``'s adapter as a verified artifact at ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    with _staged(out_dir) as staging:
        peft_model.peft_config["default"].base_model_name_or_path = base.name_or_path
        # The shared adapter only: an arm's local part (personalized mode) never leaves it.
        peft_model.save_pretrained(staging, selected_adapters=["default"])
        write_tensors(staging / TENSORS_FILE, load_tensors(staging))  # PEFT writes float32
        peft_model.base_model.model.config._save_pretrained(staging)
        (staging / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        base_entry = BaseEntry(spec=base.spec, name_or_path=base.name_or_path, id=base.base_id)
        return _seal(staging, out_dir, version, parent_version, base_entry, lora, round_, metrics)


def save_adapter_arrays(
    template: Path,
    out_dir: Path,
    tensors: dict[str, Any],
    *,
    version: int,
    parent_version: int | None,
    round_: int | None = None,
    metrics: dict[str, Metric] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    """A new artifact at ``out_dir`` holding ``tensors`` (numpy, PEFT's names), with the base,
    LoRA config and policy config of the verified artifact ``template``.

    The hub writes each aggregated version this way: no policy is built (1.8 GB at full size),
    and the tensors must match the template's names, shapes and dtypes exactly.
    """
    template, out_dir = Path(template), Path(out_dir)
    original = verify_artifact(template)
    with _staged(out_dir) as staging:
        for name in original.files:
            if name != TENSORS_FILE and name not in (extra_files or {}):
                shutil.copyfile(template / name, staging / name)
        write_tensors(staging / TENSORS_FILE, tensors)
        written = safetensors_header(staging / TENSORS_FILE)
        if (why := misfit(written, original.tensors)) is not None:
            raise ArtifactError(f"tensors do not match the adapter of {template}: {why}")
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        return _seal(
            staging, out_dir, version, parent_version, original.base, original.lora, round_, metrics
        )


def _seal(
    staging: Path,
    out_dir: Path,
    version: int,
    parent_version: int | None,
    base: BaseEntry,
    lora: LoraSpec,
    round_: int | None,
    metrics: dict[str, Metric] | None,
) -> Manifest:
    """Write the manifest over the files in ``staging`` and publish it at ``out_dir``."""
    manifest = Manifest(
        version=version,
        parent_version=parent_version,
        base=base,
        lora=lora,
        round=round_,
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        files={
            path.name: FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
            for path in sorted(staging.iterdir())
        },
        tensors=safetensors_header(staging / TENSORS_FILE),
        metrics=metrics or {},
    )
    (staging / MANIFEST).write_bytes(manifest.canonical_bytes())
    (staging / ID_FILE).write_text(manifest.artifact_id + "\n")
    publish_dir(staging, out_dir)
    return manifest


def reversion_artifact(
    source: Path, out_dir: Path, *, version: int, parent_version: int | None
) -> Manifest:
    """Copy the verified artifact ``source`` to ``out_dir`` under a new version number.

    Files, tensors, base, LoRA config, round and metrics stay as they are; the manifest gets the
    new ``version`` and ``parent_version`` and a new ``created_at``, so the copy has its own
    artifact id. A hub promotes or rolls back this way: version numbers only grow.
    """
    source, out_dir = Path(source), Path(out_dir)
    original = verify_artifact(source)
    with _staged(out_dir) as staging:
        for name in original.files:
            shutil.copyfile(source / name, staging / name)
        manifest = Manifest.model_validate(
            {
                **original.model_dump(mode="json"),
                "version": version,
                "parent_version": parent_version,
                "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
        (staging / MANIFEST).write_bytes(manifest.canonical_bytes())
        (staging / ID_FILE).write_text(manifest.artifact_id + "\n")
        verify_artifact(staging, manifest.artifact_id)  # the copy is whole before it appears
        publish_dir(staging, out_dir)
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """Parse ``manifest.json`` (no file checks); one-line error if absent or malformed."""
    path = Path(folder) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{folder}: no {MANIFEST}") from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ArtifactError(f"{path}: {where}: {first['msg']}") from None
    if manifest.canonical_bytes() != raw:
        raise ArtifactError(f"{path}: not in canonical form (edited by hand?)")
    return manifest


def verify_artifact(
    folder: Path,
    expected_id: str | None = None,
    base: BaseRef | None = None,
    expected_tensors: dict[str, TensorEntry] | None = None,
) -> Manifest:
    """Check every hash, size and tensor before use; raises ``ArtifactError`` with one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    manifest = read_manifest(folder)
    artifact_id = manifest.artifact_id
    id_path = folder / ID_FILE
    if not id_path.is_file() or id_path.read_text().strip() != artifact_id:
        raise ArtifactError(f"{folder}: {MANIFEST} does not match {ID_FILE} (manifest edited?)")
    if expected_id is not None and artifact_id != expected_id:
        raise ArtifactError(
            f"{folder}: artifact id {artifact_id[:12]}… is not the expected {expected_id[:12]}…"
        )
    present = {p.name for p in folder.iterdir()} - {MANIFEST, ID_FILE}
    if present != set(manifest.files):
        missing, extra = (
            sorted(set(manifest.files) - present),
            sorted(present - set(manifest.files)),
        )
        raise ArtifactError(
            f"{folder}: files differ from the manifest (missing {missing}, unexpected {extra})"
        )
    for name, entry in manifest.files.items():
        path = folder / name
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactError(f"{path}: {size} bytes, manifest says {entry.size} (truncated?)")
        if sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path}: sha256 differs from the manifest (corrupted or tampered)")
    # Every byte hashed to the manifest: from here on, what is wrong is the content itself.
    if TENSORS_FILE not in manifest.files:
        raise ArtifactContentError(f"{folder}: the manifest lists no {TENSORS_FILE}")
    try:
        header = safetensors_header(folder / TENSORS_FILE)
    except SafetensorsError as error:
        raise ArtifactContentError(str(error)) from None
    if header != manifest.tensors:
        raise ArtifactContentError(f"{folder}: tensors in {TENSORS_FILE} differ from the manifest")
    if base is not None and manifest.base.id != base.base_id:
        raise ArtifactContentError(
            f"{folder}: built on base {manifest.base.id}, not on {base.spec} ({base.base_id})"
        )
    if expected_tensors is not None and (why := misfit(manifest.tensors, expected_tensors)):
        raise ArtifactContentError(f"{folder}: adapter tensors do not fit this model ({why})")
    return manifest


def misfit(tensors: dict[str, TensorEntry], expected: dict[str, TensorEntry]) -> str | None:
    """How an artifact's tensors differ from ``expected`` in names or shapes, or hold a dtype
    no version is stored in (None: they fit; float32 and bfloat16 both load)."""
    if set(tensors) != set(expected):
        return f"names differ, e.g. {sorted(set(tensors) ^ set(expected))[:2]}"
    for name, entry in sorted(tensors.items()):
        if entry.shape != expected[name].shape:
            return f"{name} is {entry.shape}, not {expected[name].shape}"
        if entry.dtype not in LOADABLE_DTYPES:
            return f"{name} is {entry.dtype}, not one of {', '.join(LOADABLE_DTYPES)}"
    return None


def write_tensors(path: Path, tensors: Mapping[str, Any]) -> None:
    """``tensors`` (numpy arrays or torch tensors) as a safetensors file in ``STORED_DTYPE``."""
    import torch
    from safetensors.torch import save_file

    def stored(value: Any) -> Any:
        value = value if torch.is_tensor(value) else torch.from_numpy(np.array(value, np.float32))
        return value.detach().to(torch.bfloat16).contiguous()

    ordered = {name: stored(tensors[name]) for name in sorted(tensors)}
    save_file(ordered, str(path), {"format": "pt"})


def as_stored(arrays: Mapping[str, Any]) -> dict[str, NDArray[np.float32]]:
    """``arrays`` rounded to ``STORED_DTYPE`` and widened back: the values a version holds
    (round-to-nearest-even, as torch's cast that writes them)."""
    return {name: as_bf16(np.asarray(value, np.float32)) for name, value in arrays.items()}


def load_tensors(folder: Path) -> dict[str, Any]:
    """An artifact's tensors as float32 torch tensors (bfloat16 widens exactly)."""
    import torch
    from safetensors.torch import load_file

    return {
        name: value.to(torch.float32)
        for name, value in load_file(Path(folder) / TENSORS_FILE).items()
    }


def load_arrays(folder: Path) -> dict[str, NDArray[np.float32]]:
    """An artifact's tensors as float32 numpy arrays (no torch; bfloat16 widens exactly)."""
    return read_float_tensors(Path(folder) / TENSORS_FILE)


def expected_tensors(peft_model: Any) -> dict[str, TensorEntry]:
    """Names, shapes and dtypes an adapter for ``peft_model`` must have."""
    return {
        name: TensorEntry(shape=tuple(t.shape), dtype=_safetensors_dtype(t.dtype))
        for name, t in sorted(adapter_state(peft_model).items())
    }


def _safetensors_dtype(dtype: Any) -> str:
    return {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}[str(dtype)]


def load_adapter(
    peft_model: Any, folder: Path, expected_id: str | None = None, base: BaseRef | None = None
) -> Manifest:
    """Verify ``folder`` against ``peft_model`` and load its tensors into it."""
    manifest = verify_artifact(folder, expected_id, base, expected_tensors(peft_model))
    load_adapter_state(peft_model, load_tensors(folder))
    return manifest
