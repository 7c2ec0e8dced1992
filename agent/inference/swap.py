"""Hot swap: the policy version the engine runs, replaced by reference between two chunks.

A LoRA adapter of ``zk0.shared.lora`` changes only the action expert's attention projections.
So a version is, for inference, a set of merged weights ``W + (alpha / r) * B @ A`` for those
projections (exactly PEFT's ``merge_and_unload``, as ``merged_copy`` does, without copying the
other 99 % of the policy) plus pre/post processors carrying the artifact's shared
normalization: a ``PolicyRuntime``. A loader thread verifies the artifact against the base,
merges and builds the runtime; only then does ``active`` point at it. The policy worker reads
``active`` once per chunk, so a chunk is computed wholly by one version, the next by the new
one, and the control loop never waits for a load. ``rollback`` points back at the version that
ran before.

Merging this way costs milliseconds and a few MB (full size: 5 MB of merged weights instead of
a 1.8 GB copy), so a swap neither stalls the control loop's thread nor doubles memory.

Personalized mode (``zk0.agent.personal``): a runtime is (fleet version, local revision), its
weights ``W + (alpha/r) B A + (alpha_p/r_p) B_p A_p`` (PEFT with both adapters active); the slot
merges its local part into every fleet version, and ``offer_personal``/``use_personal`` swap in
another revision over the active fleet version.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from loguru import logger
from numpy.typing import NDArray

from zk0.shared.lora import EXPERT_LAYERS, LoraSpec
from zk0.shared.policy_factory import LoadedPolicy, make_processors

if TYPE_CHECKING:
    from zk0.agent.personal import PersonalPart

#: The expert's attention projections: every weight a LoRA adapter of ``zk0.shared.lora`` can
#: change. The ONNX denoise graph takes exactly these as inputs.
EXPERT_WEIGHTS = re.compile(rf"{EXPERT_LAYERS}\.(q_proj|k_proj|v_proj|o_proj)\.weight")
_PEFT_PREFIX = "base_model.model."
DatasetStats = dict[str, dict[str, Any]]
Weights = dict[str, Any]  # parameter name -> torch.Tensor


def expert_weight_names(policy: Any) -> list[str]:
    return [name for name, _ in policy.named_parameters() if EXPERT_WEIGHTS.fullmatch(name)]


def expert_weights(policy: Any) -> Weights:
    """The policy's expert attention weights (detached, shared with the policy)."""
    return {
        name: param.detach()
        for name, param in policy.named_parameters()
        if EXPERT_WEIGHTS.fullmatch(name)
    }


def merge_lora(base: Weights, spec: LoraSpec, state: Weights) -> Weights:
    """``base`` with the adapter ``state`` (PEFT's keys) merged in; untouched weights shared.

    Refuses tensors that do not pair up, name no expert weight, do not fit, or are not finite.
    """
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key.removeprefix(_PEFT_PREFIX))
        if match is None:
            raise ValueError(f"adapter tensor {key!r} is not a LoRA A or B matrix")
        pairs.setdefault(match[1] + ".weight", {})[match[2]] = tensor
    merged = dict(base)
    scaling = spec.alpha / spec.rank
    for name, pair in sorted(pairs.items()):
        if name not in base or set(pair) != {"A", "B"}:
            raise ValueError(f"adapter tensors for {name!r} do not fit this policy's expert")
        weight = base[name]
        # In the weight's dtype, as PEFT holds a loaded adapter (versions store bfloat16).
        delta = pair["B"].to(weight.device, weight.dtype) @ pair["A"].to(
            weight.device, weight.dtype
        )
        if delta.shape != weight.shape:
            shapes = f"{tuple(delta.shape)}, the weight is {tuple(weight.shape)}"
            raise ValueError(f"{name}: the adapter gives {shapes}")
        result = weight.clone()
        result += (delta * scaling).to(weight.dtype)  # PEFT's merge, in its order
        if not bool(result.isfinite().all()):
            raise ValueError(f"{name}: merged weight is not finite; refusing the adapter")
        merged[name] = result
    return merged


@dataclass(frozen=True, eq=False)
class PolicyRuntime:
    """One policy version ready to run: its merged expert weights and its processors."""

    version: int | None
    artifact_id: str | None
    preprocessor: Any
    postprocessor: Any
    weights: Weights = field(repr=False)
    load_s: float = 0.0
    #: The local revision merged into ``weights`` (None: the fleet version alone).
    personal_revision: int | None = None
    #: With a local part: the fleet version's weights without it (what another revision merges on).
    fleet_weights: Weights | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        fleet = "base" if self.version is None else f"v{self.version}"
        local = self.personal_revision
        return fleet if local is None else f"{fleet}+r{local}"

    def with_personal(self, part: PersonalPart | None) -> PolicyRuntime:
        """The same fleet version with local part ``part`` merged in (None: without one)."""
        fleet = self.fleet_weights if self.fleet_weights is not None else self.weights
        if part is None:
            return replace(self, weights=fleet, personal_revision=None, fleet_weights=None)
        merged = merge_lora(fleet, part.spec, part.state)
        return replace(self, weights=merged, personal_revision=part.revision, fleet_weights=fleet)

    @property
    def arrays(self) -> dict[str, NDArray[np.float32]]:
        """The weights as numpy arrays (views, no copy), as ONNX Runtime takes them."""
        return {name: tensor.cpu().numpy() for name, tensor in self.weights.items()}


class _Processors:
    """Pre/post processors per normalization (most versions share the hub's statistics)."""

    def __init__(self, policy_config: Any) -> None:
        self._config = policy_config
        self._built: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, stats: Callable[[], DatasetStats | None]) -> tuple[Any, Any]:
        with self._lock:
            if key not in self._built:
                self._built[key] = make_processors(self._config, stats())
            return self._built[key]


def artifact_stats(folder: Path, manifest: Any) -> DatasetStats | None:
    """The shared normalization an artifact carries, as LeRobot's ``dataset_stats``."""
    from zk0.shared.normalization import NORMALIZATION_FILE, loads, to_lerobot

    if NORMALIZATION_FILE not in manifest.files:
        return None
    return to_lerobot(loads((Path(folder) / NORMALIZATION_FILE).read_bytes()))


@dataclass(frozen=True)
class SwapRecord:
    """A version made active: when it was asked for, how long loading took, when it went live."""

    version: int | None
    offered_at: float
    active_at: float
    load_s: float
    kind: str  # "offer", "load" or "rollback"


class VersionInUse:
    """The version that computed the engine's last chunk, and the one callback that hears it
    change (thread-safe; reports arrive in the order they were made)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known = False
        self.version: int | None = None
        self.callback: Callable[[int | None], None] | None = None

    def listen(self, callback: Callable[[int | None], None] | None) -> None:
        """Make ``callback`` the listener; it hears the version at once if one is known, so that
        a listener wired after the engine's warm-up learns it. Callbacks must return quickly."""
        with self._lock:
            self.callback = callback
            if callback is not None and self._known:
                callback(self.version)

    def report(self, version: int | None) -> None:
        with self._lock:
            if self._known and version == self.version:
                return
            self._known, self.version = True, version
            if self.callback is not None:
                self.callback(version)


class AdapterSlot:
    """Holds the active ``PolicyRuntime``; loads offered versions in its own thread."""

    def __init__(
        self,
        base: LoadedPolicy,
        base_stats: DatasetStats | None = None,
        keep_previous: int = 2,
    ) -> None:
        if keep_previous < 1:
            raise ValueError("keep_previous must be at least 1 (rollback needs one)")
        import safetensors.torch  # noqa: F401  (imported now, not during the first swap)

        self.base = base
        self.base_stats = base_stats
        self._keep = keep_previous
        self._swap_listeners: list[Callable[[PolicyRuntime], None]] = []
        self._base_weights = expert_weights(base.policy)
        self._processors = _Processors(base.policy.config)
        pre, post = self._processors.get("base", lambda: base_stats)
        self._active = PolicyRuntime(None, None, pre, post, self._base_weights)
        self._previous: list[PolicyRuntime] = []  # fleet versions only: rollback's history
        self._personal: PersonalPart | None = None  # merged into every runtime swapped in
        self._cond = threading.Condition()
        self._pending: tuple[int | None, Path, float] | None = None
        self._pending_personal: tuple[int, Callable[[], PersonalPart]] | None = None
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.swaps: list[SwapRecord] = []
        self.errors: list[str] = []

    # -- what the policy worker reads -----------------------------------------------------------
    @property
    def active(self) -> PolicyRuntime:
        return self._active  # one reference read: a chunk sees one version, whole

    @property
    def version(self) -> int | None:
        return self._active.version

    @property
    def personal_revision(self) -> int | None:
        return self._active.personal_revision

    def build(self, folder: Path) -> PolicyRuntime:
        """Verify the artifact at ``folder`` against the base and merge it (any thread); the
        fleet version alone (the slot's local part is merged in when it is swapped in)."""
        from zk0.shared.artifact import load_tensors, verify_artifact
        from zk0.shared.normalization import NORMALIZATION_FILE

        start = time.perf_counter()
        folder = Path(folder)
        manifest = verify_artifact(folder, base=self.base.base)
        weights = merge_lora(self._base_weights, manifest.lora, load_tensors(folder))
        entry = manifest.files.get(NORMALIZATION_FILE)
        key = f"sha256:{entry.sha256}" if entry is not None else "base"
        pre, post = self._processors.get(
            key, lambda: artifact_stats(folder, manifest) if entry else self.base_stats
        )
        runtime = PolicyRuntime(manifest.version, manifest.artifact_id, pre, post, weights)
        return replace(runtime, load_s=time.perf_counter() - start)

    # -- commands ---------------------------------------------------------------------------------
    def add_swap_listener(self, listener: Callable[[PolicyRuntime], None]) -> None:
        """Call ``listener`` with every runtime made active (offer, load, rollback), in the
        thread that swapped it in; it must return quickly."""
        self._swap_listeners.append(listener)

    def start(self) -> AdapterSlot:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="adapter-loader", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None

    def offer(self, version: int | None, path: Path, manifest: Any = None) -> None:
        """Load ``path`` in the background and swap it in; returns at once (thread-safe).

        The distribution subscriber's ``on_new_version(version, path, manifest)`` shape. A newer
        offer replaces one whose loading has not started (the latest version wins).
        """
        with self._cond:
            if self._pending is not None:
                superseded = self._pending[0]
                logger.info("adapter v{} superseded by v{} before loading", superseded, version)
            self._pending = (version, Path(path), time.monotonic())
            self._cond.notify_all()

    def load(self, path: Path) -> PolicyRuntime:
        """Load and swap in now, in the caller's thread (a command, or ``--adapter``)."""
        offered = time.monotonic()
        return self._swap(self.build(path), offered, "load")

    def offer_personal(self, revision: int, load: Callable[[], PersonalPart]) -> None:
        """Load local revision ``revision`` (``load`` verifies it) in the background and swap it
        in over the active fleet version; returns at once. A newer offer replaces one waiting."""
        with self._cond:
            self._pending_personal = (revision, load)
            self._cond.notify_all()

    def use_personal(self, part: PersonalPart | None) -> PolicyRuntime:
        """Run local part ``part`` (verified; None: none) over the active fleet version, now."""
        offered = time.monotonic()
        with self._cond:
            runtime = self._active.with_personal(part)  # merging refuses what does not fit
            runtime = replace(runtime, load_s=time.monotonic() - offered)
            replaced, self._active, self._personal = self._active, runtime, part
            self.swaps.append(
                SwapRecord(runtime.version, offered, time.monotonic(), runtime.load_s, "personal")
            )
        logger.info("local part: {} -> {} active", replaced.label, runtime.label)
        self._swapped(runtime)
        return runtime

    def rollback(self) -> PolicyRuntime:
        """Make the fleet version that ran before the current one active again (with the local
        part in use now: ``use_personal`` rolls that back)."""
        with self._cond:
            if not self._previous:
                raise ValueError("nothing to roll back to: no earlier version has run")
            runtime = self._with_local(self._previous.pop())
            now = time.monotonic()
            replaced, self._active = self._active, runtime
            self.swaps.append(SwapRecord(runtime.version, now, now, 0.0, "rollback"))
        logger.info("rolled back from {} to {}", replaced.label, runtime.label)
        self._swapped(runtime)
        return runtime

    def idle(self) -> bool:
        """No offer waiting or loading."""
        with self._cond:
            return self._pending is None and self._pending_personal is None and not self._busy

    # -- internals --------------------------------------------------------------------------------
    def _with_local(self, runtime: PolicyRuntime) -> PolicyRuntime:
        """``runtime`` with the slot's local part merged in (call holding ``_cond``)."""
        try:
            return runtime.with_personal(self._personal)
        except ValueError as error:  # verified, yet it does not fit: the fleet version alone
            logger.error("local part dropped: {}; running {} alone", error, runtime.label)
            self._personal = None
            return runtime.with_personal(None)

    def _swap(self, runtime: PolicyRuntime, offered: float, kind: str) -> PolicyRuntime:
        with self._cond:
            runtime = self._with_local(runtime)
            self._previous.append(self._active)
            del self._previous[: -self._keep]
            self._active = runtime
            self.swaps.append(
                SwapRecord(runtime.version, offered, time.monotonic(), runtime.load_s, kind)
            )
        logger.info(
            "adapter {} active (verified and merged in {:.1f} ms, off the control path)",
            runtime.label,
            runtime.load_s * 1e3,
        )
        self._swapped(runtime)
        return runtime

    def _swapped(self, runtime: PolicyRuntime) -> None:
        for listener in self._swap_listeners:
            listener(runtime)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopping or bool(self._pending or self._pending_personal)
                )
                if self._stopping:
                    return
                offer, personal = self._pending, None
                if offer is None:  # fleet versions first; a local revision merges over the newest
                    personal, self._pending_personal = self._pending_personal, None
                self._pending, self._busy = None, True
            try:
                if offer is not None:
                    version, path, offered = offer
                    what = f"adapter v{version} at {path}"
                    runtime = self.build(path)
                    if version is not None and runtime.version != version:
                        raise ValueError(f"it holds version {runtime.version}")
                    self._swap(runtime, offered, "offer")
                elif personal is not None:
                    revision, load = personal
                    what = "local part"  # the store's error names the revision and folder
                    part = load()  # verifies it
                    if part.revision != revision:
                        raise ValueError(f"r{revision} holds revision {part.revision}")
                    self.use_personal(part)
            except Exception as error:  # a bad artifact or revision must never stop the arm
                message = f"{what} not loaded: {error}"
                logger.error(message)
                self.errors.append(message)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
