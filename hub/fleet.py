"""The hub's view of its fleet: one record per agent, from the statuses agents send.

The distribution server keeps the table in memory and writes it to ``<store root>/agents.json``
(atomically) so that ``zk0-hub agents list`` and the round scheduler can read it from other
processes. A record keeps the agent's last ``AgentReport`` as the agent sent it (already bounded
by the protocol's model), except its ``dataset`` statistics: an agent sends them at most once a
minute, so a report without them keeps the last ones it sent.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from zk0.shared.agent_status import AgentReport
from zk0.shared.distribution.protocol import Status
from zk0.shared.fsutil import atomic_write_bytes

FLEET_FILE = "agents.json"


class AgentRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    agent_id: str
    key_id: str  # fingerprint of the CURVE key the agent authenticated with ("-" when plain)
    last_seen: float  # unix time of its last valid message
    applied: int | None = None
    in_use: int | None = None
    sync: str = "unknown"
    report: AgentReport = AgentReport()
    error: str | None = None
    revoked: bool = False  # its key left the allow-list; the hub ignores it from then on

    def online(self, now: float, heartbeat_s: float) -> bool:
        return not self.revoked and now - self.last_seen <= 3 * heartbeat_s + 1.0


class FleetTable:
    """Thread-safe agent records, keyed by agent id."""

    def __init__(self, path: Path | None, heartbeat_s: float) -> None:
        self.path = path
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._records: dict[str, AgentRecord] = {}
        self._dirty = False
        self._written_at = 0.0

    def update(self, status: Status, key_id: str) -> tuple[AgentRecord | None, AgentRecord]:
        """Record ``status``; returns (previous record, new record)."""
        with self._lock:
            previous = self._records.get(status.agent_id)
            report = status.report
            if report.dataset is None and previous is not None:  # sent once a minute: keep it
                report = report.model_copy(update={"dataset": previous.report.dataset})
            record = AgentRecord(
                agent_id=status.agent_id,
                key_id=key_id,
                last_seen=time.time(),
                applied=status.applied,
                in_use=status.in_use,
                sync=status.sync,
                report=report,
                error=status.error,
            )
            self._records[status.agent_id] = record
            self._dirty = self._dirty or previous is None or _changed(previous, record)
        return previous, record

    def seen(self, agent_id: str) -> None:
        with self._lock:
            record = self._records.get(agent_id)
            if record is not None:
                self._records[agent_id] = record.model_copy(
                    update={"last_seen": time.time(), "revoked": False}
                )

    def mark_revoked(self, allowed: set[str]) -> list[str]:
        """Flag every agent whose id is no longer allowed; returns the newly revoked ids."""
        newly = []
        with self._lock:
            for agent_id, record in self._records.items():
                if agent_id not in allowed and not record.revoked:
                    self._records[agent_id] = record.model_copy(update={"revoked": True})
                    newly.append(agent_id)
            self._dirty = self._dirty or bool(newly)
        return newly

    def records(self) -> list[AgentRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.agent_id)

    def summary(self, current: int | None) -> dict[str, Any]:
        """Convergence at a glance, what a round scheduler needs (new episodes on online agents),
        and the data the fleet holds (every agent's last report)."""
        now = time.time()
        records = [r for r in self.records() if not r.revoked]
        online = [r for r in records if r.online(now, self.heartbeat_s)]
        return {
            "current": current,
            "agents": len(records),
            "online": len(online),
            "applied_current": sum(1 for r in records if r.applied == current),
            "in_use_current": sum(1 for r in records if r.in_use == current),
            "episodes_since_round": sum(r.report.episodes_new for r in online),
            "episodes_total": sum(r.report.episodes_total for r in records),
            "frames_total": sum(r.report.frames_total for r in records),
            "recorded_s": round(sum(r.report.recorded_s for r in records), 3),
        }

    def save_if_due(self, hub: dict[str, Any], every_s: float = 5.0) -> None:
        """Write the file when something changed, and at least every ``every_s`` while running."""
        now = time.monotonic()
        if self.path is None or (not self._dirty and now - self._written_at < every_s):
            return
        self.save(hub)

    def save(self, hub: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.agent_id)
            agents = [r.model_dump(mode="json") for r in records]
            self._dirty = False
        self._written_at = time.monotonic()
        payload = {
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "heartbeat_s": self.heartbeat_s,
            "hub": hub,
            "agents": agents,
        }
        atomic_write_bytes(self.path, (json.dumps(payload, indent=1) + "\n").encode())


def _changed(old: AgentRecord, new: AgentRecord) -> bool:
    return old.model_copy(update={"last_seen": 0.0}) != new.model_copy(update={"last_seen": 0.0})


def load_fleet(store_root: Path) -> tuple[dict[str, Any], list[AgentRecord]]:
    """What the hub last wrote: its own summary and the agent records (empty if never run)."""
    path = Path(store_root) / FLEET_FILE
    if not path.exists():
        return {}, []
    raw = json.loads(path.read_text())
    return dict(raw.get("hub", {})) | {
        "updated_at": raw.get("updated_at"),
        "heartbeat_s": raw.get("heartbeat_s", 1.0),
    }, [AgentRecord.model_validate(entry) for entry in raw.get("agents", [])]
