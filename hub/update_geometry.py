"""The geometry of LoRA updates, from r x r Gram matrices (``zk0.hub.robust`` scores with it).

A reply's update is its change from the round's starting adapter, kept as a low-rank product
left·right per module (:func:`low_rank_update`); norms, inner products, distances to a
combination of updates and the geometric median all come from Grams of the factors,
⟨L1·R1, L2·R2⟩_F = trace((L1ᵀL2)(R2·R1ᵀ)), in float64, never from d x d products.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from zk0.hub.aggregation import Arrays, Mode, lora_only_pairs, lora_pairs

Float64 = NDArray[np.float64]
#: Per tensor or module: the update as a product left·right (float64).
LowRank = dict[str, tuple[Float64, Float64]]
_WEISZFELD_STEPS = 100
_BISECTION_STEPS = 60


def low_rank_update(mode: Mode, arrays: Arrays, reference: Arrays) -> LowRank:
    """The reply's change from ``reference`` as products left·right (see the module doc)."""
    names = list(reference)
    pairs = lora_only_pairs(names) if mode == "svd" else lora_pairs(names)
    paired = {name for pair in pairs for name in pair}
    update: LowRank = {}
    for a_name, b_name in pairs:
        b, b_ref = (np.asarray(x[b_name], np.float64) for x in (arrays, reference))
        if mode == "ffa":
            update[b_name] = (b - b_ref, np.eye(b.shape[1]))
            continue
        a, a_ref = (np.asarray(x[a_name], np.float64) for x in (arrays, reference))
        update[b_name] = (np.concatenate([b, -b_ref], axis=1), np.concatenate([a, a_ref]))
    for name in sorted(set(names) - paired):  # anything else counts coordinate by coordinate
        change = (np.asarray(arrays[name], np.float64) - reference[name]).reshape(-1, 1)
        update[name] = (change, np.ones((1, 1)))
    return update


def inner_product(x: LowRank, y: LowRank) -> float:
    """Σ over modules of ⟨L_x·R_x, L_y·R_y⟩_F = trace((L_xᵀL_y)(R_y·R_xᵀ)), from k x k Grams."""
    total = 0.0
    for name, (left_x, right_x) in x.items():
        left_y, right_y = y[name]
        # trace(P·Q) = Σ P ⊙ Qᵀ, and (R_y·R_xᵀ)ᵀ = R_x·R_yᵀ.
        total += float(np.sum((left_x.T @ left_y) * (right_x @ right_y.T)))
    return total


def update_gram(updates: list[LowRank]) -> Float64:
    """The n x n matrix of :func:`inner_product` between the replies' updates.

    Per module, two matrix products over all replies at once: the (n·k) x (n·k) Grams of the
    left factors' columns and of the right factors' rows (memory (n·k)² floats, k = 2r: a few
    MB for a hundred replies).
    """
    count = len(updates)
    gram = np.zeros((count, count))
    # A reply too large for float64 shows as inf or nan here; screen() rejects it by name.
    with np.errstate(over="ignore", invalid="ignore"):
        for name in updates[0]:
            lefts = np.stack([update[name][0] for update in updates])  # (n, d, k)
            rights = np.stack([update[name][1] for update in updates])  # (n, k, m)
            _, rows, width = lefts.shape
            columns = lefts.transpose(0, 2, 1).reshape(count * width, rows)
            left_grams = (columns @ columns.T).reshape(count, width, count, width)
            flat_rights = rights.reshape(count * width, -1)
            right_grams = (flat_rights @ flat_rights.T).reshape(count, width, count, width)
            # [i, k, j, l]: (L_iᵀL_j)[k, l] and (R_i·R_jᵀ)[k, l]; their dot is the trace above.
            gram += np.einsum("ikjl,ikjl->ij", left_grams, right_grams)
    symmetric: Float64 = (gram + gram.T) / 2  # equal up to rounding; exactly so from here on
    return symmetric


def distances_to(gram: Float64, centre: Float64) -> Float64:
    """‖U_i - Σ_j centre_j U_j‖ for every i, from the Gram matrix."""
    squared = np.diag(gram) - 2 * gram @ centre + centre @ gram @ centre
    result: Float64 = np.sqrt(np.clip(squared, 0.0, None))
    return result


def geometric_median(gram: Float64) -> Float64:
    """Coefficients a (Σa = 1) of the updates' geometric median Σ a_j U_j (Weiszfeld)."""
    count = gram.shape[0]
    centre: Float64 = np.full(count, 1.0 / count)
    # Replies at the centre itself would divide by zero; equal replies stay equally weighted.
    floor = max(1e-12 * float(np.sqrt(np.median(np.diag(gram)))), 1e-150)
    for _ in range(_WEISZFELD_STEPS):
        inverse = 1.0 / np.maximum(distances_to(gram, centre), floor)
        updated: Float64 = inverse / inverse.sum()
        if np.abs(updated - centre).max() < 1e-9:
            return updated
        centre = updated
    return centre


def factor_scale(arrays: Arrays, reference: Arrays, target: float) -> float:
    """The scale s of both factors' changes that brings ΔW's change to norm ``target``.

    With B = B_ref + s·dB and A = A_ref + s·dA, B·A - B_ref·A_ref = s·X + s²·Y per module
    (X = dB·A_ref + B_ref·dA, Y = dB·dA), so ‖·‖² = s²‖X‖² + 2s³⟨X, Y⟩ + s⁴‖Y‖², from the
    same r x r Grams as the scoring. It is below ``target`` at s = 0 and above it at s = 1 (the
    reply as sent); bisection finds where it crosses.
    """
    x: LowRank = {}
    y: LowRank = {}
    for a_name, b_name in lora_pairs(list(reference)):
        b_ref, a_ref = (np.asarray(reference[n], np.float64) for n in (b_name, a_name))
        d_b = np.asarray(arrays[b_name], np.float64) - b_ref
        d_a = np.asarray(arrays[a_name], np.float64) - a_ref
        x[b_name] = (np.concatenate([d_b, b_ref], axis=1), np.concatenate([a_ref, d_a]))
        y[b_name] = (d_b, d_a)
    paired = {name for pair in lora_pairs(list(reference)) for name in pair}
    for name in sorted(set(reference) - paired):  # anything else moves linearly
        change = (np.asarray(arrays[name], np.float64) - reference[name]).reshape(-1, 1)
        x[name], y[name] = (change, np.ones((1, 1))), (np.zeros_like(change), np.ones((1, 1)))
    xx, xy, yy = inner_product(x, x), inner_product(x, y), inner_product(y, y)
    low, high = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        squared = middle**2 * xx + 2 * middle**3 * xy + middle**4 * yy
        low, high = (middle, high) if squared <= target**2 else (low, middle)
    return low
