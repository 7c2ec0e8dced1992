"""A hub without sockets: answers an agent ``Updater``'s requests from a real hub store."""

from __future__ import annotations

from zk0.agent.distribution.updater import Updater
from zk0.shared.artifact import MANIFEST, read_manifest
from zk0.shared.distribution import protocol as p
from zk0.shared.store import AdapterStore


class FakeHub:
    """Answers an ``Updater``'s requests from a hub store, the way the hub's ROUTER would."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self.requests: list[p.Message] = []
        self.served: list[p.Message] = []  # requests answered, in order
        self.statuses = 0

    def send(self, message: p.Message) -> bool:
        self.requests.append(message)
        return True

    def send_status(self) -> None:
        self.statuses += 1

    def offer(self, version: int) -> p.Latest:
        folder = self.store.path(version)
        manifest = read_manifest(folder)
        size = (folder / MANIFEST).stat().st_size + sum(f.size for f in manifest.files.values())
        return p.Latest(
            hub="0" * 16,
            seq=version,
            heartbeat_s=1.0,
            version=version,
            artifact_id=manifest.artifact_id,
            size=size,
            base_id=manifest.base.id,
        )

    def serve(self, updater: Updater, limit: int | None = None) -> None:
        """Answer the requests in order, the ones the answers cause too; at most ``limit``."""
        served = 0
        while self.requests and (limit is None or served < limit):
            served += 1
            self.served.append(self.requests[0])
            request = self.requests.pop(0)
            folder = self.store.path(request.version)  # type: ignore[attr-defined]
            if isinstance(request, p.GetManifest):
                reply = p.ManifestReply(
                    version=request.version,
                    artifact_id=request.artifact_id,
                    manifest=(folder / MANIFEST).read_bytes(),
                )
                updater.on_transfer(reply, None)
            elif isinstance(request, p.GetChunk):
                with (folder / request.file).open("rb") as handle:
                    handle.seek(request.offset)
                    data = handle.read(request.length)
                chunk = p.ChunkReply(
                    version=request.version,
                    artifact_id=request.artifact_id,
                    file=request.file,
                    offset=request.offset,
                )
                updater.on_transfer(chunk, data)
