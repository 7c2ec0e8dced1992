"""A safetensors file read without torch: its header checked field by field, float tensors as
numpy.

Artifacts arrive from peers (the hub, a federated client): whatever their header holds, the
answer is a tensor layout or a one-line ``SafetensorsError`` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is truncated, or its header does not describe its bytes."""


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    shape: tuple[int, ...]
    dtype: str


#: Bytes per element of every dtype the safetensors format names.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor's bytes lie in a safetensors file (absolute offsets, end exclusive)."""

    entry: TensorEntry
    start: int
    end: int


def safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor names, shapes and dtypes from a safetensors header, without loading tensors."""
    return {name: layout.entry for name, layout in safetensors_layout(path).items()}


def safetensors_layout(path: Path) -> dict[str, TensorLayout]:
    """Every tensor's entry and byte range, from a header checked field by field.

    Whatever the header holds (valid JSON of the wrong shape, fields of the wrong type, byte
    ranges outside the file or not matching dtype x shape), the answer is a ``SafetensorsError``
    naming the file and the field, never a ``TypeError`` from deep inside.
    """
    header, length, data_bytes = _header(path)
    header.pop("__metadata__", None)
    return {
        name: _tensor_layout(path, name, info, 8 + length, data_bytes)
        for name, info in sorted(header.items())
    }


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The header's ``__metadata__`` (text to text; empty when there is none)."""
    metadata = _header(path)[0].get("__metadata__", {})
    if not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: safetensors header: __metadata__ holds non-text values")
    return dict(metadata)


def _header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header, its length, the bytes after it), the header a JSON object and its
    ``__metadata__`` (if any) an object."""
    with path.open("rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise SafetensorsError(f"{path}: truncated safetensors header")
        (length,) = struct.unpack("<Q", raw_length)
        if length > MAX_SAFETENSORS_HEADER:
            raise SafetensorsError(f"{path}: safetensors header of {length} bytes is implausible")
        raw = handle.read(length)
        data_bytes = max(0, path.stat().st_size - 8 - length)
    if len(raw) != length:
        raise SafetensorsError(
            f"{path}: safetensors header says {length} bytes, the file is shorter"
        )
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SafetensorsError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsError(
            f"{path}: safetensors header is a JSON {type(header).__name__}, not an object"
        )
    if not isinstance(header.get("__metadata__", {}), dict):
        raise SafetensorsError(f"{path}: safetensors header: __metadata__ is not an object")
    return header, length, data_bytes


def _tensor_layout(
    path: Path, name: str, info: Any, data_start: int, data_bytes: int
) -> TensorLayout:
    where = f"{path}: safetensors header: tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where} is a JSON {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise SafetensorsError(f"{where}: dtype {str(dtype)[:40]!r} is not a safetensors dtype")
    if not _int_list(shape):
        raise SafetensorsError(f"{where}: shape {str(shape)[:40]} is not a list of sizes")
    if not _int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise SafetensorsError(f"{where}: data_offsets {str(offsets)[:40]} is not [begin, end]")
    size = _DTYPE_BYTES[dtype] * math.prod(shape)
    if offsets[1] - offsets[0] != size or offsets[1] > data_bytes:
        raise SafetensorsError(
            f"{where}: bytes {offsets[0]}..{offsets[1]} do not hold {dtype} {tuple(shape)} "
            f"({size} bytes) within the file's {data_bytes} data bytes"
        )
    entry = TensorEntry(shape=tuple(shape), dtype=dtype)
    return TensorLayout(entry, data_start + offsets[0], data_start + offsets[1])


def _int_list(value: object) -> TypeGuard[list[int]]:
    """A JSON list of non-negative integers (booleans are not sizes)."""
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value
    )


def read_float_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, NDArray[Any]]:
    """Floating-point tensors of a safetensors file as numpy (no torch; bf16 widened to f32).

    The header is validated first (``SafetensorsError`` with one line if it is malformed).
    """
    layout = safetensors_layout(path)
    wanted = sorted(layout) if names is None else sorted(names)
    tensors: dict[str, NDArray[Any]] = {}
    with Path(path).open("rb") as handle:
        for name in wanted:
            if name not in layout:
                raise SafetensorsError(f"{path}: no tensor {name}")
            entry = layout[name]
            if entry.entry.dtype not in _FLOAT_DTYPES:
                raise SafetensorsError(f"{path}: tensor {name} is {entry.entry.dtype}, not a float")
            handle.seek(entry.start)
            raw = handle.read(entry.end - entry.start)
            tensors[name] = _decode(raw, entry.entry.dtype).reshape(entry.entry.shape)
    return tensors


_FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _decode(raw: bytes, dtype: str) -> NDArray[Any]:
    values = np.frombuffer(raw, dtype=_FLOAT_DTYPES[dtype])
    if dtype == "BF16":  # bfloat16 is the high half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


def as_bf16(values: NDArray[Any]) -> NDArray[np.float32]:
    """float32 values rounded to the nearest bfloat16 (ties to even, as torch casts), as
    float32: exactly what a BF16 tensor written from them reads back as."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)
