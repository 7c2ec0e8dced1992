"""The hub side of adapter distribution (protocol: ``zk0/shared/protocol.md``).

``DistributionServer`` runs in its own thread with its own ZeroMQ context:

* an XPUB socket announces the store's current version on every publish, to every new
  subscriber and every heartbeat (XPUB rather than PUB so that late joiners get the state at
  once and junk sent upstream is seen and logged);
* a ROUTER socket answers statuses with the latest version and serves manifests and chunks of
  any stored version (``zk0.hub.serving``), with a bounded queue per connection: an agent that
  does not read its replies has its requests dropped, never buffered (``zk0.hub.replies``);
* CURVE on both, with a ZAP handler on the same context that admits only keys in the live
  allow-list; each ROUTER message's ZAP User-Id is checked again, so removing a key cuts an
  agent off without a restart (the XPUB is rebound so its subscription is dropped too).

The server follows the store's ``current.json``: a federated round (in this process or another)
or an operator's ``zk0-hub adapters promote`` is announced within a loop tick.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth.thread
from loguru import logger

from zk0.hub.fleet import FLEET_FILE, AgentRecord, FleetTable
from zk0.hub.gate_keeper import GateKeeper
from zk0.hub.replies import BATCH, ReplyRouter, bound_queues, user_id
from zk0.hub.serving import FaultLog, FetchService, ServedVersion, VersionCache, ZapPolicy
from zk0.shared.artifact import Manifest
from zk0.shared.config import CanaryConfig, HubConfig, HubKeys
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.keys import (
    AllowList,
    KeyFileError,
    load_keypair,
    load_public_key,
    require_curve,
)
from zk0.shared.distribution.limits import DistributionLimits
from zk0.shared.distribution.liveness import detect_dead_peers
from zk0.shared.store import CURRENT, AdapterStore

_LOOP_TICK_S = 0.2
_BIND_RETRY_S = 3.0


class DistributionError(ValueError):
    """The server cannot start (e.g. its port is taken); the message is one line."""


class DistributionServer:
    def __init__(
        self,
        store: AdapterStore,
        *,
        keys: HubKeys | None,
        bind_host: str = "127.0.0.1",
        publish_port: int = 0,
        fetch_port: int = 0,
        heartbeat_s: float = 1.0,
        insecure: bool = False,
        fleet_file: Path | None = None,
        limits: DistributionLimits | None = None,
        canary: CanaryConfig | None = None,
    ) -> None:
        """Port 0 picks a free port (see ``publish_port``/``fetch_port`` after ``start``);
        ``limits`` bound the ROUTER's queues per connection (default ``DistributionLimits()``);
        ``insecure`` (no CURVE) is for the benchmark's comparison only."""
        if keys is None and not insecure:
            raise ValueError("the hub config has no keys: section; CURVE keys are required")
        self.store, self.keys = store, keys
        self.bind_host, self.heartbeat_s = bind_host, heartbeat_s
        self.publish_port, self.fetch_port = publish_port, fetch_port
        self.hub_id = secrets.token_hex(8)
        self.faults = FaultLog()
        self.fleet = FleetTable(fleet_file or store.root / FLEET_FILE, heartbeat_s)
        self.allow_list = AllowList(keys.allow_list_dir) if keys else None
        self.cache = VersionCache(store)
        #: Canary rollout (``canary:`` in hub.yaml): None without canaries.
        self.gates = GateKeeper(store, canary, self.fleet) if canary and canary.enabled else None
        self.limits = limits or DistributionLimits()
        self.service = FetchService(
            self.cache,
            self.fleet,
            self.faults,
            self.allow_list,
            self._latest_for,
            self.gates.may_fetch if self.gates is not None else None,
            self.limits.max_downloads,
        )
        self.replies = ReplyRouter(self.service, self.faults, self.limits, curve=keys is not None)
        self._announced: ServedVersion | None = None
        self._current_stamp: tuple[int, int, int] | None = None
        self._admitted: dict[bytes, str] = {}
        self._seq = 0
        self._stop = threading.Event()
        self._wake_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self._sockets: dict[str, zmq.Socket[bytes]] = {}

    @classmethod
    def from_config(cls, config: HubConfig, keys: HubKeys | None = None) -> DistributionServer:
        """The server ``config`` describes; ``keys`` in place of its own (e.g. the paths
        systemd handed over as credentials)."""
        return cls(
            AdapterStore(config.store_root),
            keys=keys or config.keys,
            bind_host=config.bind_host,
            publish_port=config.publish_port,
            fetch_port=config.fetch_port,
            heartbeat_s=config.heartbeat_s,
            limits=config.distribution_limits,
            canary=config.canary,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> DistributionServer:
        """Check keys, bind both sockets and start serving; fails with one line if it cannot."""
        self._stop.clear()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            if self.keys is not None:
                self._start_auth(self.keys)
            else:
                logger.warning("adapter distribution WITHOUT CURVE: plain text, no authentication")
            self._sockets["router"] = self._bind(zmq.ROUTER, self.fetch_port)
            self.fetch_port = self._port(self._sockets["router"])
            self._sockets["xpub"] = self._bind(zmq.XPUB, self.publish_port)
            self.publish_port = self._port(self._sockets["xpub"])
            wake = f"inproc://zk0-wake-{self.hub_id}"
            self._sockets["wake_rx"] = self._ctx.socket(zmq.PAIR)
            self._sockets["wake_rx"].bind(wake)
            self._sockets["wake_tx"] = self._ctx.socket(zmq.PAIR)
            self._sockets["wake_tx"].connect(wake)
        except BaseException:
            self._close()
            raise
        self._check_current()
        self._thread = threading.Thread(target=self._run, name="zk0-distribution", daemon=True)
        self._thread.start()
        logger.info(
            "distribution on {}: publish port {}, fetch port {}, heartbeat {:g}s, {}",
            self.bind_host,
            self.publish_port,
            self.fetch_port,
            self.heartbeat_s,
            "CURVE" if self.keys else "plain",
        )
        return self

    def _start_auth(self, keys: HubKeys) -> None:
        assert self.allow_list is not None
        require_curve()
        self._pair = load_keypair(keys.curve_secret)
        if load_public_key(keys.curve_public) != self._pair.public:
            raise KeyFileError(f"{keys.curve_public}: not the public half of {keys.curve_secret}")
        if not keys.allow_list_dir.is_dir():
            raise KeyFileError(
                f"{keys.allow_list_dir}: no allow-list folder (zk0-hub keys add AGENT KEYFILE)"
            )
        self._auth = zmq.auth.thread.ThreadAuthenticator(self._ctx)  # same context as sockets
        self._auth.start()
        self._auth.configure_curve_callback("*", ZapPolicy(self.allow_list, self.faults))
        self._admitted = self.allow_list.admitted()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout_s)
        self._thread = None
        self.fleet.save(self._hub_summary())
        self._close()

    def __enter__(self) -> DistributionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()

    def _bind(self, kind: int, port: int, retry_s: float = _BIND_RETRY_S) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_REQUEST_BYTES)
        detect_dead_peers(sock)
        if kind == zmq.ROUTER:
            bound_queues(sock, self.limits)
        else:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every new subscriber, not just the first
        if self.keys is not None:
            sock.curve_server = True
            sock.curve_secretkey = self._pair.secret
            sock.curve_publickey = self._pair.public
        deadline = time.monotonic() + retry_s
        while True:
            try:
                sock.bind(f"tcp://{self.bind_host}:{port or '*'}")
                return sock
            except zmq.ZMQError as error:  # a previous hub's port may take a moment to free
                if error.errno != zmq.EADDRINUSE or not port or time.monotonic() > deadline:
                    sock.close(linger=0)
                    where = f"{self.bind_host}:{port}"
                    raise DistributionError(f"cannot listen on {where}: {error}") from None
                time.sleep(0.05)

    @staticmethod
    def _port(sock: zmq.Socket[bytes]) -> int:
        return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    def _wake(self) -> None:
        with self._wake_lock, contextlib.suppress(zmq.ZMQError, KeyError):
            self._sockets["wake_tx"].send(b"", zmq.NOBLOCK)

    # -- what callers use ------------------------------------------------------------------

    def publish(self, version: int) -> Manifest:
        """Make ``version`` current (after verifying it) and announce it now."""
        manifest = self.store.set_current(version)
        self._wake()
        return manifest

    def agents(self) -> list[AgentRecord]:
        """Per agent: key id, last seen, applied and in-use versions, sync and its report."""
        return self.fleet.records()

    def fleet_summary(self) -> dict[str, Any]:
        """How many agents are online, applied and run the current version; their episodes."""
        return self.fleet.summary(self.announced_version)

    @property
    def announced_version(self) -> int | None:
        return self._announced.version if self._announced else None

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for name in ("router", "xpub", "wake_rx"):
            poller.register(self._sockets[name], zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, min(next_beat - time.monotonic(), _LOOP_TICK_S))
            try:
                events = dict(poller.poll(int(timeout * 1000)))
                announce = False
                if self._sockets["wake_rx"] in events:
                    while self._sockets["wake_rx"].poll(0):
                        self._sockets["wake_rx"].recv()
                if self._sockets["router"] in events:
                    self.replies.drain(self._sockets["router"])
                if self._sockets.get("xpub") in events:
                    announce = self._drain_xpub()
                if self.gates is not None:
                    announce = self.gates.tick() or announce
                announce = self._check_current() or announce
                if self._check_allow_list() or "xpub" not in self._sockets:
                    announce = self._rebind_xpub(poller) or announce
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_s
                    announce = True
                    self.fleet.save_if_due(self._hub_summary())
                if announce:
                    self._announce()
            except Exception:  # one bad turn must never stop distribution to the fleet
                logger.exception("distribution loop error; continuing")
                time.sleep(0.05)

    def _offer[O: p.Offer](
        self, kind: type[O], served: ServedVersion | None = None, **gate: int
    ) -> O:
        """``kind`` naming ``served`` (default: the announced version), with ``gate`` fields."""
        served = served or self._announced
        return kind(
            hub=self.hub_id,
            seq=self._seq,
            heartbeat_s=self.heartbeat_s,
            version=served.version if served else None,
            artifact_id=served.artifact_id if served else None,
            size=served.size if served else None,
            base_id=served.manifest.base.id if served else None,
            withdrawn=self.gates.withdrawn if self.gates is not None else (),
            **gate,
        )

    def _latest_for(self, agent_id: str) -> p.Latest:
        """The reply to ``agent_id``'s status: the announce's content, or for a canary of an
        open gate the version under gate with the version to compare it with."""
        gate = self.gates.canary_offer(agent_id) if self.gates is not None else None
        served = self.cache.get(gate.version) if gate is not None else None
        if self.gates is None or gate is None or served is None:
            return self._offer(p.Latest)
        episodes = self.gates.config.min_episodes
        return self._offer(p.Latest, served, gate_baseline=gate.baseline, gate_episodes=episodes)

    def _announce(self) -> None:
        self._seq += 1
        frames = p.encode_announce(self._offer(p.Announce))
        with contextlib.suppress(zmq.Again, KeyError):
            self._sockets["xpub"].send_multipart(frames, zmq.NOBLOCK)

    def _hub_summary(self) -> dict[str, Any]:
        return {
            "hub_id": self.hub_id,
            **self.fleet_summary(),
            "faults": dict(self.faults.counts),
        }

    def _check_current(self) -> bool:
        """Follow the store's current pointer; True if a new version is to be announced."""
        try:
            info = (self.store.root / CURRENT).stat()
        except FileNotFoundError:
            return False
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        if stamp == self._current_stamp:
            return False
        self._current_stamp = stamp
        pointer = self.store.current()
        if pointer is None or (self._announced and self._announced.version == pointer.version):
            return False
        served = self.cache.get(pointer.version)
        if served is None or served.artifact_id != pointer.artifact_id:
            logger.error(
                "current version {} does not verify; still announcing {}",
                pointer.version,
                self.announced_version,
            )
            return False
        self._announced = served
        logger.info(
            "publishing version {} ({}…, {:,} bytes)",
            served.version,
            served.artifact_id[:12],
            served.size,
        )
        return True

    def _check_allow_list(self) -> bool:
        """Follow the allow-list; True if a key was removed (the XPUB must drop its subscriber)."""
        if self.allow_list is None:
            return False
        admitted = self.allow_list.admitted()
        if admitted == self._admitted:
            return False
        removed = set(self._admitted) - set(admitted)
        self._admitted = admitted
        for agent_id in self.fleet.mark_revoked(set(admitted.values())):
            logger.warning("agent {} is no longer in the allow-list: cut off", agent_id)
        return bool(removed)

    def _rebind_xpub(self, poller: zmq.Poller) -> bool:
        """Close and rebind the XPUB: every subscriber handshakes again, so ZAP drops removed
        keys; admitted agents reconnect by themselves. True once it is bound again."""
        old = self._sockets.pop("xpub", None)
        if old is not None:
            poller.unregister(old)
            old.close(linger=0)
        try:
            self._sockets["xpub"] = self._bind(zmq.XPUB, self.publish_port, retry_s=0.5)
        except DistributionError as error:
            logger.error("cannot rebind the publish socket ({}); retrying", error)
            return False
        poller.register(self._sockets["xpub"], zmq.POLLIN)
        return True

    def _drain_xpub(self) -> bool:
        """Upstream traffic: subscriptions (announce at once for the newcomer) or junk (a fault)."""
        announce = False
        for _ in range(BATCH):
            try:
                frames = self._sockets["xpub"].recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            first = frames[0].bytes
            if len(frames) == 1 and first[:1] == b"\x01":
                announce = True
            elif len(frames) != 1 or first[:1] != b"\x00":
                _, source = self.service.source(user_id(frames[0]))
                message = f"{len(frames)} unexpected frame(s) sent to the PUB socket"
                self.faults.record("publish", source, message)
        return announce
