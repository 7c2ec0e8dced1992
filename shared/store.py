"""The adapter store: every version of the adapter, kept, verified, with one current pointer.

Layout::

    <root>/versions/<v>/     one artifact per version (see ``zk0.shared.artifact``)
    <root>/current.json      {"version": v, "artifact_id": "<sha256>"}, switched atomically
    <root>/store.lock        held while a version number is allocated or a pointer moves
    <root>/refused.json      versions an agent refused for their content, with the reason
    <root>/deltas/<v>.safetensors   the hub's int8 difference of v from its parent, if any
                             (``zk0.shared.wire_delta``); pruned with v

Hub and agents both use it: the hub allocates versions for what its rounds produce; agents
install the versions they fetch under the hub's numbers. Versions are immutable once written,
and a version's folder appears all at once (staging folder, fsync, rename), so a crash leaves
either no version or a whole one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zk0.shared.artifact import ArtifactError, Manifest, read_manifest, verify_artifact
from zk0.shared.fsutil import atomic_write_bytes, file_lock, publish_dir, staging_dir_for
from zk0.shared.wire_delta import delta_path

CURRENT = "current.json"
REFUSED = "refused.json"
#: The refused list keeps the newest entries only: versions only grow, so an old refusal stops
#: mattering once a newer version is current.
MAX_REFUSED = 64


@dataclass(frozen=True)
class CurrentPointer:
    version: int
    artifact_id: str


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / "store.lock"

    def path(self, version: int) -> Path:
        return self.versions_dir / str(version)

    def versions(self) -> list[int]:
        """Complete versions, oldest first (staging leftovers of a crash are not versions)."""
        return sorted(int(p.name) for p in self.versions_dir.iterdir() if p.name.isdigit())

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def manifest(self, version: int) -> Manifest:
        return read_manifest(self.path(version))

    def verify(self, version: int, expected_id: str | None = None) -> Manifest:
        return verify_artifact(self.path(version), expected_id)

    @contextlib.contextmanager
    def allocate(self) -> Iterator[tuple[int, Path]]:
        """Reserve the next version number; the caller writes the artifact at the path given.

        The lock is held until the ``with`` block ends, so two writers (two hub processes, a
        round and an operator's promote) never get the same number and numbers only grow.
        """
        with file_lock(self._lock_path):
            version = max([*self.versions(), -1]) + 1
            yield version, self.path(version)
            if not self.path(version).is_dir():
                raise ArtifactError(f"version {version} was allocated but nothing was written")

    def install(self, source: Path, expected_id: str | None = None) -> Manifest:
        """Copy a verified artifact (e.g. fetched from the hub) in under its own version number."""
        manifest = verify_artifact(source, expected_id)
        final = self.path(manifest.version)
        with file_lock(self._lock_path):
            if final.exists():
                existing = read_manifest(final)
                if existing.artifact_id != manifest.artifact_id:
                    raise ArtifactError(
                        f"{final}: version {manifest.version} already holds another artifact"
                    )
                return existing
            staging = staging_dir_for(final)
            try:
                shutil.copytree(source, staging, dirs_exist_ok=True)
                verify_artifact(staging, manifest.artifact_id)
                publish_dir(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return manifest

    def current(self) -> CurrentPointer | None:
        path = self.root / CURRENT
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return CurrentPointer(version=int(raw["version"]), artifact_id=str(raw["artifact_id"]))

    def set_current(self, version: int) -> Manifest:
        """Verify ``version`` fully, then point ``current`` at it (atomic switch)."""
        manifest = self.verify(version)
        pointer = {"version": version, "artifact_id": manifest.artifact_id}
        with file_lock(self._lock_path):
            atomic_write_bytes(self.root / CURRENT, (json.dumps(pointer) + "\n").encode())
        return manifest

    def load_current(self) -> tuple[CurrentPointer, Manifest] | None:
        """The current version, verified against the id the pointer recorded."""
        pointer = self.current()
        if pointer is None:
            return None
        return pointer, self.verify(pointer.version, pointer.artifact_id)

    def refused(self) -> dict[tuple[int, str], str]:
        """(version, artifact id) -> reason, for every artifact refused for its content.

        Kept beside the versions so that a restarted agent does not fetch them again; a list
        that cannot be read counts as empty (it costs one more fetch and refusal, no more).
        """
        try:
            entries = json.loads((self.root / REFUSED).read_text())
            return {(int(e["version"]), str(e["artifact_id"])): str(e["reason"]) for e in entries}
        except (OSError, ValueError, TypeError, KeyError):  # none yet, or unreadable
            return {}

    def refuse(self, version: int, artifact_id: str, reason: str) -> None:
        """Record that ``(version, artifact_id)`` was refused for its content (atomic write)."""
        with file_lock(self._lock_path):
            refused = {**self.refused(), (version, artifact_id): reason}
            newest = sorted(refused.items())[-MAX_REFUSED:]
            entries = [{"version": v, "artifact_id": a, "reason": r} for (v, a), r in newest]
            atomic_write_bytes(self.root / REFUSED, (json.dumps(entries, indent=1) + "\n").encode())

    def discard(self, version: int) -> None:
        """Delete one stored version (one refused after it was stored); never the current one."""
        with file_lock(self._lock_path):
            pointer = self.current()
            if pointer is not None and pointer.version == version:
                raise ArtifactError(f"version {version} is current; it cannot be discarded")
            if self.path(version).is_dir():
                trash = self.versions_dir / f".{version}.deleting"
                self.path(version).rename(trash)
                shutil.rmtree(trash)

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions, never the current one; returns deleted."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        with file_lock(self._lock_path):
            pointer = self.current()
            protected = {pointer.version} if pointer else set()
            doomed = [v for v in self.versions()[:-keep] if v not in protected]
            for version in doomed:
                trash = self.versions_dir / f".{version}.deleting"
                self.path(version).rename(trash)
                shutil.rmtree(trash)
                delta_path(self.root, version).unlink(missing_ok=True)
            # Leftovers of a crash mid-write or mid-delete; never visible as versions.
            for leftover in [
                *self.versions_dir.glob(".*.staging"),
                *self.versions_dir.glob(".*.deleting"),
            ]:
                shutil.rmtree(leftover, ignore_errors=True)
        return doomed
