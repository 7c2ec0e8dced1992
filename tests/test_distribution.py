"""Adapter distribution end to end on 127.0.0.1: real sockets, CURVE, real tiny adapters.

Agents here are in-process subscribers (each with its own thread and ZeroMQ context); the
SIGKILL trials with agent processes are in ``test_distribution_faults.py``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from conftest import wait_until
from zk0.hub.fleet import load_fleet
from zk0.shared.agent_status import AgentReport
from zk0.shared.artifact import TENSORS_FILE
from zk0.shared.distribution.keys import AllowList
from zk0.shared.store import AdapterStore


class Engine:
    """Stands in for the inference engine: records every version it is handed and, like the
    real one, reports the version in use (at once when wired, then on every change)."""

    def __init__(self) -> None:
        self.taken: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._report: Callable[[int | None], None] | None = None

    def __call__(self, version: int, folder: Path, manifest: Any) -> None:
        assert (folder / TENSORS_FILE).is_file()
        with self._lock:
            self.taken.append((version, manifest.artifact_id))
            if self._report is not None:
                self._report(version)

    def wire(self, subscriber: Any) -> Any:
        """``engine.on_version_in_use = subscriber.set_in_use``, as the agent daemon wires it."""
        with self._lock:
            self._report = subscriber.set_in_use
            if self.taken:
                subscriber.set_in_use(self.taken[-1][0])
        return subscriber


def hub_id_of(rig: Any, version: int) -> str:
    return str(rig.store.manifest(version).artifact_id)


def test_every_agent_converges_to_each_published_version(rig: Any) -> None:
    first = rig.new_version()
    server = rig.start_hub()
    server.publish(first)
    engines = [Engine() for _ in range(3)]
    agents = [
        engine.wire(rig.subscriber(f"arm-{i}", server, on_new_version=engine))
        for i, engine in enumerate(engines)
    ]
    wait_until(lambda: all(a.status().applied == first for a in agents), what="first version")
    second = rig.new_version()
    server.publish(second)
    wait_until(lambda: all(a.status().in_use == second for a in agents), what="second version")
    for agent, engine in zip(agents, engines, strict=True):
        assert engine.taken == [(first, hub_id_of(rig, first)), (second, hub_id_of(rig, second))]
        pointer, manifest = agent.store.load_current()
        assert (pointer.version, manifest.artifact_id) == (second, hub_id_of(rig, second))
    wait_until(
        lambda: (
            [(r.agent_id, r.applied, r.in_use, r.sync) for r in server.agents()]
            == [(f"arm-{i}", second, second, "up_to_date") for i in range(3)]
        ),
        what="the hub's fleet table to show convergence",
    )


def test_a_hub_serving_one_download_at_a_time_brings_every_agent_to_the_version(
    rig: Any,
) -> None:
    from zk0.agent.distribution.state import SubscriberOptions
    from zk0.shared.distribution.limits import DistributionLimits

    server = rig.start_hub(limits=DistributionLimits(max_downloads=1))
    server.publish(rig.new_version())
    slow = SubscriberOptions(chunk_bytes=4096, throttle_s=0.01)  # each download takes ~0.2 s
    agents = [rig.subscriber(f"arm-{i}", server, options=slow) for i in range(4)]
    seen_queued: set[int] = set()

    def done() -> bool:
        seen_queued.update(i for i, a in enumerate(agents) if a.status().sync == "queued")
        return all(a.status().applied == 0 for a in agents)

    wait_until(done, what="every agent to get version 0, one download at a time")
    assert server.service.admission.refused > 0 and seen_queued  # some were told to wait
    assert all(a.status().error is None for a in agents)


def test_offline_agent_serves_its_version_at_once_then_catches_up(rig: Any) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    agent = rig.subscriber("arm-a", server)
    wait_until(lambda: agent.status().applied == 0, what="version 0")
    agent.stop()
    for _ in range(3):  # published while the agent is offline
        server.publish(rig.new_version())
    wait_until(lambda: server.announced_version == 3, what="the hub to announce version 3")
    announced = server.announced_version
    engine = Engine()
    config = rig.agent_config("arm-a", server)
    from zk0.agent.distribution.subscriber import AdapterSubscriber

    restarted = engine.wire(AdapterSubscriber.from_config(config, on_new_version=engine))
    start = time.monotonic()
    restarted.start()
    rig.subscribers.append(restarted)
    assert engine.taken == [(0, hub_id_of(rig, 0))], "serves its last version before any fetch"
    wait_until(lambda: restarted.status().in_use == 3, timeout_s=20, what="the newest version")
    assert time.monotonic() - start < 10
    assert server.announced_version == announced == 3  # no new publish was needed
    assert engine.taken == [(0, hub_id_of(rig, 0)), (3, hub_id_of(rig, 3))]  # 1, 2 skipped


def test_hub_restart_agents_reconnect_converge_and_never_go_back(rig: Any, tmp_path: Path) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    agents = [rig.subscriber(f"arm-{i}", server) for i in range(2)]
    wait_until(lambda: all(a.status().applied == 0 for a in agents), what="version 0")
    ports = dict(publish_port=server.publish_port, fetch_port=server.fetch_port)
    first_hub = server.hub_id
    server.stop()
    wait_until(
        lambda: all(a.status().sync == "hub_silent" for a in agents), what="agents to see silence"
    )
    rig.store.set_current(rig.new_version())  # a round finished while distribution was down
    server = rig.start_hub(**ports)
    wait_until(
        lambda: all(a.status().applied == 1 and a.status().hub_id == server.hub_id for a in agents),
        what="agents to hear the new hub and re-sync to version 1",
    )
    assert server.hub_id != first_hub
    server.stop()
    # A hub restored from an old backup announces version 0: agents keep version 1.
    old = AdapterStore(tmp_path / "old-hub")
    old.install(rig.store.path(0))
    old.set_current(0)
    server = rig.start_hub(store=old, **ports)
    wait_until(
        lambda: (
            {r.agent_id for r in server.agents()} == {"arm-0", "arm-1"}
            and all(a.status().hub_id == server.hub_id for a in agents)
        ),
        what="agents to hear the restored hub announce version 0",
    )
    time.sleep(3 * server.heartbeat_s)  # a few more announces and replies naming version 0
    assert [(r.applied, r.in_use) for r in server.agents()] == [(1, None), (1, None)]  # no engine
    assert all(a.status().applied == 1 and a.store.current().version == 1 for a in agents)


def test_unknown_key_is_refused(rig: Any) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    stranger = rig.subscriber("stranger", server, enroll=False)
    wait_until(lambda: stranger.status().sync == "denied", what="the hub to refuse the key")
    wait_until(lambda: server.faults.counts.get("zap", 0) >= 2, what="both sockets to refuse")
    assert stranger.store.versions() == [] and stranger.status().applied is None
    assert server.agents() == []


def test_key_removed_while_connected_is_cut_off_without_hub_restart(rig: Any) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    keep, drop = rig.subscriber("arm-keep", server), rig.subscriber("arm-drop", server)
    wait_until(lambda: keep.status().applied == drop.status().applied == 0, what="version 0")
    AllowList(rig.hub_keys.allow_list_dir).remove("arm-drop")
    wait_until(lambda: drop.status().sync == "denied", what="the removed agent to be refused")
    wait_until(
        lambda: [r.revoked for r in server.agents()] == [True, False],  # arm-drop, arm-keep
        what="the hub's table to mark the agent revoked",
    )
    server.publish(rig.new_version())
    wait_until(lambda: keep.status().applied == 1, what="the admitted agent to get version 1")
    time.sleep(5 * server.heartbeat_s)  # several announces and statuses later...
    assert drop.status().applied == 0 and drop.store.versions() == [0]
    assert drop.status().sync == "denied"
    AllowList(rig.hub_keys.allow_list_dir).add(
        "arm-drop", rig.root / "agents/arm-drop/keys/arm-drop.key"
    )
    wait_until(lambda: drop.status().applied == 1, what="the re-admitted agent to catch up")


def test_bit_flipped_artifact_is_refused_and_the_agent_keeps_its_version(rig: Any) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    engine = Engine()
    agent = engine.wire(rig.subscriber("arm-a", server, on_new_version=engine))
    wait_until(lambda: agent.status().in_use == 0, what="version 0")
    agent.stop()
    server.publish(rig.new_version())  # verified by the hub when published...
    wait_until(lambda: server.announced_version == 1, what="the hub to announce version 1")
    tensors = rig.store.path(1) / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0x04  # ...then one bit rots on the hub's disk
    tensors.write_bytes(bytes(data))
    restarted = engine.wire(rig.subscriber("arm-a", server, on_new_version=engine))
    wait_until(lambda: (restarted.status().error or "").startswith("refused v1"), what="refusal")
    assert "sha256" in restarted.status().error
    assert restarted.status().applied == restarted.status().in_use == 0
    assert restarted.store.versions() == [0] and restarted.store.current().version == 0
    wait_until(
        lambda: any(r.error and "refused v1" in r.error for r in server.agents()),
        what="the hub to learn about the refusal",
    )
    assert server.cache.get(1) is None, "told of the refusal, the hub verified v1 again"
    server.publish(rig.new_version())  # a good version is taken as usual
    wait_until(lambda: restarted.status().in_use == 2, what="version 2")
    assert [v for v, _ in engine.taken] == [0, 0, 2]


def test_the_agents_report_reaches_the_hubs_table_and_file(rig: Any) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    agent = rig.subscriber("arm-a", server)  # no engine: nothing is in use
    report = AgentReport(
        state="recording",
        episodes_new=12,
        episodes_total=30,
        frames_total=9000,
        recorded_s=300.0,
        job="record",
    )
    agent.set_report(report)
    wait_until(
        lambda: [r.report for r in server.agents()] == [report],
        what="the hub to see the agent's report",
    )
    wait_until(lambda: server.fleet_summary()["applied_current"] == 1, what="convergence")
    assert server.fleet_summary() == {
        "current": 0,
        "agents": 1,
        "online": 1,
        "applied_current": 1,
        "in_use_current": 0,
        "episodes_since_round": 12,
        "episodes_total": 30,
        "frames_total": 9000,
        "recorded_s": 300.0,
    }
    server.stop()
    hub, [record] = load_fleet(rig.store.root)
    assert hub["episodes_total"] == 30 and record.report == report and record.in_use is None
    with pytest.raises(ValidationError, match="state"):
        AgentReport(state="Recording now!")


def test_the_subscriber_imports_no_torch() -> None:
    """Many subscribers run per host (tests, benches): the agent side must stay small."""
    code = (
        "import sys, zk0.agent.distribution.subscriber, zk0.agent.distribution.__main__\n"
        "heavy = [m for m in ('torch', 'lerobot', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
