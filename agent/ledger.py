"""What the agent remembers across restarts about its part in the federation.

``<data_root>/agent_state.json`` holds the last round this agent trained in and how many
episodes its dataset held then, so "new episodes" (what the hub schedules runs on) survives a
restart and counts only what was recorded since.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from zk0.shared.fsutil import atomic_write_bytes

_last_read: dict[Path, tuple[int, int]] = {}


def dataset_size(root: Path) -> tuple[int, int]:
    """(episodes, frames) of the LeRobot dataset at ``root``; (0, 0) before the first one.

    LeRobot rewrites ``info.json`` in place after every episode, so a read can catch it half
    written: then the last complete read stands.
    """
    root = Path(root)
    try:
        info = json.loads((root / "meta" / "info.json").read_text())
        size = int(info["total_episodes"]), int(info["total_frames"])
    except FileNotFoundError:
        size = 0, 0
    except (ValueError, KeyError):
        return _last_read.get(root, (0, 0))
    _last_read[root] = size
    return size


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._state: dict[str, Any] = {"episodes_at_last_round": 0, "last_round": None}
        if self.path.is_file():
            self._state.update(json.loads(self.path.read_text()))

    @property
    def episodes_at_last_round(self) -> int:
        return int(self._state["episodes_at_last_round"])

    @property
    def last_round(self) -> dict[str, Any] | None:
        last: dict[str, Any] | None = self._state["last_round"]
        return last

    def trained(self, server_round: int, episodes: int) -> None:
        """A round was granted the compute to train on ``episodes`` episodes."""
        self._state = {
            "episodes_at_last_round": episodes,
            "last_round": {"round": server_round, "at": time.time(), "episodes": episodes},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(self._state, indent=1) + "\n").encode())
