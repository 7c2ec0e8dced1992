"""An agent that falls behind its hub for a while keeps running and stays in touch.

Both ends bound their receive queues. With ZMTP heartbeats, an agent whose subscriber thread
did not read for longer than the heartbeat timeout (a slow disk during an install, a starved
process) had its full SUB queue stop libzmq reading, the heartbeat timed the healthy connection
out, and libzmq 4.3.5 aborted the agent when it read again (``Assertion failed:
_input_stopped``; ``zk0.shared.distribution.liveness``). ``zk0 bench distribution`` found it at
100 agents on a loaded host.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from conftest import wait_until

#: The agent's install of a version sleeps this long three times (a slow disk): 7.5 s without
#: reading, longer than the ZMTP heartbeat timeout the sockets used to set (5 s).
STAGE_DELAY_S = 2.5


def applied_versions(events: Path) -> list[int]:
    if not events.exists():
        return []
    return [json.loads(line)["version"] for line in events.read_text().splitlines() if line]


def test_an_agent_busy_past_the_heartbeat_timeout_survives_and_reports(
    rig: Any, tmp_path: Path
) -> None:
    server = rig.start_hub(heartbeat_s=0.02)  # 50 announces/s fill the agent's queue at once
    server.publish(rig.new_version())
    rig.agent_config("arm-slow-disk", server)
    events = tmp_path / "events.jsonl"
    agent = rig.spawn_agent(
        "arm-slow-disk", "--events", str(events), "--stage-delay-s", str(STAGE_DELAY_S)
    )
    wait_until(lambda: applied_versions(events) == [0], what="the agent to apply version 0")
    time.sleep(2.0)  # the agent drains its queue: where libzmq aborted
    assert agent.poll() is None, f"the agent died after its install (exit {agent.returncode})"
    wait_until(
        lambda: [(r.agent_id, r.applied) for r in server.agents()] == [("arm-slow-disk", 0)],
        what="the hub to hear the agent report version 0",
    )
