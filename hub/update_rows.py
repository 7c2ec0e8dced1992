"""A round's replies as the rows of one matrix: each read once, averaged at memory speed.

Reading 1,000 full-size adapters is 5.2 GB, about half a second of memory bandwidth; averaging
them tensor by tensor and client by client (float64 temporaries for every product) took
seconds. Flower hands each reply's flat adapter over as ``.npy`` bytes (``zk0.shared.
adapter_wire``), which have to be copied out once anyway: here that one copy goes straight into
the reply's row of a float32 (n, P) matrix, and the reply's tensors are views of its row. The
example-weighted mean is then one matrix-vector product over the rows (BLAS, threads as pinned
by the process)::

    reply i: ArrayRecord{"adapter": npy bytes} --copy--> matrix[i, :]
    fedavg = weights (n,) @ matrix (n, P) --split by the layout--> {name: tensor}

float32 is safe there: the weights are non-negative and sum to 1, and a convex combination
never exceeds the largest magnitude among its terms, so it cannot overflow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord
from numpy.typing import NDArray

from zk0.hub.aggregation import Arrays
from zk0.shared.adapter_wire import AdapterLayout, unpack_flat


class ReplyRows:
    """Up to ``capacity`` replies of one round, each in a row of one float32 matrix."""

    def __init__(self, layout: AdapterLayout, capacity: int) -> None:
        self.layout = layout
        self.matrix: NDArray[np.float32] = np.empty((capacity, layout.size), np.float32)
        self.count = 0

    def add(self, record: ArrayRecord) -> int:
        """Copy ``record`` into the next row; its index. Raises ``WireError`` (the row stays
        free) for a record that is not an adapter of this layout."""
        self.matrix[self.count] = unpack_flat(record, self.layout)
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
