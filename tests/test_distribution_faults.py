"""Distribution faults: agents SIGKILLed mid-transfer and mid-write, and a flood of junk frames.

The kill trials run the agent as a real process (``python -m zk0.agent.distribution``) with
test hooks that slow its transfer (small throttled chunks) and its install steps, so that the
kills land where they hurt.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq
from loguru import logger

from conftest import wait_until
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.keys import load_keypair, load_public_key
from zk0.shared.store import AdapterStore

TRIALS = 20
KILL_DURING_WRITE_EVERY = 5  # trials 4, 9, 14, 19: after the store write, before the switch
HOOKS = ["--chunk-bytes", "4096", "--credit", "2", "--throttle-s", "0.02"]


def _hooks(trial: int) -> list[str]:
    """Slow transfers always; slow install steps only where the kill must land in them."""
    write_trial = trial % KILL_DURING_WRITE_EVERY == KILL_DURING_WRITE_EVERY - 1
    return [*HOOKS, "--stage-delay-s", "0.2" if write_trial else "0"]


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class KillTrials:
    """One agent process, killed once per trial while it takes a new version, then restarted."""

    def __init__(self, rig: Any, server: Any) -> None:
        self.rig, self.server = rig, server
        rig.agent_config("arm-k", server)
        self.store = AdapterStore(rig.root / "agents" / "arm-k" / "data" / "adapters")
        self.incoming = self.store.root / "incoming"
        self.events = rig.root / "events.jsonl"
        self.rng = random.Random(7)
        self.landed = {"mid_transfer": 0, "mid_write": 0, "after_switch": 0}
        self.proc = self.spawn(0)

    def spawn(self, trial: int) -> Any:
        return self.rig.spawn_agent("arm-k", "--events", str(self.events), *_hooks(trial))

    def kill_while_taking(self, target: int, during_write: bool) -> None:
        if during_write:
            wait_until(lambda: self.store.path(target).is_dir(), what=f"v{target} to be stored")
        else:
            wait_until(
                lambda: any(f.stat().st_size for f in self.incoming.glob(f"v{target}-*/*")),
                what=f"v{target}'s first chunks",
            )
            time.sleep(self.rng.uniform(0.0, 0.25))
        self.proc.kill()
        self.proc.wait(timeout=30)

    def classify(self, target: int) -> int:
        """Where the kill landed; returns the version current at the kill."""
        pointer = self.store.current()
        assert pointer is not None
        partial = list(self.incoming.glob(f"v{target}-*"))
        if pointer.version == target:
            self.landed["after_switch"] += 1
        elif partial and not (partial[0] / "manifest.json").exists():  # written at the end
            self.landed["mid_transfer"] += 1
        else:
            self.landed["mid_write"] += 1
        return pointer.version

    def restart_and_converge(self, trial: int, target: int, was_current: int) -> None:
        seen = len(_events(self.events))
        self.proc = self.spawn(trial + 1)
        wait_until(
            lambda: any(e["version"] == target for e in _events(self.events)[seen:]),
            what=f"the restarted agent to take v{target}",
        )
        after_restart = _events(self.events)[seen:]
        assert after_restart[0]["version"] == was_current, "serves its version at once"
        assert after_restart[-1]["version"] == target
        for event in after_restart:
            assert event["artifact_id"] == self.rig.store.manifest(event["version"]).artifact_id


def test_sigkilled_agent_never_runs_a_partial_adapter_and_converges_after_restart(
    rig: Any,
) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    trials = KillTrials(rig, server)
    wait_until(lambda: (c := trials.store.current()) is not None and c.version == 0, what="v0")
    for trial in range(TRIALS):
        target = rig.new_version()
        server.publish(target)
        during_write = trial % KILL_DURING_WRITE_EVERY == KILL_DURING_WRITE_EVERY - 1
        trials.kill_while_taking(target, during_write)
        was_current = trials.classify(target)
        # What a restart loads is whole and exactly what the hub published (never partial).
        pointer, manifest = trials.store.load_current()
        assert pointer.version == was_current in (target - 1, target)
        assert manifest.artifact_id == rig.store.manifest(was_current).artifact_id
        trials.restart_and_converge(trial, target, was_current)
    logger.info("SIGKILL trials landed: {}", trials.landed)
    assert trials.landed["mid_transfer"] >= 15, trials.landed
    assert trials.landed["mid_write"] >= 1, trials.landed


def _junk_requests(rng: random.Random, count: int) -> list[list[bytes]]:
    """Frames an allowed but broken client might send: none of them a valid request."""
    good = {
        "p": p.PROTOCOL.version,
        "t": "get_chunk",
        "version": 0,
        "artifact_id": "0" * 64,
        "file": "adapter_model.safetensors",
        "offset": 0,
        "length": 16,
    }
    variants: list[dict[str, Any]] = [
        {**good, "p": "99.0"},
        {**good, "p": 1},  # a peer of protocol 1
        {**good, "t": "reboot"},
        {**good, "offset": -1},
        {**good, "length": 1 << 30},
        {**good, "file": "../../../etc/passwd"},
        {**good, "file": "manifest.json/.."},
        {**good, "version": True},
        {**good, "artifact_id": "zz"},
        {k: v for k, v in good.items() if k != "offset"},
        {
            "p": p.PROTOCOL.version,
            "t": "status",
            "agent_id": "arm-good",
            "applied": 99,
            "in_use": 99,
            "report": {"state": "idle"},
            "sync": "up_to_date",
        },  # claims another agent's id
        {
            "p": p.PROTOCOL.version,
            "t": "status",
            "agent_id": "Not An Id!",
            "applied": 0,
            "in_use": 0,
            "report": {"episodes_new": -5},
            "sync": "x",
        },
    ]
    out: list[list[bytes]] = []
    for i in range(count):
        kind = i % 5
        if kind == 0:
            out.append([rng.randbytes(rng.randint(0, 2000))])
        elif kind == 1:
            out.append([msgpack.packb([rng.random(), {"x": rng.randbytes(8)}, None])])
        elif kind == 2:
            out.append([msgpack.packb(rng.choice(variants))])
        elif kind == 3:
            out.append([rng.randbytes(rng.randint(1, 64)) for _ in range(rng.randint(2, 4))])
        else:
            out.append([b"\x80\xc1" + rng.randbytes(rng.randint(0, 100))])  # invalid msgpack
    return out


def _not_a_subscription(rng: random.Random) -> bytes:
    """Random bytes that do not start with 0 or 1 (the XSUB would send those as (un)subscribe)."""
    return bytes([rng.randint(2, 255)]) + rng.randbytes(rng.randint(0, 300))


def _connect(ctx: zmq.Context[Any], kind: int, port: int, rig: Any, agent: str) -> Any:
    keys = rig.root / "agents" / agent / "keys"
    pair = load_keypair(keys / f"{agent}.key_secret")
    sock = ctx.socket(kind)
    sock.curve_secretkey, sock.curve_publickey = pair.secret, pair.public
    sock.curve_serverkey = load_public_key(rig.hub_keys.curve_public)
    sock.linger = 0
    sock.sndtimeo = 10_000
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def test_hub_survives_1000_junk_frames_per_socket_and_keeps_serving(rig: Any) -> None:
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    server = rig.start_hub()
    server.publish(rig.new_version())
    good = rig.subscriber("arm-good", server)
    wait_until(lambda: good.status().applied == 0, what="version 0")
    rig.agent_config("mallory", server)  # admitted: the junk comes from an allowed client
    ctx: zmq.Context[Any] = zmq.Context()
    dealer = _connect(ctx, zmq.DEALER, server.fetch_port, rig, "mallory")
    xsub = _connect(ctx, zmq.XSUB, server.publish_port, rig, "mallory")
    rng = random.Random(3)
    try:
        xsub.send(b"\x01" + p.ANNOUNCE_TOPIC)  # an XSUB drops what it sends before it connects:
        assert xsub.poll(20_000), "no announce"  # the first announce proves the connection
        for i, frames in enumerate(_junk_requests(rng, 1000)):
            dealer.send_multipart(frames)
            junk = [_not_a_subscription(rng) for _ in range(1 + i % 2)]
            xsub.send_multipart(junk)
            if i == 500:
                server.publish(rig.new_version())  # mid-flood
        wait_until(
            lambda: (
                server.faults.counts.get("fetch", 0) >= 1000
                and server.faults.counts.get("publish", 0) >= 1000
            ),
            what="the hub to see every junk frame",
        )
        wait_until(lambda: good.status().applied == 1, what="the good agent to get version 1")

        def record() -> Any:
            return {r.agent_id: r for r in server.agents()}["arm-good"]

        # The hub hears the agent's status a moment after the agent applied the version.
        wait_until(lambda: record().applied != 0, what="the hub to hear arm-good's status")
        assert (record().applied, record().error) == (1, None)  # not the spoofed status's 99
        # The same client, asking properly, is still served (any stored version).
        while dealer.poll(500):  # first drop the error replies queued for it
            dealer.recv_multipart()
        manifest_of_0 = rig.store.manifest(0)
        request = p.GetManifest(version=0, artifact_id=manifest_of_0.artifact_id)
        dealer.send_multipart(p.encode(request))
        deadline = time.monotonic() + 20
        reply = None
        while time.monotonic() < deadline and not isinstance(reply, p.ManifestReply):
            if dealer.poll(1000):
                reply, _ = p.decode_reply(dealer.recv_multipart())
        assert (
            isinstance(reply, p.ManifestReply)
            and reply.manifest == rig.store.path(0).joinpath("manifest.json").read_bytes()
        )
    finally:
        dealer.close()
        xsub.close()
        ctx.term()
        logger.remove(sink)
    text = "\n".join(warnings)
    assert "malformed request" in text and "sent to the PUB socket" in text
