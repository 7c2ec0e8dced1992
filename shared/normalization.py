"""Shared normalization statistics, combined exactly from per-client summaries.

Every client and every inference-only agent must normalize state and actions the same way,
or the shared adapter means different things on different arms. Before round 1 each client
reports, per feature, only its count, mean, (population) variance, min and max — never samples.
The hub combines them exactly (Chan et al.'s parallel update), and the result travels inside
every adapter artifact as ``normalization.json``, covered by the artifact's hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

NORMALIZATION_FILE = "normalization.json"
#: SmolVLA normalizes state and action with mean/std; images pass through.
NORMALIZED_FEATURES = ("observation.state", "action")
_STD_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Summary of one feature over ``count`` samples (float64 throughout)."""

    count: int
    mean: NDArray[np.float64]
    var: NDArray[np.float64]
    min: NDArray[np.float64]
    max: NDArray[np.float64]

    @classmethod
    def from_samples(cls, samples: NDArray[Any]) -> FeatureStats:
        values = np.asarray(samples, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0:
            raise ValueError(f"expected a non-empty (samples, dims) array, got {values.shape}")
        return cls(
            count=values.shape[0],
            mean=values.mean(axis=0),
            var=values.var(axis=0),
            min=values.min(axis=0),
            max=values.max(axis=0),
        )

    def combine(self, other: FeatureStats) -> FeatureStats:
        if self.mean.shape != other.mean.shape:
            raise ValueError(
                f"cannot combine stats of shapes {self.mean.shape} and {other.mean.shape}"
            )
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = (
            self.var * self.count
            + other.var * other.count
            + delta**2 * self.count * other.count / count
        )
        return FeatureStats(
            count=count,
            mean=mean,
            var=m2 / count,
            min=np.minimum(self.min, other.min),
            max=np.maximum(self.max, other.max),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean.tolist(),
            "var": self.var.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FeatureStats:
        arrays = {
            key: np.asarray(raw[key], dtype=np.float64) for key in ("mean", "var", "min", "max")
        }
        shapes = {value.shape for value in arrays.values()}
        if len(shapes) != 1 or int(raw["count"]) <= 0:
            raise ValueError("normalization stats: inconsistent shapes or non-positive count")
        if (
            not all(np.isfinite(value).all() for value in arrays.values())
            or (arrays["var"] < 0).any()
        ):
            raise ValueError("normalization stats: non-finite values or negative variance")
        return cls(count=int(raw["count"]), **arrays)


Stats = dict[str, FeatureStats]


def combine_all(per_client: list[Stats]) -> Stats:
    """Exact statistics of the union of all clients' samples."""
    if not per_client:
        raise ValueError("no client statistics to combine")
    keys = set(per_client[0])
    if any(set(stats) != keys for stats in per_client):
        raise ValueError("clients report statistics for different features")
    combined = dict(per_client[0])
    for stats in per_client[1:]:
        combined = {key: combined[key].combine(stats[key]) for key in sorted(keys)}
    return combined


def to_lerobot(stats: Stats) -> dict[str, dict[str, Any]]:
    """The ``dataset_stats`` shape LeRobot's normalizer takes (tensors of float32)."""
    import torch

    return {
        key: {
            "mean": torch.as_tensor(value.mean, dtype=torch.float32),
            "std": torch.as_tensor(
                np.sqrt(np.maximum(value.var, _STD_FLOOR**2)), dtype=torch.float32
            ),
            "min": torch.as_tensor(value.min, dtype=torch.float32),
            "max": torch.as_tensor(value.max, dtype=torch.float32),
            "count": torch.as_tensor([value.count]),
        }
        for key, value in stats.items()
    }


def dumps(stats: Stats) -> bytes:
    return (
        json.dumps({key: stats[key].as_dict() for key in sorted(stats)}, indent=1) + "\n"
    ).encode()


def loads(data: bytes) -> Stats:
    raw = json.loads(data)
    return {key: FeatureStats.from_dict(value) for key, value in raw.items()}
