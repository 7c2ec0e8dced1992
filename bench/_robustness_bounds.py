"""``zk0 bench robustness``'s own check of every stored version: finite and within the bounds.

Written apart from the product's check (``zk0.shared.adapter_bounds``): base norms come from the
policy's own tensors (not the product's checkpoint reader) and ‖ΔW‖ from the explicit float64
product, so the re-check does not share the code it checks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zk0.shared.adapter_bounds import PEFT_PREFIX, AdapterBounds
from zk0.shared.artifact import load_arrays
from zk0.shared.store import AdapterStore


def base_norms(policy: Any) -> dict[str, float]:
    """‖W‖_F per adapted module (the action expert's attention projections)."""
    return {
        name.removesuffix(".weight"): float(np.linalg.norm(p.detach().double().numpy()))
        for name, p in policy.named_parameters()
        if name.endswith("_proj.weight") and ".lm_expert." in name
    }


class StoredVersionCheck:
    def __init__(self, base: dict[str, float], bounds: AdapterBounds) -> None:
        self.base, self.bounds = base, bounds

    def norms(self, store: AdapterStore, version: int) -> dict[str, float]:
        return _module_norms(load_arrays(store.path(version)), store, version)

    def recheck(
        self, store: AdapterStore, version: int, earlier: list[dict[str, float]]
    ) -> str | None:
        """Why the stored ``version`` is bad (non-finite, out of bounds), or None."""
        tensors = load_arrays(store.path(version))
        for name, value in tensors.items():
            if not np.isfinite(value).all():
                return f"{name}: non-finite values"
        for module, norm in _module_norms(tensors, store, version).items():
            if not norm <= self.bounds.max_relative_norm * self.base[module]:
                return f"{module}: ‖ΔW‖ {norm:.4g} > rho x ‖W‖ {self.base[module]:.4g}"
            largest = max((n.get(module, 0.0) for n in earlier), default=0.0)
            if largest > 0 and not norm <= self.bounds.max_growth * largest:
                return f"{module}: ‖ΔW‖ {norm:.4g} > growth x earlier {largest:.4g}"
        return None


def _module_norms(tensors: dict[str, Any], store: AdapterStore, version: int) -> dict[str, float]:
    """‖(alpha/r)·B·A‖_F per module from the explicit float64 product (tiny modules)."""
    lora = store.manifest(version).lora
    norms = {}
    for name, a in tensors.items():
        if ".lora_A." in name:
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            with np.errstate(over="ignore", invalid="ignore"):
                product = b.astype(np.float64) @ a.astype(np.float64)
                norm = float(np.linalg.norm(product)) * lora.alpha / lora.rank
            module = name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            norms[module] = norm if np.isfinite(norm) else float("inf")
    return norms
