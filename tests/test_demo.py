"""The demo end to end, reduced (2 agents, 2 rounds), with an agent SIGKILLed in round 2.

Real daemons (``zk0-hub run``, ``zk0-agent run``), a real SuperLink and SuperNodes, real
ZeroMQ distribution and the simulated SO-101: the round completes with the surviving agent,
the demo's supervisor restarts the killed one, and it converges to the newest version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zk0.hub.demo import RESULTS_FILE, DemoResults, run_demo
from zk0.hub.demo_fleet import DemoOptions
from zk0.hub.history import HISTORY_FILE
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
        eval_episodes=2,
        mid_eval_episodes=0,
        outputs=tmp_path / "outputs",
        chaos_kill_round=2,
        timeout_s=900,
    )
    run_dir = run_demo(options)

    results = DemoResults.model_validate_json((run_dir / RESULTS_FILE).read_text())
    newest = results.newest
    store = AdapterStore(run_dir / "hub" / "adapters")
    assert store.latest_version() == newest
    round_2 = store.manifest(newest).metrics
    assert round_2["clients_trained"] == 1 and round_2["clients_dropped"] == 1
    assert store.manifest(newest - 1).metrics["clients_trained"] == 2

    agents = results.agents
    assert agents["sim-00"].restarts == 1 and agents["sim-01"].restarts == 0
    for agent_id, agent in agents.items():
        status = agent.status
        assert status.in_use == newest, agent_id
        assert status.report.last_round is not None, agent_id
    # The survivor trained and evaluated every round; its daemon remembers how round 2 ended.
    last = agents["sim-01"].status.report.last_round
    assert last is not None and (last.round, last.outcome) == (2, "evaluated")
    assert [a.report.episodes_total for a in results.hub.agents] == [4, 4]
    # Success was measured before the first round and after the last, on the same 2 scenes.
    assert results.hub.last_run is not None
    history = json.loads((Path(results.hub.last_run.run_dir) / HISTORY_FILE).read_text())
    for agent_id in agents:
        measured = [s for s in history["success"][agent_id] if s is not None]
        assert len(measured) >= 2 and measured[0]["episodes"] == 2, (agent_id, measured)
    printed = capsys.readouterr().out
    assert "zk0 demo: 2 simulated SO-101 agents" in printed and f"v{newest}" in printed
    assert "eval_mse_chart.png" in printed and "mean success over agents" in printed
    assert "demo wall time" in printed
