"""The agent side of adapter distribution (protocol: ``zk0/shared/protocol.md``).

``AdapterSubscriber`` keeps an agent's adapter store on the hub's newest version:

* on start it hands its last verified version to the inference engine at once (no network);
* it reports ``applied`` (verified, stored, current) and, from the engine alone
  (``set_in_use``, the engine's ``on_version_in_use``), ``in_use``: the version that computed
  the engine's last chunk, never a guess from a hand-over;
* a SUB socket hears announces; a DEALER socket sends statuses (each answered with the latest
  version: the clone pattern's snapshot) and fetches manifests and chunks;
* a version is fetched on start, on every (re)connect, and whenever a higher one is seen; it is
  verified (artifact id, every file hash, tensor shapes, base id) before ``current`` switches,
  and versions at or below the current one are ignored (``zk0.agent.distribution.updater``);
* a hub silent for three heartbeats is marked so; when it speaks again the agent re-syncs;
* socket monitors turn CURVE failures (a refused key, a wrong hub key) into one log line;
* ``DistributionLimits`` bound what it takes and holds: a manifest over the size or file limit
  is refused before any chunk is asked for, the credit has a ceiling, and its sockets queue
  only a bounded number of incoming messages.

No torch here or in anything imported: many subscribers run per host in tests and benches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import zmq
from loguru import logger
from zmq.utils.monitor import recv_monitor_message

from zk0.agent.distribution.state import StatusBox, SubscriberOptions, SubscriberStatus
from zk0.agent.distribution.updater import BaseNorms, OnNewVersion, Updater
from zk0.shared.adapter_bounds import AdapterBounds, PolicyBaseNorms
from zk0.shared.agent_status import DATASET_STATS_EVERY_S, AgentReport
from zk0.shared.config import AgentConfig, AgentKeys, HubAddress
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.keys import KeyPair, load_keypair, load_public_key, require_curve
from zk0.shared.distribution.limits import DistributionLimits
from zk0.shared.distribution.liveness import detect_dead_peers
from zk0.shared.safetensors_file import TensorEntry
from zk0.shared.store import AdapterStore

__all__ = ["AdapterSubscriber", "OnNewVersion", "SubscriberOptions", "SubscriberStatus"]
ADAPTERS_DIR = "adapters"
_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
#: Sync states in which the hub has not (recently) answered.
_UNHEARD = ("starting", "hub_silent", "handshake_failed", "denied")
#: Announces queued on the SUB socket: each carries the whole state, so extra ones may drop.
_ANNOUNCE_QUEUE = 16
#: Replies queued on the DEALER beyond a full credit: latest and error replies to statuses.
_SPARE_REPLIES = 16
#: A periodic status that says nothing new is left out while another request reached the hub
#: within this many heartbeats (a queued agent's manifest asks, a download's chunk requests):
#: the hub counts any request as a sign of life and calls an agent offline after 3 heartbeats
#: + 1 s of silence. At a thousand agents most wait their turn for a minute or more, and their
#: statuses were about 3 % of the bytes of a 2.6 MB version.
_QUIET_HEARTBEATS = 2.5


class AdapterSubscriber:
    def __init__(
        self,
        agent_id: str,
        store_root: Path,
        hub: HubAddress,
        keys: AgentKeys | None,
        *,
        on_new_version: OnNewVersion | None = None,
        expected_base_id: str | None = None,
        expected_tensors: dict[str, TensorEntry] | None = None,
        options: SubscriberOptions | None = None,
        limits: DistributionLimits | None = None,
        insecure: bool = False,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        adapter_bounds: AdapterBounds | None = None,
        base_norms: BaseNorms | None = None,
    ) -> None:
        """``on_new_version`` runs in the caller's thread for the stored version (in ``start``),
        then in the subscriber's thread for each new one; ``limits`` bound what it fetches
        (default: ``DistributionLimits()``); ``insecure`` (no CURVE) is for the benchmark's
        comparison only. A version must keep ``adapter_bounds`` (default ``AdapterBounds()``),
        checked against ``base_norms`` (the base's weight norms; without it, only finite values
        and growth are checked)."""
        if keys is None and not insecure:
            raise ValueError("the agent config has no keys: section; CURVE keys are required")
        self.agent_id, self.hub, self.keys = agent_id, hub, keys
        self.options = options or SubscriberOptions()
        self.limits = limits or DistributionLimits()
        if not 1 <= self.options.credit <= self.limits.max_chunks_in_flight:
            raise ValueError(
                f"credit {self.options.credit} is outside 1 .. "
                f"distribution_limits.max_chunks_in_flight ({self.limits.max_chunks_in_flight})"
            )
        self._status = StatusBox(agent_id)
        self._dataset_sent_at = -DATASET_STATS_EVERY_S  # the first status carries them
        self._last_status: p.Status | None = None
        self._last_request_at = -float("inf")  # of a request other than a status
        self.updater = Updater(
            AdapterStore(store_root),
            self.options,
            self._status,
            self._send,
            self._send_status,
            on_new_version,
            expected_base_id,
            expected_tensors,
            bounds=adapter_bounds,
            base_norms=base_norms,
            limits=self.limits,
        )
        self._shared_context = context
        self._stopping = False
        self._thread: Any = None
        self._heartbeat_s = 1.0
        self._last_announce = 0.0
        self._logged: set[str] = set()

    @classmethod
    def from_config(cls, config: AgentConfig, **kwargs: Any) -> AdapterSubscriber:
        """The subscriber of the agent ``config`` describes; its store: ``<data_root>/adapters``."""
        store_root = config.data_root / ADAPTERS_DIR
        kwargs.setdefault("adapter_bounds", config.adapter_bounds)
        # The agent checks versions against the base it runs, read once when first needed.
        kwargs.setdefault("base_norms", PolicyBaseNorms(config.policy, config.robot_config))
        kwargs.setdefault("limits", config.distribution_limits)
        return cls(config.agent_id, store_root, config.hub, config.keys, **kwargs)

    @property
    def store(self) -> AdapterStore:
        return self.updater.store

    # -- what the agent uses -----------------------------------------------------------------

    def start(self) -> AdapterSubscriber:
        """Serve the last verified version at once, then connect and catch up in a thread."""
        import threading

        self._pair: KeyPair | None = None
        if self.keys is not None:
            require_curve()
            self._pair = load_keypair(self.keys.curve_secret)
            self._server_key = load_public_key(self.keys.hub_curve_public)
        self.updater.recover()
        self._thread = threading.Thread(
            target=self._run, name=f"zk0-sub-{self.agent_id}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> AdapterSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> SubscriberStatus:
        return self._status.get()

    def set_in_use(self, version: int | None) -> None:
        """The inference engine computed its last chunk with ``version`` (its
        ``on_version_in_use``): the only writer of ``in_use``."""
        self._status.update(in_use=version)

    def set_report(self, report: AgentReport) -> None:
        """What the agent does and the episodes it holds; the hub schedules rounds on it."""
        self._status.update(report=report)

    # -- sockets -----------------------------------------------------------------------------

    def _socket(self, kind: int, port: int, max_bytes: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, self.options.reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.options.reconnect_ivl_max_ms)
        detect_dead_peers(sock)
        if self._pair is not None:
            sock.curve_secretkey = self._pair.secret
            sock.curve_publickey = self._pair.public
            sock.curve_serverkey = self._server_key
        if kind == zmq.DEALER:
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no requests queued for a hub that is not there
            # A hub sends only what was asked for; beyond that libzmq stops reading the hub
            # (backpressure, nothing dropped), so a hostile hub cannot fill this agent's memory.
            queued = 2 * self.limits.max_chunks_in_flight + _SPARE_REPLIES
            sock.setsockopt(zmq.RCVHWM, queued)
        else:
            sock.setsockopt(zmq.RCVHWM, _ANNOUNCE_QUEUE)
            sock.setsockopt(zmq.SUBSCRIBE, p.ANNOUNCE_TOPIC)
        sock.connect(f"tcp://{self.hub.host}:{port}")
        return sock

    def _send(self, message: p.Message) -> bool:
        frames = p.encode(message)
        try:
            self._dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # not connected: the reconnect handshake resends what matters
            return False
        self._status.count(tx=sum(len(f) for f in frames))
        if not isinstance(message, p.Status):
            self._last_request_at = time.monotonic()
        return True

    def _send_status(self, periodic: bool = False) -> None:
        """The status, its report's dataset statistics on one status a minute (the hub keeps
        the last it received): the first sent, then one each ``DATASET_STATS_EVERY_S``. A
        ``periodic`` one (a heartbeat's) that says nothing new is left out while other
        requests show the hub this agent is there (``_QUIET_HEARTBEATS``)."""
        s = self._status.get()
        now = time.monotonic()
        due = s.report.dataset is not None and now - self._dataset_sent_at >= DATASET_STATS_EVERY_S
        status = p.Status(
            agent_id=self.agent_id,
            applied=s.applied,
            in_use=s.in_use,
            report=s.report.model_copy(update={"dataset": None}),
            sync=s.sync,
            error=s.error,
        )
        quiet = now - self._last_request_at < _QUIET_HEARTBEATS * self._heartbeat_s
        if periodic and quiet and not due and status == self._last_status:
            return
        sent = status.model_copy(update={"report": s.report}) if due else status
        if self._send(sent):
            self._last_status = status
            if due:
                self._dataset_sent_at = now

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        self._ctx = self._shared_context or zmq.Context()
        self._sub = self._socket(zmq.SUB, self.hub.publish_port, p.MAX_ANNOUNCE_BYTES)
        self._dealer = self._socket(zmq.DEALER, self.hub.fetch_port, p.MAX_REPLY_BYTES)
        monitors = {
            self._sub.get_monitor_socket(_MONITOR_EVENTS): "publish",
            self._dealer.get_monitor_socket(_MONITOR_EVENTS): "fetch",
        }
        poller = zmq.Poller()
        for sock in (self._sub, self._dealer, *monitors):
            poller.register(sock, zmq.POLLIN)
        next_status = 0.0
        try:
            while not self._stopping:
                try:
                    next_status = self._turn(poller, monitors, next_status)
                except Exception:  # a bad turn must not end distribution to this agent
                    logger.exception("subscriber loop error; continuing")
                    time.sleep(0.05)
        finally:
            self.updater.abandon("stopping")
            for sock in (self._sub, self._dealer):
                sock.disable_monitor()
            for sock in (*monitors, self._sub, self._dealer):
                sock.close(linger=0)
            if self._shared_context is None:
                self._ctx.term()

    def _turn(
        self, poller: zmq.Poller, monitors: dict[zmq.Socket[bytes], str], next_status: float
    ) -> float:
        """One pass of the loop; returns when the next status is due."""
        now = time.monotonic()
        if now >= next_status:
            self._send_status(periodic=next_status > 0.0)  # 0.0: at start, or a re-sync
            next_status = now + self._heartbeat_s
        timeout_ms = int(max(0.0, min(next_status - now, 0.1)) * 1000)
        events = dict(poller.poll(timeout_ms))
        for monitor, name in monitors.items():
            if monitor in events and self._on_monitor(name, monitor):
                next_status = 0.0
        if self._sub in events and self._drain_sub():
            next_status = 0.0
        if self._dealer in events:
            self._drain_dealer()
        silent_for = time.monotonic() - self._last_announce
        silent = self._last_announce and silent_for > 3 * self._heartbeat_s
        if silent and self.status().sync not in _UNHEARD:
            logger.warning("no announce from the hub for {:.1f}s", silent_for)
            self._status.update(sync="hub_silent")
        self.updater.check_stall()
        return next_status

    def _on_monitor(self, name: str, monitor: zmq.Socket[bytes]) -> bool:
        """Handle one connection event; True if a status should go out now (re-sync)."""
        event = recv_monitor_message(monitor)["event"]
        port = self.hub.fetch_port if name == "fetch" else self.hub.publish_port
        where = f"{self.hub.host}:{port}"
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            logger.debug("{} connection to the hub up", name)
            if name == "fetch":
                self.updater.on_reconnect()
                return True
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._bad_state(
                "denied",
                f"the hub at {where} refused this agent's key (zk0-hub keys add {self.agent_id} "
                "<its public key> on the hub)",
            )
        else:
            hint = f" (is {self.keys.hub_curve_public} the hub's key?)" if self.keys else ""
            self._bad_state("handshake_failed", f"CURVE handshake with {where} failed{hint}")
        return False

    def _bad_state(self, sync: str, message: str) -> None:
        if self.status().sync != sync:
            logger.error(message)
        self._status.update(sync=sync)

    def _healthy(self, announced: bool = False) -> None:
        """The hub answered: leave a starting, denied or failed-handshake state, and (only for
        an announce) a silent one."""
        sync = self.status().sync
        if sync in _UNHEARD and (announced or sync != "hub_silent"):
            if sync != "starting":
                logger.info("the hub answers again (was {})", sync)
            fetching = self.updater.download is not None
            self._status.update(sync="fetching" if fetching else "up_to_date")

    def _drain_sub(self) -> bool:
        """Handle announces; True if the agent should re-sync now (new or returning hub)."""
        resync = False
        while True:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return resync
            self._status.count(rx=sum(len(f) for f in frames))
            try:
                announce = p.decode_announce(frames)
            except p.ProtocolError as error:
                self._log_once(f"announce:{error.code}", f"ignoring an announce: {error}")
                continue
            status = self.status()
            if announce.hub != status.hub_id or status.sync in ("starting", "hub_silent"):
                logger.info("hub {} announces version {}", announce.hub, announce.version)
                self._status.update(hub_id=announce.hub)
                resync = True
            self._last_announce = time.monotonic()
            self._heartbeat_s = self.updater.retry_after_s = announce.heartbeat_s
            if status.sync != "denied":
                self._healthy(announced=True)
            self.updater.consider(announce)

    def _drain_dealer(self) -> None:
        for _ in range(10 * self.options.credit):
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._status.count(rx=sum(len(f) for f in frames))
            try:
                message, data = p.decode_reply(frames)
            except p.ProtocolError as error:
                self._log_once(f"reply:{error.code}", f"ignoring a reply from the hub: {error}")
                continue
            if isinstance(message, p.Latest):
                self._healthy()
                self._heartbeat_s = self.updater.retry_after_s = message.heartbeat_s
                self.updater.consider(message)
            elif isinstance(message, p.ErrorReply):
                if message.code == "denied":
                    self._bad_state("denied", f"the hub refuses this agent: {message.detail}")
                elif message.code == "protocol":
                    self._log_once("protocol", f"the hub speaks another protocol: {message.detail}")
                elif message.code == "busy":  # sync says "queued" until its turn comes
                    logger.debug("the hub is busy: {}", message.detail)
                else:
                    logger.warning("hub error {}: {}", message.code, message.detail)
                self.updater.on_error(message)
            else:
                self.updater.on_transfer(message, data)

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.error(message)
