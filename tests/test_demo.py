"""The demo end to end, reduced (2 agents, 2 rounds), with an agent SIGKILLed in round 2 and a
broken version injected through the canary gate afterwards.

Real daemons (``zk0-hub run``, ``zk0-agent run``), a real SuperLink and SuperNodes, real
ZeroMQ distribution and the simulated SO-101: the round completes with the surviving agent,
the demo's supervisor restarts the killed one, and it converges to the newest version. Every
version waits for the canary (``sim-01``); the broken one is rejected on the canary's numbers,
reaches no other agent, and the canary goes back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zk0.hub.demo import RESULTS_FILE, DemoResults, run_demo
from zk0.hub.demo_fleet import DemoOptions
from zk0.hub.history import HISTORY_FILE
from zk0.shared.store import AdapterStore


@pytest.mark.timeout(1500)  # real daemons, a run and three canary evaluations on 2 busy cores
def test_a_killed_agent_restarts_and_converges_and_a_broken_version_is_stopped_at_the_gate(
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
        inject_bad_version=True,
        timeout_s=900,
    )
    run_dir = run_demo(options)

    results = DemoResults.model_validate_json((run_dir / RESULTS_FILE).read_text())
    newest = results.newest
    store = AdapterStore(run_dir / "hub" / "adapters")
    assert store.latest_version() == newest + 1  # the injected version, stored but rejected
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
    assert f"dashboard   {results.hub.hub.dashboard}" in printed
    assert results.hub.hub.dashboard and results.hub.hub.dashboard.startswith("http://127.0.0.1:")

    # Every round's version went through the gate on the canary's evaluation.
    rounds = [g for g in results.hub.gates if g.version <= newest]
    assert rounds and all(g.state != "open" and g.canaries == ("sim-01",) for g in rounds)
    injected = results.injected
    assert injected is not None and injected.gate.version == newest + 1
    gate = injected.gate
    assert gate.state == "rejected" and gate.numbers is not None, gate
    evaluation = gate.numbers.agents["sim-01"]
    assert evaluation.candidate.mse is not None and evaluation.current.mse is not None
    assert evaluation.candidate.mse > evaluation.current.mse
    assert injected.applied_by_others == []
    assert injected.back_after_s is not None and injected.back_after_s <= 60
    assert f"injected version {newest + 1}" in printed and "rejected by the canary gate" in printed
