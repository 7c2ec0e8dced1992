"""The hub's half of the artifact: a round's aggregated arrays become a verified store version.

What a version holds is what the agents run, so every check runs on it: the aggregate rounded
to bfloat16, or, with the run's ``wire-encoding int8``, its parent plus the aggregate's
difference in int8 (``zk0.shared.wire_delta``), whose delta is kept beside the store for the
agents that hold the parent. The float32 aggregate is kept as the version's master
(``zk0.hub.masters``): the next round trains from it.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from zk0.hub.aggregation import Arrays
from zk0.hub.gate import GateBook, wait_for_decision
from zk0.hub.masters import MasterAdapters
from zk0.shared import wire_delta
from zk0.shared.adapter_bounds import (
    BoundsVerdict,
    NormHistory,
    Norms,
    base_weight_norms,
    check_adapter,
)
from zk0.shared.artifact import (
    ArtifactError,
    as_stored,
    load_arrays,
    save_adapter,
    save_adapter_arrays,
)
from zk0.shared.config import load_robot_config
from zk0.shared.features import PolicyFeatures
from zk0.shared.federation import RunSettings
from zk0.shared.lora import adapter_state, apply_lora
from zk0.shared.normalization import NORMALIZATION_FILE, Stats, dumps, loads
from zk0.shared.policy_factory import build_policy, resolve_base
from zk0.shared.store import AdapterStore
from zk0.shared.wire_delta import Delta, DeltaError, save_delta


class Publisher:
    """Turns aggregated arrays into verified store versions (the hub's half of the artifact).

    A version is stored only if its adapter keeps the run's ``adapter_bounds``
    (``zk0.shared.adapter_bounds``) against the base's weights and the stored versions' norms;
    one that does not is logged with its reason and not stored, and the previous version stays
    current. The strategy asks :meth:`out_of_bounds` first, so such arrays are not trained on.
    """

    def __init__(self, settings: RunSettings, store: AdapterStore) -> None:
        self.features = PolicyFeatures.from_robot_config(
            load_robot_config(settings.robot_config_path)
        )
        self.settings = settings
        self.base = resolve_base(settings.policy, self.features)
        self.lora = settings.lora
        self.store = store
        self.bounds = settings.adapter_bounds
        self._base_norms: Norms | None = None  # read from the base checkpoint on first use
        self._base_norms_read = False
        self._norms = NormHistory()  # per stored artifact, so each publish reads only its own
        #: Canary rollout (``gate-timeout-s`` > 0): versions wait under gate (zk0.hub.gate).
        self.gates = GateBook(store.root) if settings.gate_timeout_s > 0 else None
        self.masters = MasterAdapters(store.root)

    def fresh_adapter(self, stats: Stats) -> tuple[int, Arrays]:
        """Version 0: a freshly initialised adapter carrying the shared normalization. The
        only time the hub builds the policy: later versions are written from arrays. Its
        lora_A draws come from the run's ``seed``: the same run config, the same version 0."""
        import torch

        loaded = build_policy(self.settings.policy, self.features, device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed)
            peft_model = apply_lora(loaded.policy, self.lora, loaded.base.name_or_path)
        with self.store.allocate() as (version, path):
            save_adapter(
                peft_model,
                path,
                version=version,
                base=loaded.base,
                lora=self.lora,
                round_=0,
                extra_files={NORMALIZATION_FILE: dumps(stats)},
            )
        master = {k: v.numpy() for k, v in adapter_state(peft_model).items()}
        self.masters.save(version, master, self.store.manifest(version).artifact_id)
        self._announce(version, 0)  # B = 0: the base itself, nothing for a gate to judge
        return version, master

    def publish(
        self,
        arrays: Arrays,
        stats: Stats,
        parent: int,
        round_: int | None,
        metrics: dict[str, Any],
    ) -> int:
        """A new version: ``parent``'s adapter with the aggregated ``arrays`` (stored rounded,
        the float32 master beside it); ``parent`` again (nothing stored) when the version would
        break the bounds."""
        stored, delta = self.stored_form(arrays, parent)  # what agents run: every check on these
        verdict = self._verdict(stored)
        if verdict.reason is not None:
            logger.error(
                "round {}: the aggregated adapter is not stored ({}); version {} stays current",
                round_,
                verdict.reason,
                parent,
            )
            return parent
        with self.store.allocate() as (version, path):
            manifest = save_adapter_arrays(
                self.store.path(parent),
                path,
                stored,
                version=version,
                parent_version=parent,
                round_=round_,
                metrics=metrics,
                extra_files={NORMALIZATION_FILE: dumps(stats)},
            )
        self.masters.save(version, arrays, manifest.artifact_id)
        if delta is not None:
            try:
                save_delta(
                    self.store.root, (parent, self.store.path(parent)), (version, path), delta
                )
            except (DeltaError, ArtifactError, OSError) as error:
                logger.warning(
                    "version {}: no int8 delta ({}); agents fetch it whole", version, error
                )
        self._norms.remember(manifest.artifact_id, verdict.norms)
        current = self.store.current()
        if self.gates is not None and current is not None:
            self.gates.open(version, baseline=current.version)
        else:
            self._announce(version, round_)
        return version

    def stored_form(self, arrays: Arrays, parent: int) -> tuple[Arrays, Delta | None]:
        """What a version made of ``arrays`` after ``parent`` holds, and its int8 difference
        from ``parent`` when the run's ``wire-encoding`` is int8 (``zk0.shared.wire_delta``)."""
        if self.settings.wire_encoding == "bf16":
            return as_stored(arrays), None
        before = load_arrays(self.store.path(parent))
        if {k: v.shape for k, v in before.items()} != {k: v.shape for k, v in arrays.items()}:
            return as_stored(arrays), None  # another layout: only a whole version can say it
        try:
            delta = wire_delta.encode(before, arrays)
            return wire_delta.apply(before, delta), delta
        except DeltaError:  # not finite: the bounds verdict says why it is not stored
            return as_stored(arrays), None

    def out_of_bounds(self, arrays: Arrays) -> str | None:
        """Why ``arrays`` may not become a version (one line), or None."""
        return self._verdict(as_stored(arrays)).reason

    def _verdict(self, arrays: Arrays) -> BoundsVerdict:
        if not self._base_norms_read:
            self._base_norms_read = True
            try:
                self._base_norms = base_weight_norms(self.base)
            except (ArtifactError, OSError, ValueError) as error:  # the run goes on, less checked
                logger.error(
                    "base weights of {} unreadable ({}): rho is not checked", self.base.spec, error
                )
        latest = self.store.latest_version()
        rejected = self.gates.withdrawn() if self.gates is not None else []
        previous = (
            self._norms.previous(self.store, below=latest + 1, skip=rejected)
            if latest is not None
            else []
        )
        return check_adapter(
            arrays, self.lora.alpha / self.lora.rank, self.bounds, self._base_norms, previous
        )

    def _announce(self, version: int, round_: int | None) -> None:
        manifest = self.store.set_current(version)
        logger.info(
            "published version {} ({}…), round {}", version, manifest.artifact_id[:12], round_
        )

    def after_gate(self, version: int) -> int:
        """The version the next round starts from once ``version``'s gate is decided (itself,
        or the promoted one it was compared with); ``version`` itself without a gate."""
        if self.gates is None or self.gates.get(version) is None:
            return version
        record = wait_for_decision(self.gates, version, self.settings.gate_timeout_s)
        logger.info("version {} {} by its canary gate: {}", version, record.state, record.reason)
        if record.state == "promoted":
            return version
        current = self.store.current()
        return current.version if current is not None else record.baseline

    def arrays(self, version: int) -> Arrays:
        """What training continues from after ``version``: its float32 master (``masters``)."""
        manifest = self.store.manifest(version)
        stored = load_arrays(self.store.path(version))
        return self.masters.starting_point(version, manifest.artifact_id, stored)

    def starting_point(self) -> tuple[int, int, Arrays, Stats] | None:
        """(version, round, arrays, stats) of the store's current version, if any."""
        current = self.store.load_current()
        if current is None:
            return None
        pointer, manifest = current
        if manifest.base.id != self.base.base_id or manifest.lora != self.lora:
            raise ArtifactError(
                f"{self.store.root}: current version {pointer.version} was built on "
                f"{manifest.base.id} with {manifest.lora}, not on this run's base and LoRA"
            )
        folder = self.store.path(pointer.version)
        if NORMALIZATION_FILE not in manifest.files:
            raise ArtifactError(f"{folder}: carries no shared normalization statistics")
        stats = loads((folder / NORMALIZATION_FILE).read_bytes())
        return pointer.version, manifest.round or 0, self.arrays(pointer.version), stats
