"""The hub daemon's control protocol (``zk0-hub run``): every command and reply, for both ends
(the daemon; ``zk0-hub status|start-run|keys add|keys remove``; the demo). Transport and
framing: ``zk0.shared.control``.

==================  ==========  ====================================================
command             arguments   reply
==================  ==========  ====================================================
``status``          -           :class:`HubStatus`
``start_run``       rounds      :class:`RunView` (refused while a run is in progress)
``register_keys``   -           :class:`KeySync` (refused while the SuperLink is down)
==================  ==========  ====================================================
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from zk0.shared.agent_status import AgentReport
from zk0.shared.control import Command
from zk0.shared.gate_record import GateRecord
from zk0.shared.validation import Protocol, WireModel

PROTOCOL = Protocol("hub control", "2.1")  # 2.1: HubStatus.gates


# -- replies ----------------------------------------------------------------------------------


class RunView(WireModel):
    """A federated run in progress."""

    index: int
    started_at: str
    run_dir: str
    rounds: int
    completed_rounds: int
    min_nodes: int
    trigger: str
    agents: list[str]


class RunOutcome(WireModel):
    """How a run ended (``error`` None: it completed)."""

    index: int
    run_dir: str
    returncode: int
    ended_at: str
    error: str | None


class HubInfo(WireModel):
    pid: int
    started_at: str
    config: str
    state_dir: str
    log_dir: str
    trigger: str
    #: The dashboard's address (None: disabled).
    dashboard: str | None = None


class SuperLinkView(WireModel):
    address: str
    up: bool
    state: str
    pid: int | None
    restarts: int
    last_exit: str | None


class DistributionView(WireModel):
    bind_host: str
    publish_port: int | None
    fetch_port: int | None


class FleetAgent(WireModel):
    """One agent as the hub last heard it (its distribution status)."""

    agent_id: str
    online: bool
    applied: int | None
    in_use: int | None
    last_seen_s: float
    converged: bool
    report: AgentReport


class HubStatus(WireModel):
    hub: HubInfo
    superlink: SuperLinkView
    distribution: DistributionView
    current_version: int | None
    versions: list[int]
    run: RunView | None
    #: Why no run starts now (the scheduler's reason).
    next_run: str
    runs_started: int
    runs_completed: int
    runs_failed: int
    last_run: RunOutcome | None
    agents: list[FleetAgent]
    #: Every online agent runs the current version (a canary: the version under its gate).
    converged: bool
    #: Agent id -> its SuperNode's node id on the SuperLink (None: not known yet).
    enrolled: dict[str, int | None]
    #: The newest canary gates (oldest first), with their decisions and numbers.
    gates: list[GateRecord] = Field(default_factory=list)


class KeySync(WireModel):
    """What one registration pass changed on the SuperLink."""

    registered: list[str] = Field(default_factory=list)
    unregistered: list[str] = Field(default_factory=list)
    #: Agent id -> why its key could not be (un)registered.
    failed: dict[str, str] = Field(default_factory=dict)
    enrolled: dict[str, int | None] = Field(default_factory=dict)


# -- commands ---------------------------------------------------------------------------------


class HubCommand[R: WireModel](Command[R]):
    protocol: ClassVar[Protocol] = PROTOCOL


class Status(HubCommand[HubStatus]):
    cmd: ClassVar[str] = "status"


class StartRun(HubCommand[RunView]):
    """Start a federated run now, whatever the trigger and cooldown."""

    cmd: ClassVar[str] = "start_run"
    rounds: Annotated[int, Field(ge=1, le=10_000)] | None = Field(
        default=None, description="Rounds of this run (default: the run config's)."
    )


class RegisterKeys(HubCommand[KeySync]):
    """Register every enrolled SuperNode key not yet registered; unregister withdrawn ones."""

    cmd: ClassVar[str] = "register_keys"
