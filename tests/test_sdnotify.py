"""sd_notify as systemd sees it: a datagram socket we bind ourselves stands in for systemd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import FakeSystemd
from zk0.shared.sdnotify import (
    Watchdog,
    credential_path,
    handle_sigterm,
    notify,
    service_dirs,
)


def test_outside_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LOGS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    assert notify(READY=1) is False
    watchdog = Watchdog.from_env()
    assert not watchdog.enabled
    assert watchdog.progress() is False
    assert service_dirs(Path("outputs"), Path("state")) == (Path("outputs"), Path("state"))


def test_ready_and_status_reach_systemd(systemd: FakeSystemd) -> None:
    assert notify(READY=1, STATUS="serving v3 to 2 agents")
    assert systemd.receive(5) == ["READY=1", "STATUS=serving v3 to 2 agents"]
    # A status must stay one line: a newline would start a bogus field.
    assert notify(STATUS="line one\nSTOPPING=1")
    assert systemd.receive(5) == ["STATUS=line one STOPPING=1"]


def test_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSystemd(f"@zk0-test-{uuid.uuid4().hex}")
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    try:
        assert notify(READY=1)
        assert fake.receive(5) == ["READY=1"]
    finally:
        fake.close()


def test_unreachable_socket_does_not_break_the_daemon(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "gone.sock"))
    assert notify(READY=1) is False


def test_watchdog_pings_while_the_loop_progresses_then_stops(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2 -> ping every 0.1 s
    watchdog = Watchdog.from_env()
    assert watchdog.enabled
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # a loop going round every 5 ms for a second
        watchdog.progress()
        time.sleep(0.005)
    pings = systemd.during(0.2)
    # Rate-limited to half the timeout: about 10 pings, not one per iteration (~200).
    assert 3 <= pings.count("WATCHDOG=1") <= 12
    assert systemd.during(0.6) == []  # no progress, no ping


def test_watchdog_meant_for_another_process_is_ignored(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert not Watchdog.from_env().enabled


def test_systemd_directories_and_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGS_DIRECTORY", "/var/log/zk0-hub")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/zk0-hub:/var/lib/other")
    assert service_dirs(Path("outputs"), Path("state")) == (
        Path("/var/log/zk0-hub"),
        Path("/var/lib/zk0-hub"),
    )
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "keys_hub.key_secret").write_text("secret")  # LoadCredential=keys:DIR
    (credentials / "server.key").write_text("secret")  # LoadCredential=server.key:FILE
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    keys = Path("/etc/zk0/keys")
    assert credential_path(keys / "hub.key_secret") == credentials / "keys_hub.key_secret"
    assert credential_path(keys / "server.key") == credentials / "server.key"
    assert credential_path(keys / "other.key") == keys / "other.key"


def test_sigterm_runs_finally_blocks(systemd: FakeSystemd) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    stop = handle_sigterm()
    cleaned = False
    try:
        with pytest.raises(SystemExit) as exited:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted by the handler
            finally:
                cleaned = True
        assert exited.value.code == 0
        assert cleaned and stop.is_set()
        assert "STOPPING=1" in systemd.receive(5)
    finally:
        signal.signal(signal.SIGTERM, previous)


# A daemon-shaped child: READY, a main loop feeding the watchdog, then a hang inside the loop.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from zk0.shared.sdnotify import Watchdog, handle_sigterm, notify

    stop = handle_sigterm()
    watchdog = Watchdog.from_env()
    notify(READY=1, STATUS="running")
    try:
        deadline = time.monotonic() + 1.0
        while not stop.is_set():
            if time.monotonic() > deadline:
                notify(STATUS="hung")
                time.sleep(3600)  # stuck (a dead device, a lost lock): the loop stops
            watchdog.progress()
            time.sleep(0.01)
    finally:
        Path(sys.argv[1]).write_text("cleaned up")
    """
)


def test_a_hung_daemon_stops_pinging_and_still_stops_cleanly(
    systemd: FakeSystemd, tmp_path: Path
) -> None:
    marker = tmp_path / "finally.txt"
    env = dict(os.environ, NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="200000")
    env.pop("WATCHDOG_PID", None)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker)], env=env)
    try:
        assert systemd.until("READY=1", 30)[:2] == ["READY=1", "STATUS=running"]
        before_hang = systemd.until("STATUS=hung", 30)
        assert before_hang.count("WATCHDOG=1") >= 3  # ~10 expected over its 1 s loop
        assert systemd.during(1.0) == []  # hung: no ping for 5x the timeout
        assert child.poll() is None  # alive, so only the watchdog can tell
        # What systemd does on `systemctl stop`: SIGTERM, then wait TimeoutStopSec=.
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=20) == 0
        assert marker.read_text() == "cleaned up"
        assert "STOPPING=1" in systemd.until("STOPPING=1", 5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
