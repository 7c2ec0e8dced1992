"""``zk0-agent run``, the robot-workstation daemon, as a real process: systemd notifications,
its control socket and CLI, recording, the compute arbiter, hot swaps, rollback and SIGTERM.

The hub side is a real distribution server (CURVE) from the distribution rig; the arm is the
simulated SO-101; the policy is the tiny SmolVLA the rig's adapters were made for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import SIM_ROBOT, FakeSystemd, wait_until
from zk0.agent.round_tasks import compute_permission
from zk0.shared import agent_control as ac
from zk0.shared.config import load_robot_config
from zk0.shared.control import ControlError, request
from zk0.shared.federation import NodeSettings

BIN = Path(sys.executable).parent


def _short_sim(folder: Path) -> Path:
    robot = load_robot_config(SIM_ROBOT).model_copy(update={"episode_time_s": 1.5})
    path = folder / "robot.yaml"
    path.write_text(yaml.safe_dump(robot.model_dump(mode="json", exclude_none=True)))
    return path


class Daemon:
    """A running ``zk0-agent run`` and its CLI."""

    def __init__(
        self, process: subprocess.Popen[bytes], config: Any, path: Path, rig: Any, server: Any
    ) -> None:
        self.process, self.config, self.config_path = process, config, path
        self.rig, self.server, self.socket = rig, server, config.control_socket

    def status(self) -> ac.AgentStatus:
        return request(self.socket, ac.Status())

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """``zk0-agent ARGS --config ...`` with ``stdin`` as its input, however it ends."""
        return subprocess.run(
            [str(BIN / "zk0-agent"), *args, "--config", str(self.config_path)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def cli(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def job_done(self) -> ac.JobView:
        wait_until(lambda: getattr(self.status().job, "state", "") != "running", 120, "job")
        job = self.status().job
        assert job is not None and job.state == "done", job
        return job


@contextlib.contextmanager
def running_daemon(
    rig: Any, short_dir: Path, systemd: FakeSystemd, robot_config: Path
) -> Iterator[Daemon]:
    """``zk0-agent run`` on ``robot_config`` with the tiny policy, next to the rig's hub."""
    server = rig.start_hub()
    config = rig.agent_config("arm-01", server).model_copy(
        update={
            "policy": "tiny",
            "robot_config": robot_config,
            "control_socket": short_dir / "agent.sock",
        }
    )
    path = rig.root / "agent.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    env = {
        **os.environ,
        "NOTIFY_SOCKET": systemd.address,
        "WATCHDOG_USEC": "1000000",
        "ZK0_RUN_DIR": str(rig.root / "run"),
    }
    env.pop("WATCHDOG_PID", None)
    process = subprocess.Popen(
        [str(BIN / "zk0-agent"), "run", "--config", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(rig.root / "daemon.stderr").open("wb"),
    )
    try:
        yield Daemon(process, config, path, rig, server)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


@pytest.fixture
def daemon(rig: Any, short_dir: Path, systemd: FakeSystemd) -> Iterator[Daemon]:
    with running_daemon(rig, short_dir, systemd, _short_sim(rig.root)) as started:
        yield started


def test_ready_means_serving_and_the_watchdog_follows_the_loop(
    daemon: Any, systemd: FakeSystemd
) -> None:
    lines = systemd.until("READY=1", timeout_s=180)
    assert any(line.startswith("STATUS=connecting the arm") for line in lines)
    status = daemon.status()  # READY came after the control socket was up
    assert status.report.state == "idle" and status.in_use is None
    assert status.report.episodes_total == 0 and status.report.last_round is None
    assert systemd.during(2.5).count("WATCHDOG=1") >= 2
    assert "in use base" in daemon.cli("status")


def test_the_arm_comes_first_and_versions_hot_swap(daemon: Any, systemd: FakeSystemd) -> None:
    systemd.until("READY=1", timeout_s=180)
    version = daemon.rig.new_version()
    daemon.server.publish(version)
    wait_until(lambda: daemon.status().in_use == version, 60, "the hot swap")

    assert "recording 2 episodes" in daemon.cli("start-recording", "--episodes", "2", "--no-wait")
    wait_until(lambda: daemon.status().report.state == "recording", 30, "recording")
    pid = os.getpid()
    refused = request(daemon.socket, ac.ComputeBegin(pid=pid, round=1, phase="train"))
    assert not refused.granted and refused.reason is not None and "recording" in refused.reason
    assert daemon.status().report.job == "record"
    with pytest.raises(ControlError, match="the arm is busy"):
        request(daemon.socket, ac.RunTask(episodes=1))
    recorded = daemon.job_done().result
    assert isinstance(recorded, ac.RecordResult) and recorded.total_episodes == 2
    report = daemon.status().report
    assert (report.episodes_new, report.episodes_total, report.job) == (2, 2, None)
    assert report.frames_total > 0 and report.recorded_s == pytest.approx(report.frames_total / 30)

    assert request(daemon.socket, ac.ComputeBegin(pid=pid, round=1, phase="train")).granted
    status = daemon.status()
    assert status.report.state == "training" and status.report.episodes_new == 0
    assert status.training == ac.Training(round=1, phase="train")

    # A task on the arm starts even while a round trains, with the hot-swapped version.
    request(daemon.socket, ac.RunTask(episodes=1, horizon_s=1.0))
    result = daemon.job_done().result
    assert isinstance(result, ac.TaskResult)
    assert result.episodes == 1 and result.adapter_version == version
    ended = ac.ComputeEnd(pid=pid, round=1, phase="train", outcome="replied")
    assert request(daemon.socket, ended).released
    last = daemon.status().report.last_round
    assert last is not None and (last.round, last.outcome) == (1, "trained")

    assert "now running the base policy" in daemon.cli("rollback")
    wait_until(lambda: daemon.status().in_use is None, 30, "the base in use again")

    # A round's process that dies holding the compute does not block the agent forever.
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert request(daemon.socket, ac.ComputeBegin(pid=dead.pid, round=2, phase="train")).granted
    wait_until(lambda: daemon.status().report.state == "idle", 10, "the dead round's lease reaped")
    last = daemon.status().report.last_round
    assert last is not None and (last.round, last.outcome) == (2, "dropped")
    assert last.reason is not None and "died" in last.reason
    assert "last round    2 (train) dropped" in daemon.cli("status")


def test_sigterm_while_recording_keeps_the_episodes_and_exits_0(
    daemon: Any, systemd: FakeSystemd
) -> None:
    systemd.until("READY=1", timeout_s=180)
    request(daemon.socket, ac.Record(episodes=50))
    wait_until(lambda: daemon.status().report.episodes_total >= 1, 120, "a recorded episode")

    # A federated round gives up after train-wait-s while the arm records (the hub drops it).
    root = daemon.config.dataset_root(load_robot_config(daemon.config.robot_config))
    node = NodeSettings(
        agent_id="arm-01", data_root=root, control_socket=str(daemon.socket), train_wait_s=1.5
    )
    refused = r"busy for 2 s \(the arm is recording\); skipping round 3"
    with pytest.raises(RuntimeError, match=refused), compute_permission(node, 3, "train"):
        pytest.fail("the round trained while the arm was recording")
    last = daemon.status().report.last_round
    assert last is not None and (last.round, last.outcome) == (3, "skipped")

    systemd.during(0.1)  # room in its queue (systemd reads at once; this fake only now)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0, (daemon.rig.root / "daemon.stderr").read_text()[-2000:]
    systemd.until("STOPPING=1", timeout_s=5)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["total_episodes"] >= 1
    assert not Path(daemon.socket).exists()  # the control socket is gone with the daemon
    with pytest.raises(ControlError, match="no daemon"):
        request(daemon.socket, ac.Status())
