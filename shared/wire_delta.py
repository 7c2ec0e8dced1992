"""The int8 wire encoding of a version: its difference from its parent, 8 bits a value.

A version's tensors are bfloat16 (2 bytes a value). When a round's hub runs with
``wire-encoding int8``, a version is *defined* as its parent plus a quantized difference, so
an agent that holds the parent rebuilds the version's tensors file bit for bit from about
half the bytes, and verifies it against the manifest like any fetched file::

    hub:   d = master - parent          (float32; parent as stored, widened)
           per block of 64 values: scale = max|d| / 127, q = rint(d / scale) in [-127, 127]
           version = bf16(parent + q * scale)      stored, hashed, announced as usual
           <store>/deltas/<version>.safetensors    q (I8) and scale (F32) per tensor,
                                                   from/to version and artifact id
    agent: parent file (its own store) + delta -> the version's adapter_model.safetensors,
           whose sha256 must be the manifest's (else it fetches the file whole)

The error of a version against its float32 master is at most half a scale step plus bf16's
rounding, and does not add up over rounds: each difference is taken from the parent as
stored. The arithmetic (float32 multiply, then add, then round-to-nearest-even to bfloat16)
is IEEE-exact in numpy, so hub and agent get the same bits. No torch here: agents use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from zk0.shared.safetensors_file import (
    SafetensorsError,
    TensorLayout,
    as_bf16,
    read_float_tensors,
    safetensors_layout,
    safetensors_metadata,
)

WireEncoding = Literal["bf16", "int8"]
BLOCK = 64
DELTAS = "deltas"
#: The name an agent asks chunks of when it fetches a version's delta.
DELTA_FILE = "int8-delta.safetensors"
#: A scale is a LoRA value's step: far beyond this is no adapter of ours.
MAX_SCALE = 1e3

Arrays = Mapping[str, NDArray[Any]]
#: ``q/<name>`` (int8 steps) and ``s/<name>`` (float32 scale per block) of every tensor.
Delta = dict[str, NDArray[Any]]


class DeltaError(ValueError):
    """A delta that does not describe a version of the given parent; one line."""


@dataclass(frozen=True)
class DeltaOrigin:
    """Which version a delta rebuilds, and from which (kept in the file's metadata)."""

    from_version: int
    from_artifact_id: str
    to_version: int
    to_artifact_id: str

    def metadata(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.__dict__.items()}

    @classmethod
    def of(cls, path: Path) -> DeltaOrigin:
        try:
            meta = safetensors_metadata(path)
            return cls(
                int(meta["from_version"]),
                meta["from_artifact_id"],
                int(meta["to_version"]),
                meta["to_artifact_id"],
            )
        except (OSError, SafetensorsError, ValueError, KeyError) as error:
            raise DeltaError(f"{path}: no delta origin ({error})") from None


def delta_path(store_root: Path, version: int) -> Path:
    return Path(store_root) / DELTAS / f"{version}.safetensors"


def encode(parent: Arrays, target: Arrays) -> Delta:
    """The delta from ``parent`` (bf16 values) to ``target``: ``q/<name>`` and ``s/<name>``."""
    if set(parent) != set(target):
        raise DeltaError("parent and target hold different tensors")
    delta: Delta = {}
    for name in sorted(parent):
        diff = (np.asarray(target[name], np.float32) - parent[name]).ravel()
        if not np.isfinite(diff).all():
            raise DeltaError(f"tensor {name}: the difference is not finite")
        padded = np.zeros(math.ceil(diff.size / BLOCK) * BLOCK, np.float32)
        padded[: diff.size] = diff
        blocks = padded.reshape(-1, BLOCK)
        scale = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))[:, None]
        q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).ravel()[: diff.size]
        delta[f"q/{name}"] = q.reshape(np.shape(parent[name]))
        delta[f"s/{name}"] = scale
    return delta


def apply(parent: Arrays, delta: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[np.float32]]:
    """The version ``delta`` makes of ``parent``: bf16(parent + q * scale), as float32."""
    out = {}
    for name in sorted(parent):
        q, scale = delta[f"q/{name}"], delta[f"s/{name}"]
        steps = q.astype(np.float32).ravel() * np.repeat(scale, BLOCK)[: q.size]
        value = as_bf16(np.asarray(parent[name], np.float32).ravel() + steps)
        if not np.isfinite(value).all():
            raise DeltaError(f"tensor {name}: the delta makes values that are not finite")
        out[name] = value.reshape(np.shape(parent[name]))
    return out


def delta_bytes(delta: Mapping[str, NDArray[Any]], origin: DeltaOrigin) -> bytes:
    from safetensors.numpy import save

    tensors = {name: np.ascontiguousarray(delta[name]) for name in sorted(delta)}
    return bytes(save(tensors, metadata=origin.metadata()))


def read_delta(path: Path, parent: Mapping[str, TensorLayout]) -> dict[str, NDArray[Any]]:
    """A delta file checked against the parent's tensors: for each, int8 steps of its shape and
    finite scales in 0 .. ``MAX_SCALE``; nothing else. ``DeltaError`` (one line) otherwise."""
    try:
        layout = safetensors_layout(path)
    except (OSError, SafetensorsError) as error:
        raise DeltaError(str(error)) from None
    expected = {f"{kind}/{name}" for name in parent for kind in ("q", "s")}
    if set(layout) != expected:
        extra = sorted(set(layout) ^ expected)[:2]
        raise DeltaError(f"{path}: tensors differ from the parent's ({extra})")
    delta: dict[str, NDArray[Any]] = {}
    with path.open("rb") as handle:
        for name, tensor in parent.items():
            size = math.prod(tensor.entry.shape)
            wanted: dict[str, tuple[str, tuple[int, ...], np.dtype[Any]]] = {
                f"q/{name}": ("I8", tensor.entry.shape, np.dtype(np.int8)),
                f"s/{name}": ("F32", (math.ceil(size / BLOCK),), np.dtype("<f4")),
            }
            for key, (dtype, shape, numpy_dtype) in wanted.items():
                entry = layout[key]
                if entry.entry.dtype != dtype or entry.entry.shape != shape:
                    raise DeltaError(
                        f"{path}: {key} is {entry.entry.dtype} {entry.entry.shape}, "
                        f"not {dtype} {shape}"
                    )
                handle.seek(entry.start)
                delta[key] = np.frombuffer(handle.read(entry.end - entry.start), numpy_dtype)
            scale, steps = delta[f"s/{name}"], delta[f"q/{name}"]
            if not (np.isfinite(scale) & (scale >= 0) & (scale <= MAX_SCALE)).all():
                raise DeltaError(f"{path}: s/{name} holds scales outside 0 .. {MAX_SCALE:g}")
            if (steps == -128).any():
                raise DeltaError(f"{path}: q/{name} holds -128, outside the encoding's -127 .. 127")
            delta[f"q/{name}"] = delta[f"q/{name}"].reshape(tensor.entry.shape)
    return delta


def rebuild(parent_file: Path, delta_file: Path, out: Path) -> None:
    """Write the version's tensors file: ``parent_file`` (bfloat16 safetensors) with each
    tensor's bytes replaced by what ``delta_file`` makes of them (same header, same layout)."""
    try:
        layout = safetensors_layout(parent_file)
    except (OSError, SafetensorsError) as error:
        raise DeltaError(str(error)) from None
    if any(tensor.entry.dtype != "BF16" for tensor in layout.values()):
        raise DeltaError(f"{parent_file}: not a bfloat16 adapter; a delta cannot rebuild it")
    try:
        parent = read_float_tensors(parent_file)
    except (OSError, SafetensorsError) as error:
        raise DeltaError(str(error)) from None
    values = apply(parent, read_delta(delta_file, layout))
    raw = bytearray(parent_file.read_bytes())
    for name, tensor in layout.items():
        bits = (values[name].ravel().view(np.uint32) >> 16).astype("<u2")
        raw[tensor.start : tensor.end] = bits.tobytes()
    out.write_bytes(bytes(raw))


def save_delta(
    store_root: Path,
    parent: tuple[int, Path],
    version: tuple[int, Path],
    delta: Mapping[str, NDArray[Any]],
) -> Path:
    """Keep ``delta`` as ``version``'s (number, folder) delta from ``parent``'s, once it is
    proven to rebuild the version's tensors file bit for bit; ``DeltaError`` (or ``OSError``)
    otherwise."""
    from zk0.shared.artifact import TENSORS_FILE, read_manifest
    from zk0.shared.fsutil import atomic_write_bytes, sha256_file

    (from_version, from_folder), (to_version, to_folder) = parent, version
    to_manifest = read_manifest(to_folder)
    if TENSORS_FILE not in to_manifest.files:
        raise DeltaError(f"version {to_version} has no {TENSORS_FILE}: nothing to rebuild")
    origin = DeltaOrigin(
        from_version, read_manifest(from_folder).artifact_id, to_version, to_manifest.artifact_id
    )
    path = delta_path(store_root, to_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    trial, rebuilt = path.with_suffix(".trial"), path.with_suffix(".rebuilt")
    try:
        trial.write_bytes(delta_bytes(delta, origin))
        rebuild(from_folder / TENSORS_FILE, trial, rebuilt)
        if sha256_file(rebuilt) != to_manifest.files[TENSORS_FILE].sha256:
            raise DeltaError(f"the delta of version {to_version} does not rebuild it exactly")
        atomic_write_bytes(path, trial.read_bytes())
    finally:
        trial.unlink(missing_ok=True)
        rebuilt.unlink(missing_ok=True)
    return path
