"""Which versions an agent takes, and how: verify before switching, never go backwards.

``Updater`` holds no sockets; the subscriber feeds it what the hub says and gives it a ``send``
function. It owns the agent's adapter store, the download in progress and the hand-over to the
inference engine. It never sets ``in_use``: only the engine knows which version computed its
last chunk, and reports it through ``AdapterSubscriber.set_in_use``.

Before a version becomes current its tensors, as stored, must keep ``AdapterBounds``
(``zk0.shared.adapter_bounds``: finite, each module's ‖ΔW‖ within rho x the base weight's norm
and within a factor of the previous versions'). A version refused for its content (out of
bounds, or an artifact whose hash-verified bytes are unusable: ``ArtifactContentError``) is
refused once, its reason sent to the hub in the status ``error``, and never fetched again: the
(version, artifact id) is kept in the store's ``refused.json``, so a restart remembers it. A
failed transfer (bytes that do not hash to the manifest, a full disk) is only retried later.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from loguru import logger

from zk0.agent.distribution.fetch import Download, Target, clear_incoming
from zk0.agent.distribution.state import GateTask, StatusBox, SubscriberOptions
from zk0.shared.adapter_bounds import (
    AdapterBounds,
    NormHistory,
    check_adapter,
)
from zk0.shared.artifact import (
    TENSORS_FILE,
    ArtifactContentError,
    ArtifactError,
    Manifest,
    verify_artifact,
)
from zk0.shared.distribution import protocol as p
from zk0.shared.distribution.limits import DistributionLimits
from zk0.shared.safetensors_file import SafetensorsError, TensorEntry, read_float_tensors
from zk0.shared.store import AdapterStore

#: Called with (version, artifact folder, manifest) for every version that became current.
OnNewVersion = Callable[[int, Path, Manifest], None]
#: Given a version's base id: ‖W‖_F per adaptable module of that base as this agent has it, or
#: None when this agent does not run that base (then only the other bounds are checked).
BaseNorms = Callable[[str], Mapping[str, float] | None]


class Updater:
    def __init__(
        self,
        store: AdapterStore,
        options: SubscriberOptions,
        status: StatusBox,
        send: Callable[[p.Message], bool],
        send_status: Callable[[], None],
        on_new_version: OnNewVersion | None,
        expected_base_id: str | None,
        expected_tensors: dict[str, TensorEntry] | None,
        *,
        bounds: AdapterBounds | None = None,
        base_norms: BaseNorms | None = None,
        limits: DistributionLimits | None = None,
    ) -> None:
        self.store, self.options, self.status = store, options, status
        self.send, self.send_status = send, send_status
        self.on_new_version = on_new_version
        self.expected_base_id, self.expected_tensors = expected_base_id, expected_tensors
        self.download: Download | None = None
        self.retry_after_s = 1.0  # the hub's heartbeat, once known
        self._refused: dict[tuple[int, str], float] = {}  # retry after (monotonic)
        self.bounds = bounds or AdapterBounds()
        self.limits = limits or DistributionLimits()
        self.base_norms = base_norms
        self._norms = NormHistory()
        self._refused_for_content = store.refused()  # (version, artifact id) -> reason
        self._warned_no_base: set[str] = set()

    # -- start-up ----------------------------------------------------------------------------

    def recover(self) -> None:
        """Clear a crash's leftovers and hand the last verified version to the engine at once."""
        clear_incoming(self.store)
        self.store.prune(self.options.keep_versions)  # also deletes half-written versions
        loaded: Manifest | None = None
        try:
            current = self.store.load_current()
            loaded = current[1] if current else None
        except (ArtifactError, OSError, ValueError) as error:
            logger.error("current adapter does not verify ({}); looking for an older one", error)
            refused = self._refused_versions
            for version in reversed([v for v in self.store.versions() if v not in refused]):
                with contextlib.suppress(ArtifactError, OSError):
                    loaded = self.store.set_current(version)
                    break
        if loaded is None:
            logger.info("no adapter yet: waiting for the hub")
            return
        self.expected_base_id = self.expected_base_id or loaded.base.id
        self.status.update(applied=loaded.version)
        logger.info(
            "serving version {} ({}…) from the store", loaded.version, loaded.artifact_id[:12]
        )
        self._hand_over(loaded)

    def _hand_over(self, manifest: Manifest) -> None:
        if self.on_new_version is None:
            return
        try:
            self.on_new_version(manifest.version, self.store.path(manifest.version), manifest)
        except Exception as error:  # the engine refused it: report why
            logger.exception("the inference engine did not take version {}", manifest.version)
            self.status.update(error=f"engine refused v{manifest.version}: {error}"[:300])

    # -- what the hub says -------------------------------------------------------------------

    def consider(self, offer: p.Offer) -> None:
        """Fetch ``offer`` if it is newer than what we run and not already on its way; go back
        to it if the hub withdrew the version we run (a canary whose version was rejected)."""
        if offer.version is None or offer.artifact_id is None or offer.version in offer.withdrawn:
            return
        status = self.status.get()
        applied, gate = status.applied, status.under_gate
        if isinstance(offer, p.Latest):
            self._follow_gate(offer)
        elif gate is not None and (
            gate.candidate in offer.withdrawn or offer.version >= gate.candidate
        ):
            self.status.update(under_gate=None)  # decided: rejected, or promoted to the fleet
        going_back = applied is not None and applied in offer.withdrawn and offer.version < applied
        if going_back and applied is not None and self._back_from_store(offer, applied):
            return
        if applied is not None and offer.version <= applied and not going_back:
            return
        current = self.download
        if current is not None and current.target.version >= offer.version:
            return
        if (offer.version, offer.artifact_id) in self._refused_for_content:
            return
        if self._refused.get((offer.version, offer.artifact_id), 0.0) > time.monotonic():
            return
        if self.expected_base_id and offer.base_id and offer.base_id != self.expected_base_id:
            self._refused[(offer.version, offer.artifact_id)] = time.monotonic() + 3600
            logger.error(
                "v{} is for base {}, this agent runs {}: ignored",
                offer.version,
                offer.base_id,
                self.expected_base_id,
            )
            return
        if current is not None:
            self.abandon(f"v{offer.version} supersedes it")
        target = Target(offer.version, offer.artifact_id, offer.size, offer.base_id)
        if self.store.path(target.version).is_dir():  # stored before a crash, never switched to
            try:
                stored = verify_artifact(self.store.path(target.version), target.artifact_id)
                self._accept(stored)
                return
            except ArtifactContentError as error:
                with contextlib.suppress(ArtifactError, OSError):  # never to be run: drop it
                    self.store.discard(target.version)
                self._refuse_for_content(target.version, target.artifact_id, str(error))
                return
            except (ArtifactError, OSError):
                pass  # fetched again below
        logger.info(
            "fetching version {} ({}…, {} bytes)",
            target.version,
            target.artifact_id[:12],
            target.size,
        )
        self.download = Download(
            target, self.store, self.options.chunk_bytes, self.options.credit, self.limits
        )
        self.status.update(sync="fetching")
        self.send(self.download.manifest_request())

    def _follow_gate(self, offer: p.Latest) -> None:
        """A canary is told so in each reply to its status; anyone else is not one (any more)."""
        assert offer.version is not None
        gate = None
        if offer.gate_baseline is not None:
            gate = GateTask(offer.version, offer.gate_baseline, offer.gate_episodes or 0)
        if gate != self.status.get().under_gate:
            self.status.update(under_gate=gate)
            if gate is not None:
                logger.info("canary of version {} (the fleet runs version {})",
                            gate.candidate, gate.current)  # fmt: skip

    def _back_from_store(self, offer: p.Offer, withdrawn: int) -> bool:
        """The hub withdrew ``withdrawn`` (its canary gate rejected it): back to the offered
        version from the store, where it still is (it ran here before); False: fetch it."""
        assert offer.version is not None and offer.artifact_id is not None
        logger.warning("version {} was withdrawn by the hub: back to version {}",
                       withdrawn, offer.version)  # fmt: skip
        try:
            manifest = self.store.verify(offer.version, offer.artifact_id)
        except (ArtifactError, OSError):
            return False
        self.abandon(f"v{withdrawn} was withdrawn")
        self._switch(manifest)
        return True

    def on_transfer(self, message: p.Reply, data: bytes | None) -> None:
        download = self.download
        if download is None:
            return
        try:
            if isinstance(message, p.ManifestReply):
                download.on_manifest(message, self.expected_base_id)
            elif isinstance(message, p.ChunkReply) and data is not None:
                accepted = download.on_chunk(message, data)
                if accepted and self.options.throttle_s:
                    time.sleep(self.options.throttle_s)
            for request in download.next_requests():
                self.send(request)
            if download.complete:
                self._install(download)
        except ArtifactContentError as error:
            self._refuse_for_content(
                download.target.version, download.target.artifact_id, str(error)
            )
        except (ArtifactError, OSError) as error:
            self._refuse(download, str(error))

    def on_error(self, error: p.ErrorReply) -> None:
        download = self.download
        if download is None or error.version not in (None, download.target.version):
            return
        if error.code == "busy":  # serving others: ask again after its delay, jittered
            wait = (error.retry_after_s or self.retry_after_s) * random.uniform(0.5, 1.5)
            self.abandon("the hub is busy", retry_after_s=wait, quiet=True)
            self.status.update(sync="queued")
            return
        self.abandon(f"hub answered {error.code}", retry_after_s=self.retry_after_s)

    def on_reconnect(self) -> None:
        if self.download is not None:
            for request in self.download.outstanding_requests():
                self.send(request)

    def check_stall(self) -> None:
        """Probe a hub silent for longer than the download's patience (backed off, jittered)
        with its oldest request; the chunks already fetched are kept."""
        download = self.download
        options = self.options
        if download is None or not download.stalled(
            download.patience_s(options.request_timeout_s, options.max_request_timeout_s)
        ):
            return
        if download.retries == 0:
            logger.debug("no reply for version {}: asking again", download.target.version)
        for request in download.ask_again():
            self.send(request)

    # -- install, switch, refuse -------------------------------------------------------------

    def _install(self, download: Download) -> None:
        delay = self.options.stage_delay_s
        time.sleep(delay)
        download.finalize(self.expected_base_id, self.expected_tensors)
        time.sleep(delay)
        manifest = self.store.install(download.partial, download.target.artifact_id)
        download.discard()
        self.download = None
        time.sleep(delay)
        delta = download.delta
        logger.info(
            "version {} verified: {:,} bytes fetched, {:,} reused from the store{}",
            manifest.version,
            download.fetched_bytes,
            download.local_bytes,
            f" ({delta.offer.size:,} of them an int8 delta from v{delta.offer.from_version})"
            if delta is not None and delta.used
            else "",
        )
        self._accept(manifest)

    def _accept(self, manifest: Manifest) -> None:
        """Switch to the stored ``manifest`` if its tensors, as stored, keep the bounds; else
        delete it from the store and raise ``ArtifactContentError`` with the reason."""
        folder = self.store.path(manifest.version)
        try:
            tensors = read_float_tensors(folder / TENSORS_FILE)
        except SafetensorsError as error:
            self.store.discard(manifest.version)
            raise ArtifactContentError(str(error)) from None
        verdict = check_adapter(
            tensors,
            manifest.lora.alpha / manifest.lora.rank,
            self.bounds,
            self._base_norms(manifest.base.id),
            self._norms.previous(self.store, below=manifest.version, skip=self._refused_versions),
        )
        if verdict.reason is not None:
            self.store.discard(manifest.version)
            raise ArtifactContentError(f"out of bounds: {verdict.reason}")
        self._norms.remember(manifest.artifact_id, verdict.norms)
        self._switch(manifest)

    @property
    def _refused_versions(self) -> set[int]:
        return {version for version, _ in self._refused_for_content}

    def _base_norms(self, base_id: str) -> Mapping[str, float] | None:
        norms = self.base_norms(base_id) if self.base_norms is not None else None
        if norms is None and base_id not in self._warned_no_base:
            self._warned_no_base.add(base_id)
            logger.warning(
                "no weights of base {} here: versions for it are checked for finite values and "
                "growth, not against the base's norms",
                base_id,
            )
        return norms

    def _switch(self, manifest: Manifest) -> None:
        self.store.set_current(manifest.version)
        self.expected_base_id = self.expected_base_id or manifest.base.id
        self.status.update(applied=manifest.version, sync="up_to_date", error=None)
        self.status.count(applied=1)
        logger.info("version {} is current ({}…)", manifest.version, manifest.artifact_id[:12])
        self._hand_over(manifest)
        self.send_status()
        self.store.prune(self.options.keep_versions)

    def _refuse_for_content(self, version: int, artifact_id: str, reason: str) -> None:
        """Refuse ``version`` for good: reported once, remembered across restarts."""
        logger.error(
            "refusing version {} for good: {}; keeping version {}",
            version,
            reason,
            self.status.get().applied,
        )
        self._refused_for_content[(version, artifact_id)] = reason
        try:
            self.store.refuse(version, artifact_id, reason)
        except OSError as error:  # still refused for this process's lifetime
            logger.warning("could not record the refusal of version {}: {}", version, error)
        self.status.update(error=f"refused v{version}: {reason}"[:300])
        self.abandon(reason)
        self.send_status()

    def _refuse(self, download: Download, reason: str) -> None:
        logger.error(
            "refusing version {}: {}; keeping version {}",
            download.target.version,
            reason,
            self.status.get().applied,
        )
        self.status.update(error=f"refused v{download.target.version}: {reason}"[:300])
        self.abandon(reason, retry_after_s=self.options.refused_retry_s)
        self.send_status()

    def abandon(self, reason: str, retry_after_s: float = 0.0, *, quiet: bool = False) -> None:
        download = self.download
        if download is None:
            return
        (logger.debug if quiet else logger.info)(
            "dropping the download of version {}: {}", download.target.version, reason
        )
        download.discard()
        self.download = None
        if retry_after_s:
            key = (download.target.version, download.target.artifact_id)
            self._refused[key] = time.monotonic() + retry_after_s
        if self.status.get().sync == "fetching":
            self.status.update(sync="up_to_date")
