"""``zk0 bench federated``'s aggregation timing, one client count per process of its own.

Its own process, so that the BLAS threads are pinned before numpy loads (the parent sets
``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``) and its peak memory is
that count's alone. The replies are built as the hub receives them: Flower ``ArrayRecord``\\ s of
full-size adapters, each one flat Array (``zk0.shared.adapter_wire``; half of them sharing
lora_A). Timed, as the strategy does it:

* ``read_s``: every reply read into its row of the round's matrix (``zk0.hub.update_rows``);
* ``<mode>``: the plain aggregate of each mode over those rows;
* ``robust.<mode>`` (``--robust``): ``robust_aggregate`` with the run's default screening, and
  ``robust.fedavg-median`` / ``robust.fedavg-trimmed-mean`` with an order statistic.

Prints one JSON object: ``python -m zk0.bench._aggregation_timing SHAPES.json COUNT [--robust]``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from zk0.hub.aggregation import MODES, ClientUpdate, aggregate
from zk0.hub.robust import robust_aggregate
from zk0.hub.update_rows import ReplyRows
from zk0.shared.adapter_wire import AdapterLayout, pack, unpack
from zk0.shared.federation import RunSettings

#: Order-statistic variants timed beside the default screening.
ORDER_STATISTICS = ("median", "trimmed-mean")


def replies(shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> list[Any]:
    """``count`` full-size adapters as Flower records (built one at a time: memory is theirs)."""
    rng = np.random.default_rng(seed)
    shared_a = {
        n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in shapes.items() if ".lora_A." in n
    }
    return [
        pack(
            {
                n: shared_a[n]
                if n in shared_a and i % 2 == 0
                else rng.normal(0, 0.02, s).astype(np.float32)
                for n, s in shapes.items()
            }
        )
        for i in range(count)
    ]


def measure(shapes: dict[str, tuple[int, ...]], count: int, robust: bool) -> dict[str, Any]:
    records = replies(shapes, count, seed=count)
    layout = AdapterLayout.of({n: np.empty(s, np.float32) for n, s in shapes.items()})
    reference = {n: v.copy() for n, v in unpack(records[0], layout).items()}
    start = time.perf_counter()
    rows = ReplyRows(layout, count)
    indices = [rows.add(record) for record in records]
    read_s = time.perf_counter() - start
    del records
    weights = np.random.default_rng(count).integers(100, 1000, count)
    updates = [
        ClientUpdate(f"c{i}", rows.arrays(row), int(w), rows, row)
        for i, (row, w) in enumerate(zip(indices, weights, strict=True))
    ]
    times: dict[str, Any] = {"read_s": read_s}
    for mode in MODES:
        start = time.perf_counter()
        aggregate(mode, updates, reference)
        times[mode] = time.perf_counter() - start
    if robust:
        times["robust"] = {}
        variants: list[tuple[str, Any, RunSettings]] = [
            (mode, mode, RunSettings()) for mode in MODES
        ]
        variants += [
            (f"fedavg-{name}", "fedavg", RunSettings(order_statistic=name))  # type: ignore[arg-type]
            for name in ORDER_STATISTICS
        ]
        for label, mode, settings in variants:
            start = time.perf_counter()
            robust_aggregate(mode, updates, reference, settings)
            times["robust"][label] = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux.
    times["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return times


def main() -> None:
    shapes_path, count = Path(sys.argv[1]), int(sys.argv[2])
    shapes = {name: tuple(shape) for name, shape in json.loads(shapes_path.read_text()).items()}
    sys.stdout.write(json.dumps(measure(shapes, count, robust="--robust" in sys.argv[3:])) + "\n")


if __name__ == "__main__":
    main()
