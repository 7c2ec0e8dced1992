"""The demo end to end, reduced (2 agents, 2 rounds), with an agent SIGKILLed in round 2.

Real daemons (``zk0-hub run``, ``zk0-agent run``), a real SuperLink and SuperNodes, real
ZeroMQ distribution and the simulated SO-101: the round completes with the surviving agent,
the demo's supervisor restarts the killed one, and it converges to the newest version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zk0.hub.demo import DemoOptions, run_demo
from zk0.shared.store import AdapterStore


def test_a_killed_agent_restarts_and_converges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = DemoOptions(
        agents=2,
        rounds=2,
        episodes=4,
        episode_time_s=4.0,
        local_steps=8,
        eval_episodes=1,
        outputs=tmp_path / "outputs",
        chaos_kill_round=2,
        timeout_s=900,
    )
    run_dir = run_demo(options)

    results = json.loads((run_dir / "demo_results.json").read_text())
    newest = results["newest"]
    store = AdapterStore(run_dir / "hub" / "adapters")
    assert store.latest_version() == newest
    round_2 = store.manifest(newest).metrics
    assert round_2["clients_trained"] == 1 and round_2["clients_dropped"] == 1
    assert store.manifest(newest - 1).metrics["clients_trained"] == 2

    agents = results["agents"]
    assert agents["sim-00"]["restarts"] == 1 and agents["sim-01"]["restarts"] == 0
    for agent_id, status in agents.items():
        assert status["in_use"] == newest, agent_id
        assert status["job"]["result"]["episodes"] == 1
    printed = capsys.readouterr().out
    assert "zk0 demo: 2 simulated SO-101 agents" in printed and f"v{newest}" in printed
    assert "eval_mse_chart.png" in printed
