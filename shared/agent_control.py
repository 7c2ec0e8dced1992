"""The agent daemon's control protocol (``zk0-agent run``): every command and reply, for both
ends (the daemon, ``zk0-agent status|start-recording|run-task|stop-job|rollback``, the round worker
asking for the compute, the demo). Transport and framing: ``zk0.shared.control``.

=================  ==================================  ======================================
command            arguments                           reply
=================  ==================================  ======================================
``status``         -                                   :class:`AgentStatus`
``record``         episodes                            :class:`JobStarted`
``run_task``       episodes, horizon_s                 :class:`JobStarted`
``stop_job``       -                                   :class:`JobStopped`
``rollback``       -                                   :class:`RolledBack`
``label``          label, episode, relabel             :class:`Labelled`
``labels``         job, limit                          :class:`LabelsView`
``compute_begin``  pid, round, phase                   :class:`ComputeGrant`
``compute_end``    pid, round, phase, outcome, reason  :class:`ComputeReleased`
=================  ==================================  ======================================

``compute_begin`` is asked by the process running a round's task (the agent's round worker)
before it trains or evaluates; it is granted
only while the arm is idle (``zk0.agent.arbiter``), and the process asks again each second
until its ``train_wait_s`` runs out. ``compute_end`` tells how its part of the round ended:
``replied``, ``failed``, or ``skipped`` (it gave up waiting, holding nothing).

Every ``run_task`` episode is a :class:`TaskEpisode` the daemon keeps (``zk0.agent.task_labels``).
A real arm cannot tell whether the task succeeded; its operator can: ``label`` stores their
verdict with the episode, and every success figure counts an episode's label, else the
simulator's verdict, else nothing (:class:`zk0.shared.success.SuccessRate`).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from zk0.shared.agent_status import AgentReport, Phase, Reason
from zk0.shared.control import Command
from zk0.shared.success import Count, SuccessRate
from zk0.shared.validation import Protocol, WireModel

#: 2.1: ``label``, ``labels``; ``TaskResult.success``, ``AgentStatus.tasks``.
#: 2.2: ``AgentReport.personal_revision``; ``RolledBack.personal_revision``, ``.summary``.
PROTOCOL = Protocol("agent control", "2.2")
Episodes = Annotated[int, Field(ge=1, le=100_000)]
Version = Annotated[int, Field(ge=0, le=2**53)]
#: Task episodes and jobs are numbered from 1, as an operator counts them.
EpisodeId = Annotated[int, Field(ge=1, le=2**53)]
JobId = Annotated[int, Field(ge=1, le=2**53)]
Seconds = Annotated[float, Field(ge=0, le=2**40, allow_inf_nan=False)]
LabelWord = Literal["success", "failure"]


# -- replies ----------------------------------------------------------------------------------


class RecordResult(WireModel):
    saved: int
    total_episodes: int
    success_rate: float | None
    stopped_by: str | None


class TaskResult(WireModel):
    """Closed-loop episodes under the policy in use (``zk0.agent.inference.evaluation``).

    ``success`` counts each episode's operator label, else the simulator's verdict; an episode
    with neither is not counted (a real arm before labelling: ``success.rate`` is None).
    ``successes`` and ``success_rate`` repeat ``success`` for older readers.
    """

    episodes: int
    successes: int
    success_rate: float | None
    success: SuccessRate
    adapter_version: Version | None
    mean_episode_s: float
    chunk_latency_p50_s: float
    chunk_latency_p95_s: float
    starved_fraction: float
    missed_ticks: int


class TaskEpisode(WireModel):
    """One ``run_task`` episode as the daemon keeps it: one line of ``task_episodes.jsonl``.

    ``auto`` is the simulator's verdict (None on a real arm); ``label`` the operator's.
    """

    id: EpisodeId
    job: JobId
    started_at: Seconds
    ended_at: Seconds
    adapter_version: Version | None
    auto: bool | None
    label: LabelWord | None = None
    labelled_at: Seconds | None = None

    @property
    def outcome(self) -> bool | None:
        """The operator's label, else the simulator's verdict, else None (not counted)."""
        return self.label == "success" if self.label is not None else self.auto


class TaskCounts(WireModel):
    """Task episodes, how many carry a label, and the success of those whose outcome is known."""

    episodes: Count
    labelled: Count
    success: SuccessRate

    def describe(self) -> str:
        """``12 task episodes, 9 labelled: 6/9 = 67% [35, 88] %``; never 0 % for nothing."""
        if self.episodes == 0:
            return "no task episodes"
        head = f"{self.episodes} task episode{'s' if self.episodes != 1 else ''}"
        if self.success.episodes == 0:
            return f"{head}, no labelled episodes"
        line = f"{head}, {self.labelled} labelled: {self.success.describe()}"
        judged = self.success.episodes - self.labelled
        return line + (f" ({judged} judged by the simulator)" if judged > 0 else "")


class VersionCounts(TaskCounts):
    adapter_version: Version | None


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
    #: Task episodes under the adapter in use, and their success.
    tasks: VersionCounts


class JobStarted(WireModel):
    job: JobView


class JobStopped(WireModel):
    stopped: bool


class RolledBack(WireModel):
    """What runs after a rollback: the fleet version and the local revision (personalized mode),
    and one line saying what was rolled back to (empty from daemons older than 2.2)."""

    in_use: Version | None
    personal_revision: Annotated[int, Field(ge=1, le=2**53)] | None = None
    summary: Annotated[str, Field(max_length=300)] = ""


class Labelled(WireModel):
    episode: TaskEpisode


class LabelsView(WireModel):
    """Every task episode counted, per adapter version (the newest versions), and episodes."""

    total: TaskCounts
    by_version: list[VersionCounts]
    #: The newest ``limit`` episodes (of the job asked for), oldest first.
    episodes: list[TaskEpisode]


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


class Label(AgentCommand[Labelled]):
    """Store the operator's verdict on a task episode."""

    cmd: ClassVar[str] = "label"
    label: LabelWord = Field(description="success or failure.")
    episode: EpisodeId | None = Field(
        default=None, description="The task episode (default: the newest unlabelled one)."
    )
    relabel: bool = Field(default=False, description="Replace a label given before.")


class Labels(AgentCommand[LabelsView]):
    """Task episodes, their labels and success counts."""

    cmd: ClassVar[str] = "labels"
    job: JobId | None = Field(default=None, description="Only this job's episodes.")
    limit: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=20, description="Episodes to list (the newest)."
    )


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
