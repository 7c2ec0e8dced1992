"""What the hub daemon answers to ``status`` (``zk0.shared.hub_control.HubStatus``), composed
from its parts: the SuperLink's supervisor, the store, the run book and the fleet."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from zk0.hub.gate import GateBook
from zk0.shared import hub_control as hc

#: Canary gates ``status`` shows (the newest).
SHOWN_GATES = 5

if TYPE_CHECKING:
    from zk0.hub.service import HubService


def hub_status(hub: HubService) -> hc.HubStatus:
    config, supervisor = hub.config, hub.supervisor
    pointer = hub.store.current()
    current = pointer.version if pointer else None
    now = time.time()
    records = [r for r in (hub.distribution.agents() if hub.distribution else []) if not r.revoked]
    book = GateBook(hub.store.root)
    gates = book.records()
    # A canary evaluating the version under an open gate is where the hub wants it to be.
    gate = book.open_gate(gates)
    under_gate = {canary: gate.version for canary in gate.canaries} if gate else {}
    agents = [
        hc.FleetAgent(
            agent_id=r.agent_id,
            online=r.online(now, config.heartbeat_s),
            applied=r.applied,
            in_use=r.in_use,
            last_seen_s=round(now - r.last_seen, 1),
            converged=r.in_use is not None and r.in_use == under_gate.get(r.agent_id, current),
            # Without the dataset statistics: 600 bytes an agent would take a 1,000-agent
            # status past the control socket's 1 MiB; the dashboard shows what they mean.
            report=r.report.model_copy(update={"dataset": None}),
        )
        for r in records
    ]
    distribution = hub.distribution
    return hc.HubStatus(
        hub=hc.HubInfo(
            pid=os.getpid(),
            started_at=hub.started_at,
            config=str(hub.config_path),
            state_dir=str(hub.state_dir),
            log_dir=str(hub.log_dir),
            trigger=config.runs.trigger,
            dashboard=hub.dashboard.url if hub.dashboard else None,
        ),
        superlink=hc.SuperLinkView(
            address=hub.link.address,
            up=supervisor.up,
            state=supervisor.state,
            pid=supervisor.pid,
            restarts=supervisor.restarts,
            last_exit=supervisor.last_exit,
        ),
        distribution=hc.DistributionView(
            bind_host=config.bind_host,
            publish_port=distribution.publish_port if distribution else None,
            fetch_port=distribution.fetch_port if distribution else None,
        ),
        current_version=current,
        versions=hub.store.versions(),
        run=hub.run.view() if hub.run else None,
        next_run=hub.next_run,
        runs_started=hub.book.runs_started,
        runs_completed=hub.book.runs_completed,
        runs_failed=hub.book.runs_failed,
        last_run=hub.book.last_run,
        agents=agents,
        converged=all(a.converged for a in agents if a.online),
        enrolled=hub.enrolment.enrolled(),
        gates=gates[-SHOWN_GATES:],
    )
