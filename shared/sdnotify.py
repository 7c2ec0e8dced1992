"""Running under systemd: readiness and watchdog notifications, service folders, clean SIGTERM.

No dependency: ``sd_notify`` is one datagram to the ``AF_UNIX`` socket in ``$NOTIFY_SOCKET``
(a path, or an abstract name written ``@name``). Outside systemd that variable is unset and
every call here is a no-op, so the daemons call them unconditionally::

    stop = handle_sigterm()                   # SIGTERM -> SystemExit(0): `finally` blocks run
    logs, state = service_dirs(Path("outputs"), Path("outputs/state"))
    watchdog = Watchdog.from_env()
    try:
        start_everything()
        notify(READY=1, STATUS="serving")
        while not stop.is_set():
            do_one_bounded_step()
            watchdog.progress()               # pings only while the loop keeps coming round
    finally:
        stop_everything()

The watchdog pings ``WATCHDOG=1`` from the loop itself, at most every half ``$WATCHDOG_USEC``:
a loop that hangs stops the pings, and systemd kills and restarts the service. Every step of
the loop must therefore finish within half of the unit's ``WatchdogSec=``; run longer work (a
federated round, an episode) in threads the loop supervises. systemd's watchdog kill is
SIGABRT: call ``faulthandler.enable()`` at start-up and every thread's stack, showing where the
loop hung, lands in the journal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

from loguru import logger

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
LOGS_DIRECTORY_ENV = "LOGS_DIRECTORY"
STATE_DIRECTORY_ENV = "STATE_DIRECTORY"
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"
#: The units' ``LoadCredential=keys:/etc/zk0/keys`` names each file ``keys_<file name>``.
CREDENTIAL_PREFIX = "keys_"

_warned_send_failure = False


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock addresses and the like: not for us


def _send(fields: dict[str, str | int]) -> bool:
    """One datagram to systemd; False if there is none to send it to. Raises OSError."""
    address = _address(os.environ.get(NOTIFY_SOCKET_ENV, ""))
    if not fields or address is None:
        return False
    lines = (f"{key}={str(value).replace(chr(10), ' ')}\n" for key, value in fields.items())
    # Non-blocking: a service manager that stopped reading (its queue holds only
    # net.unix.max_dgram_qlen datagrams) must not stall the loop whose progress we report.
    kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.sendto("".join(lines).encode(), address)
    return True


def notify(**fields: str | int) -> bool:
    """Send ``KEY=value`` lines (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``)
    to the service manager. True if a datagram went out; False outside systemd or on error."""
    global _warned_send_failure
    try:
        return _send(fields)
    except OSError as error:
        if not _warned_send_failure:  # once: a daemon must not die or spam over this
            logger.warning("sd_notify to {} failed: {}", os.environ.get(NOTIFY_SOCKET_ENV), error)
            _warned_send_failure = True
        return False


def watchdog_interval_s() -> float | None:
    """The watchdog timeout systemd set for this process (``WatchdogSec=``), or None."""
    usec = os.environ.get(WATCHDOG_USEC_ENV, "")
    pid = os.environ.get(WATCHDOG_PID_ENV, "")
    if pid and pid != str(os.getpid()):
        return None  # inherited from a parent: the watchdog is not ours
    try:
        timeout_s = int(usec) / 1e6
    except ValueError:
        return None
    return timeout_s if timeout_s > 0 else None


class Watchdog:
    """``WATCHDOG=1`` tied to a main loop's progress: call :meth:`progress` once per iteration.

    It pings when at least ``timeout_s / 2`` have passed since the last ping, so pings stop
    as soon as the loop stops coming round; systemd then kills the service after
    ``WatchdogSec=``. Disabled (every call a no-op) when systemd set no watchdog.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.ping_every_s = timeout_s / 2 if timeout_s else None
        self._last_ping: float | None = None
        self._lock = threading.Lock()
        self.pings = 0

    @classmethod
    def from_env(cls) -> Watchdog:
        return cls(watchdog_interval_s())

    @property
    def enabled(self) -> bool:
        return self.ping_every_s is not None

    def progress(self) -> bool:
        """The loop went round once more; True if that sent a ping."""
        if self.ping_every_s is None:
            return False
        now = time.monotonic()
        with self._lock:
            if self._last_ping is not None and now - self._last_ping < self.ping_every_s:
                return False
            self._last_ping = now
        if notify(WATCHDOG=1):
            self.pings += 1
            return True
        return False


def _first_dir(env: str, default: Path) -> Path:
    # systemd joins several directories of one kind with ":"; the first is the unit's own.
    value = os.environ.get(env, "").split(":")[0]
    return Path(value) if value else Path(default)


def service_dirs(default_logs: Path, default_state: Path) -> tuple[Path, Path]:
    """(logs, state) folders: systemd's ``LogsDirectory=``/``StateDirectory=`` when it set
    them (``/var/log/zk0-hub``, ``/var/lib/zk0-hub``), else the defaults."""
    return _first_dir(LOGS_DIRECTORY_ENV, default_logs), _first_dir(
        STATE_DIRECTORY_ENV, default_state
    )


def credential_path(configured: Path) -> Path:
    """Where to read a key file a config names: systemd's copy when it handed one over, else
    ``configured``.

    The units load every file of ``/etc/zk0/keys/`` (root only) with
    ``LoadCredential=keys:/etc/zk0/keys``, which systemd names ``keys_<file name>`` in
    ``$CREDENTIALS_DIRECTORY``; a single ``LoadCredential=<file name>:...`` works too. The
    service user can read only those copies (0400), so every key path goes through here.
    """
    folder = os.environ.get(CREDENTIALS_DIRECTORY_ENV, "")
    if folder:
        name = Path(configured).name
        for candidate in (Path(folder) / f"{CREDENTIAL_PREFIX}{name}", Path(folder) / name):
            if candidate.is_file():
                return candidate
    return Path(configured)


def handle_sigterm(*, raise_exit: bool = True) -> threading.Event:
    """Turn SIGTERM into a clean shutdown; returns an event set when it arrives.

    Python's default SIGTERM disposition kills the process without running ``finally``
    blocks. This handler sends ``STOPPING=1``, sets the event and (with ``raise_exit``) raises
    ``SystemExit(0)`` in the main thread once, so the code in progress unwinds through its
    ``finally`` blocks and the process exits 0 (a clean stop for systemd, no restart). Further
    SIGTERMs during the clean-up only set the event again: the clean-up is not interrupted,
    and systemd SIGKILLs whatever is left after ``TimeoutStopSec=``. Call from the main
    thread; loops that poll ``event.is_set()`` may pass ``raise_exit=False``.
    """
    stop = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        first = not stop.is_set()
        stop.set()
        if not first:
            return
        # No logging here: the signal may have interrupted a logging call holding its lock.
        with contextlib.suppress(OSError):
            _send({"STOPPING": 1, "STATUS": "stopping (SIGTERM)"})
        if raise_exit:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    return stop
