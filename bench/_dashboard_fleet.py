"""A fleet for the dashboard to show: versions with metrics and gates, a run's evaluation
history, and synthetic agents that speak the real distribution protocol (CURVE, statuses,
fetch and verify) and report what real agents report (episodes, hours, dataset statistics).

Shared by ``tests/test_dashboard.py`` (a few agents) and ``zk0 bench dashboard`` (fifty), and
by the README's screenshots. Everything is written the way the hub's own code writes it
(``save_adapter_arrays``, ``GateBook``, ``EvalHistory``), only faster than a real round.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zk0.shared.agent_status import AgentReport, DatasetStats, RoundOutcome
from zk0.shared.normalization import NORMALIZATION_FILE, FeatureStats, Stats, dumps
from zk0.shared.store import AdapterStore
from zk0.shared.success import SuccessRate

#: The fleet's joints: where an SO-101 spends its time (degrees; gripper 0..100) and how much
#: it moves around there.
FLEET_MEAN = np.array([0.0, -30.0, 45.0, 60.0, 0.0, 25.0])
FLEET_STD = np.array([20.0, 15.0, 15.0, 12.0, 25.0, 15.0])
#: The joint a drifting agent reports off (shoulder_lift), and by how many fleet sds.
DRIFT_JOINT, DRIFT_SD = 1, 8.0
DROPPED_REASON = "update norm 41.2 exceeds 5x the fleet's median (8.1)"
SKIPPED_REASON = "busy for 60 s (recording)"
BIN = Path(sys.executable).parent


def fleet_normalization(frames: int = 200_000) -> Stats:
    var = FLEET_STD**2
    feature = FeatureStats(
        frames, FLEET_MEAN, var, FLEET_MEAN - 3 * FLEET_STD, FLEET_MEAN + 3 * FLEET_STD
    )
    return {"observation.state": feature, "action": feature}


def seed_store(store: AdapterStore, template: Path) -> dict[str, int]:
    """v0 (the starting adapter), v1 and v2 from rounds 1-2 (v2 the fleet's), v3 rejected by
    its canary gate. Returns the version numbers by role."""
    from zk0.hub.gate import Decision, GateBook
    from zk0.shared.artifact import load_arrays, save_adapter_arrays
    from zk0.shared.gate_record import GateNumbers, PooledScore

    arrays = load_arrays(template)
    extra = {NORMALIZATION_FILE: dumps(fleet_normalization())}
    numbers: dict[str, int] = {}
    rounds: list[tuple[str, int | None, dict[str, Any]]] = [
        ("start", None, {}),
        ("round1", 1, _metrics(0.182, 0.45, 20, 2)),
        ("current", 2, _metrics(0.141, 0.60, 20, 1)),
        ("rejected", 3, _metrics(0.455, 0.10, 20, 0)),
    ]
    parent: int | None = None
    for role, round_, metrics in rounds:
        with store.allocate() as (version, path):
            scaled = {name: value * (1 + 0.01 * version) for name, value in arrays.items()}
            save_adapter_arrays(
                template,
                path,
                scaled,
                version=version,
                parent_version=parent,
                round_=round_,
                metrics=metrics,
                extra_files=extra,
            )
        numbers[role] = parent = int(version)
    store.set_current(numbers["current"])
    book = GateBook(store.root)
    decisions: tuple[tuple[str, Literal["promoted", "rejected"]], ...] = (
        ("current", "promoted"),
        ("rejected", "rejected"),
    )
    for role, state in decisions:
        version, baseline = numbers[role], numbers[role] - 1
        book.open(version, baseline)
        candidate = PooledScore(
            version=version,
            mse=0.455 if state == "rejected" else 0.141,
            mse_frames=1800,
            success=SuccessRate.of(2 if state == "rejected" else 12, 20),
        )
        current = PooledScore(
            version=baseline, mse=0.182, mse_frames=1800, success=SuccessRate.of(9, 20)
        )
        reason = (
            "success 10 % [3, 30] below 45 % by more than 5 points"
            if state == "rejected"
            else "no worse than the fleet's version"
        )
        book.close(
            version,
            Decision(
                state=state,
                reason=reason,
                numbers=GateNumbers(candidate=candidate, current=current, agents={}),
            ),
        )
    return numbers


def _metrics(mse: float, success: float, episodes: int, dropped: int) -> dict[str, Any]:
    return {
        "eval_mse": mse,
        "clients_trained": 3,
        "clients_dropped": dropped,
        "aggregation": "fedavg",
        "eval_success_rate": success,
        "eval_success_episodes": episodes,
    }


def write_run(runs_root: Path, agents: list[str], missing: str, index: int = 1) -> Path:
    """A finished 3-round run's folder, as the hub writes it: ``hub-run.json`` and the evaluation
    history; ``missing`` was dropped in round 1 and skipped in round 2."""
    from zk0.hub.history import EvalHistory

    folder = runs_root / f"20261130-090000-run{index}"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"index": index, "started_at": "2026-11-30T09:00:00+00:00", "trigger": "episodes"}
    (folder / "hub-run.json").write_text(json.dumps(record))
    history = EvalHistory("fedavg")
    rng = np.random.default_rng(index)
    for number in range(4):
        counted = [a for a in agents if not (a == missing and number in (1, 2))]
        mse = {a: float(0.3 * 0.8**number + rng.uniform(0, 0.03)) for a in counted}
        success = {
            a: SuccessRate.of(int(rng.integers(2 + 2 * number, 5 + 2 * number)), 10)
            for a in counted
        }
        history.add_round(
            number,
            mse,
            dict.fromkeys(counted, 600),
            success,
            success_asked=10,
            dropped={missing: DROPPED_REASON} if number == 1 else {},
            skipped={missing: SKIPPED_REASON} if number == 2 else {},
            round_s=None if number == 0 else 40.0 + number,
            aggregation_s=None if number == 0 else 0.05 * number,
        )
    history.write(folder)
    return folder


def report(index: int, drift: bool = False) -> AgentReport:
    """What agent ``index`` says of itself; a drifting one's shoulder_lift reads far off."""
    mean = FLEET_MEAN + np.linspace(-0.5, 0.5, len(FLEET_MEAN)) * (index % 3)
    if drift:
        mean[DRIFT_JOINT] += DRIFT_SD * FLEET_STD[DRIFT_JOINT]
    var = tuple(float(v) for v in FLEET_STD**2 * 0.8)
    episodes = 20 + 7 * index
    return AgentReport(
        state="idle" if index % 4 else "recording",
        episodes_total=episodes,
        frames_total=episodes * 600,
        recorded_s=episodes * 20.0,
        last_round=RoundOutcome(round=2, phase="train", outcome="trained", at=time.time()),
        dataset=DatasetStats(
            frames=episodes * 600,
            state_mean=tuple(float(m) for m in mean),
            state_var=var,
            action_mean=tuple(float(m) for m in mean),
            action_var=var,
        ),
    )


class SyntheticAgents:
    """Subscribers in this process, one per agent, admitted to the hub's allow-list."""

    def __init__(self, root: Path, hub_public: Path, allow_list_dir: Path, hub: Any) -> None:
        self.root, self.hub_public, self.allow_list_dir = root, hub_public, allow_list_dir
        self.hub = hub  # a zk0.shared.config.HubAddress
        self.subscribers: dict[str, Any] = {}

    def admit(self, agent_ids: Iterable[str]) -> None:
        """Keys for each agent, in the hub's allow-list (a running hub reads it within 1 s)."""
        from zk0.shared.distribution.keys import AllowList, create_keypair

        allow = AllowList(self.allow_list_dir)
        for agent_id in agent_ids:
            keys = self.root / agent_id / "keys"
            create_keypair(keys / "agent.key_secret", keys / "agent.key", agent_id)
            allow.add(agent_id, keys / "agent.key")

    def start(self, agent_id: str, agent_report: AgentReport) -> Any:
        from zk0.agent.distribution.subscriber import AdapterSubscriber
        from zk0.shared.config import AgentKeys

        keys = self.root / agent_id / "keys"
        agent_keys = AgentKeys(
            curve_secret=keys / "agent.key_secret",
            curve_public=keys / "agent.key",
            hub_curve_public=self.hub_public,
        )
        holder: list[Any] = []

        def applied(version: int, folder: Path, manifest: Any) -> None:
            if holder:  # what a real agent does once the engine runs the version
                holder[0].set_in_use(version)

        subscriber = AdapterSubscriber(
            agent_id,
            self.root / agent_id / "adapters",
            self.hub,
            agent_keys,
            on_new_version=applied,
        )
        holder.append(subscriber)
        subscriber.set_report(agent_report)
        self.subscribers[agent_id] = subscriber.start()
        return subscriber

    def stop(self, agent_id: str | None = None) -> None:
        for name in [agent_id] if agent_id else list(self.subscribers):
            self.subscribers.pop(name).stop()


class DashboardHub:
    """``zk0-hub run`` on loopback over a seeded store and run folder, with synthetic agents
    admitted (not started: ``fleet.start`` each); a context manager that SIGTERMs the daemon
    and records its exit code in ``returncode``."""

    def __init__(self, folder: Path, template: Path, agents: list[str], **settings: Any) -> None:
        from zk0.hub.demo_fleet import loopback_hub_config, write_config
        from zk0.shared.config import HubAddress

        self.folder = folder
        self.config = loopback_hub_config(folder, runs={"trigger": "manual"}, **settings)
        self.config_path = write_config(folder / "hub.yaml", self.config)
        self.template, self.agents = template, agents
        self.url = f"http://127.0.0.1:{self.config.dashboard.port}/"
        hub = HubAddress(host="127.0.0.1", publish_port=self.config.publish_port,
                         fetch_port=self.config.fetch_port)  # fmt: skip
        assert self.config.keys is not None
        self.fleet = SyntheticAgents(folder / "agents", self.config.keys.curve_public,
                                     self.config.keys.allow_list_dir, hub)  # fmt: skip
        self.roles: dict[str, int] = {}
        self.keys_init = ""
        self.returncode: int | None = None
        self._daemon: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "zk0-hub"), *args, "--config", str(self.config_path)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    def __enter__(self) -> DashboardHub:
        import os

        made = self.cli("keys", "init")
        if made.returncode != 0:
            raise RuntimeError(f"zk0-hub keys init: {made.stderr.strip()}")
        self.keys_init = made.stdout
        self.roles = seed_store(AdapterStore(self.config.store_root), self.template)
        logs = self.folder / "logs"
        write_run(logs, self.agents[: max(3, len(self.agents) // 2)], missing=self.agents[2])
        self.fleet.admit(self.agents)
        env = {**os.environ, "ZK0_OUTPUTS": str(logs)}
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "ZK0_RUN_DIR", "LOGS_DIRECTORY"):
            env.pop(name, None)
        with (self.folder / "daemon.out").open("wb") as log:
            self._daemon = subprocess.Popen(
                [str(BIN / "zk0-hub"), "run", "--config", str(self.config_path)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while "dashboard" not in self.cli("status").stdout:
            if self._daemon.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the hub did not start: {self.log_tail()}")
            time.sleep(0.5)
        return self

    def log_tail(self) -> str:
        return (self.folder / "daemon.out").read_text(errors="replace")[-2000:]

    def __exit__(self, *exc: object) -> None:
        self.fleet.stop()
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.send_signal(signal.SIGTERM)
        if self._daemon is not None:
            self.returncode = self._daemon.wait(timeout=30)
