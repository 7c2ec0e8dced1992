"""What the hub answers on its ROUTER socket: statuses, manifests and chunks of stored versions.

``FetchService`` holds no sockets: it takes a request's frames and the ZAP User-Id libzmq
attached to them and returns the reply frames. Every request is checked against the live
allow-list (so a removed key is refused at once), decoded strictly, and answered from versions
verified once per hub lifetime; faults are counted and logged, rate-limited per source.
``Admission`` bounds the downloads served at once.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from loguru import logger

from zk0.hub.fleet import FleetTable
from zk0.shared.artifact import TENSORS_FILE, ArtifactError, Manifest, verify_artifact
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.keys import AllowList, key_id
from zk0.shared.fsutil import sha256_file
from zk0.shared.store import AdapterStore
from zk0.shared.wire_delta import DELTA_FILE, DeltaError, DeltaOrigin, delta_path

_REFUSED = re.compile(r"^refused v(\d+): ")
_FAULT_LOG_WINDOW_S = 10.0
_FAULT_LOG_PER_WINDOW = 5
#: A busy hub tells an agent to ask for its manifest again after this long (it adds jitter).
BUSY_RETRY_S = 2.0


@dataclass(frozen=True)
class ServedVersion:
    version: int
    artifact_id: str
    manifest: Manifest
    manifest_bytes: bytes
    folder: Path
    #: 2.5: the int8 delta offered with the manifest, and where it lies (both or neither).
    delta: p.DeltaOffer | None = None
    delta_file: Path | None = None

    def file(self, name: str) -> tuple[Path, int] | None:
        """Where an agent's ``get_chunk`` file lies and its size; None: not one to serve.
        The version's own files come first: a delta is never offered under one's name."""
        if (entry := self.manifest.files.get(name)) is not None:
            return self.folder / name, entry.size
        if self.delta is not None and self.delta_file is not None and name == self.delta.file:
            return self.delta_file, self.delta.size
        return None

    @property
    def size(self) -> int:
        """Bytes an agent fetches: the manifest and every file it lists."""
        return len(self.manifest_bytes) + sum(f.size for f in self.manifest.files.values())


class FaultLog:
    """Counts faults per socket; logs the first few per source and window, then a tally."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._windows: dict[str, tuple[float, int]] = {}

    def record(self, socket: str, source: str, message: str) -> None:
        self.counts[socket] = self.counts.get(socket, 0) + 1
        now = time.monotonic()
        key = f"{socket}:{source}"
        start, seen = self._windows.get(key, (now, 0))
        if now - start > _FAULT_LOG_WINDOW_S:
            if seen > _FAULT_LOG_PER_WINDOW:
                logger.warning(
                    "{} more faults on the {} socket from {} not logged",
                    seen - _FAULT_LOG_PER_WINDOW,
                    socket,
                    source,
                )
            start, seen = now, 0
        self._windows[key] = (start, seen + 1)
        if seen < _FAULT_LOG_PER_WINDOW:
            logger.warning("fault on the {} socket from {}: {}", socket, source, message)


class ZapPolicy:
    """ZAP credentials provider: a CURVE client key is admitted iff it is in the allow-list."""

    def __init__(self, allow_list: AllowList, faults: FaultLog) -> None:
        self.allow_list, self.faults = allow_list, faults

    def callback(self, domain: str, key: bytes) -> bool:
        if self.allow_list.agent_for(key) is not None:
            return True
        self.faults.record("zap", f"key {key_id(key)}", "refused a CURVE key not in the allow-list")
        return False


class VersionCache:
    """Stored versions, each verified in full the first time it is asked for, with the int8
    delta the store keeps for it (``zk0.shared.wire_delta``) if it still fits."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self._served: dict[int, ServedVersion] = {}
        self._bad_deltas: set[tuple[int, str]] = set()  # (version, why): each logged once

    def get(self, version: int) -> ServedVersion | None:
        served = self._served.get(version)
        if served is None:
            folder = self.store.path(version)
            if not folder.is_dir():
                return None
            try:
                manifest = verify_artifact(folder)
            except ArtifactError as error:
                logger.error("not serving version {}: {}", version, error)
                return None
            served = ServedVersion(
                version, manifest.artifact_id, manifest, manifest.canonical_bytes(), folder
            )
            served = self.with_delta(served)
            self._served[version] = served
        return served

    def with_delta(self, served: ServedVersion) -> ServedVersion:
        """``served`` with the delta kept for it, if it has none yet: also one kept after the
        version was first served (a manifest request costs a version without one a stat)."""
        path = delta_path(self.store.root, served.version)
        if served.delta is not None or not path.is_file():
            return served
        offer = self._delta_offer(served.manifest, path)
        if offer is None:
            return served
        self._served[served.version] = served = replace(served, delta=offer, delta_file=path)
        return served

    def _delta_offer(self, manifest: Manifest, path: Path) -> p.DeltaOffer | None:
        """The delta at ``path`` if it rebuilds exactly ``manifest``'s artifact from a version
        still stored with the artifact id it names; None (a bad one logged once) else."""
        version = manifest.version
        if DELTA_FILE in manifest.files or TENSORS_FILE not in manifest.files:
            return None
        try:
            origin = DeltaOrigin.of(path)
            if (origin.to_version, origin.to_artifact_id) != (version, manifest.artifact_id):
                raise DeltaError(f"it rebuilds v{origin.to_version} {origin.to_artifact_id:.12}…")
            if self.store.manifest(origin.from_version).artifact_id != origin.from_artifact_id:
                raise DeltaError(f"v{origin.from_version} is stored with another artifact id")
            return p.DeltaOffer(
                from_version=origin.from_version,
                from_artifact_id=origin.from_artifact_id,
                file=DELTA_FILE,
                rebuilds=TENSORS_FILE,
                size=path.stat().st_size,
                sha256=sha256_file(path),
            )
        except (ArtifactError, OSError, ValueError) as error:  # DeltaError, ValidationError too
            if (version, str(error)) not in self._bad_deltas:
                self._bad_deltas.add((version, str(error)))
                logger.warning("not offering the int8 delta of version {}: {}", version, error)
            return None

    def forget(self, version: int) -> None:
        self._served.pop(version, None)


class Admission:
    """The downloads the hub serves at once (``DistributionLimits.max_downloads``).

    A manifest request opens a download unless ``limit`` others are open; the agent is then
    told it is busy. A chunk request keeps its download open, opening it if need be: a download
    under way is never cut. A download closes when its agent's status no longer says
    ``fetching``, or after ``idle_s`` without a request (an agent that went away). The chunk
    requests queued at the hub are then at most ``limit`` x the agents' credit, whatever the
    fleet's size, so each waits seconds, not minutes, and agents do not ask twice.
    """

    def __init__(self, limit: int, idle_s: float = 30.0) -> None:
        self.limit, self.idle_s = limit, idle_s
        self._open: dict[str, float] = {}  # agent -> monotonic time of its last request
        self.refused = 0

    def admit(self, who: str) -> bool:
        now = time.monotonic()
        if who not in self._open and len(self._open) >= self.limit:
            self._open = {w: t for w, t in self._open.items() if now - t < self.idle_s}
            if len(self._open) >= self.limit:
                self.refused += 1
                return False
        self._open[who] = now
        return True

    def keep(self, who: str) -> None:
        self._open[who] = time.monotonic()

    def close(self, who: str) -> None:
        self._open.pop(who, None)

    @property
    def open(self) -> int:
        return len(self._open)


def _error(
    code: p.ErrorCode, detail: str, version: int | None = None, retry_after_s: float | None = None
) -> list[bytes]:
    reply = p.ErrorReply(
        code=code, detail=detail[:300], version=version, retry_after_s=retry_after_s
    )
    return p.encode(reply)


class FetchService:
    def __init__(
        self,
        cache: VersionCache,
        fleet: FleetTable,
        faults: FaultLog,
        allow_list: AllowList | None,
        latest: Callable[[str], p.Latest],
        may_fetch: Callable[[str | None, int], bool] | None = None,
        max_downloads: int = 64,
    ) -> None:
        """``allow_list`` None means plain mode (no CURVE): agents are who they say they are.
        ``latest(agent_id)`` answers a status; ``may_fetch(agent_id, version)`` (canary gate)
        says whether that agent may have that version (None: any stored version)."""
        self.cache, self.fleet, self.faults = cache, fleet, faults
        self.allow_list, self.latest, self.may_fetch = allow_list, latest, may_fetch
        self.admission = Admission(max_downloads)
        #: Bytes of manifests and chunks served, per downloader (agent id; the connection in
        #: plain mode).
        self.bytes_by_agent: Counter[str] = Counter()

    def source(self, user_id: str | None) -> tuple[str | None, str]:
        """(agent id or None, a label for logs) of a message's authenticated key."""
        if self.allow_list is None:
            return None, "plain peer"
        if not user_id:
            return None, "unauthenticated peer"
        agent_id = self.allow_list.agent_for(user_id.encode())
        return agent_id, f"agent {agent_id}" if agent_id else f"key {key_id(user_id.encode())}"

    def handle(self, frames: list[bytes], user_id: str | None, peer: bytes = b"") -> list[bytes]:
        """The reply to one request (``frames`` without the routing frame ``peer``)."""
        agent_id, source = self.source(user_id)
        who = agent_id or peer.hex()  # whose download (plain mode: the connection's)
        if self.allow_list is not None and agent_id is None:
            self.faults.record("fetch", source, "request from a key that is not in the allow-list")
            return _error("denied", "this agent's key is not in the hub's allow-list")
        try:
            message = p.decode_request(frames)
        except p.ProtocolError as error:
            self.faults.record("fetch", source, f"malformed request: {error}")
            return _error(error.code, str(error))
        if isinstance(message, p.Status):
            if agent_id is not None and message.agent_id != agent_id:
                self.faults.record("fetch", source, f"status claims to be {message.agent_id!r}")
                return _error("bad_request", "agent_id does not match the key you connect with")
            self._on_status(message, key_id(user_id.encode()) if user_id else "-")
            if message.sync != "fetching":
                self.admission.close(who)
            return p.encode(self.latest(message.agent_id))
        if agent_id is not None:
            self.fleet.seen(agent_id)
        if self.may_fetch is not None and not self.may_fetch(agent_id, message.version):
            return _error("unknown_version", "that version is not offered to this agent",
                          message.version)  # fmt: skip
        if isinstance(message, p.GetManifest):
            served = self.cache.get(message.version)
            if served is None or served.artifact_id != message.artifact_id:
                return _error("unknown_version", "no such version/artifact id", message.version)
            if not self.admission.admit(who):
                return _error(
                    "busy",
                    f"{self.admission.open} downloads in flight (max_downloads); ask again later",
                    message.version,
                    BUSY_RETRY_S,
                )
            served = self.cache.with_delta(served)
            self.bytes_by_agent[who] += len(served.manifest_bytes)
            reply = p.ManifestReply(
                version=served.version,
                artifact_id=served.artifact_id,
                manifest=served.manifest_bytes,
                delta=served.delta,
            )
            return p.encode(reply)
        assert isinstance(message, p.GetChunk)
        self.admission.keep(who)
        return self._chunk(message, source, who)

    @property
    def bytes_served(self) -> int:
        return self.bytes_by_agent.total()

    def _chunk(self, request: p.GetChunk, source: str, who: str) -> list[bytes]:
        served = self.cache.get(request.version)
        if served is None or served.artifact_id != request.artifact_id:
            return _error("unknown_version", "no such version/artifact id", request.version)
        where = served.file(request.file)
        if where is None or request.offset + request.length > where[1]:
            self.faults.record("fetch", source, f"chunk outside the artifact: {request.file!r}")
            return _error("bad_request", "chunk outside the artifact", request.version)
        try:
            fd = os.open(where[0], os.O_RDONLY)
            try:
                data = os.pread(fd, request.length, request.offset)
            finally:
                os.close(fd)
        except OSError as error:
            logger.error("cannot read version {}: {}", request.version, error)
            data = b""
        if len(data) != request.length:
            self.cache.forget(request.version)
            return _error("unavailable", "the hub cannot read that version", request.version)
        self.bytes_by_agent[who] += len(data)
        header = p.ChunkReply(
            version=served.version,
            artifact_id=served.artifact_id,
            file=request.file,
            offset=request.offset,
        )
        return p.encode(header, data)

    def _on_status(self, status: p.Status, key: str) -> None:
        previous, record = self.fleet.update(status, key)
        if previous is None or previous.revoked:
            logger.info(
                "agent {} (key {}) online: applied {}, in use {}",
                record.agent_id,
                key,
                record.applied,
                record.in_use,
            )
        elif (previous.applied, previous.in_use) != (record.applied, record.in_use):
            logger.info(
                "agent {}: applied {}, in use {}", record.agent_id, record.applied, record.in_use
            )
        if record.error and record.error != (previous.error if previous else None):
            logger.warning("agent {} reports: {}", record.agent_id, record.error)
            refused = _REFUSED.match(record.error)
            if refused:  # verify that version again before serving it to anyone else
                self.cache.forget(int(refused.group(1)))
