"""The adapter in Flower's messages: one flat float32 ``Array``, the tensors in name order.

Flower moves each ``Array`` of a message as objects of its own, one request per object on each
of a message's hops (ServerApp -> SuperLink -> SuperNode -> ClientApp, and back): an adapter of
32 tensors took some 70 requests per message. Packed, it takes a few, however many tensors the
adapter has. Only values travel: both ends already know the layout (the arm from the model it
built, the hub from the round's reference adapter), so a peer cannot choose a name or a shape,
and a record of any other form is refused with the reason::

    {name: tensor} --sorted by name, row-major, float32--> ArrayRecord{"adapter": float32[size]}
    ArrayRecord{"adapter": ...} --size checked against the receiver's layout--> {name: view}
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy
from numpy.typing import NDArray

#: The one Array of the adapter record.
ADAPTER_ARRAY = "adapter"


class WireError(ValueError):
    """A record that is not the adapter the receiver expects; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AdapterLayout:
    """Where each tensor lies in the flat adapter: (name, shape, offset) by name, and the size."""

    entries: tuple[tuple[str, tuple[int, ...], int], ...]
    size: int

    @classmethod
    def of(cls, tensors: Mapping[str, Any]) -> AdapterLayout:
        """The layout of ``tensors`` (numpy arrays or torch tensors): their names sorted."""
        entries, offset = [], 0
        for name in sorted(tensors):
            shape = tuple(int(n) for n in tensors[name].shape)
            entries.append((name, shape, offset))
            offset += int(np.prod(shape))
        return cls(tuple(entries), offset)

    def views(self, flat: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        """The tensors of a flat adapter, as views of it."""
        return {
            name: flat[offset : offset + int(np.prod(shape))].reshape(shape)
            for name, shape, offset in self.entries
        }


def pack(tensors: Mapping[str, Any]) -> ArrayRecord:
    """The adapter record of ``tensors`` (numpy arrays or torch tensors), float32."""
    layout = AdapterLayout.of(tensors)
    flat = np.empty(layout.size, np.float32)
    for name, views in layout.views(flat).items():
        value = tensors[name]
        views[...] = value.detach().float().cpu().numpy() if torch.is_tensor(value) else value
    return from_values(flat)


def from_values(flat: NDArray[np.float32]) -> ArrayRecord:
    """The adapter record of a flat float32 adapter already in layout order."""
    return ArrayRecord({ADAPTER_ARRAY: Array(np.ascontiguousarray(flat, np.float32))})


def values(record: ArrayRecord) -> NDArray[np.float32]:
    """The record's flat values, whatever their count (for code that treats an adapter as one
    vector, such as a test's hostile client)."""
    if list(record) != [ADAPTER_ARRAY]:
        raise WireError(f"adapter record holds {sorted(record)[:3]}, not ['{ADAPTER_ARRAY}']")
    return unpack_flat(record, AdapterLayout.of(record))


def unpack_flat(record: ArrayRecord, layout: AdapterLayout) -> NDArray[np.float32]:
    """The record's values as a read-only view of its bytes, checked against ``layout``.

    Raises :class:`WireError` for anything but one little-endian float32 vector of
    ``layout.size`` values (the values themselves are the caller's to bound).
    """
    if list(record) != [ADAPTER_ARRAY]:
        raise WireError(f"adapter record holds {sorted(record)[:3]}, not ['{ADAPTER_ARRAY}']")
    flat = _npy_view(record[ADAPTER_ARRAY].data)
    if flat is None or flat.ndim != 1:
        raise WireError("adapter is not a float32 vector")
    if flat.size != layout.size:
        raise WireError(f"adapter has {flat.size} values, the layout {layout.size}")
    return flat


def unpack(record: ArrayRecord, layout: AdapterLayout) -> dict[str, NDArray[np.float32]]:
    """The record's tensors (read-only views), named and shaped by ``layout``."""
    return layout.views(unpack_flat(record, layout))


def unpack_torch(record: ArrayRecord, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The record's tensors as torch tensors named and shaped like ``like`` (an adapter's
    state: the arm knows its own layout); a copy, so training may write to them."""
    layout = AdapterLayout.of(like)
    flat = torch.from_numpy(unpack_flat(record, layout).copy())
    return {
        name: flat[offset : offset + int(np.prod(shape))].view(shape)
        for name, shape, offset in layout.entries
    }


def _npy_view(data: bytes) -> NDArray[np.float32] | None:
    """The float32 array in ``.npy`` bytes, as a view of them (no copy); None if it is not
    little-endian float32 in C order."""
    header = _npy_header(data[: _header_end(data)])
    if header is None:
        return None
    shape, offset = header
    count = int(np.prod(shape))
    if len(data) - offset != 4 * count:
        return None
    return np.frombuffer(data, np.float32, count, offset).reshape(shape)


def _header_end(data: bytes) -> int:
    """Where the data of ``.npy`` bytes start: after the magic, the version, the header's
    length (2 bytes in version 1, 4 after) and the header."""
    if len(data) < 12 or data[:6] != b"\x93NUMPY":
        return 0
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")


@functools.lru_cache(maxsize=64)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], int] | None:
    """(shape, data offset) of a little-endian float32 C-order ``.npy`` header, else None.

    Cached: a round's replies share one header, and numpy parses it with ``ast.literal_eval``.
    """
    stream = io.BytesIO(prefix)
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    try:
        read_header = readers.get(npy.read_magic(stream))  # type: ignore[no-untyped-call]
        if read_header is None:
            return None
        shape, fortran_order, dtype = read_header(stream)  # type: ignore[no-untyped-call]
    except ValueError:
        return None
    if fortran_order or dtype != np.dtype("<f4") or stream.tell() != len(prefix):
        return None
    return tuple(shape), len(prefix)
