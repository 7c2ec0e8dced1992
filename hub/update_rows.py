"""A round's replies as the rows of one matrix: each read once, averaged at memory speed.

Reading 1,000 full-size adapters is 5.2 GB, about half a second of memory bandwidth; averaging
them tensor by tensor and client by client (float64 temporaries for every product) took
seconds. Flower hands each reply's tensors over as ``.npy`` bytes, which have to be copied out
once anyway: here that one copy goes straight into the reply's row of a float32 (n, P) matrix,
and the reply's tensors are views of its row. The example-weighted mean is then one
matrix-vector product over the rows (BLAS, threads as pinned by the process)::

    reply i: ArrayRecord{name: npy bytes} --copy--> matrix[i, offset(name) : offset + size]
    fedavg = weights (n,) @ matrix (n, P) --split by offsets--> {name: tensor}

float32 is safe there: the weights are non-negative and sum to 1, and a convex combination
never exceeds the largest magnitude among its terms, so it cannot overflow.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord
from numpy.lib import format as npy
from numpy.typing import NDArray

from zk0.hub.aggregation import Arrays


@dataclass(frozen=True)
class Layout:
    """Where each tensor of an adapter lies in its row: (name, shape, offset), and the row size."""

    entries: tuple[tuple[str, tuple[int, ...], int], ...]
    size: int

    @classmethod
    def of(cls, reference: Arrays) -> Layout | None:
        """The layout of ``reference``'s tensors, in its order; None unless all are float32."""
        entries, offset = [], 0
        for name, value in reference.items():
            if value.dtype != np.float32:
                return None
            entries.append((name, tuple(value.shape), offset))
            offset += int(value.size)
        return cls(tuple(entries), offset)

    def views(self, row: NDArray[np.float32]) -> Arrays:
        return {
            name: row[offset : offset + int(np.prod(shape))].reshape(shape)
            for name, shape, offset in self.entries
        }


class ReplyRows:
    """Up to ``capacity`` replies of one round, each in a row of one float32 matrix."""

    def __init__(self, layout: Layout, capacity: int) -> None:
        self.layout = layout
        self.matrix: NDArray[np.float32] = np.empty((capacity, layout.size), np.float32)
        self.count = 0

    def add(self, record: ArrayRecord) -> int | None:
        """Copy ``record`` into the next row: its index, or None where its names, dtypes or
        shapes differ from the layout (the caller reads it the slow way, and refuses it)."""
        if list(record) != [name for name, _, _ in self.layout.entries]:
            return None
        row = self.matrix[self.count]
        for name, shape, offset in self.layout.entries:
            values = _npy_view(record[name].data)
            if values is None or values.shape != shape:
                return None
            row[offset : offset + values.size] = values.reshape(-1)
        self.count += 1
        return self.count - 1

    def arrays(self, index: int) -> Arrays:
        """The reply's tensors: views of its row."""
        return self.layout.views(self.matrix[index])

    def weighted_sum(self, rows: Sequence[int], weights: NDArray[np.float64]) -> Arrays:
        """Σ weight·row over ``rows`` (weights ≥ 0 summing to 1), as tensors.

        Only those rows are read (a dropped reply's may hold NaN, and 0·NaN is NaN): one
        product per run of consecutive rows, each a view of the matrix.
        """
        per_row = np.zeros(self.count, np.float32)
        per_row[list(rows)] = weights
        total = np.zeros(self.layout.size, np.float32)
        for start, stop in _runs(sorted(rows)):
            total += per_row[start:stop] @ self.matrix[start:stop]
        return self.layout.views(total)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as half-open runs of consecutive ones: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


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


@functools.lru_cache(maxsize=4096)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], int] | None:
    """(shape, data offset) of a little-endian float32 C-order ``.npy`` header, else None.

    Cached: a round's replies repeat the same few headers, and numpy parses each with
    ``ast.literal_eval`` (most of the time of reading 1,000 replies tensor by tensor).
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
