"""Bounds a LoRA adapter must keep before a hub stores it or an agent runs it.

An adapter changes each adapted base weight ``W`` by ``ΔW = (alpha / r) B A``. A version is
acceptable when

* every tensor is finite;
* for every module ``‖ΔW‖_F <= max_relative_norm x ‖W‖_F`` (rho): an honest adapter nudges the
  base, it does not replace it;
* for every module ``‖ΔW‖_F <= max_growth x the largest ‖ΔW‖_F`` of that module among the
  previous accepted versions, when there are any. Version 0 starts from ``B = 0`` (norm 0), so
  a module without a non-zero previous norm has no reference and only rho applies. The largest,
  not the median, because training makes norms grow round after round and a restarted
  training (cosine restarts, a promoted older version) must not look like an attack; rho stays
  the absolute ceiling.

Norms come from the r x r Gram matrices, ``‖BA‖² = trace((BᵀB)(AAᵀ))``, in float64: no d x d
product is formed, and values up to ~1e150 do not overflow. The check itself is pure (arrays and
numbers in, a verdict out). The file helpers at the end (norms of stored versions and of a
base checkpoint, read with numpy: no torch) import the artifact code lazily, because
``zk0.shared.config`` imports this module and the artifact code imports the config.

Defaults come from honest training measured here: LoRA r16, alpha 32, AdamW, batch 8 of
synthetic frames with random target actions (which push harder than real episodes), the largest
ratio ‖ΔW‖/‖W‖ over the 16 adapted modules (the median module's is 2-6x lower):

* ``tiny-sim-base``, lr 1e-4 (the run default): 0.039 / 0.23 / 0.68 after 20 / 100 / 300 steps;
  lr 1e-3: 0.41 / 1.6 / 3.7; lr 1e-2 (the test fixtures'): 0.24 / 1.0 / 4.6 after 1 / 4 / 20;
* ``tiny`` (random weights): lr 1e-4: 0.056 / 0.29 / 2.0; lr 1e-3: 0.49 / 3.0 / 6.1;
  lr 1e-2: 0.40 / 0.87 / 3.8

The tiny expert's weights are 32-64 wide, so a rank-16 update is large next to them; at full
size (expert weights of hundreds by hundreds) the same per-entry Adam steps should give smaller
ratios (estimated, not measured here: no full-size training fits this machine).
``max_relative_norm`` 20 leaves 10x over the default learning rate's worst and 3x over ten times
that rate; the faults it exists for (a client scaled x1e4, values of 1e30, NaN) land 1,000x and
more above it. ``max_growth`` 10: with equal local steps per round an honest module grows by at
most ~2.5x a round (20 -> 100 steps of the same run: 6x), so 10 also survives a run that raises
its local steps a few times over; a run that raises them ten-fold over a young adapter should
raise ``max_growth`` with them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from loguru import logger
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from zk0.shared.lora import EXPERT_LAYERS
from zk0.shared.safetensors_file import read_float_tensors, safetensors_layout

if TYPE_CHECKING:
    from zk0.shared.policy_factory import BaseRef

#: PEFT names adapter tensors ``base_model.model.<module>.lora_{A,B}.weight``.
PEFT_PREFIX = "base_model.model."
_LORA_TENSOR = re.compile(r"(.+)\.lora_([AB])\.weight")
#: Every base weight a LoRA adapter of ``zk0.shared.lora`` can change.
_EXPERT_WEIGHT = re.compile(rf"({EXPERT_LAYERS}\.(?:q_proj|k_proj|v_proj|o_proj))\.weight")
#: Honest adapters measured well below these (see the module docstring).
DEFAULT_MAX_RELATIVE_NORM = 20.0
DEFAULT_MAX_GROWTH = 10.0
#: Previous versions whose norms set the growth reference (the newest ones below the candidate).
HISTORY_VERSIONS = 8
Norms = dict[str, float]  # module (no PEFT prefix) -> ‖ΔW‖_F or ‖W‖_F


class AdapterBounds(BaseModel):
    """How far one adapter version may move the base, and how fast versions may grow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_relative_norm: float = Field(
        default=DEFAULT_MAX_RELATIVE_NORM,
        gt=0,
        description="rho: per module, ‖ΔW‖_F = ‖(alpha/r) B A‖_F may be at most rho x ‖W‖_F of the "
        "base weight it adapts.",
    )
    max_growth: float = Field(
        default=DEFAULT_MAX_GROWTH,
        gt=1,
        description="Per module, ‖ΔW‖_F may be at most this factor times the largest ‖ΔW‖_F of "
        f"that module in the {HISTORY_VERSIONS} previous accepted versions (when non-zero).",
    )


@dataclass(frozen=True)
class BoundsVerdict:
    """The outcome of a check: ``reason`` (one line) is None when the adapter is acceptable."""

    reason: str | None
    norms: Norms = field(default_factory=dict)  # per module ‖ΔW‖_F, when they could be computed

    @property
    def ok(self) -> bool:
        return self.reason is None


def module_of(tensor_name: str) -> tuple[str, str] | None:
    """(module, "A" or "B") of a PEFT LoRA tensor name; None for any other name."""
    match = _LORA_TENSOR.fullmatch(tensor_name.removeprefix(PEFT_PREFIX))
    return (match[1], match[2]) if match else None


def delta_norm(a: NDArray[Any], b: NDArray[Any], scale: float) -> float:
    """‖scale · B A‖_F from the r x r Gram matrices, in float64 (inf when it overflows)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        # Both Gram matrices are symmetric, so trace(XY) is the sum of their elementwise product.
        squared = float(np.sum((b64.T @ b64) * (a64 @ a64.T)))
    if not math.isfinite(squared):
        return math.inf
    return abs(scale) * math.sqrt(max(squared, 0.0))


def delta_norms(tensors: Mapping[str, NDArray[Any]], scale: float) -> Norms:
    """‖ΔW‖_F of every module whose A and B are both in ``tensors`` (assumed finite, paired)."""
    pairs = _pairs(tensors)
    return {module: delta_norm(pair["A"], pair["B"], scale) for module, pair in pairs.items()}


def _pairs(tensors: Mapping[str, NDArray[Any]]) -> dict[str, dict[str, NDArray[Any]]]:
    pairs: dict[str, dict[str, NDArray[Any]]] = {}
    for name, tensor in tensors.items():
        if (parsed := module_of(name)) is not None:
            pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    return pairs


def check_adapter(
    tensors: Mapping[str, NDArray[Any]],
    scale: float,
    bounds: AdapterBounds,
    base_norms: Mapping[str, float] | None,
    previous: Sequence[Mapping[str, float]] = (),
) -> BoundsVerdict:
    """Is the adapter ``tensors`` (PEFT names, scaling ``scale`` = alpha / r) acceptable?

    ``base_norms``: ‖W‖_F per adapted module (None: the relative bound is not checked, for a
    caller that has no base weights); ``previous``: per-module norms of previous accepted
    versions. The reason names the worst module and its numbers.
    """
    for name, tensor in tensors.items():
        values = np.asarray(tensor)
        if not np.issubdtype(values.dtype, np.floating):
            return BoundsVerdict(f"tensor {name}: dtype {values.dtype} is not floating point")
        if bad := int(values.size - np.count_nonzero(np.isfinite(values))):
            return BoundsVerdict(f"tensor {name}: {bad} of {values.size} values are not finite")
    pairs = _pairs(tensors)
    if unnamed := sorted(n for n in tensors if module_of(n) is None):
        return BoundsVerdict(f"tensor {unnamed[0]} is not a LoRA A or B matrix")
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            return BoundsVerdict(f"module {module}: has lora_{''.join(pair)} without its pair")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            return BoundsVerdict(f"module {module}: B {b.shape} and A {a.shape} do not multiply")
    norms = {module: delta_norm(p["A"], p["B"], scale) for module, p in sorted(pairs.items())}
    violations: list[tuple[float, str]] = []  # (how far past its limit, one-line reason)
    for module, norm in norms.items():
        limits: list[tuple[float, str]] = []  # (bound, how it was derived)
        if base_norms is not None:
            if module not in base_norms:
                return BoundsVerdict(f"module {module}: the base has no such weight", norms)
            rho, weight = bounds.max_relative_norm, base_norms[module]
            limits.append((rho * weight, f"max_relative_norm {rho:g} x ‖W‖ {weight:.4g}"))
        earlier = [n[module] for n in previous if math.isfinite(n.get(module, 0.0))]
        if (reference := max(earlier, default=0.0)) > 0:
            growth = bounds.max_growth
            how = f"max_growth {growth:g} x the largest earlier ‖ΔW‖ {reference:.4g}"
            limits.append((growth * reference, how))
        for limit, how in limits:
            if not norm <= limit:  # also catches an overflowed (inf) norm
                excess = norm / limit if limit > 0 else math.inf
                violations.append((excess, f"module {module}: ‖ΔW‖ {norm:.4g} > {how}"))
    if not violations:
        return BoundsVerdict(None, norms)
    violations.sort(key=lambda item: item[0], reverse=True)
    more = f" (and {len(violations) - 1} more over a bound)" if len(violations) > 1 else ""
    return BoundsVerdict(violations[0][1] + more, norms)


# -- reading norms from files (lazy imports: zk0.shared.config imports this module) ----------


def artifact_delta_norms(folder: Path) -> tuple[str, Norms]:
    """(artifact id, per-module ‖ΔW‖_F) of a stored artifact (its manifest gives the scale)."""
    from zk0.shared.artifact import TENSORS_FILE, read_manifest

    manifest = read_manifest(folder)
    tensors = read_float_tensors(Path(folder) / TENSORS_FILE)
    return manifest.artifact_id, delta_norms(tensors, manifest.lora.alpha / manifest.lora.rank)


def base_weight_norms(base: BaseRef) -> Norms:
    """‖W‖_F of the adaptable weights of ``base`` (resolved already: never downloads)."""
    folder = Path(base.name_or_path)
    if not folder.is_dir():  # a Hub id: the snapshot ``resolve_base`` fetched
        from huggingface_hub import snapshot_download

        revision = base.base_id.partition("@")[2] or None
        folder = Path(
            snapshot_download(base.name_or_path, revision=revision, local_files_only=True)
        )
    return checkpoint_weight_norms(folder)


class PolicyBaseNorms:
    """‖W‖_F of the base a policy spec names (an agent's own: ``AgentConfig.policy``), for
    versions built on that base; resolved and read once, on first use, off the import path."""

    def __init__(self, policy: str, robot_config: Path | None = None) -> None:
        self.policy, self.robot_config = policy, robot_config
        self._loaded: tuple[str, Norms] | None = None  # (base id, norms)
        self._tried = False

    def __call__(self, base_id: str) -> Norms | None:
        if not self._tried:
            self._tried = True
            self._loaded = self._load()
        if self._loaded is None or self._loaded[0] != base_id:
            return None
        return self._loaded[1]

    def _load(self) -> tuple[str, Norms] | None:
        from zk0.shared.config import load_robot_config
        from zk0.shared.features import PolicyFeatures
        from zk0.shared.policy_factory import GENERATED_BASES, committed_bases, resolve_base

        spec = self.policy
        try:
            if spec in committed_bases() or spec in GENERATED_BASES or Path(spec).exists():
                robot = load_robot_config(self.robot_config) if self.robot_config else None
                base = resolve_base(
                    spec, PolicyFeatures.from_robot_config(robot) if robot else None
                )
                return base.base_id, base_weight_norms(base)
            # A Hub id: only a snapshot already here (the policy the agent runs), never a
            # download from inside the subscriber.
            from huggingface_hub import snapshot_download

            repo_id, _, revision = spec.partition("@")
            folder = Path(
                snapshot_download(repo_id, revision=revision or None, local_files_only=True)
            )
            return f"{repo_id}@{folder.name}", checkpoint_weight_norms(folder)
        except Exception as error:  # resolving raises many types; all mean "no base here"
            logger.warning("no base weights for policy {}: {}", spec, error)
            return None


def checkpoint_weight_norms(checkpoint: Path) -> Norms:
    """‖W‖_F of every weight a LoRA adapter can change, from a checkpoint's model.safetensors."""
    weights = Path(checkpoint) / "model.safetensors"
    names = [n for n in safetensors_layout(weights) if _EXPERT_WEIGHT.fullmatch(n)]
    return {
        name.removesuffix(".weight"): float(np.linalg.norm(tensor.astype(np.float64)))
        for name, tensor in read_float_tensors(weights, names).items()
    }


class NormHistory:
    """Per-module ‖ΔW‖ of the versions in an adapter store, computed once per artifact id."""

    def __init__(self) -> None:
        self._by_artifact: dict[str, Norms] = {}

    def remember(self, artifact_id: str, norms: Norms) -> None:
        self._by_artifact[artifact_id] = norms

    def previous(self, store: Any, below: int, skip: Iterable[int] = ()) -> list[Norms]:
        """Norms of up to ``HISTORY_VERSIONS`` stored versions below ``below`` (newest first),
        except ``skip``; versions that cannot be read are left out (they are no reference)."""
        from zk0.shared.artifact import ArtifactError

        skipped = set(skip)
        candidates = [v for v in store.versions() if v < below and v not in skipped]
        found: list[Norms] = []
        for version in reversed(candidates[-HISTORY_VERSIONS:]):
            folder = store.path(version)
            try:
                artifact_id = store.manifest(version).artifact_id
                if artifact_id not in self._by_artifact:
                    self._by_artifact[artifact_id] = artifact_delta_norms(folder)[1]
            except (ArtifactError, OSError, ValueError):
                continue
            found.append(self._by_artifact[artifact_id])
        return found
