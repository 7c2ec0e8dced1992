"""The parts of ``zk0 bench distribution``: a hub process of its own, agents many to a process,
and the full-size versions it publishes (``AdapterMaker``).

::

    bench process ──Pipe──> hub process (DistributionServer; its CPU and peak RSS are its own)
         │                      │ XPUB announces, ROUTER fetches (CURVE)
         │                      ▼
         └──Queue<── worker processes, each ``agents_per_process`` real AdapterSubscribers on
                     one ZeroMQ context: announce, status, fetch, verify, store, switch

Each worker reports (agent, version, applied at, bytes so far) from the subscriber's
``on_new_version`` callback; ``time.monotonic`` is one clock for every process on the host.
"""

from __future__ import annotations

import multiprocessing
import os
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
    """Several agents sharing one ZeroMQ context (one I/O thread, not one per agent: a thousand
    agents on two cores); reports every version each one applies."""
    import zmq

    from zk0.agent.distribution.subscriber import AdapterSubscriber, SubscriberOptions
    from zk0.shared.config import AgentKeys, HubAddress
    from zk0.shared.processes import raise_open_files_limit

    _quiet_logs()
    # libzmq's default of 1,023 sockets per context holds about 170 agents, and an eventfd per
    # socket plus two TCP connections per agent in 1,024 open files (the default) about 120.
    sockets = SOCKETS_PER_AGENT * len(specs) + 64
    raise_open_files_limit(2 * sockets, needed=2 * sockets)
    context: zmq.Context[Any] = zmq.Context(io_threads=1)
    context.set(zmq.MAX_SOCKETS, sockets)
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
            context=context,
        )
        subscribers.append(subscriber)
    for subscriber in subscribers:
        subscriber.start()
    stop.wait()
    for subscriber in subscribers:
        subscriber.stop()
    context.term()


def _usage() -> dict[str, float]:
    """This process's peak resident memory so far (its CPU seconds: ``cpu_seconds``).

    The peak is ``VmHWM``, not ``ru_maxrss``: Linux carries ``ru_maxrss`` across the exec of a
    spawned child, so it would report the bench process's own peak at the fork."""
    status = Path("/proc/self/status").read_text()
    peak_kb = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")
    )
    return {"peak_rss_mb": peak_kb / 1024}


def hub_process(
    store_root: str, keys: dict[str, str] | None, heartbeat_s: float, conn: Any
) -> None:
    """A hub's DistributionServer, driven over ``conn``: ("publish", v), ("usage",), ("stop",)."""
    from zk0.hub.distribution import DistributionServer
    from zk0.shared.config import HubKeys
    from zk0.shared.processes import raise_open_files_limit
    from zk0.shared.store import AdapterStore

    _quiet_logs()
    raise_open_files_limit()  # as ``zk0-hub run`` does
    hub_keys = HubKeys.model_validate(keys) if keys else None
    server = DistributionServer(
        AdapterStore(Path(store_root)),
        keys=hub_keys,
        insecure=hub_keys is None,
        heartbeat_s=heartbeat_s,
    ).start()
    conn.send((server.publish_port, server.fetch_port))
    try:
        while True:
            command, *args = conn.recv()
            if command == "publish":
                server.publish(args[0])
                conn.send(None)
            elif command == "usage":
                conn.send({**_usage(), "dropped_requests": server.replies.dropped})
            else:
                break
    finally:
        server.stop()
        conn.send(_usage())


class Hub:
    """The bench's handle on its hub process."""

    def __init__(self, store_root: Path, keys: dict[str, str] | None, heartbeat_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=hub_process, args=(str(store_root), keys, heartbeat_s, child), daemon=True
        )
        self.process.start()
        if not self._conn.poll(60):
            raise TimeoutError("the bench's hub process did not start within 60 s")
        self.publish_port, self.fetch_port = self._conn.recv()

    def _ask(self, *command: Any) -> Any:
        self._conn.send(command)
        if not self._conn.poll(60):
            raise TimeoutError(f"the bench's hub process did not answer {command[0]!r} in 60 s")
        return self._conn.recv()

    def publish(self, version: int) -> None:
        self._ask("publish", version)

    def usage(self) -> dict[str, float]:
        return dict(self._ask("usage"))

    def stop(self) -> dict[str, float]:
        usage = dict(self._ask("stop"))
        self.process.join(30)
        return usage


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds of these processes so far (``/proc/<pid>/stat``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks


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


class AdapterMaker:
    """Full-size LoRA adapters with fresh random values, saved as real artifacts."""

    def __init__(self, robot_config: str, wire_encoding: str = "bf16") -> None:
        import torch
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

        from zk0.shared.config import load_robot_config
        from zk0.shared.features import PolicyFeatures
        from zk0.shared.lora import LoraSpec, apply_lora
        from zk0.shared.policy_factory import (
            GENERATED_BASES,
            BaseRef,
            _ensure_backbone,
            _recipe_digest,
            smolvla_config,
        )

        features = PolicyFeatures.from_robot_config(load_robot_config(robot_config))
        base = GENERATED_BASES["smolvla-arch"]
        config = smolvla_config(
            _ensure_backbone(base.backbone), features, base.smolvla_overrides, "cpu"
        )
        with torch.device("meta"):  # shapes only: the 451M base weights are never initialized
            policy = SmolVLAPolicy(config)
        self.lora = LoraSpec()
        self.peft_model = apply_lora(policy, self.lora).to_empty(device="cpu")
        digest = _recipe_digest(base, features)[:16]
        self.base = BaseRef("smolvla-arch", "smolvla-arch", f"recipe:smolvla-arch-{digest}")
        self._generator = torch.Generator().manual_seed(0)
        self.wire_encoding = wire_encoding

    def add_version(self, store: Any) -> int:
        """A new version; with the int8 encoding (after the first), written as the hub's
        ``Publisher`` writes it: its parent plus the int8 delta kept beside the store."""
        import torch

        from zk0.shared import wire_delta
        from zk0.shared.artifact import load_arrays, save_adapter, save_adapter_arrays
        from zk0.shared.lora import adapter_state

        with torch.no_grad():
            for name, param in self.peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=self._generator) * 0.01)
        parent = store.latest_version()
        if self.wire_encoding == "bf16" or parent is None:
            with store.allocate() as (version, path):
                save_adapter(self.peft_model, path, version=version, base=self.base, lora=self.lora)
            return int(version)
        before = load_arrays(store.path(parent))
        target = {k: v.numpy() for k, v in adapter_state(self.peft_model).items()}
        delta = wire_delta.encode(before, target)
        with store.allocate() as (version, path):
            tensors = wire_delta.apply(before, delta)
            save_adapter_arrays(
                store.path(parent), path, tensors, version=version, parent_version=parent
            )
        wire_delta.save_delta(store.root, (parent, store.path(parent)), (version, path), delta)
        return int(version)
