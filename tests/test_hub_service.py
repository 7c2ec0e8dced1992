"""The hub daemon: run scheduling (pure), its config, node-key enrolment, and the real
``zk0-hub run`` under a stand-in for systemd (READY only once it listens, status over the
control socket, SuperNode keys registered, a clean SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import wait_until
from zk0.hub.enrolment import (
    Enrolment,
    NodeKeyError,
    check_node_key,
    node_key_path,
    store_node_key,
)
from zk0.hub.runs import run_settings
from zk0.hub.scheduler import AgentView, Idle, ManualRequest, RunPlan, decide
from zk0.shared.config import ConfigError, HubConfig, RunsConfig, load_hub_config
from zk0.shared.distribution.keys import AllowList, create_keypair
from zk0.shared.federation import RunSettings
from zk0.shared.flower_keys import make_node_keypair
from zk0.shared.processes import descendants, free_port

BIN = Path(sys.executable).parent
NOW = 10_000.0


def _agents(*specs: tuple[str, bool, int]) -> list[AgentView]:
    return [AgentView(agent_id, online, episodes) for agent_id, online, episodes in specs]


def _decide(runs: RunsConfig, agents: list[AgentView], **kwargs: Any) -> RunPlan | Idle:
    options: dict[str, Any] = {
        "run_active": False,
        "last_started": NOW - 10_000,
        "last_ended": None,
        "now": NOW,
    }
    return decide(runs, agents, **(options | kwargs))


# -- the scheduler ---------------------------------------------------------------------------


def test_episodes_trigger_needs_enough_online_agents_with_enough_new_episodes() -> None:
    runs = RunsConfig(min_new_episodes=20, min_agents=2)
    fleet = _agents(("arm-b", True, 25), ("arm-a", True, 20), ("arm-c", True, 19))
    plan = _decide(runs, fleet)
    assert isinstance(plan, RunPlan)
    assert (plan.trigger, plan.agents, plan.rounds) == ("episodes", ("arm-a", "arm-b"), None)
    offline = _agents(("arm-a", True, 50), ("arm-b", False, 50), ("arm-c", True, 3))
    idle = _decide(runs, offline)
    assert isinstance(idle, Idle) and "1 of 2 agents" in idle.reason
    assert isinstance(_decide(runs, []), Idle)


def test_never_while_a_run_is_active_nor_within_the_cooldown() -> None:
    runs = RunsConfig(min_new_episodes=1, min_agents=1, cooldown_s=60)
    fleet = _agents(("arm-a", True, 5))
    assert isinstance(_decide(runs, fleet, run_active=True), Idle)
    assert isinstance(_decide(runs, fleet, run_active=True, request=ManualRequest()), Idle)
    cooling = _decide(runs, fleet, last_ended=NOW - 59)
    assert isinstance(cooling, Idle) and "cooling down" in cooling.reason
    assert isinstance(_decide(runs, fleet, last_ended=NOW - 60), RunPlan)


def test_manual_requests_start_a_run_whatever_the_trigger_and_cooldown() -> None:
    runs = RunsConfig(trigger="manual", min_agents=2)
    fleet = _agents(("arm-a", True, 100), ("arm-b", True, 100))
    waiting = _decide(runs, fleet)
    assert isinstance(waiting, Idle) and "manual" in waiting.reason
    plan = _decide(runs, fleet, last_ended=NOW - 1, request=ManualRequest(rounds=7))
    assert isinstance(plan, RunPlan)
    assert (plan.trigger, plan.rounds) == ("manual", 7)
    plan = _decide(RunsConfig(), [], request=ManualRequest())
    assert isinstance(plan, RunPlan) and plan.rounds is None and plan.agents == ()


def test_a_run_takes_the_run_config_over_the_defaults_and_the_hub_sets_the_rest(
    tmp_path: Path,
) -> None:
    runs = RunsConfig(min_agents=3, run_config={"num-server-rounds": 5, "local_steps": 7})
    hub = HubConfig(store_root=tmp_path / "store", policy="tiny", runs=runs)
    settings = run_settings(hub, tmp_path / "run")
    assert (settings.num_server_rounds, settings.local_steps, settings.min_nodes) == (5, 7, 3)
    assert (settings.policy, settings.run_dir) == ("tiny", str(tmp_path / "run"))
    assert settings.lr == RunSettings().lr  # not given: RunSettings' default
    assert run_settings(hub, tmp_path / "run", rounds=2).num_server_rounds == 2


def test_schedule_trigger_runs_every_period_with_enough_agents_online() -> None:
    runs = RunsConfig(trigger="schedule", every_s=3600, min_agents=2, min_new_episodes=99)
    fleet = _agents(("arm-a", True, 0), ("arm-b", True, 0))
    early = _decide(runs, fleet, last_started=NOW - 3000)
    assert isinstance(early, Idle) and "600 s" in early.reason
    plan = _decide(runs, fleet, last_started=NOW - 3600)
    assert isinstance(plan, RunPlan) and plan.trigger == "schedule"
    alone = _decide(runs, fleet[:1], last_started=NOW - 4000)
    assert isinstance(alone, Idle) and "1 of 2 agents online" in alone.reason


# -- configuration -----------------------------------------------------------------------------


def _write(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ({"run_config": {"local-stepz": 3}}, "runs.run_config: unknown Flower run-config key"),
        ({"run_config": {"lr": "fast"}}, "runs.run_config: lr: Input should be a valid number"),
        ({"run_config": {"min-nodes": 9}}, "set by the hub from runs.min_agents"),
        ({"run_config": {"num-server-rounds": 0}}, "num-server-rounds: Input should be greater"),
        ({"trigger": "schedule"}, "runs: every_s is required when trigger is schedule"),
        ({"trigger": "hourly"}, "runs.trigger: Input should be"),
    ],
)
def test_bad_runs_section_fails_in_one_line(
    tmp_path: Path, runs: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path / "hub.yaml", {"store_root": "store", "runs": runs})
    with pytest.raises(ConfigError) as error:
        load_hub_config(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_hub_state_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "hub.yaml",
        {
            "store_root": "data/adapters",
            "tls": {"ca_cert": "tls/ca.crt", "server_cert": "tls/s.pem", "server_key": "tls/s.key"},
            "runs": {"run_config": {"local_steps": 5, "lr": 0.001}},
        },
    )
    hub = load_hub_config(path)
    assert hub.hub_state_dir == tmp_path / "data" / "hub-state"
    assert hub.control_socket_path == tmp_path / "data" / "hub-state" / "hub.sock"
    assert hub.tls is not None and hub.tls.server_key == tmp_path / "tls" / "s.key"
    assert hub.runs.run_config == {"local-steps": 5, "lr": 0.001}  # Flower's dashed keys
    explicit = _write(tmp_path / "b.yaml", {"store_root": "s", "state_dir": "st"})
    assert load_hub_config(explicit).control_socket_path == tmp_path / "st" / "hub.sock"


# -- enrolment of SuperNode keys -------------------------------------------------------------


class FakeFlwr:
    """Stands in for ``flwr supernode register|unregister`` against a SuperLink."""

    def __init__(self) -> None:
        self.nodes: dict[int, bytes] = {}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if args[:2] == ("supernode", "register"):
            key = Path(args[2]).read_bytes()
            if key in self.nodes.values():
                reply = {"success": False, "error-message": "[code: 23] Public key already in use."}
                return subprocess.CompletedProcess(args, 1, json.dumps(reply, indent=2), "")
            node_id = 1000 + len(self.nodes)
            self.nodes[node_id] = key
            return subprocess.CompletedProcess(
                args, 0, json.dumps({"success": True, "node-id": node_id}, indent=2), ""
            )
        assert args[:2] == ("supernode", "unregister")
        self.nodes.pop(int(args[2]))
        return subprocess.CompletedProcess(args, 0, '{"success": true}', "")


def _enrol(allowed: Path, keys: Path, agent_id: str) -> tuple[Path, Path]:
    curve = keys / f"{agent_id}.key"
    create_keypair(keys / f"{agent_id}.key_secret", curve, agent_id)
    node_pub = make_node_keypair(keys / f"{agent_id}-node")
    AllowList(allowed).add(agent_id, curve)
    return curve, store_node_key(allowed, agent_id, node_pub)


def test_node_keys_are_checked_and_kept_out_of_the_allow_list(tmp_path: Path) -> None:
    allowed, keys = tmp_path / "allowed", tmp_path / "keys"
    curve, stored = _enrol(allowed, keys, "arm-1")
    assert stored == node_key_path(allowed, "arm-1") and stored.parent.name == "supernodes"
    # The allow-list reads its top level only: the subfolder is no agent and no warning.
    assert [e.agent_id for e in AllowList(allowed).entries()] == ["arm-1"]
    other = make_node_keypair(keys / "other-node")
    for agent_id, source, message in [
        ("arm-2", stored, "already enrolled as 'arm-1'"),
        ("arm-1", other, "already has another SuperNode key; use --replace"),
        ("arm-2", curve, "not an OpenSSH public key"),
        ("arm-2", keys / "other-node", "not an OpenSSH public key"),  # the private half
        ("Arm 2", other, "not a valid agent id"),
    ]:
        with pytest.raises(NodeKeyError, match=message):
            check_node_key(allowed, agent_id, source)
    assert check_node_key(allowed, "arm-1", other, replace=True).startswith(b"ecdsa-sha2-nistp384")


def test_enrolment_follows_the_key_files(tmp_path: Path) -> None:
    allowed, keys = tmp_path / "allowed", tmp_path / "keys"
    flwr = FakeFlwr()
    enrolment = Enrolment(allowed, tmp_path / "state" / "supernodes.json", flwr)
    _enrol(allowed, keys, "arm-1")
    _enrol(allowed, keys, "arm-2")
    assert enrolment.pending()
    first = enrolment.sync("zk0")
    assert first.registered == ["arm-1", "arm-2"] and not first.failed
    assert first.enrolled == {"arm-1": 1000, "arm-2": 1001} == enrolment.enrolled()
    assert not enrolment.pending() and enrolment.sync("zk0").registered == []
    # Withdrawing the CURVE key alone cuts the SuperNode off too.
    AllowList(allowed).remove("arm-2")
    assert enrolment.sync("zk0").unregistered == ["arm-2"] and list(flwr.nodes) == [1000]
    # A registry lost beside a kept database: the key is taken already, and still counts.
    (tmp_path / "state" / "supernodes.json").unlink()
    again = enrolment.sync("zk0")
    assert again.registered == ["arm-1"] and again.enrolled == {"arm-1": None}


# -- the daemon --------------------------------------------------------------------------------


class NotifyReceiver:
    """The receiving end of ``$NOTIFY_SOCKET``, as systemd holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.lines: list[str] = []

    def poll(self, timeout_s: float) -> list[str]:
        self.sock.settimeout(timeout_s)
        try:
            new = self.sock.recv(4096).decode().splitlines()
        except TimeoutError:
            return []
        self.lines += new
        return new


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _status(config: Path) -> dict[str, Any]:
    result = _hub("status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    state: dict[str, Any] = json.loads(result.stdout)
    return state


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie has: it only awaits reaping)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _hub(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "zk0-hub"), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="zk0-hub-", dir="/tmp") as folder:
        yield Path(folder)


def test_bad_config_is_one_line_and_exit_2(short_dir: Path) -> None:
    config = _write(short_dir / "hub.yaml", {"store_root": "store"})
    result = _hub("run", "--config", str(config))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {config}: keys: required by zk0-hub run (zk0-hub keys init)"
    )


def test_hub_daemon_ready_status_enrolment_and_sigterm(short_dir: Path) -> None:
    ports = {"flower_port": free_port(), "publish_port": free_port(), "fetch_port": free_port()}
    config = _write(
        short_dir / "hub.yaml",
        {
            "bind_host": "127.0.0.1",
            **ports,
            "store_root": "store",
            "state_dir": "state",
            "heartbeat_s": 0.5,
            "keys": {
                "curve_secret": "keys/hub.key_secret",
                "curve_public": "keys/hub.key",
                "allow_list_dir": "allowed",
            },
            "tls": {
                "ca_cert": "tls/ca.crt",
                "server_cert": "tls/server.pem",
                "server_key": "tls/server.key",
            },
            "policy": "tiny-sim-base",
            "runs": {"trigger": "episodes", "min_agents": 2},
        },
    )
    made = _hub("keys", "init", "--config", str(config))
    assert made.returncode == 0 and "server certificate for 127.0.0.1" in made.stdout, made.stderr
    assert (short_dir / "tls" / "server.key").stat().st_mode & 0o077 == 0
    # Enrolled while no hub runs: registered when it starts.
    agents = short_dir / "agents"
    for agent_id in ("arm-0", "arm-1"):
        create_keypair(agents / f"{agent_id}.key_secret", agents / f"{agent_id}.key", agent_id)
        make_node_keypair(agents / f"{agent_id}-node")
    early = _hub(
        "keys", "add", "arm-0", str(agents / "arm-0.key"), "--config", str(config),
        "--supernode-key", str(agents / "arm-0-node.pub"),
    )  # fmt: skip
    assert early.returncode == 0, early.stderr
    assert "no hub running at" in early.stdout and "registered when the hub starts" in early.stdout

    systemd = NotifyReceiver(short_dir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "ZK0_OUTPUTS": str(short_dir / "logs")}
    for name in (
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "ZK0_RUN_DIR",
        "LOGS_DIRECTORY",
        "STATE_DIRECTORY",
    ):
        env.pop(name, None)
    log = (short_dir / "daemon.out").open("wb")
    daemon = subprocess.Popen(
        [str(BIN / "zk0-hub"), "run", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    superlink_pid = None
    try:
        seen_down = False
        deadline = time.monotonic() + 60
        while "READY=1" not in systemd.lines:
            assert time.monotonic() < deadline, "no READY=1 within 60 s"
            assert daemon.poll() is None, (short_dir / "daemon.out").read_text()[-2000:]
            listening = _accepts(ports["flower_port"])
            got = systemd.poll(0.05)
            if "READY=1" in got:
                # READY only once the SuperLink and both distribution sockets listen.
                assert _accepts(ports["flower_port"]), "READY=1 before the SuperLink listened"
                assert _accepts(ports["publish_port"]) and _accepts(ports["fetch_port"])
            else:
                seen_down = seen_down or not listening
        assert seen_down  # the check above really raced the start-up
        assert any(line.startswith("STATUS=") for line in systemd.lines)

        status = _hub("status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        superlink_pid = state["superlink"]["pid"]
        assert state["superlink"]["up"] and state["superlink"]["address"].endswith(
            f":{ports['flower_port']}"
        )
        assert state["agents"] == [] and state["run"] is None and state["converged"]
        assert state["current_version"] is None and state["versions"] == []
        assert isinstance(state["enrolled"]["arm-0"], int)  # registered at start-up
        text = _hub("status", "--config", str(config))
        assert text.returncode == 0 and "superlink" in text.stdout and " up" in text.stdout

        added = _hub(
            "keys", "add", "arm-1", str(agents / "arm-1.key"), "--config", str(config),
            "--supernode-key", str(agents / "arm-1-node.pub"),
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "registered with the hub's SuperLink (node " in added.stdout
        node_id = json.loads(_hub("status", "--config", str(config), "--json").stdout)["enrolled"][
            "arm-1"
        ]
        listed = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "zk0", "--format", "json"],
            env={**env, "FLWR_HOME": str(short_dir / "state" / "flwr-home")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        nodes = {n["node-id"]: n["status"] for n in json.loads(listed.stdout)["nodes"]}
        assert nodes.get(str(node_id)) == "registered", listed.stdout

        removed = _hub("keys", "remove", "arm-1", "--config", str(config))
        assert removed.returncode == 0 and "unregistered" in removed.stdout, removed.stderr

        # A SuperLink that dies is started again, with the reason kept.
        os.kill(superlink_pid, signal.SIGKILL)
        wait_until(
            lambda: (
                _status(config)["superlink"]["restarts"] == 1 and _status(config)["superlink"]["up"]
            ),
            30,
            "the SuperLink to be restarted",
        )
        link = _status(config)["superlink"]
        assert "exited with -9" in link["last_exit"] and link["pid"] != superlink_pid
        superlink_pid = link["pid"]

        # A run in progress (no SuperNode ever comes: no round runs) is abandoned on SIGTERM.
        started_run = _hub("start-run", "--config", str(config), "--rounds", "1")
        assert started_run.returncode == 0 and "run 1 started: 1 rounds" in started_run.stdout
        again = _hub("start-run", "--config", str(config))
        assert again.returncode == 1 and "run 1 is in progress" in again.stderr
        run_dir = Path(_status(config)["run"]["run_dir"])
        wait_until(
            lambda: "Successfully started run" in _read(run_dir / "hub" / "flwr-run.log"),
            60,
            "flwr run to submit the run",
        )
        children = descendants(daemon.pid)
        assert superlink_pid in children

        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
        while systemd.poll(0.5):  # every datagram sent, STOPPING=1 among the last
            pass
        assert "STOPPING=1" in systemd.lines
        assert any(line.startswith("STATUS=run 1 round 0/1") for line in systemd.lines)
        assert not (short_dir / "state" / "hub.sock").exists()
        # An exited child may linger as a zombie until init reaps it (slowly under load): gone.
        wait_until(lambda: not [p for p in children if _running(p)], 5, "the hub's children")
        book = json.loads((short_dir / "state" / "hub-runs.json").read_text())
        assert book["last_run"]["error"] == "abandoned: hub stopped"
        gone = _hub("status", "--config", str(config))
        assert gone.returncode == 1
        assert gone.stderr.strip() == f"error: no hub running at {short_dir / 'state' / 'hub.sock'}"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
        systemd.sock.close()
