"""Who may use the arm and the compute on a robot workstation, decided in one place.

States (what ``zk0-agent status`` and the hub see)::

    idle ──start recording──▶ recording ──done──▶ idle
    idle ──run a task───────▶ running_policy ──done──▶ idle
    idle ──round asks───────▶ training ──round replied (or its process died)──▶ idle

The arm and a running policy come first: an arm job starts whenever the arm is free, even
while a federated round trains in the agent's round worker (that round is not interrupted; it
only competes for CPU), and a round is granted the compute only while the arm is idle. A round
that is not granted within the agent's ``train_wait_s`` gives up on its own side (the round worker
replies with an error, and the hub counts the agent as dropped for that round).

Pure logic, no threads or I/O: the daemon calls it from its main loop and its control
handlers, under one lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from zk0.shared.agent_status import Phase


class AgentState(StrEnum):
    IDLE = "idle"
    RECORDING = "recording"
    RUNNING_POLICY = "running_policy"
    TRAINING = "training"


ARM_JOBS = (AgentState.RECORDING, AgentState.RUNNING_POLICY)


@dataclass(frozen=True)
class Lease:
    """The compute, lent to the process running one task of a federated round (the agent's
    round worker, or a ClientApp that runs its task itself)."""

    pid: int
    server_round: int
    phase: Phase
    granted_at: float


class Arbiter:
    def __init__(self) -> None:
        self.arm_job: AgentState | None = None
        self.lease: Lease | None = None

    @property
    def state(self) -> AgentState:
        if self.arm_job is not None:
            return self.arm_job
        return AgentState.TRAINING if self.lease is not None else AgentState.IDLE

    def start_arm_job(self, job: AgentState) -> None:
        """Take the arm for ``job``; ValueError (one line) if it is busy."""
        if job not in ARM_JOBS:
            raise ValueError(f"{job} is not an arm job")
        if self.arm_job is not None:
            raise ValueError(f"the arm is busy ({self.arm_job}); try again when it is idle")
        self.arm_job = job

    def end_arm_job(self) -> None:
        self.arm_job = None

    def request_compute(self, pid: int, server_round: int, phase: Phase, now: float) -> str | None:
        """Grant the compute to ``pid``; None if granted, else why not (it will ask again)."""
        if self.arm_job is not None:
            return f"the arm is {self.arm_job}"
        if self.lease is not None and self.lease.pid != pid:
            return f"round {self.lease.server_round} ({self.lease.phase}) holds the compute"
        if self.lease is None or self.lease.phase != phase:
            self.lease = Lease(pid, server_round, phase, now)
        return None

    def release_compute(self, pid: int) -> bool:
        if self.lease is None or self.lease.pid != pid:
            return False
        self.lease = None
        return True

    def reap(self, alive: Callable[[int], bool]) -> Lease | None:
        """Drop the lease of a process that died without releasing it."""
        lease = self.lease
        if lease is not None and not alive(lease.pid):
            self.lease = None
            return lease
        return None
