"""The agent daemon's control protocol (``zk0-agent run``): every command and reply, for both
ends (the daemon, ``zk0-agent status|start-recording|run-task|stop-job|rollback``, the ClientApp
asking for the compute, the demo). Transport and framing: ``zk0.shared.control``.

=================  ==================================  ======================================
command            arguments                           reply
=================  ==================================  ======================================
``status``         -                                   :class:`AgentStatus`
``record``         episodes                            :class:`JobStarted`
``run_task``       episodes, horizon_s                 :class:`JobStarted`
``stop_job``       -                                   :class:`JobStopped`
``rollback``       -                                   :class:`RolledBack`
``compute_begin``  pid, round, phase                   :class:`ComputeGrant`
``compute_end``    pid, round, phase, outcome, reason  :class:`ComputeReleased`
=================  ==================================  ======================================

``compute_begin`` is asked by a ClientApp process before it trains or evaluates; it is granted
only while the arm is idle (``zk0.agent.arbiter``), and the process asks again each second
until its ``train_wait_s`` runs out. ``compute_end`` tells how its part of the round ended:
``replied``, ``failed``, or ``skipped`` (it gave up waiting, holding nothing).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from zk0.shared.agent_status import AgentReport, Phase, Reason
from zk0.shared.control import Command
from zk0.shared.validation import Protocol, WireModel

PROTOCOL = Protocol("agent control", "2.0")
Episodes = Annotated[int, Field(ge=1, le=100_000)]
Version = Annotated[int, Field(ge=0, le=2**53)]


# -- replies ----------------------------------------------------------------------------------


class RecordResult(WireModel):
    saved: int
    total_episodes: int
    success_rate: float | None
    stopped_by: str | None


class TaskResult(WireModel):
    """Closed-loop episodes under the policy in use (``zk0.agent.inference.evaluation``)."""

    episodes: int
    successes: int
    success_rate: float | None
    adapter_version: Version | None
    mean_episode_s: float
    chunk_latency_p50_s: float
    chunk_latency_p95_s: float
    starved_fraction: float
    missed_ticks: int


class JobView(WireModel):
    """The arm's job: a recording or a task under the policy, one at a time."""

    id: int
    kind: Literal["record", "run_task"]
    state: Literal["running", "done", "failed"]
    started_at: float
    ended_at: float | None
    progress: list[str]
    result: RecordResult | TaskResult | None = None
    error: str | None = None


class Training(WireModel):
    round: int
    phase: Phase


class SuperNodeView(WireModel):
    running: bool
    restarts: int


class AgentStatus(WireModel):
    agent_id: str
    pid: int
    report: AgentReport
    applied: Version | None
    in_use: Version | None
    sync: str
    bytes_received: int
    dataset_root: str
    training: Training | None
    supernode: SuperNodeView
    job: JobView | None


class JobStarted(WireModel):
    job: JobView


class JobStopped(WireModel):
    stopped: bool


class RolledBack(WireModel):
    in_use: Version | None


class ComputeGrant(WireModel):
    granted: bool
    reason: str | None


class ComputeReleased(WireModel):
    released: bool


# -- commands ---------------------------------------------------------------------------------


class AgentCommand[R: WireModel](Command[R]):
    protocol: ClassVar[Protocol] = PROTOCOL


class Status(AgentCommand[AgentStatus]):
    cmd: ClassVar[str] = "status"


class Record(AgentCommand[JobStarted]):
    """Record teleoperated episodes into the agent's dataset."""

    cmd: ClassVar[str] = "record"
    episodes: Episodes = Field(default=1, description="Episodes to record.")


class RunTask(AgentCommand[JobStarted]):
    """Run the task closed loop with the policy in use (asynchronous inference)."""

    cmd: ClassVar[str] = "run_task"
    episodes: Episodes = Field(default=1, description="Episodes under the policy.")
    horizon_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] | None = Field(
        default=None, description="Seconds of policy actions per episode (default: the robot's)."
    )


class StopJob(AgentCommand[JobStopped]):
    cmd: ClassVar[str] = "stop_job"


class Rollback(AgentCommand[RolledBack]):
    cmd: ClassVar[str] = "rollback"


class ComputeBegin(AgentCommand[ComputeGrant]):
    cmd: ClassVar[str] = "compute_begin"
    pid: Annotated[int, Field(gt=0)]
    round: Annotated[int, Field(ge=0)]
    phase: Phase


class ComputeEnd(AgentCommand[ComputeReleased]):
    cmd: ClassVar[str] = "compute_end"
    pid: Annotated[int, Field(gt=0)]
    round: Annotated[int, Field(ge=0)]
    phase: Phase
    outcome: Literal["replied", "failed", "skipped"]
    reason: Reason | None = None
