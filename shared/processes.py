"""Child processes zk0 supervises (Flower's SuperLink and SuperNodes), started the same way.

Children get the venv's ``bin`` on PATH (Flower launches ``flwr-serverapp``,
``flwr-clientapp`` and ``flower-superexec`` by name), Flower's telemetry, update checks and
runtime dependency installation switched off, and die with their parent (PR_SET_PDEATHSIG),
so a killed daemon leaves no orphan holding ports.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

_PR_SET_PDEATHSIG = 1


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until something accepts on ``host:port``; fails early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"pid {process.pid} exited with {process.returncode} before listening"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout_s:.0f}s")


class ManagedProcess:
    """A named child process with its output in a log file; stops gracefully, then by force."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        log.close()
        logger.info("started {} (pid {}), log {}", self.name, self.process.pid, self.log_path)
        return self.process

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; then whatever it started and left behind
        (Flower's SuperExec, ServerApp and ClientApp processes), so that no orphan outlives it."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            below = descendants(self.process.pid)
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("{} ignored SIGTERM for {:.0f}s; killing it", self.name, timeout_s)
                self.process.kill()
                self.process.wait()
            end_processes(below)
        return self.process.returncode


class Supervised:
    """A child that is started again whenever it exits, as systemd's ``Restart=always`` would.

    ``make`` builds a fresh :class:`ManagedProcess` for every start (a new free port, say).
    Restarts back off exponentially (``min_backoff_s`` doubling up to ``max_backoff_s``) so a
    child that cannot start (its server is down) does not spin; a child that stayed up for
    ``healthy_s`` is forgiven its earlier failures. Call :meth:`check` from the owner's loop.
    """

    def __init__(
        self,
        make: Callable[[], ManagedProcess],
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        healthy_s: float = 60.0,
    ) -> None:
        self.make = make
        self.min_backoff_s, self.max_backoff_s, self.healthy_s = (
            min_backoff_s,
            max_backoff_s,
            healthy_s,
        )
        self.child: ManagedProcess | None = None
        self.restarts = 0
        self._backoff_s = min_backoff_s
        self._started_at = 0.0
        self._restart_at: float | None = None

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    def start(self) -> None:
        self.child = self.make()
        self.child.start()
        self._started_at = time.monotonic()
        self._restart_at = None

    def check(self) -> None:
        """Restart the child if it exited and its back-off has passed."""
        if self.child is None or self.child.running:
            return
        now = time.monotonic()
        if self._restart_at is None:
            code = self.child.process.returncode if self.child.process is not None else None
            if now - self._started_at >= self.healthy_s:
                self._backoff_s = self.min_backoff_s
            logger.warning(
                "{} exited with {}; restarting in {:.0f} s (log {})",
                self.child.name,
                code,
                self._backoff_s,
                self.child.log_path,
            )
            self._restart_at = now + self._backoff_s
            self._backoff_s = min(self.max_backoff_s, self._backoff_s * 2)
        elif now >= self._restart_at:
            self.restarts += 1
            self.start()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children before grandchildren)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    found: list[int] = []
    frontier = [pid]
    while frontier:
        below = [child for child, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def end_processes(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, to those of ``pids`` still alive."""
    alive = [pid for pid in pids if _signal(pid, signal.SIGTERM)]
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if process_alive(pid)]
    for pid in alive:
        logger.warning("pid {} ignored SIGTERM; killing it", pid)
        _signal(pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for a reaper that may be slow)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
