"""The processes of ``zk0 bench distribution``: a hub of its own, and agents many to a process.

::

    bench process ──Pipe──> hub process (DistributionServer; its CPU and peak RSS are its own)
         │                      │ XPUB announces, ROUTER fetches (CURVE)
         │                      ▼
         └──Queue<── worker processes, each ``agents_per_process`` real AdapterSubscribers on
                     its own ZeroMQ context: announce, status, fetch, verify, store, switch

Each worker reports (agent, version, applied at, bytes so far) from the subscriber's
``on_new_version`` callback; ``time.monotonic`` is one clock for every process on the host.
"""

from __future__ import annotations

import multiprocessing
import resource
import threading
import time
from pathlib import Path
from typing import Any

#: ZeroMQ sockets one subscriber opens: SUB and DEALER, and a monitor pair for each.
SOCKETS_PER_AGENT = 6


def _quiet_logs() -> None:
    from loguru import logger

    logger.remove()
    logger.add(lambda m: None, level="ERROR")


def agent_worker(specs: list[dict[str, Any]], queue: Any, stop: Any) -> None:
    """Several agents, each with its own ZeroMQ context as on a robot's PC (many DEALERs on one
    context's I/O thread crash libzmq 4.3.5 here: ``Assertion failed: _input_stopped``,
    zeromq/libzmq#3937); reports every version each one applies."""

    from zk0.agent.distribution.subscriber import AdapterSubscriber, SubscriberOptions
    from zk0.shared.config import AgentKeys, HubAddress
    from zk0.shared.processes import raise_open_files_limit

    _quiet_logs()
    # An eventfd per ZeroMQ socket and a TCP connection per SUB and DEALER: 1,024 open files
    # (the default soft limit) hold about 120 agents.
    raise_open_files_limit(2 * SOCKETS_PER_AGENT * len(specs) + 64)
    subscribers: list[AdapterSubscriber] = []

    def report(agent_id: str, index: int) -> Any:
        def on_new_version(version: int, folder: Path, manifest: Any) -> None:
            now = time.monotonic()
            status = subscribers[index].status()
            queue.put((agent_id, version, now, status.bytes_rx + status.bytes_tx))

        return on_new_version

    for index, spec in enumerate(specs):
        keys = AgentKeys(**spec["keys"]) if spec["keys"] else None
        subscriber = AdapterSubscriber(
            spec["agent_id"],
            Path(spec["store"]),
            HubAddress(**spec["hub"]),
            keys,
            on_new_version=report(spec["agent_id"], index),
            options=SubscriberOptions(keep_versions=2),  # what an agent's store retains
            insecure=keys is None,
        )
        subscribers.append(subscriber)
    for subscriber in subscribers:
        subscriber.start()
    stop.wait()
    for subscriber in subscribers:
        subscriber.stop()


def _usage() -> dict[str, float]:
    """This process's CPU seconds (every thread) and peak resident memory so far.

    The peak is ``VmHWM``, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across the exec of a
    spawned child, so it would report the bench process's own peak at the fork."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    status = Path("/proc/self/status").read_text()
    peak_kb = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")
    )
    return {"cpu_s": own.ru_utime + own.ru_stime, "peak_rss_mb": peak_kb / 1024}


def hub_process(store_root: str, keys: dict[str, str] | None, conn: Any) -> None:
    """A hub's DistributionServer, driven over ``conn``: ("publish", v), ("usage",), ("stop",)."""
    from zk0.hub.distribution import DistributionServer
    from zk0.shared.config import HubKeys
    from zk0.shared.processes import raise_open_files_limit
    from zk0.shared.store import AdapterStore

    _quiet_logs()
    raise_open_files_limit()  # as ``zk0-hub run`` does
    hub_keys = HubKeys.model_validate(keys) if keys else None
    server = DistributionServer(
        AdapterStore(Path(store_root)), keys=hub_keys, insecure=hub_keys is None
    ).start()
    conn.send((server.publish_port, server.fetch_port))
    try:
        while True:
            command, *args = conn.recv()
            if command == "publish":
                server.publish(args[0])
                conn.send(None)
            elif command == "usage":
                conn.send(_usage())
            else:
                break
    finally:
        server.stop()
        conn.send(_usage())


class Hub:
    """The bench's handle on its hub process."""

    def __init__(self, store_root: Path, keys: dict[str, str] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=hub_process, args=(str(store_root), keys, child), daemon=True
        )
        self.process.start()
        if not self._conn.poll(60):
            raise TimeoutError("the bench's hub process did not start within 60 s")
        self.publish_port, self.fetch_port = self._conn.recv()

    def _ask(self, *command: Any) -> Any:
        self._conn.send(command)
        return self._conn.recv()

    def publish(self, version: int) -> None:
        self._ask("publish", version)

    def usage(self) -> dict[str, float]:
        return dict(self._ask("usage"))

    def stop(self) -> dict[str, float]:
        usage = dict(self._ask("stop"))
        self.process.join(30)
        return usage


class SystemMemory:
    """Peak memory in use on the host (MemTotal - MemAvailable), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.before_gb = self.peak_gb = self.used_gb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def used_gb() -> float:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0])  # kB
        return (fields["MemTotal"] - fields["MemAvailable"]) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_gb = max(self.peak_gb, self.used_gb())

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"system_memory_before_gb": self.before_gb, "system_memory_peak_gb": self.peak_gb}
