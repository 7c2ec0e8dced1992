"""Shared normalization statistics, combined exactly from per-client summaries.

Every client and every inference-only agent must normalize state and actions the same way,
or the shared adapter means different things on different arms. Before round 1 each client
reports, per feature, only its count, mean, (population) variance, min and max — never samples.
The hub combines them exactly (Chan et al.'s parallel update), and the result travels inside
every adapter artifact as ``normalization.json``, covered by the artifact's hash.

Counts and summaries are self-reported, so before combining the hub bounds them
(:func:`select_robust_stats`): each client's count is capped to a maximum share of the total
(:func:`capped_shares`, the same cap that bounds example weights in aggregation), and with three
or more clients one whose mean or spread lies far outside the others' (a robust z-score against
the median client, per feature dimension) is dropped with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

NORMALIZATION_FILE = "normalization.json"
#: SmolVLA normalizes state and action with mean/std; images pass through.
NORMALIZED_FEATURES = ("observation.state", "action")
_STD_FLOOR = 1e-6
#: MAD -> standard deviation for normally distributed values.
_MAD_TO_STD = 1.4826
#: A spread ratio is compared in log10 with at least this scale: at z = 10, a client's std
#: must be 1000x off the median client's before it counts as far outside.
_LOG_STD_SCALE_FLOOR = 0.3


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


def capped_shares(counts: NDArray[Any], max_share: float) -> NDArray[np.float64]:
    """Weights proportional to ``counts`` with none above the cap (water-filling).

    The cap is ``max(max_share, 2/n)`` for n clients: with 2/max_share clients or more (8 at a
    share of 1/4) the configured share binds; with fewer, a share the size of the equal share
    1/n or near it would throw away real differences in data, so a client may weigh up to twice
    the equal share. Two clients therefore weigh as reported (there is no majority to protect).
    Mass taken from capped clients goes to the others in proportion to their own counts.
    """
    values = np.asarray(counts, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not (values > 0).all():
        raise ValueError(f"counts must be a non-empty list of positive numbers, got {values}")
    count = values.size
    cap = max(max_share, 2.0 / count)
    capped = np.zeros(count, dtype=bool)
    weights = values / values.sum()
    while (over := (weights > cap * (1 + 1e-12)) & ~capped).any():
        capped |= over
        free = 1.0 - cap * capped.sum()
        weights = np.where(capped, cap, free * values / values[~capped].sum())
    result: NDArray[np.float64] = weights
    return result


def below_proportional(counts: NDArray[Any], shares: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Which clients :func:`capped_shares` weighed below their share of the counts."""
    values = np.asarray(counts, dtype=np.float64)
    capped: NDArray[np.bool_] = shares < values / values.sum() * (1 - 1e-9)
    return capped


def _robust_z(values: NDArray[np.float64], floor: NDArray[np.float64]) -> NDArray[np.float64]:
    """|x - median| / scale per column, the scale a MAD-based std no smaller than ``floor``."""
    median = np.median(values, axis=0)
    spread = _MAD_TO_STD * np.median(np.abs(values - median), axis=0)
    z: NDArray[np.float64] = np.abs(values - median) / np.maximum(spread, floor)
    return z


def stats_outliers(per_client: dict[str, Stats], max_z: float) -> dict[str, str]:
    """Why each far-out client must be dropped: its mean or spread, per feature dimension.

    A mean is measured in units of the clients' typical spread (the larger of the MAD of the
    means, the median client's std and a quarter of the median client's range), so honest arms
    whose data differ by task variant or calibration stay well inside; a spread (std) in log10
    units. Needs three clients: with two there is no majority to say which one is off.
    """
    if len(per_client) < 3 or max_z <= 0:
        return {}
    clients = list(per_client)
    keys = set(per_client[clients[0]])
    shapes = {(k, v.mean.shape) for stats in per_client.values() for k, v in stats.items()}
    if any(set(stats) != keys for stats in per_client.values()) or len(shapes) != len(keys):
        return {}  # combine_all refuses mismatched features with its own message
    reasons: dict[str, str] = {}
    for key in sorted(keys):
        stats = [per_client[client][key] for client in clients]
        means = np.stack([s.mean for s in stats])
        stds = np.sqrt(np.maximum(np.stack([s.var for s in stats]), _STD_FLOOR**2))
        ranges = np.stack([s.max - s.min for s in stats])
        typical = np.maximum(np.median(stds, axis=0), np.median(ranges, axis=0) / 4)
        typical = np.maximum(typical, _STD_FLOOR * (1 + np.abs(np.median(means, axis=0))))
        for label, z in (
            ("mean", _robust_z(means, typical)),
            ("std", _robust_z(np.log10(stds), np.full(stds.shape[1], _LOG_STD_SCALE_FLOOR))),
        ):
            for row, client in enumerate(clients):
                worst = int(np.argmax(z[row]))
                if z[row, worst] > max_z and client not in reasons:
                    value = (means if label == "mean" else stds)[row, worst]
                    reasons[client] = (
                        f"{key}[{worst}] {label} {value:.4g} is {z[row, worst]:.3g} robust "
                        f"z-scores from the other clients' (limit {max_z:g})"
                    )
    return reasons


def dropped_from(notes: dict[str, str]) -> dict[str, str]:
    """The clients :func:`select_robust_stats` dropped (not merely capped), with why."""
    return {client: note for client, note in notes.items() if not note.startswith("count capped")}


def select_robust_stats(
    per_client: dict[str, Stats], max_share: float, max_z: float
) -> tuple[list[Stats], dict[str, str]]:
    """(Statistics to combine, why each other client was dropped or capped).

    Far-out clients are dropped (:func:`stats_outliers`); the rest have their counts capped to
    ``max_share`` of the total (:func:`capped_shares`); a capped client's reason starts with
    "count capped" and its statistics still count.
    """
    notes = stats_outliers(per_client, max_z)
    kept = {client: stats for client, stats in per_client.items() if client not in notes}
    if not kept:
        return [], notes
    clients = list(kept)
    first_key = sorted(kept[clients[0]])[0]
    counts = np.array([kept[client][first_key].count for client in clients], dtype=np.float64)
    shares = capped_shares(counts, max_share)
    proportional = counts / counts.sum()
    uncapped = ~below_proportional(counts, shares)
    # Uncapped clients keep their counts; a capped one counts as frames_per_share x its share.
    frames_per_share = counts[uncapped].sum() / shares[uncapped].sum()
    selected: list[Stats] = []
    for row, client in enumerate(clients):
        if uncapped[row]:
            selected.append(kept[client])
            continue
        scale = shares[row] * frames_per_share / counts[row]
        notes[client] = (
            f"count capped: claimed {int(counts[row])} frames, {proportional[row]:.0%} of all, "
            f"counted as {shares[row]:.0%} ({max(1, round(counts[row] * scale))} frames)"
        )
        selected.append(
            {k: replace(v, count=max(1, round(v.count * scale))) for k, v in kept[client].items()}
        )
    return selected, notes
