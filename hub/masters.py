"""The hub's float32 master of each version, beside the store.

Versions store bfloat16 (``zk0.shared.artifact.STORED_DTYPE``): that is what agents fetch, check
and run. Training continues from float32, as Flower's server-side optimizers keep their state
in float32: a round's aggregate is the master, and the version is the master rounded. A master
is used only while it still rounds to its version's stored tensors; otherwise (a store restored
from elsewhere, a master lost) the stored tensors, widened, are the starting point::

    <store root>/masters/<version>.safetensors    float32, written atomically
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from loguru import logger

from zk0.hub.aggregation import Arrays
from zk0.shared.artifact import as_stored
from zk0.shared.fsutil import atomic_write_bytes
from zk0.shared.safetensors_file import SafetensorsError, read_float_tensors


class MasterAdapters:
    def __init__(self, store_root: Path) -> None:
        self.folder = Path(store_root) / "masters"

    def path(self, version: int) -> Path:
        return self.folder / f"{version}.safetensors"

    def save(self, version: int, arrays: Arrays) -> None:
        from safetensors.numpy import save

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: np.ascontiguousarray(arrays[name], np.float32) for name in sorted(arrays)}
        atomic_write_bytes(self.path(version), save(tensors))

    def starting_point(self, version: int, stored: Arrays) -> Arrays:
        """The master of ``version`` if it rounds to ``stored`` (its version's tensors), else
        ``stored`` itself."""
        path = self.path(version)
        if not path.is_file():
            return stored
        try:
            master = read_float_tensors(path)
        except (OSError, SafetensorsError) as error:
            logger.warning(
                "master of version {} unreadable ({}): its stored tensors", version, error
            )
            return stored
        rounded = as_stored(master)
        if set(rounded) != set(stored) or any(
            not np.array_equal(rounded[name], stored[name]) for name in stored
        ):
            logger.warning("master of version {} is not the version's: its stored tensors", version)
            return stored
        return master
