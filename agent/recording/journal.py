"""Crash safety for a LeRobot dataset: an episode journal and a recovery step.

How recording writes (see ``writer.py``): every episode is saved by a fresh LeRobot writer that
is finalized right after, so each episode lands in *new, closed* files (``data/``, ``videos/``,
``meta/episodes/``); the only files rewritten in place are ``meta/info.json``,
``meta/stats.json`` and ``meta/tasks.parquet``.

The journal (``<root>/.zk0/journal.json``, replaced atomically) brackets each save:

1. ``begin``: copy the three rewritten files to ``.zk0/committed/``, note which append-only
   files exist, and mark the episode *pending*.
2. LeRobot saves and finalizes the episode.
3. ``commit``: fsync the new files, mark the episode *committed*.

``recover`` (run before every recording session and by ``zk0-agent dataset recover``) rolls a
pending episode back: it deletes the files the episode added, restores the three files, and
removes LeRobot's scratch (``images/``, ``tmp*/``). A SIGKILL at any moment therefore costs at
most the episode in progress; between episodes the files on disk are always the committed
state, and after ``recover`` plain ``LeRobotDataset(repo_id, root=...)`` loads every
committed episode.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.shared.fsutil import atomic_write_bytes, fsync_dir, fsync_file

JOURNAL_DIR = ".zk0"
MUTABLE = ("meta/info.json", "meta/stats.json", "meta/tasks.parquet")
APPEND_ONLY = ("data", "videos", "meta/episodes")
SCRATCH = ("images", f"{JOURNAL_DIR}/cache")
FORMAT = 1


class DatasetBusyError(ValueError):
    """Another process is recording into this dataset."""


@dataclass
class RecoveryReport:
    committed_episodes: int
    rolled_back: int | None = None
    removed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.rolled_back is None:
            return f"{self.committed_episodes} episodes, nothing to recover"
        return (
            f"rolled back unfinished episode {self.rolled_back} ({len(self.removed)} files); "
            f"{self.committed_episodes} episodes kept"
        )


@contextlib.contextmanager
def dataset_lock(root: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock on a dataset (beside it: it may not exist yet)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    path = root.parent / f".{root.name}.lock"
    with path.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetBusyError(f"{root} is being recorded by another process") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _files(root: Path) -> set[str]:
    found: set[str] = set()
    for folder in APPEND_ONLY:
        base = root / folder
        if base.is_dir():
            found.update(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file())
    return found


def _total_episodes(root: Path) -> int:
    info = json.loads((root / "meta" / "info.json").read_text())
    return int(info["total_episodes"])


class Journal:
    """The journal of the dataset at ``root`` (callers hold ``dataset_lock``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / JOURNAL_DIR
        self.path = self.folder / "journal.json"
        self.backup = self.folder / "committed"

    def read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state: dict[str, Any] = json.loads(self.path.read_text())
        return state

    def _write(self, committed: int, pending: dict[str, Any] | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"format": FORMAT, "committed_episodes": committed, "pending": pending}
        atomic_write_bytes(self.path, json.dumps(state, indent=1).encode())

    @property
    def committed_episodes(self) -> int:
        state = self.read()
        return int(state["committed_episodes"]) if state else 0

    def initialize(self, committed: int = 0) -> None:
        self._write(committed, None)

    def begin(self, episode_index: int) -> None:
        """Before LeRobot saves ``episode_index``: back up what it rewrites, list what exists."""
        committed = self.committed_episodes
        if episode_index != committed:
            raise RuntimeError(f"episode {episode_index} would leave a gap after {committed}")
        self.backup.mkdir(parents=True, exist_ok=True)
        present = {}
        for name in MUTABLE:
            source = self.root / name
            present[name] = source.exists()
            if present[name]:
                atomic_write_bytes(self.backup / Path(name).name, source.read_bytes())
        pending = {
            "episode_index": episode_index,
            "mutable": present,
            "files": sorted(_files(self.root)),
        }
        self._write(committed, pending)

    def added(self) -> list[str]:
        """Files (relative paths) the pending save added so far."""
        state = self.read()
        if not state or not state["pending"]:
            raise RuntimeError("no save is pending")
        return sorted(_files(self.root) - set(state["pending"]["files"]))

    def commit(self, episode_index: int) -> None:
        """After LeRobot saved and finalized ``episode_index``: make it durable, then count it."""
        state = self.read()
        if not state or not state["pending"] or state["pending"]["episode_index"] != episode_index:
            raise RuntimeError(f"episode {episode_index} was not begun")
        new = _files(self.root) - set(state["pending"]["files"])
        for relative in sorted(new) + [n for n in MUTABLE if (self.root / n).exists()]:
            fsync_file(self.root / relative)
        for folder in {(self.root / relative).parent for relative in new} | {self.root / "meta"}:
            fsync_dir(folder)
        self._write(episode_index + 1, None)

    def recover(self) -> RecoveryReport:
        """Roll back an unfinished save and clear scratch; afterwards LeRobot loads the dataset."""
        state = self.read()
        if state is None:  # a dataset this journal never saw (e.g. recorded by lerobot-record)
            committed = _total_episodes(self.root)
            self.initialize(committed)
            state = {"committed_episodes": committed, "pending": None}
        report = RecoveryReport(committed_episodes=int(state["committed_episodes"]))
        pending = state["pending"]
        if pending is not None:
            report.rolled_back = int(pending["episode_index"])
            for relative in sorted(_files(self.root) - set(pending["files"])):
                (self.root / relative).unlink()
                report.removed.append(relative)
            for name, existed in pending["mutable"].items():
                target = self.root / name
                if existed:
                    atomic_write_bytes(target, (self.backup / Path(name).name).read_bytes())
                elif target.exists():
                    target.unlink()
                    report.removed.append(name)
            for folder in APPEND_ONLY:
                _prune_empty_dirs(self.root / folder)
            fsync_dir(self.root / "meta")
            self._write(report.committed_episodes, None)
            logger.warning("dataset {}: {}", self.root, report.describe())
        for scratch in [*SCRATCH, *(p.name for p in self.root.glob("tmp*") if p.is_dir())]:
            if (self.root / scratch).exists():
                shutil.rmtree(self.root / scratch)
                report.removed.append(scratch + "/")
        on_disk = _total_episodes(self.root)
        if on_disk != report.committed_episodes:
            logger.warning(
                "dataset {}: meta/info.json holds {} episodes, the journal {}: the dataset was "
                "changed outside zk0; trusting meta/info.json",
                self.root,
                on_disk,
                report.committed_episodes,
            )
            report.committed_episodes = on_disk
            self.initialize(on_disk)
        return report


def _prune_empty_dirs(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def recover_dataset(root: Path) -> RecoveryReport:
    """Make the dataset at ``root`` loadable by plain LeRobot after any crash (idempotent)."""
    root = Path(root)
    if not (root / "meta" / "info.json").exists():
        raise FileNotFoundError(f"{root}: not a LeRobot dataset (no meta/info.json)")
    with dataset_lock(root):
        return Journal(root).recover()


def remove_stale_staging(root: Path) -> None:
    """Remove a half-created dataset folder left by a crash during creation."""
    staging = staging_path(root)
    if staging.exists():
        shutil.rmtree(staging)
        logger.warning("removed {} (dataset creation interrupted)", staging)


def staging_path(root: Path) -> Path:
    return root.parent / f".{root.name}.creating"


def publish(staging: Path, root: Path) -> None:
    """Fsync a freshly created dataset and rename it into place (atomic)."""
    for path in staging.rglob("*"):
        if path.is_file():
            fsync_file(path)
    for folder in {p.parent for p in staging.rglob("*")} | {staging}:
        fsync_dir(folder)
    staging.replace(root)
    fsync_dir(root.parent)
