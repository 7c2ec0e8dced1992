"""What an agent's subscriber knows and shares between its thread and the agent's: its options,
its status (applied, in use, sync, ...) behind a lock, and a canary's task. No sockets, no torch."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

from zk0.shared.agent_status import AgentReport
from zk0.shared.distribution import protocol as p


@dataclass(frozen=True)
class SubscriberOptions:
    chunk_bytes: int = p.DEFAULT_CHUNK_BYTES
    credit: int = 8  # chunk requests in flight per download
    #: No reply for this long (or 4x the hub's usual reply time): the oldest request again,
    #: waiting twice as long after each unanswered one, up to the maximum. Lost requests are
    #: found sooner, by the replies to later ones (``zk0.agent.distribution.fetch``).
    request_timeout_s: float = 10.0
    max_request_timeout_s: float = 60.0
    keep_versions: int = 8
    refused_retry_s: float = 30.0  # a transfer that failed verification is not refetched sooner
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 2000
    #: Test hooks only: sleep after each chunk and between the install steps, so that fault
    #: tests can land a SIGKILL inside a transfer or a store write.
    throttle_s: float = 0.0
    stage_delay_s: float = 0.0


@dataclass(frozen=True)
class GateTask:
    """A canary's task: score ``candidate`` against ``current`` (the version the fleet runs)
    on at least ``episodes`` closed-loop episodes each, where the arm can give them."""

    candidate: int
    current: int
    episodes: int


@dataclass(frozen=True)
class SubscriberStatus:
    agent_id: str
    applied: int | None = None  # verified, stored and current in the store
    in_use: int | None = None  # the version the inference engine computed its last chunk with
    report: AgentReport = field(default_factory=AgentReport)  # what the daemon says it does
    sync: str = "starting"  # starting, up_to_date, fetching, queued, hub_silent, denied, ...
    error: str | None = None
    hub_id: str | None = None
    bytes_rx: int = 0  # application bytes received and sent (all frames), for the bench
    bytes_tx: int = 0
    versions_applied: int = 0
    #: Canary rollout: while this agent is a canary of a version, what the daemon evaluates.
    under_gate: GateTask | None = None


class StatusBox:
    """The subscriber's status, shared between its thread and the agent's (thread-safe)."""

    def __init__(self, agent_id: str) -> None:
        self._lock = threading.Lock()
        self._status = SubscriberStatus(agent_id)

    def get(self) -> SubscriberStatus:
        with self._lock:
            return self._status

    def update(self, **changes: object) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)  # type: ignore[arg-type]

    def count(self, rx: int = 0, tx: int = 0, applied: int = 0) -> None:
        with self._lock:
            s = self._status
            self._status = replace(
                s,
                bytes_rx=s.bytes_rx + rx,
                bytes_tx=s.bytes_tx + tx,
                versions_applied=s.versions_applied + applied,
            )
