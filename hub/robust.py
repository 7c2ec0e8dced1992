"""Robust aggregation: score every reply's update, clip, reject outliers, bound the counts.

Every reply is scored on what travels, as an update relative to the adapter the round started
from (the *reference*: the previous round's global adapter, whose B is not zero after round 1):

``fedavg``, ``svd`` (both factors travel)
    per adapted module U_i = B_i·A_i - B_ref·A_ref, the change the reply makes to the module's
    effective weight ΔW. Scoring ΔW_i alone would count the fleet's shared past (B_ref·A_ref)
    into every reply, hide a small bad step behind a large common adapter, and make the honest
    replies' norms grow with the rounds.
``ffa`` (A frozen and shared, only B travels)
    U_i = B_i - B_ref, the travelling factor's own change.

U_i is kept as a low-rank product L·R (L = [B_i, -B_ref], R = [A_i; A_ref]; for ffa R = I), and
every norm and inner product comes from r x r Gram matrices (``zk0.hub.update_geometry``),
⟨L1·R1, L2·R2⟩_F = trace((L1ᵀL2)(R2·R1ᵀ)), in float64, never from d x d products.

From the n x n matrix of those inner products (summed over modules):

1. **Clip.** A reply whose update norm exceeds ``clip-norm-factor`` x the median norm is scaled
   down to that bound (ffa: B's change; svd: its product's change; fedavg: both factors'
   changes, by the scale that brings B·A's change to the bound, :func:`factor_scale`). With
   two replies the median is their mean, so a factor >= 2 never clips an honest pair; the
   default (3) leaves honest replies of comparable size alone.
2. **Reject.** With three replies or more, the geometric median of the clipped updates (the
   robust centre; Weiszfeld's iteration on the Gram matrix) is found. A reply *as sent* (not
   as clipped: x1e4 is dropped, not kept at the bound) is dropped when it lies farther from the
   centre than ``reject-distance-factor`` x max(median distance, a quarter of the median
   norm), or when its cosine with the centre is below ``min-relative-cosine`` x the median
   reply's (a negated step or noise at an honest norm: as far out as an honest arm of another
   task variant, but pointing elsewhere). The floor keeps a pair of near-identical honest arms
   from making a third one an outlier; fewer than half the replies lie above twice their
   median distance or below their median cosine, so with a factor >= 2 and a ratio <= 1 (the
   settings allow no other) the majority is always kept.
3. **Weigh.** Self-reported example counts weigh the mean only up to ``max-client-share``
   (:func:`zk0.shared.normalization.capped_shares`; binding with 2/share replies or more, else
   at twice the equal share). Order statistics ignore counts, so no cap is reported there.
4. **Combine** with the mode's maths (``zk0.hub.aggregation``), or coordinate-wise by an order
   statistic (``order-statistic``: ``trimmed-mean`` or ``median``, counts ignored) for fleets
   that expect faulty arms; svd then re-factors the order statistic of the products. The
   trimmed mean drops floor(``trim-fraction`` x n) replies at each end of every coordinate, so
   it trims nothing below 1/fraction replies (4 at the default 0.3): small fleets that expect
   faulty arms want ``median``.

When nothing is clipped, rejected or capped and no order statistic is asked for, the result is
the plain aggregate, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from zk0.hub.aggregation import (
    Arrays,
    ClientUpdate,
    Mode,
    aggregate,
    lora_only_pairs,
    rank_r_factors,
    svd_of_weighted_products,
    weighted_sum,
    with_frozen_a,
)
from zk0.hub.update_geometry import (
    Float64,
    distances_to,
    factor_scale,
    geometric_median,
    low_rank_update,
    update_gram,
)
from zk0.shared.normalization import below_proportional, capped_shares

OrderStatistic = Literal["none", "trimmed-mean", "median"]
#: The typical distance to the centre is at least this share of the median norm, so that two
#: near-identical honest replies do not make a third, honest one look far out.
_DISTANCE_FLOOR = 0.25


class RobustSettings(Protocol):
    """What robust aggregation reads; :class:`~zk0.shared.federation.RunSettings` declares it."""

    @property
    def clip_norm_factor(self) -> float: ...
    @property
    def reject_distance_factor(self) -> float: ...
    @property
    def order_statistic(self) -> OrderStatistic: ...
    @property
    def trim_fraction(self) -> float: ...
    @property
    def min_relative_cosine(self) -> float: ...
    @property
    def max_client_share(self) -> float: ...


class AggregationError(ValueError):
    """The round cannot be aggregated (the hub keeps the previous adapter)."""


@dataclass(frozen=True)
class Screening:
    """Per reply: the factor its update is scaled by (1: untouched), and why, or why dropped."""

    scales: dict[str, float]
    clipped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    #: The update norm clipped replies are scaled to (None: no clipping).
    clip_bound: float | None = None


@dataclass(frozen=True)
class RobustResult:
    arrays: Arrays
    #: Agents whose replies did not count, with the reason.
    rejected: dict[str, str]
    #: Agents whose replies counted bounded (norm clipped, weight capped), with the reason.
    clipped: dict[str, str]


def screen(clients: list[str], gram: Float64, settings: RobustSettings) -> Screening:
    """Clip and reject from the replies' Gram matrix (pure: numbers in, decisions out)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    finite = np.isfinite(norms)
    rejected = {
        client: "update too large to measure in float64"
        for client, ok in zip(clients, finite, strict=True)
        if not ok
    }
    keep = [i for i, ok in enumerate(finite) if ok]
    if not keep:
        return Screening({}, rejected=rejected)
    gram, norms, kept = gram[np.ix_(keep, keep)], norms[keep], [clients[i] for i in keep]
    if not np.isfinite(gram).all():  # measurable norms, yet a product overflowed in between
        raise AggregationError("inner products between replies overflow float64")
    median_norm = float(np.median(norms))
    scales = np.ones(len(kept))
    clipped: dict[str, str] = {}
    bound = None
    if settings.clip_norm_factor > 0:
        bound = settings.clip_norm_factor * median_norm
        for i, client in enumerate(kept):
            if norms[i] > bound:
                scales[i] = bound / norms[i]
                clipped[client] = (
                    f"update norm {norms[i]:.3g} above {settings.clip_norm_factor:g}x the "
                    f"median {median_norm:.3g}: scaled by {scales[i]:.3g}"
                )
    if len(kept) >= 3:
        outliers = _outliers(gram, norms, scales, settings)
        for i, reason in outliers.items():
            clipped.pop(kept[i], None)
            rejected[kept[i]] = reason
    return Screening(
        {c: float(s) for c, s in zip(kept, scales, strict=True) if c not in rejected},
        clipped,
        rejected,
        bound,
    )


def _outliers(
    gram: Float64, norms: Float64, scales: Float64, settings: RobustSettings
) -> dict[int, str]:
    """Replies (by index) to drop, and why: far from the fleet's median update, or pointing
    elsewhere.

    The centre is the geometric median of the *clipped* updates (the honest majority's, a
    huge reply cannot drag it), written in the unclipped basis as coefficients c·s; distances
    and cosines are those of the replies *as sent*, so a reply x1e4 is dropped, not kept at
    the clip bound. The distance alone misses a reply at an honest norm that points the other
    way or nowhere (a negated step, noise): it lies about as far from the centre as an honest
    arm of another task variant does. Its cosine with the centre gives it away (about -1 and
    0, against 0.64-0.89 for honest arms in ``zk0 bench robustness``).
    """
    centre = geometric_median(gram * np.outer(scales, scales)) * scales
    reasons: dict[int, str] = {}
    if settings.reject_distance_factor > 0:
        distances = distances_to(gram, centre)
        typical = max(float(np.median(distances)), _DISTANCE_FLOOR * float(np.median(norms)))
        limit = settings.reject_distance_factor * typical
        for i in np.flatnonzero(distances > limit):
            reasons[int(i)] = (
                f"update lies {distances[i]:.3g} from the fleet's median update, beyond "
                f"{settings.reject_distance_factor:g}x the typical distance {typical:.3g}"
            )
    centre_norm = float(np.sqrt(max(float(centre @ gram @ centre), 0.0)))
    if settings.min_relative_cosine > 0 and centre_norm > 0:
        cosines = (gram @ centre) / np.maximum(norms * centre_norm, 1e-300)
        typical_cosine = float(np.median(cosines))
        if typical_cosine > 0:  # a fleet without a common direction has none to test against
            limit = settings.min_relative_cosine * typical_cosine
            for i in np.flatnonzero(cosines < limit):
                reasons.setdefault(
                    int(i),
                    f"update's cosine with the fleet's median update is {cosines[i]:.2f}, "
                    f"below {settings.min_relative_cosine:g}x the median reply's "
                    f"{typical_cosine:.2f}",
                )
    return reasons


def order_statistic(stacked: Float64, kind: OrderStatistic, trim_fraction: float) -> Float64:
    """Coordinate-wise median or trimmed mean over axis 0 (the replies)."""
    if kind == "median":
        median: Float64 = np.median(stacked, axis=0)
        return median
    count = stacked.shape[0]
    cut = min(int(trim_fraction * count), (count - 1) // 2)
    trimmed: Float64 = np.sort(stacked, axis=0)[cut : count - cut].mean(axis=0)
    return trimmed


def _scaled(arrays: Arrays, reference: Arrays, scale: float) -> Arrays:
    """reference + scale·(arrays - reference) per tensor (float64 in between)."""
    if scale == 1.0:
        return arrays
    return {
        name: (reference[name] + scale * (np.asarray(value, np.float64) - reference[name])).astype(
            value.dtype
        )
        for name, value in arrays.items()
    }


def _combine_svd(
    arrays: list[Arrays],
    scales: list[float],
    weights: Float64,
    reference: Arrays,
    settings: RobustSettings,
) -> Arrays:
    if settings.order_statistic == "none":
        # Σ w_i (P_ref + s_i (P_i - P_ref)) = Σ (w_i s_i) P_i + (1 - Σ w_i s_i) P_ref.
        factors = weights * np.array(scales)
        return svd_of_weighted_products(
            [*arrays, reference], np.append(factors, 1.0 - factors.sum())
        )
    result: Arrays = {}
    for a_name, b_name in lora_only_pairs(list(reference)):
        ref_product = np.asarray(reference[b_name], np.float64) @ reference[a_name]
        products = np.stack(
            [
                ref_product + s * (np.asarray(x[b_name], np.float64) @ x[a_name] - ref_product)
                for x, s in zip(arrays, scales, strict=True)
            ]
        )
        centre = order_statistic(products, settings.order_statistic, settings.trim_fraction)
        rank = reference[a_name].shape[0]
        result[b_name], result[a_name] = rank_r_factors(centre, rank)
    return result


def combine(
    mode: Mode,
    arrays: list[Arrays],
    scales: list[float],
    weights: Float64,
    reference: Arrays,
    settings: RobustSettings,
) -> Arrays:
    """The mode's aggregate of the screened replies (scaled towards the reference)."""
    if mode == "svd":
        return _combine_svd(arrays, scales, weights, reference, settings)
    bounded = [_scaled(x, reference, s) for x, s in zip(arrays, scales, strict=True)]
    if settings.order_statistic == "none":
        merged = weighted_sum(bounded, weights)
    else:
        merged = {
            name: order_statistic(
                np.stack([np.asarray(x[name], np.float64) for x in bounded]),
                settings.order_statistic,
                settings.trim_fraction,
            ).astype(first.dtype)
            for name, first in reference.items()
        }
    return with_frozen_a(merged, reference) if mode == "ffa" else merged


def robust_aggregate(
    mode: Mode, updates: list[ClientUpdate], reference: Arrays, settings: RobustSettings
) -> RobustResult:
    """Screen, weigh and combine already-validated ``updates`` (see the module doc)."""
    if not updates:
        raise AggregationError("no valid client updates to aggregate")
    clients = [u.client for u in updates]
    if len(set(clients)) != len(clients):
        raise AggregationError(f"two replies from the same agent among {sorted(clients)}")
    gram = update_gram([low_rank_update(mode, u.arrays, reference) for u in updates])
    screening = screen(clients, gram, settings)
    kept = [u for u in updates if u.client in screening.scales]
    if not kept:
        raise AggregationError(f"every reply was rejected: {screening.rejected}")
    counts = np.array([u.num_examples for u in kept], dtype=np.float64)
    weights = capped_shares(counts, settings.max_client_share)
    clipped = dict(screening.clipped)
    if settings.order_statistic == "none":  # an order statistic ignores the counts
        proportional = counts / counts.sum()
        capped = below_proportional(counts, weights)
        for update, weight, share, was_capped in zip(
            kept, weights, proportional, capped, strict=True
        ):
            if was_capped:
                note = (
                    f"claimed {update.num_examples} examples, {share:.0%} of the round: "
                    f"weight capped at {weight:.0%}"
                )
                clipped[update.client] = "; ".join(filter(None, [clipped.get(update.client), note]))
    scales = [screening.scales[u.client] for u in kept]
    if mode == "fedavg" and screening.clip_bound is not None:
        # Both factors move: ΔW's change is not linear in their scale.
        bound = screening.clip_bound
        scales = [
            factor_scale(u.arrays, reference, bound) if s < 1 else s
            for u, s in zip(kept, scales, strict=True)
        ]
    if not clipped and not screening.rejected and settings.order_statistic == "none":
        merged = aggregate(mode, kept, reference)  # the plain aggregate, bit for bit
    else:
        merged = combine(mode, [u.arrays for u in kept], scales, weights, reference, settings)
    for name, value in merged.items():
        if not np.isfinite(value).all():
            raise AggregationError(f"{name}: the aggregate has non-finite values")
    return RobustResult(merged, screening.rejected, clipped)
