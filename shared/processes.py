"""Child processes zk0 supervises (Flower's SuperLink and SuperNodes), started the same way.

Children get the venv's ``bin`` on PATH (Flower launches ``flwr-serverapp``,
``flwr-clientapp`` and ``flower-superexec`` by name), Flower's telemetry, update checks and
runtime dependency installation switched off, its SuperExec looking for work every 0.2 s, and
die with their parent (PR_SET_PDEATHSIG), so a killed daemon leaves no orphan holding ports.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
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
    # How often Flower's SuperExec looks for a message to start an app process for (default 1 s).
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.2"
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


#: Open files a daemon asks for, and below which it warns: a hub holds two TCP connections per
#: agent (announces and fetches) and libzmq an eventfd per socket, so 1,000 agents need over
#: 2,000 descriptors.
OPEN_FILES_WANTED, OPEN_FILES_NEEDED = 65536, 4096


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED, needed: int = OPEN_FILES_NEEDED) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards ``wanted`` (never above the hard limit, never
    lower); returns the soft limit now in force, and warns if it stays below ``needed``.
    systemd starts services at a soft limit of 1,024 and expects those that need more to raise
    it themselves (their units also set ``LimitNOFILE=``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        logger.warning("open files limited to {} (the hard limit); {} needed", soft, needed)
    return soft


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


def accepts(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=0.1):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 1, chars: int = 300) -> str:
    """The last non-empty line(s) of a log, shortened: why a child exited, in one line."""
    try:
        with path.open("rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - 8192))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Flower colours its log lines
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-chars:]


class Supervised:
    """A child kept running, as systemd's ``Restart=always`` would: zk0's one supervisor (the
    hub's SuperLink, the agent's SuperNode, the demo's daemons).

    ``make`` builds the :class:`ManagedProcess` for every start (a new free port, say).
    ``ready`` says whether a started child serves (say, accepts on its port; default: it runs);
    one not ready within ``start_timeout_s`` is stopped and counts as a failure. Restarts back
    off exponentially (``min_backoff_s`` doubling up to ``max_backoff_s``) so a child that
    cannot start does not spin; one that stayed up for ``healthy_s`` is forgiven its earlier
    failures. Stopping ends the child's whole process tree. The owner calls :meth:`check` from
    its loop: each call is one bounded step, never a wait::

        down --start--> starting --ready--> up --exits--> down --back-off--> starting ...
    """

    def __init__(
        self,
        make: Callable[[], ManagedProcess],
        ready: Callable[[], bool] | None = None,
        start_timeout_s: float = 60.0,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        healthy_s: float = 60.0,
    ) -> None:
        self.make, self.ready = make, ready or (lambda: True)
        self.start_timeout_s = start_timeout_s
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.healthy_s = healthy_s
        self.child: ManagedProcess | None = None
        self.state = "down"
        self.restarts = 0
        self.last_exit: str | None = None
        self._backoff_s = min_backoff_s
        self._since = 0.0  # when the current state began (monotonic)
        self._restart_at: float | None = None

    @property
    def up(self) -> bool:
        return self.state == "up"

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    @property
    def pid(self) -> int | None:
        process = self.child.process if self.child is not None else None
        return process.pid if process is not None and self.running else None

    def start(self, wait: bool = False, delay_s: float = 0.0) -> None:
        """The first start; with ``wait``, block until ready (RuntimeError with the child's last
        log line if it exits or is not ready within the start timeout); with ``delay_s``, not
        before that many seconds (``check`` starts it)."""
        if delay_s > 0:
            self._restart_at = time.monotonic() + delay_s
            return
        self._launch(time.monotonic())
        if not wait:
            return
        deadline = time.monotonic() + self.start_timeout_s
        while self.state == "starting" and time.monotonic() < deadline:
            time.sleep(0.1)
            self._progress(time.monotonic())
        if self.state != "up":
            assert self.child is not None
            self.stop()
            why = self.last_exit or f"not ready within {self.start_timeout_s:g} s"
            raise RuntimeError(f"{self.child.name} did not start ({why})")

    def check(self, now: float | None = None) -> None:
        """One step: notice an exit or readiness; restart once the back-off has passed."""
        now = time.monotonic() if now is None else now
        self._progress(now)
        if self.state == "down" and self._restart_at is not None and now >= self._restart_at:
            self.restarts += self.child is not None  # a delayed first start is no restart
            self._launch(now)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
        self.state, self._restart_at = "down", None

    def _launch(self, now: float) -> None:
        self.child = self.make()
        self.child.start()
        self.state, self._since, self._restart_at = "starting", now, None

    def _progress(self, now: float) -> None:
        child = self.child
        if child is None or self.state == "down":
            return
        process = child.process
        if process is not None and process.poll() is not None:
            tail = log_tail(child.log_path)
            self._failed(now, f"exited with {process.returncode}" + (f": {tail}" if tail else ""))
        elif self.state == "starting":
            if self.ready():
                self.state, self._since = "up", now
                logger.info("{} is up (pid {})", child.name, self.pid)
            elif now - self._since > self.start_timeout_s:
                child.stop()
                self._failed(now, f"not ready within {self.start_timeout_s:g} s")
        elif now - self._since >= self.healthy_s:
            self._backoff_s = self.min_backoff_s  # it recovered: the back-off starts over

    def _failed(self, now: float, reason: str) -> None:
        assert self.child is not None
        self.last_exit = reason
        self.state, self._since = "down", now
        self._restart_at = now + self._backoff_s
        logger.error(
            "{} {}; starting it again in {:.0f} s (log {})",
            self.child.name,
            reason,
            self._backoff_s,
            self.child.log_path,
        )
        self._backoff_s = min(self.max_backoff_s, self._backoff_s * 2)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children before grandchildren)."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent_of[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    found: list[int] = []
    frontier = [pid]
    while frontier:
        below = [child for child, parent in parent_of.items() if parent in frontier]
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


def process_age_s() -> float:
    """Seconds since this process started (its ``/proc`` start time against the uptime)."""
    after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started_s = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    return float(Path("/proc/uptime").read_text().split()[0]) - started_s


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
