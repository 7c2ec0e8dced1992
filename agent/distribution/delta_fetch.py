"""A version's file rebuilt from the int8 delta the hub offers (protocol 2.5), when it fits.

The hub may offer, with a version's manifest, a delta that rebuilds one of its files (the
tensors) from the same file of an older version (``zk0.shared.wire_delta``). The agent takes it
only when its store holds that version with exactly the artifact id named, the delta is smaller
than the file and within this agent's limits, and the file is not already in the store. Once
the delta's last byte is here it must hash to the offer, rebuild the file, and the rebuilt file
must hash to the manifest's entry; anything else only costs the file, fetched whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from zk0.shared.artifact import ID_FILE, MANIFEST, ArtifactError, Manifest
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.limits import DistributionLimits
from zk0.shared.fsutil import sha256_file
from zk0.shared.store import AdapterStore
from zk0.shared.wire_delta import rebuild


@dataclass
class DeltaFetch:
    """The delta of one download: what it rebuilds, from which stored file, and its progress."""

    offer: p.DeltaOffer
    parent_file: Path  # ``rebuilds`` of ``offer.from_version`` in this agent's store
    expected_sha256: str  # the manifest's entry for ``rebuilds``
    left: int  # bytes of the delta still to come
    used: bool = False  # the file was rebuilt from it and hashes to the manifest's entry

    @classmethod
    def plan(
        cls,
        offer: p.DeltaOffer | None,
        manifest: Manifest,
        local: Mapping[str, Path],
        store: AdapterStore,
        limits: DistributionLimits,
    ) -> DeltaFetch | None:
        """The delta to fetch instead of ``offer.rebuilds``, or None: fetch the file whole."""
        if offer is None or offer.rebuilds in local or offer.file == offer.rebuilds:
            return None
        entry = manifest.files.get(offer.rebuilds)
        if entry is None or offer.file in manifest.files or offer.file in (MANIFEST, ID_FILE):
            return None
        if not 0 < offer.size < entry.size or offer.size > limits.max_artifact_bytes:
            return None
        try:
            parent = store.manifest(offer.from_version)
        except (ArtifactError, OSError):
            return None
        parent_file = store.path(offer.from_version) / offer.rebuilds
        if parent.artifact_id != offer.from_artifact_id or offer.rebuilds not in parent.files:
            return None
        if not parent_file.is_file():
            return None
        return cls(offer, parent_file, entry.sha256, offer.size)

    def rebuild(self, partial: Path) -> str | None:
        """Rebuild ``partial/rebuilds`` from the delta fetched into ``partial/file``, which is
        deleted either way; None when done, else why not (the file is then fetched whole)."""
        delta_file, out = partial / self.offer.file, partial / self.offer.rebuilds
        try:
            if sha256_file(delta_file) != self.offer.sha256:
                return "the delta does not hash to the sha256 the hub offered"
            rebuild(self.parent_file, delta_file, out)
            if sha256_file(out) != self.expected_sha256:
                return f"the rebuilt {self.offer.rebuilds} does not hash to the manifest's entry"
        except (OSError, ValueError) as error:  # DeltaError is a ValueError
            return str(error)
        finally:
            delta_file.unlink(missing_ok=True)
        self.used = True
        return None
