"""The hub daemon's SuperLink, kept up by its main loop.

The SuperLink is a child process started from the main thread (children die with the thread
that started them, ``PR_SET_PDEATHSIG``, and the main thread lives as long as the daemon) and
polled, never waited on, so the loop keeps answering its control socket and pinging the
watchdog. One that exits is started again after a back-off (1 s, doubling to 60 s; back to
1 s once it stayed up a minute), each time with the reason logged. Its database keeps
registered nodes and runs, and SuperNodes reconnect by themselves. Stopping it also ends what
it started (SuperExec, the ServerApp of an abandoned run).
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from loguru import logger

from zk0.hub.superlink import SuperLink, SuperLinkSettings

#: Addresses a server binds to that a client cannot dial; the hub's own CLI dials loopback.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
#: A SuperLink that stays up this long has recovered: its back-off starts over.
STABLE_S = 60.0
#: A restarted SuperLink that does not listen within this long is killed and tried again.
START_TIMEOUT_S = 60.0


def dial_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in WILDCARD_HOSTS else bind_host


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


class HubSuperLink(SuperLink):
    """The deployment SuperLink, dialled (by ``flwr``) on loopback when it binds a wildcard."""

    def __init__(self, settings: SuperLinkSettings, flwr_home: Path, log_dir: Path) -> None:
        super().__init__(settings, flwr_home, log_dir)
        self.dial_host = dial_host(settings.host)

    @property
    def address(self) -> str:
        return f"{self.dial_host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def pid(self) -> int | None:
        process = self.process.process
        return process.pid if process is not None else None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.1):
            return True
    except OSError:
        return False


class SuperLinkSupervisor:
    """Keeps one SuperLink up; :meth:`check` does one bounded step from the main loop."""

    def __init__(self, link: HubSuperLink) -> None:
        self.link = link
        self.state = "down"  # down -> starting -> up -> (exited) down -> starting ...
        self.restarts = 0
        self.last_exit: str | None = None
        self._failures = 0
        self._since = 0.0  # when the current state began (monotonic)
        self._restart_at: float | None = None

    @property
    def up(self) -> bool:
        return self.state == "up"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """The first start, blocking until it listens (before the daemon reports READY)."""
        if _accepts(self.link.dial_host, self.link.port):
            # Our SuperLink would fail to bind while the readiness check saw the other one.
            raise RuntimeError(f"{self.link.address}: another process listens there already")
        try:
            self.link.start(timeout_s)
        except (RuntimeError, TimeoutError) as error:
            self.link.stop()
            tail = log_tail(self.link.log_path)
            raise RuntimeError(
                f"the SuperLink did not start on {self.link.address} ({error})"
                + (f": {tail}" if tail else "")
            ) from None
        self.state, self._since = "up", time.monotonic()
        logger.info("SuperLink listening on {} (pid {})", self.link.address, self.link.pid)

    def check(self, now: float) -> None:
        process = self.link.process.process
        exited = process is not None and process.poll() is not None
        if self.state in ("up", "starting") and exited:
            assert process is not None
            tail = log_tail(self.link.log_path)
            self._failed(now, f"exited with {process.returncode}" + (f": {tail}" if tail else ""))
        elif self.state == "starting":
            if _accepts(self.link.dial_host, self.link.port):
                self.state, self._since = "up", now
                logger.info("SuperLink is back on {} (pid {})", self.link.address, self.link.pid)
            elif now - self._since > START_TIMEOUT_S:
                self.link.stop()
                self._failed(now, f"did not listen within {START_TIMEOUT_S:.0f} s")
        elif self.state == "up" and self._failures and now - self._since > STABLE_S:
            self._failures = 0
        if self.state == "down" and self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.link.process.start()
            self.state, self._since = "starting", now

    def _failed(self, now: float, reason: str) -> None:
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        self._failures += 1
        self.last_exit = reason
        self.state, self._since, self._restart_at = "down", now, now + delay
        logger.error("SuperLink {}; starting it again in {:.0f} s", reason, delay)

    def stop(self) -> None:
        """Stop the SuperLink and whatever it started (SuperExec, a ServerApp of an abandoned
        run: ``ManagedProcess.stop`` ends the whole tree)."""
        self.link.stop()
        self.state = "down"
