"""Bounded distribution (issue 13): what a hub may declare, what a client that does not read
may cost the hub. Real sockets with CURVE, a real hub store, in-process subscribers.

Memory is this process's RSS: the hub (or the agent) runs in a thread here, and the clients
that misbehave keep their own queues at one message, so what grows is the side under test.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zmq
from loguru import logger

from conftest import wait_until
from zk0.agent.distribution.subscriber import SubscriberOptions
from zk0.shared.artifact import ID_FILE, MANIFEST, Manifest, read_manifest
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.keys import load_keypair, load_public_key

MIB = 1024 * 1024
TIB = 1024 * 1024 * MIB
MEMORY_BUDGET = 50 * MIB


def rss_bytes() -> int:
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class PeakRss:
    """Samples this process's RSS every 10 ms in a thread; ``growth`` is peak minus start."""

    def __init__(self) -> None:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes()) - self.start


def with_extra_file(rig: Any, name: str, size: int) -> int:
    """Store a new version: a real adapter plus ``name``, ``size`` zero bytes as a sparse file
    (nothing written to disk); a valid artifact that verifies on the hub."""
    template = rig.templates[0]
    original = read_manifest(template).model_dump(mode="json")
    digest = hashlib.sha256()
    zeros = bytes(MIB)
    for _ in range(size // MIB):
        digest.update(zeros)
    digest.update(bytes(size % MIB))
    with rig.store.allocate() as (version, path):
        staging = path.with_name(f".{path.name}.building")
        staging.mkdir(parents=True)
        for file in original["files"]:
            shutil.copyfile(template / file, staging / file)
        with (staging / name).open("wb") as handle:
            handle.truncate(size)
        files = {**original["files"], name: {"sha256": digest.hexdigest(), "size": size}}
        manifest = Manifest.model_validate(
            {
                **original,
                "version": version,
                "parent_version": version - 1 if version else None,
                "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "files": files,
            }
        )
        (staging / MANIFEST).write_bytes(manifest.canonical_bytes())
        (staging / ID_FILE).write_text(manifest.artifact_id + "\n")
        staging.rename(path)
    return version


class ForgedHub:
    """Anyone holding the hub's key: a ROUTER that offers one forged version (a manifest it
    never has to back with bytes) and counts what the agent asks for."""

    def __init__(self, rig: Any, manifest: Manifest) -> None:
        self.manifest_bytes = manifest.canonical_bytes()
        size = len(self.manifest_bytes) + sum(f.size for f in manifest.files.values())
        self.offer = p.Latest(
            hub="0123456789abcdef",
            seq=1,
            heartbeat_s=0.2,
            version=manifest.version,
            artifact_id=manifest.artifact_id,
            size=size,
            base_id=manifest.base.id,
        )
        self.statuses: list[p.Status] = []
        self.manifest_requests = self.chunk_requests = 0
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._router, self.fetch_port = self._bind(rig, zmq.ROUTER)
        # It never announces: the agent learns of the version from the reply to its status.
        self._publisher, self.publish_port = self._bind(rig, zmq.PUB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _bind(self, rig: Any, kind: int) -> tuple[zmq.Socket[bytes], int]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        pair = load_keypair(rig.hub_keys.curve_secret)
        sock.curve_server = True
        sock.curve_secretkey, sock.curve_publickey = pair.secret, pair.public
        sock.linger = 0
        sock.bind("tcp://127.0.0.1:0")
        return sock, int(sock.last_endpoint.rsplit(b":", 1)[1])

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._router.poll(50):
                continue
            peer, *frames = self._router.recv_multipart()
            request = p.decode_request(frames)
            reply: p.Message | None = None
            if isinstance(request, p.Status):
                self.statuses.append(request)
                reply = self.offer
            elif isinstance(request, p.GetManifest):
                self.manifest_requests += 1
                reply = p.ManifestReply(
                    version=request.version,
                    artifact_id=request.artifact_id,
                    manifest=self.manifest_bytes,
                )
            else:
                self.chunk_requests += 1
            if reply is not None:
                self._router.send_multipart([peer, *p.encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._router.close()
        self._publisher.close()
        self._ctx.term()


def _forged(rig: Any, extra_files: dict[str, int]) -> Manifest:
    original = read_manifest(rig.templates[0]).model_dump(mode="json")
    files = dict(original["files"])
    for name, size in extra_files.items():
        files[name] = {"sha256": "0" * 64, "size": size}
    return Manifest.model_validate({**original, "version": 1, "files": files})


@pytest.mark.parametrize(
    ("declared", "reason"),
    [
        ({"weights.bin": 4 * TIB}, "declares 4,398,046,511,104 bytes"),
        ({f"part{i:02d}.bin": 1024 for i in range(40)}, "43 files"),
    ],
    ids=["a-4-TiB-file", "43-files"],
)
def test_a_manifest_over_the_limits_is_refused_before_any_chunk_is_requested(
    rig: Any, declared: dict[str, int], reason: str
) -> None:
    hub = ForgedHub(rig, _forged(rig, declared))
    try:
        memory = PeakRss()
        agent = rig.subscriber("arm-1", hub)
        wait_until(lambda: agent.status().error, timeout_s=20, what="the agent to refuse v1")
        error = agent.status().error
        assert error.startswith("refused v1: ") and reason in error, error
        assert "distribution_limits.max_" in error and "\n" not in error
        wait_until(
            lambda: any((s.error or "").startswith("refused v1") for s in hub.statuses),
            what="the refusal to reach the hub in a status",
        )
        seen = len(hub.statuses)
        time.sleep(1.5)  # heartbeats of 0.2 s (after the first, of 1 s): the agent's loop
        assert len(hub.statuses) >= seen + 3  # runs on, and asks for nothing more
        assert (hub.manifest_requests, hub.chunk_requests) == (1, 0)
        growth = memory.growth()
        logger.info(
            "agent memory growth refusing {}: {:.1f} MB", next(iter(declared)), growth / 1e6
        )
        assert growth < MEMORY_BUDGET
        assert agent.status().applied is None and agent.store.current() is None
        assert agent.store.versions() == [] and not list(agent.store.root.glob("incoming/*"))
    finally:
        hub.close()


def test_an_agent_keeps_no_more_chunk_requests_in_flight_than_its_credit(rig: Any) -> None:
    with pytest.raises(ValueError, match=r"credit 64 is outside 1 \.\. distribution_limits"):
        rig.subscriber("arm-greedy", rig.start_hub(), options=SubscriberOptions(credit=64))
    hub = ForgedHub(rig, _forged(rig, {"weights.bin": 4 * MIB}))  # 1,024 chunks of 4 KiB
    try:
        options = SubscriberOptions(chunk_bytes=4096, credit=8)
        rig.subscriber("arm-1", hub, options=options)
        wait_until(lambda: hub.chunk_requests, what="the first chunk requests")
        time.sleep(1.0)  # the hub answers none; the agent re-asks only after 3 s
        assert hub.chunk_requests == 8
    finally:
        hub.close()


def test_a_valid_artifact_with_an_extra_256_mib_file_is_refused_and_never_current(
    rig: Any,
) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    agent = rig.subscriber("arm-1", server)
    wait_until(lambda: agent.status().applied == 0, what="version 0")
    bloated = with_extra_file(rig, "extra.bin", 256 * MIB)
    served_before = server.service.bytes_served
    server.publish(bloated)  # the hub verifies it: a valid artifact
    wait_until(lambda: agent.status().error, timeout_s=30, what="the agent to refuse v1")
    error = agent.status().error
    assert error.startswith("refused v1: ") and "max_artifact_bytes (67,108,864)" in error, error
    wait_until(
        lambda: (r := {r.agent_id: r for r in server.agents()}.get("arm-1")) and r.error == error,
        what="the hub's fleet table to show the refusal",
    )
    assert agent.status().applied == 0 and agent.store.current().version == 0
    assert not agent.store.path(bloated).exists()
    manifest_size = len((rig.store.path(bloated) / MANIFEST).read_bytes())
    assert server.service.bytes_served - served_before == manifest_size  # not one chunk


def _flooder(rig: Any, server: Any, ctx: zmq.Context[Any]) -> zmq.Socket[bytes]:
    """An admitted agent's DEALER that sends but never reads (its own queue: one message)."""
    rig.agent_config("mallory", server)
    keys = rig.root / "agents" / "mallory" / "keys"
    pair = load_keypair(keys / "mallory.key_secret")
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.curve_secretkey, sock.curve_publickey = pair.secret, pair.public
    sock.curve_serverkey = load_public_key(rig.hub_keys.curve_public)
    sock.linger = 0
    sock.rcvhwm = 1
    sock.sndtimeo = 20_000
    sock.connect(f"tcp://127.0.0.1:{server.fetch_port}")
    return sock


def test_a_client_that_never_reads_10000_chunk_requests_is_cut_off_and_the_hub_stays_small(
    rig: Any,
) -> None:
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    server = rig.start_hub()
    served = with_extra_file(rig, "extra.bin", 4 * MIB)  # 1 MiB replies: the largest there are
    server.publish(served)
    good = rig.subscriber("arm-good", server)
    wait_until(lambda: good.status().applied == served, what="the honest agent to take v0")
    artifact_id = rig.store.manifest(served).artifact_id
    ctx: zmq.Context[Any] = zmq.Context()
    flooder = _flooder(rig, server, ctx)
    memory = PeakRss()
    started = time.monotonic()
    try:
        for i in range(10_000):
            request = p.GetChunk(
                version=served,
                artifact_id=artifact_id,
                file="extra.bin",
                offset=(i % 4) * MIB,
                length=MIB,
            )
            flooder.send_multipart(p.encode(request))
            if i == 5_000:
                server.publish(rig.new_version())  # mid-flood: the fleet is still served
        wait_until(
            lambda: server.replies.dropped >= 9_000, what="the hub to drop the unread requests"
        )
        wait_until(lambda: good.status().applied == served + 1, what="the honest agent's v1")
        flood_s = time.monotonic() - started
        growth = memory.growth()
    finally:
        flooder.close()
        ctx.term()
        logger.remove(sink)
    logger.info(
        "10,000 unread 1 MiB requests in {:.1f}s: {} dropped, hub memory growth {:.1f} MB",
        flood_s,
        server.replies.dropped,
        growth / 1e6,
    )
    assert growth < MEMORY_BUDGET
    assert any("agent mallory: does not read its replies" in w for w in warnings), warnings[:5]
    assert server.faults.counts["fetch"] >= 9_000
