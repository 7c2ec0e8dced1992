"""What the agent remembers across restarts about its part in the federation, and what its
dataset holds.

``<data_root>/agent_state.json`` holds how many episodes the dataset held when this agent last
trained in a round, so "new episodes" (what the hub schedules runs on) survives a restart and
counts only what was recorded since, and how its last round ended (trained, skipped, dropped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from pydantic import BaseModel, ValidationError

from zk0.shared.agent_status import RoundOutcome
from zk0.shared.fsutil import atomic_write_bytes


@dataclass(frozen=True)
class DatasetSize:
    episodes: int = 0
    frames: int = 0
    fps: int = 0

    @property
    def recorded_s(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


_last_read: dict[Path, DatasetSize] = {}


def dataset_size(root: Path) -> DatasetSize:
    """Episodes, frames and fps of the LeRobot dataset at ``root``; zeros before the first one.

    LeRobot rewrites ``info.json`` in place after every episode, so a read can catch it half
    written: then the last complete read stands.
    """
    root = Path(root)
    try:
        info = json.loads((root / "meta" / "info.json").read_text())
        size = DatasetSize(int(info["total_episodes"]), int(info["total_frames"]), int(info["fps"]))
    except FileNotFoundError:
        size = DatasetSize()
    except (ValueError, KeyError, TypeError):
        return _last_read.get(root, DatasetSize())
    _last_read[root] = size
    return size


class LedgerState(BaseModel):
    episodes_at_last_round: int = 0
    last_round: RoundOutcome | None = None


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.state = LedgerState()
        if self.path.is_file():
            try:
                self.state = LedgerState.model_validate_json(self.path.read_bytes())
            except ValidationError as error:  # an older or damaged file: count from zero
                logger.warning("{}: unreadable ({}); new episodes count from 0", self.path, error)

    @property
    def episodes_at_last_round(self) -> int:
        return self.state.episodes_at_last_round

    @property
    def last_round(self) -> RoundOutcome | None:
        return self.state.last_round

    def trained(self, episodes: int) -> None:
        """A round was granted the compute to train on the dataset's ``episodes`` episodes."""
        self._save(self.state.model_copy(update={"episodes_at_last_round": episodes}))

    def ended(self, outcome: RoundOutcome) -> None:
        """How this agent's part in a round ended."""
        self._save(self.state.model_copy(update={"last_round": outcome}))

    def _save(self, state: LedgerState) -> None:
        self.state = state
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, state.model_dump_json(indent=1).encode() + b"\n")
