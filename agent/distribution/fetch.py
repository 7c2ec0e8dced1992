"""One adapter download: manifest first, then chunks under credit-based flow control.

The download lives in ``<store>/incoming/v<version>-<id>.partial/`` until every byte is there;
only then are ``manifest.json`` and its id file written, and the folder is verified as the
store copies it in (artifact id, every file's sha256 and size, tensor shapes; the base id and
the engine's tensors are checked against the manifest). Files the store already holds (same
sha256 and size, e.g. after a rollback) are copied locally instead of fetched. A crash at any
point leaves a partial folder that the next start deletes: never a version, never ``current``.
A file the hub offers an int8 delta for (2.5) is rebuilt from it when that fits
(``zk0.agent.distribution.delta_fetch``), else fetched whole.

The manifest is held to the agent's ``DistributionLimits`` (size, file count) before any chunk
is asked for, and chunk requests are made only as credit frees up, one file cursor at a time:
what a download holds in memory does not grow with what the hub declares.

Lost requests are asked for again; slow ones are not. The hub answers each connection's
requests in order, so the reply to a chunk asked for once proves every request sent before it
that is still unanswered lost (the hub dropped it unread): those are asked for again at once.
Silence alone never drops a download nor the chunks it holds: after ``patience_s`` (4x the
smoothed reply time, never under ``request_timeout_s``, doubled after each unanswered probe up
to ``max_request_timeout_s``, +-25 % jitter) only the oldest request goes again, as a probe. A
busy hub serving a thousand agents then gets a few probes, not every request twice.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from zk0.agent.distribution.delta_fetch import DeltaFetch
from zk0.shared.artifact import (
    ID_FILE,
    MANIFEST,
    ArtifactError,
    Manifest,
    misfit,
    read_manifest,
)
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.limits import DistributionLimits
from zk0.shared.safetensors_file import TensorEntry
from zk0.shared.store import AdapterStore

INCOMING = "incoming"


@dataclass(frozen=True)
class Target:
    """A version the hub offers: what an announce or a ``Latest`` reply names."""

    version: int
    artifact_id: str
    size: int | None
    base_id: str | None


class ChunkPlan:
    """The chunks still to request, made one at a time from a (file, offset) cursor: a
    million-chunk file costs no more memory than a one-chunk file."""

    def __init__(self, files: Iterable[tuple[str, int]], chunk_bytes: int) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
        self._files = [(name, size) for name, size in files if size > 0]
        self._chunk_bytes = chunk_bytes
        self._index = self._offset = 0

    @property
    def done(self) -> bool:
        return self._index >= len(self._files)

    def add(self, name: str, size: int) -> None:
        """One more file to fetch, after those planned (e.g. one a delta failed to rebuild)."""
        if size > 0:
            self._files.append((name, size))

    def next(self) -> tuple[str, int, int]:
        """(file, offset, length) of the next chunk; only when not ``done``."""
        name, size = self._files[self._index]
        offset = self._offset
        length = min(self._chunk_bytes, size - offset)
        self._offset += length
        if self._offset >= size:
            self._index, self._offset = self._index + 1, 0
        return name, offset, length


@dataclass
class InFlight:
    """A chunk request awaiting its reply."""

    length: int
    sent_at: float  # monotonic time of its last sending
    seq: int  # its last sending's place in this download's order of requests
    asked_again: bool = False  # its reply then answers either sending (Karn's algorithm)
    lost: bool = field(default=False, repr=False)  # a later request's reply came first


class Download:
    def __init__(
        self,
        target: Target,
        store: AdapterStore,
        chunk_bytes: int,
        credit: int,
        limits: DistributionLimits | None = None,
    ) -> None:
        """``limits`` bound the manifest (checked when it arrives) and the credit."""
        if credit < 1:
            raise ValueError(f"credit must be at least 1, got {credit}")
        self.target, self.store = target, store
        self.chunk_bytes, self.credit = chunk_bytes, credit
        self.limits = limits or DistributionLimits()
        self.partial = (
            store.root / INCOMING / f"v{target.version}-{target.artifact_id[:16]}.partial"
        )
        self.manifest: Manifest | None = None
        self._manifest_bytes = b""
        self._plan = ChunkPlan((), chunk_bytes)
        self._outstanding: dict[tuple[str, int], InFlight] = {}  # by (file, offset)
        self._seq = 0
        self._fds: dict[str, int] = {}
        self.manifest_sent_at = 0.0
        self.last_progress = time.monotonic()
        self.fetched_bytes = 0  # what came over the wire, the delta's bytes included
        self.local_bytes = 0
        self.delta: DeltaFetch | None = None  # 2.5: a file rebuilt from an int8 delta
        self.retries = 0  # re-asks since the last reply
        self.reply_s: float | None = None  # smoothed reply time of chunks asked for once
        self._jitter = 1.0

    # -- requests ----------------------------------------------------------------------------

    def manifest_request(self) -> p.GetManifest:
        self.manifest_sent_at = time.monotonic()
        return p.GetManifest(version=self.target.version, artifact_id=self.target.artifact_id)

    def next_requests(self) -> list[p.GetChunk]:
        """Requests found lost, again, then new ones as the credit allows (one credit per chunk
        in flight; the credit never exceeds ``limits.max_chunks_in_flight``)."""
        lost = [key for key, request in self._outstanding.items() if request.lost]
        requests = self._send_again(lost)
        credit = min(self.credit, self.limits.max_chunks_in_flight)
        while not self._plan.done and len(self._outstanding) < credit:
            name, offset, length = self._plan.next()
            self._seq += 1
            self._outstanding[(name, offset)] = InFlight(length, time.monotonic(), self._seq)
            requests.append(self._request(name, offset, length))
        return requests

    def outstanding_requests(self) -> list[p.GetManifest] | list[p.GetChunk]:
        """Everything in flight again (after a reconnect: the old connection's replies are
        gone)."""
        self.last_progress = time.monotonic()
        if self.manifest is None:
            return [self.manifest_request()]
        return self._send_again(list(self._outstanding))

    def _send_again(self, keys: list[tuple[str, int]]) -> list[p.GetChunk]:
        requests = []
        for key in sorted(keys, key=lambda k: self._outstanding[k].seq):
            request = self._outstanding[key]
            self._seq += 1
            request.sent_at, request.seq = time.monotonic(), self._seq
            request.asked_again, request.lost = True, False
            requests.append(self._request(*key, request.length))
        return requests

    def patience_s(self, request_timeout_s: float, max_request_timeout_s: float) -> float:
        """How long to wait for a reply before asking again (see the module's docstring)."""
        usual = max(request_timeout_s, 4 * (self.reply_s or 0.0))
        return min(usual * 2.0**self.retries, max_request_timeout_s) * self._jitter

    def ask_again(self) -> list[p.GetManifest] | list[p.GetChunk]:
        """No reply within ``patience_s``: the oldest request again, as a probe (its reply, or
        the next one's, shows what else was lost); the next patience is twice as long."""
        self.retries += 1
        self._jitter = random.uniform(0.75, 1.25)
        self.last_progress = time.monotonic()
        if self.manifest is None:
            return [self.manifest_request()]
        if not self._outstanding:
            return []
        oldest = min(self._outstanding, key=lambda k: self._outstanding[k].seq)
        return self._send_again([oldest])

    def _request(self, name: str, offset: int, length: int) -> p.GetChunk:
        return p.GetChunk(
            version=self.target.version,
            artifact_id=self.target.artifact_id,
            file=name,
            offset=offset,
            length=length,
        )

    @property
    def complete(self) -> bool:
        return self.manifest is not None and self._plan.done and not self._outstanding

    # -- replies -----------------------------------------------------------------------------

    def on_manifest(self, reply: p.ManifestReply, expected_base_id: str | None) -> None:
        """Check the manifest against the announced id, size, base and this agent's limits;
        plan the chunks. Raises ``ArtifactError`` (the updater refuses the version) before
        any chunk is requested."""
        if self.manifest is not None or reply.artifact_id != self.target.artifact_id:
            return
        if hashlib.sha256(reply.manifest).hexdigest() != self.target.artifact_id:
            raise ArtifactError(
                f"v{self.target.version}: manifest does not hash to the artifact id"
            )
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        (self.partial / MANIFEST).write_bytes(reply.manifest)
        manifest = read_manifest(self.partial)  # schema and canonical form
        (self.partial / MANIFEST).unlink()  # written back last, once every byte is here
        self._check_limits(manifest, len(reply.manifest))
        if manifest.version != self.target.version:
            raise ArtifactError(
                f"manifest says version {manifest.version}, announced {self.target.version}"
            )
        if expected_base_id is not None and manifest.base.id != expected_base_id:
            raise ArtifactError(
                f"v{manifest.version} is built on base {manifest.base.id}, "
                f"this agent runs {expected_base_id}"
            )
        total = len(reply.manifest) + sum(f.size for f in manifest.files.values())
        if self.target.size is not None and total != self.target.size:
            raise ArtifactError(
                f"v{manifest.version}: {total} bytes, the hub announced {self.target.size}"
            )
        for name in manifest.files:
            if name in (MANIFEST, ID_FILE) or not p.FILE_NAME.fullmatch(name):
                raise ArtifactError(f"v{manifest.version}: refusing file name {name!r}")
        self.manifest, self._manifest_bytes = manifest, reply.manifest
        local = self._local_copies(manifest)
        self.delta = DeltaFetch.plan(reply.delta, manifest, local, self.store, self.limits)
        to_fetch = []
        for name, entry in sorted(manifest.files.items()):
            if name in local:
                shutil.copyfile(local[name], self.partial / name)
                self.local_bytes += entry.size
                continue
            size = entry.size
            if self.delta is not None and name == self.delta.offer.rebuilds:
                name, size = self.delta.offer.file, self.delta.offer.size
            self._open(name)
            to_fetch.append((name, size))
        self._plan = ChunkPlan(to_fetch, self.chunk_bytes)
        self.last_progress = time.monotonic()

    def _open(self, name: str) -> None:
        self._fds[name] = os.open(self.partial / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def _check_limits(self, manifest: Manifest, manifest_bytes: int) -> None:
        """Refuse a version larger than this agent accepts (``distribution_limits``)."""
        limits, version = self.limits, manifest.version
        if len(manifest.files) > limits.max_files:
            raise ArtifactError(
                f"v{version}: {len(manifest.files)} files, more than this agent's "
                f"distribution_limits.max_files ({limits.max_files})"
            )
        for name, entry in sorted(manifest.files.items()):
            if not 0 <= entry.size <= limits.max_artifact_bytes:
                raise ArtifactError(
                    f"v{version}: file {name!r:.80} declares {entry.size:,} bytes, more than "
                    f"this agent's distribution_limits.max_artifact_bytes "
                    f"({limits.max_artifact_bytes:,})"
                )
        total = manifest_bytes + sum(entry.size for entry in manifest.files.values())
        if total > limits.max_artifact_bytes:
            raise ArtifactError(
                f"v{version}: {total:,} bytes in all, more than this agent's "
                f"distribution_limits.max_artifact_bytes ({limits.max_artifact_bytes:,})"
            )

    def _local_copies(self, manifest: Manifest) -> dict[str, Path]:
        """Files of ``manifest`` that a stored version already has (same sha256 and size)."""
        have: dict[tuple[str, int], Path] = {}
        for version in self.store.versions():
            try:
                stored = self.store.manifest(version)
            except ArtifactError:
                continue
            for name, entry in stored.files.items():
                have.setdefault((entry.sha256, entry.size), self.store.path(version) / name)
        return {
            name: have[(entry.sha256, entry.size)]
            for name, entry in manifest.files.items()
            if (entry.sha256, entry.size) in have
        }

    def on_chunk(self, reply: p.ChunkReply, data: bytes) -> bool:
        """Write a chunk we asked for; False (ignored) for stray, duplicate or wrong-sized ones."""
        if reply.artifact_id != self.target.artifact_id or reply.version != self.target.version:
            return False
        key = (reply.file, reply.offset)
        request = self._outstanding.get(key)
        if request is None or request.length != len(data):
            return False
        del self._outstanding[key]
        os.pwrite(self._fds[reply.file], data, reply.offset)
        self.fetched_bytes += len(data)
        now = time.monotonic()
        if not request.asked_again:  # it answers the one sending: the hub's order and timing
            for earlier in self._outstanding.values():
                earlier.lost = earlier.lost or earlier.seq < request.seq
            sample = now - request.sent_at
            self.reply_s = sample if self.reply_s is None else 0.875 * self.reply_s + sample / 8
        self.last_progress = now
        self.retries = 0
        if self.delta is not None and reply.file == self.delta.offer.file:
            self._on_delta_bytes(len(data))
        return True

    def _on_delta_bytes(self, count: int) -> None:
        """Once the delta is whole: rebuild its file, or fetch that file whole (logged)."""
        assert self.delta is not None and self.manifest is not None
        self.delta.left -= count
        if self.delta.left > 0:
            return
        os.close(self._fds.pop(self.delta.offer.file))
        why = self.delta.rebuild(self.partial)
        if why is not None:
            name = self.delta.offer.rebuilds
            logger.warning("v{}: the int8 delta did not rebuild {} ({}); fetching it whole",
                           self.target.version, name, why)  # fmt: skip
            self._open(name)
            self._plan.add(name, self.manifest.files[name].size)

    def stalled(self, timeout_s: float) -> bool:
        return time.monotonic() - self.last_progress > timeout_s

    # -- the end -----------------------------------------------------------------------------

    def finalize(
        self, expected_base_id: str | None, expected_tensors: dict[str, TensorEntry] | None
    ) -> Manifest:
        """Write the manifest and id next to the files and check base and tensors against what
        this agent runs; every hash, size and the safetensors header are verified by
        ``AdapterStore.install`` (which copies the folder in, fsynced) before anything is used."""
        assert self.manifest is not None and self.complete
        self._close_files()
        (self.partial / MANIFEST).write_bytes(self._manifest_bytes)
        (self.partial / ID_FILE).write_text(self.manifest.artifact_id + "\n")
        manifest = self.manifest
        if expected_base_id is not None and manifest.base.id != expected_base_id:
            raise ArtifactError(
                f"v{manifest.version} is for base {manifest.base.id}, not {expected_base_id}"
            )
        if expected_tensors is not None and (why := misfit(manifest.tensors, expected_tensors)):
            raise ArtifactError(
                f"v{manifest.version}: adapter tensors do not fit this model ({why})"
            )
        return manifest

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def discard(self) -> None:
        self._close_files()
        shutil.rmtree(self.partial, ignore_errors=True)


def clear_incoming(store: AdapterStore) -> None:
    """Delete what a crash left in ``incoming/`` (never a version: versions appear atomically)."""
    shutil.rmtree(store.root / INCOMING, ignore_errors=True)
