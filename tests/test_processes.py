"""zk0's one supervisor (``zk0.shared.processes.Supervised``): readiness, a delayed first start,
restarts with a back-off and the reason, and a stop that ends the child; and the open-files
limit the daemons raise for themselves."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_until
from zk0.shared.processes import ManagedProcess, Supervised, process_alive


def _child(tmp_path: Path, code: str) -> ManagedProcess:
    argv = [sys.executable, "-c", code]
    return ManagedProcess("child", argv, {}, tmp_path / "child.log")


def test_a_child_is_up_once_ready_and_restarted_with_the_reason_when_it_exits(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "ready"
    code = (
        f"import pathlib, time; pathlib.Path({str(flag)!r}).touch(); time.sleep(0.5); print('bye')"
    )
    supervised = Supervised(
        lambda: _child(tmp_path, code), ready=flag.exists, min_backoff_s=0.2, max_backoff_s=0.4
    )
    supervised.start(wait=True)
    assert supervised.up and supervised.pid is not None and supervised.restarts == 0
    wait_until(lambda: (supervised.check(), supervised.state == "down")[1], 10, "the exit")
    assert supervised.last_exit == "exited with 0: bye"
    flag.unlink()
    wait_until(lambda: (supervised.check(), supervised.restarts == 1)[1], 10, "a restart")
    wait_until(lambda: (supervised.check(), supervised.up)[1], 10, "ready again")
    supervised.stop()
    assert supervised.state == "down" and supervised.pid is None


def test_a_delayed_first_start_is_no_restart(tmp_path: Path) -> None:
    supervised = Supervised(lambda: _child(tmp_path, "import time; time.sleep(30)"))
    started = time.monotonic()
    supervised.start(delay_s=0.5)
    supervised.check()
    assert supervised.child is None and not supervised.running
    wait_until(lambda: (supervised.check(), supervised.up)[1], 10, "the delayed start")
    assert time.monotonic() - started >= 0.5 and supervised.restarts == 0
    pid = supervised.pid
    assert pid is not None
    supervised.stop()
    assert not process_alive(pid)


def test_a_child_that_never_gets_ready_fails_the_first_start_in_one_line(tmp_path: Path) -> None:
    supervised = Supervised(
        lambda: _child(tmp_path, "import time; time.sleep(30)"),
        ready=lambda: False,
        start_timeout_s=0.5,
    )
    with pytest.raises(RuntimeError, match=r"^child did not start \(not ready within 0.5 s\)$"):
        supervised.start(wait=True)
    assert not supervised.running


def test_a_daemon_started_at_systemds_1024_open_files_raises_its_limit_for_a_large_fleet() -> None:
    code = (
        "import resource; from zk0.shared.processes import raise_open_files_limit;"
        "print(raise_open_files_limit(4096), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def start_at_1024() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))

    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=start_at_1024, capture_output=True, text=True
    )
    expected = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    assert out.stdout.split() == [str(expected), str(expected)], out.stderr
