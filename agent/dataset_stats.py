"""The dataset statistics an agent reports to the hub (``AgentReport.dataset``).

The hub compares each arm's per-joint state and action mean and variance with the normalization
the fleet shares, and flags an arm whose data drifted from it. LeRobot keeps these statistics
aggregated over every episode in ``meta/stats.json`` (what ``LeRobotDataset.meta.stats`` loads,
updated as each episode is saved), so reading them costs one small file, never a frame, nor
LeRobot's import.

They change only as episodes are recorded, so the daemon reads them at most once a minute
(:class:`DatasetStatsPacer`), from its first report on; the subscriber puts them on one status a
minute (``AdapterSubscriber``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from pydantic import ValidationError

from zk0.agent.ledger import dataset_size
from zk0.shared.agent_status import DATASET_STATS_EVERY_S, DatasetStats
from zk0.shared.validation import describe

#: LeRobot's ``STATS_PATH`` (lerobot 0.6), inside the dataset's root.
STATS_FILE = Path("meta") / "stats.json"


def read_dataset_stats(root: Path) -> DatasetStats | None:
    """The per-joint mean and variance (std squared) of ``observation.state`` and ``action`` in
    the LeRobot dataset at ``root``, from its aggregated ``meta/stats.json``; None while it has
    no episodes or no statistics yet. Raises on an unreadable file or out-of-bound numbers."""
    root = Path(root)
    if dataset_size(root).episodes == 0 or not (root / STATS_FILE).is_file():
        return None
    stats = json.loads((root / STATS_FILE).read_text())
    state, action = stats["observation.state"], stats["action"]
    return DatasetStats(
        frames=int(np.asarray(state["count"]).reshape(-1)[0]),
        state_mean=_floats(state["mean"]),
        state_var=_floats(np.square(state["std"])),
        action_mean=_floats(action["mean"]),
        action_var=_floats(np.square(action["std"])),
    )


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))


class DatasetStatsPacer:
    """The dataset's statistics as last read: :meth:`current` reads them on its first call and
    then every ``every_s`` (whether a read found them or not). A read that fails logs one
    warning line and yields None until the next: the report goes out without them.
    """

    def __init__(
        self,
        root: Path,
        every_s: float = DATASET_STATS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.every_s, self.clock = every_s, clock
        self._read_at: float | None = None
        self._stats: DatasetStats | None = None

    def current(self) -> DatasetStats | None:
        now = self.clock()
        if self._read_at is None or now - self._read_at >= self.every_s:
            self._read_at, self._stats = now, self._read()
        return self._stats

    def _read(self) -> DatasetStats | None:
        try:
            return read_dataset_stats(self.root)
        except Exception as error:  # never the status's end: it goes out without them
            if isinstance(error, ValidationError):
                why = describe(error, "dataset")
            else:
                why = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            logger.warning("{}: dataset statistics not reported ({})", self.root, why)
            return None
