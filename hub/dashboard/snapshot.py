"""Everything the dashboard shows, read at one moment: a ``Snapshot``.

The fleet table and the bytes served are the distribution server's, in memory; versions, gates
and run histories are files the ServerApp and the gate keeper write. Files are read again only
when they change (a manifest never does), so a snapshot of a 50-agent fleet with a hundred
versions costs milliseconds, and a page asks for one at most once a second.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.hub.fleet import AgentRecord
from zk0.hub.gate import GateBook
from zk0.hub.history import HISTORY_FILE, EvalHistory
from zk0.hub.runs import RUN_FILE
from zk0.shared.artifact import Manifest
from zk0.shared.gate_record import GateRecord
from zk0.shared.normalization import NORMALIZATION_FILE, Stats, loads
from zk0.shared.store import AdapterStore

#: A snapshot younger than this is shared by every request.
SNAPSHOT_MAX_AGE_S = 1.0


@dataclass(frozen=True)
class VersionInfo:
    version: int
    parent: int | None
    round: int | None
    created_at: float  # unix time
    size_bytes: int
    metrics: dict[str, Any]
    gate: GateRecord | None


@dataclass(frozen=True)
class RunInfo:
    """One federated run: its folder's ``hub-run.json`` and evaluation history."""

    index: int
    started_at: str
    trigger: str
    history: EvalHistory


@dataclass(frozen=True)
class FleetSources:
    """Where a snapshot's parts come from (the hub daemon's, or a test's)."""

    store: AdapterStore
    agents: Callable[[], list[AgentRecord]]
    #: Bytes the fetch socket has served, per agent.
    bytes_by_agent: Callable[[], dict[str, int]]
    #: The folder holding one ``<stamp>-run<N>/`` folder per federated run.
    runs_root: Path
    heartbeat_s: float


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    heartbeat_s: float
    agents: list[AgentRecord]
    bytes_by_agent: dict[str, int]
    current: int | None
    #: When the current version became the fleet's: its gate's decision, else its creation.
    current_since: float | None
    #: The current version's shared normalization (None: no version, or unreadable).
    normalization: Stats | None
    versions: list[VersionInfo] = field(default_factory=list)
    runs: list[RunInfo] = field(default_factory=list)

    @property
    def bytes_served(self) -> int:
        return sum(self.bytes_by_agent.values())

    def version(self, number: int | None) -> VersionInfo | None:
        return next((v for v in self.versions if v.version == number), None)


class SnapshotSource:
    """Takes snapshots; thread-safe (the web server's worker threads share one)."""

    def __init__(self, sources: FleetSources) -> None:
        self.sources = sources
        self._lock = threading.Lock()
        self._last: Snapshot | None = None
        self._manifests: dict[int, Manifest] = {}
        self._normalization: dict[int, Stats | None] = {}
        self._runs: dict[Path, tuple[float, RunInfo | None]] = {}

    def get(self) -> Snapshot:
        with self._lock:
            now = time.time()
            if self._last is None or now - self._last.taken_at >= SNAPSHOT_MAX_AGE_S:
                self._last = self._take(now)
            return self._last

    def _take(self, now: float) -> Snapshot:
        src = self.sources
        pointer = src.store.current()
        current = pointer.version if pointer else None
        gates = {g.version: g for g in GateBook(src.store.root).records()}
        versions = [
            info
            for number in src.store.versions()
            if (info := self._version(number, gates.get(number))) is not None
        ]
        by_number = {v.version: v for v in versions}
        since = None
        if current is not None and current in by_number:
            gate = by_number[current].gate
            decided = gate.decided_at if gate and gate.state == "promoted" else None
            since = decided or by_number[current].created_at
        return Snapshot(
            taken_at=now,
            heartbeat_s=src.heartbeat_s,
            agents=src.agents(),
            bytes_by_agent=src.bytes_by_agent(),
            current=current,
            current_since=since,
            normalization=self._stats(current),
            versions=versions,
            runs=self._read_runs(),
        )

    def _version(self, number: int, gate: GateRecord | None) -> VersionInfo | None:
        manifest = self._manifests.get(number)
        if manifest is None:
            try:
                manifest = self.sources.store.manifest(number)
            except (OSError, ValueError) as error:  # being written, or pruned meanwhile
                logger.debug("dashboard: version {} unreadable: {}", number, error)
                return None
            self._manifests[number] = manifest
        return VersionInfo(
            version=number,
            parent=manifest.parent_version,
            round=manifest.round,
            created_at=_unix(manifest.created_at),
            size_bytes=sum(f.size for f in manifest.files.values()),
            metrics=dict(manifest.metrics),
            gate=gate,
        )

    def _stats(self, version: int | None) -> Stats | None:
        if version is None:
            return None
        if version not in self._normalization:
            path = self.sources.store.path(version) / NORMALIZATION_FILE
            try:
                self._normalization[version] = loads(path.read_bytes())
            except (OSError, ValueError) as error:
                logger.warning("dashboard: {}: {}", path, error)
                self._normalization[version] = None
        return self._normalization[version]

    def _read_runs(self) -> list[RunInfo]:
        runs = []
        for history_path in self.sources.runs_root.glob(f"*-run*/{HISTORY_FILE}"):
            try:
                stamp = history_path.stat().st_mtime
            except OSError:
                continue
            cached = self._runs.get(history_path)
            if cached is None or cached[0] != stamp:
                cached = (stamp, _read_run(history_path))
                self._runs[history_path] = cached
            if cached[1] is not None:
                runs.append(cached[1])
        return sorted(runs, key=lambda run: run.index)


def _read_run(history_path: Path) -> RunInfo | None:
    """A run's record, or None while its files are half-written (the next snapshot retries)."""
    try:
        record = json.loads((history_path.parent / RUN_FILE).read_text())
        history = EvalHistory.from_dict(json.loads(history_path.read_text()))
        return RunInfo(
            index=int(record["index"]),
            started_at=str(record.get("started_at", "")),
            trigger=str(record.get("trigger", "")),
            history=history,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.debug("dashboard: {}: {}", history_path, error)
        return None


def _unix(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0
