"""The hub's float32 master of each version, beside the store.

Versions store bfloat16 (``zk0.shared.artifact.STORED_DTYPE``): that is what agents fetch, check
and run. Training continues from float32, as Flower's server-side optimizers keep their state
in float32: a round's aggregate is the master, and the version is the master rounded (or, with
the int8 wire encoding, its parent plus the master's difference in int8: ``zk0.shared.
wire_delta``). A master is used only while it is its version's: written for that artifact id,
or (masters written before ids were kept) rounding to its stored tensors; otherwise (a store
restored from elsewhere, a master lost) the stored tensors, widened, are the starting point::

    <store root>/masters/<version>.safetensors    float32, the artifact id in its metadata
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from loguru import logger

from zk0.hub.aggregation import Arrays
from zk0.shared.artifact import as_stored
from zk0.shared.fsutil import atomic_write_bytes
from zk0.shared.safetensors_file import (
    SafetensorsError,
    read_float_tensors,
    safetensors_metadata,
)

ARTIFACT_ID = "artifact_id"


class MasterAdapters:
    def __init__(self, store_root: Path) -> None:
        self.folder = Path(store_root) / "masters"

    def path(self, version: int) -> Path:
        return self.folder / f"{version}.safetensors"

    def save(self, version: int, arrays: Arrays, artifact_id: str) -> None:
        from safetensors.numpy import save

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: np.ascontiguousarray(arrays[name], np.float32) for name in sorted(arrays)}
        atomic_write_bytes(self.path(version), save(tensors, {ARTIFACT_ID: artifact_id}))

    def starting_point(self, version: int, artifact_id: str, stored: Arrays) -> Arrays:
        """The master of ``version`` (``artifact_id``) if it is that version's (see above), else
        ``stored``, the version's own tensors."""
        path = self.path(version)
        if not path.is_file():
            return stored
        try:
            master, written_for = read_float_tensors(path), safetensors_metadata(path)
        except (OSError, SafetensorsError) as error:
            logger.warning(
                "master of version {} unreadable ({}): its stored tensors", version, error
            )
            return stored
        if ARTIFACT_ID in written_for:
            if written_for[ARTIFACT_ID] == artifact_id and set(master) == set(stored):
                return master
            logger.warning("master of version {} is not the version's: its stored tensors", version)
            return stored
        rounded = as_stored(master)
        if set(rounded) != set(stored) or any(
            not np.array_equal(rounded[name], stored[name]) for name in stored
        ):
            logger.warning("master of version {} is not the version's: its stored tensors", version)
            return stored
        return master
