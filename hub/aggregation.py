"""Aggregation of LoRA adapters: pure functions over named numpy arrays.

Three modes, selected by the run config's ``aggregation``:

``fedavg`` (LoRAFedAvg, the default)
    Weighted mean of every ``lora_A`` and every ``lora_B`` separately. Cheap, but
    mean(B)·mean(A) is not the mean of the clients' updates B_i·A_i.
``svd``
    Weighted mean of the products ΔW_i = B_i·A_i, re-factored to rank r by truncated SVD
    (B = U·√S, A = √S·Vᵀ): the best rank-r approximation of the true average update.
``ffa``
    FFA-LoRA: A is frozen at its shared initialisation and only B is trained, so
    mean(B)·A is exactly the mean of B_i·A; A passes through unchanged.

Replies are validated before they count (names, shapes, dtypes, finite values, example
counts); a bad reply is dropped with its reason and the rest are aggregated. The hub bounds
them first (``zk0.hub.robust``: clipped and outlying updates, capped example counts) and calls
the weighted forms here (:func:`weighted_sum`, :func:`svd_of_weighted_products`). Products
are formed on operands scaled to unit magnitude: replies of 1e30 must not overflow into inf or
NaN factors. A mean reads
every reply once, at memory speed, where the hub read them into one matrix (``update_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from numpy.typing import NDArray

if TYPE_CHECKING:
    from zk0.hub.update_rows import ReplyRows

Arrays = dict[str, NDArray[np.float32]]
Mode = Literal["fedavg", "svd", "ffa"]
MODES: tuple[Mode, ...] = ("fedavg", "svd", "ffa")
MAX_EXAMPLES_PER_CLIENT = 10_000_000


@dataclass(frozen=True)
class ClientUpdate:
    client: str
    arrays: Arrays
    num_examples: int
    #: Where the reply was read into a row of the round's matrix (its arrays are views of it):
    #: the mean is then one matrix-vector product (``zk0.hub.update_rows``).
    rows: ReplyRows | None = None
    row: int = -1


def validate_update(update: ClientUpdate, reference: Arrays) -> str | None:
    """Why ``update`` must be dropped, or None if it fits ``reference`` (the global adapter)."""
    if not 0 < update.num_examples <= MAX_EXAMPLES_PER_CLIENT:
        return f"implausible example count {update.num_examples}"
    if set(update.arrays) != set(reference):
        missing = sorted(set(reference) - set(update.arrays))[:2]
        extra = sorted(set(update.arrays) - set(reference))[:2]
        return f"tensor names differ (missing {missing}, unexpected {extra})"
    for name, expected in reference.items():
        got = update.arrays[name]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            expected_text = f"{expected.dtype}{list(expected.shape)}"
            return f"{name}: {got.dtype}{list(got.shape)}, expected {expected_text}"
        if not np.isfinite(got).all():
            return f"{name}: non-finite values"
    return None


def _weights(updates: list[ClientUpdate]) -> NDArray[np.float64]:
    counts = np.array([u.num_examples for u in updates], dtype=np.float64)
    weights: NDArray[np.float64] = counts / counts.sum()
    return weights


def weighted_sum(arrays: list[Arrays], weights: NDArray[np.float64]) -> Arrays:
    """Σ weight_i·arrays_i per tensor, accumulated in float64, in the first one's dtype."""
    averaged: Arrays = {}
    for name, first in arrays[0].items():
        total = np.zeros(first.shape, dtype=np.float64)
        for weight, values in zip(weights, arrays, strict=True):
            total += weight * values[name]
        averaged[name] = total.astype(first.dtype)
    return averaged


def fedavg(updates: list[ClientUpdate]) -> Arrays:
    """Example-weighted mean of every tensor: over the rows of the round's matrix where the
    replies were read into one, else tensor by tensor (accumulated in float64)."""
    rows = updates[0].rows
    if rows is not None and all(u.rows is rows for u in updates):
        return rows.weighted_sum([u.row for u in updates], _weights(updates))
    return weighted_sum([u.arrays for u in updates], _weights(updates))


def lora_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(lora_A name, lora_B name) for every adapted module."""
    pairs = []
    for name in sorted(names):
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in names:
                raise ValueError(f"{name} has no matching lora_B tensor")
            pairs.append((name, partner))
    return pairs


def svd_of_products(updates: list[ClientUpdate]) -> Arrays:
    """Weighted mean of B_i·A_i per module, truncated back to rank r."""
    return svd_of_weighted_products([u.arrays for u in updates], _weights(updates))


def lora_only_pairs(names: list[str]) -> list[tuple[str, str]]:
    """:func:`lora_pairs`, refusing any tensor that is not part of a pair (svd needs pairs)."""
    pairs = lora_pairs(names)
    if {name for pair in pairs for name in pair} != set(names):
        raise ValueError("svd aggregation expects only lora_A/lora_B tensors")
    return pairs


def svd_of_weighted_products(arrays: list[Arrays], weights: NDArray[np.float64]) -> Arrays:
    """Σ weight_i·B_i·A_i per module, truncated back to rank r."""
    pairs = lora_only_pairs(list(arrays[0]))
    result: Arrays = {}
    for a_name, b_name in pairs:
        rank = arrays[0][a_name].shape[0]
        # ΔW = Σ w_i B_i A_i = [w_1 B_1 … w_n B_n] · [A_1; …; A_n]: one matmul, not n of them.
        stacked_b = np.concatenate(
            [np.float32(w) * x[b_name] for w, x in zip(weights, arrays, strict=True)], axis=1
        )
        stacked_a = np.concatenate([x[a_name] for x in arrays], axis=0)
        if 2 * stacked_a.shape[0] <= min(stacked_b.shape[0], stacked_a.shape[1]):
            result[b_name], result[a_name] = factors_of_product(stacked_b, stacked_a, rank)
        else:
            result[b_name], result[a_name] = rank_r_factors(_product(stacked_b, stacked_a), rank)
    return result


def factors_of_product(
    left: NDArray[np.floating], right: NDArray[np.floating], rank: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """:func:`rank_r_factors` of ``left @ right`` without forming it, for a thin inner side
    (few clients): with ``left = Q_l R_l`` and ``rightᵀ = Q_r R_r``, the product's SVD is that
    of the small core ``R_l R_rᵀ`` carried back by ``Q_l`` and ``Q_r`` (exact, float64, and
    several times faster than the Gram of the full product while the inner side is under half
    of it).
    """
    q_left, r_left = torch.linalg.qr(_float64(left))
    q_right, r_right = torch.linalg.qr(_float64(right).T)
    u, sigma, vt = torch.linalg.svd(r_left @ r_right.T)
    root = torch.sqrt(sigma[:rank])
    b = (q_left @ u[:, :rank]) * root
    a = root[:, None] * (vt[:rank] @ q_right.T)
    return _float32(b), _float32(a)


def rank_r_factors(
    delta: NDArray[np.floating], rank: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(B, A) with B·A the best rank-r approximation of ``delta`` (B = U√S, A = √S·Vᵀ).

    Through the Gram matrix of the smaller side (:func:`_leading_vectors`): the factors of a
    truncated SVD, an order of magnitude faster than LAPACK's SVD on 720x960 projections.
    """
    matrix = _float64(delta)
    tall = matrix.shape[0] > matrix.shape[1]
    squared, vectors = _leading_vectors(matrix if tall else matrix.T, rank)
    root = torch.sqrt(torch.sqrt(torch.clamp(squared, min=0.0)))  # sqrt(sigma)
    # The other side's singular vectors are delta·v/sigma (or uᵀ·delta/sigma); zero sigma adds 0.
    inverse_root = torch.where(root > 1e-12, 1.0 / root, torch.zeros_like(root))
    if tall:
        b, a = (matrix @ vectors) * inverse_root, root[:, None] * vectors.T
    else:
        b, a = vectors * root, inverse_root[:, None] * (vectors.T @ matrix)
    return _float32(b), _float32(a)


def _leading_vectors(side: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` leading right singular vectors of ``side`` (long x short, float64) and
    their squared singular values, largest first.

    LAPACK's eigh in float32 on the Gram matrix of ``side`` scaled to unit magnitude (no
    overflow, about half of float64's time), then one Rayleigh-Ritz step in float64 on a block
    twice as wide: vectors orthonormal in float64, singular values to float64 precision. The
    rank-r product B·A is delta·V·Vᵀ, which depends on the vectors' span alone, and float32
    resolves that span well below the adapters' own float32 precision wherever the spectrum has
    a gap.
    """
    scale = side.abs().max()
    if not bool(torch.isfinite(scale)) or scale == 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(side.T @ side)
        order = torch.argsort(eigenvalues, descending=True)[:count]
        return eigenvalues[order], eigenvectors[:, order]
    unit = (side / scale).to(torch.float32)
    _, approximate = torch.linalg.eigh(unit.T @ unit)  # ascending
    block = min(side.shape[1], 2 * count)
    basis, _ = torch.linalg.qr(approximate[:, -block:].to(torch.float64))
    projected = side @ basis
    squared, rotation = torch.linalg.eigh(projected.T @ projected)
    order = torch.argsort(squared, descending=True)[:count]
    return squared[order], basis @ rotation[:, order]


def _product(left: NDArray[np.float32], right: NDArray[np.float32]) -> NDArray[np.float64]:
    """``left @ right`` in float32 on operands scaled to unit magnitude (no overflow however
    large a reply's values, twice float64's speed), returned in float64 at its true scale."""
    left_scale, right_scale = float(np.abs(left).max()), float(np.abs(right).max())
    if not (left_scale > 0 and right_scale > 0):
        return np.zeros((left.shape[0], right.shape[1]))
    unit = torch.from_numpy(left / np.float32(left_scale)) @ torch.from_numpy(
        right / np.float32(right_scale)
    )
    return unit.to(torch.float64).numpy() * (left_scale * right_scale)


# The factorizations run on torch's LAPACK (MKL in its CPU wheels): eigh of a 720x720 Gram
# matrix takes about a third of numpy's OpenBLAS time here, and svd of 100 full-size adapters
# is 64 of them. Threads are torch's (``torch.set_num_threads``, or OMP_NUM_THREADS at start).
def _float64(values: NDArray[np.floating]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, np.float64))


def _float32(values: torch.Tensor) -> NDArray[np.float32]:
    return values.to(torch.float32).numpy()


def ffa(updates: list[ClientUpdate], reference: Arrays) -> Arrays:
    """Average B; keep the frozen, shared A (clients that changed A are refused earlier)."""
    return with_frozen_a(fedavg(updates), reference)


def with_frozen_a(averaged: Arrays, reference: Arrays) -> Arrays:
    """``averaged`` with every lora_A taken from ``reference`` (FFA-LoRA's frozen A)."""
    return {name: reference[name] if ".lora_A." in name else averaged[name] for name in averaged}


def ffa_violation(update: ClientUpdate, reference: Arrays) -> str | None:
    """FFA-LoRA trains B only: a client whose A moved does not follow the protocol."""
    for name, value in update.arrays.items():
        if ".lora_A." in name and not np.array_equal(value, reference[name]):
            return f"{name}: lora_A changed, but FFA-LoRA keeps A frozen"
    return None


def aggregate(mode: Mode, updates: list[ClientUpdate], reference: Arrays) -> Arrays:
    """Aggregate already-validated ``updates`` according to ``mode``."""
    if not updates:
        raise ValueError("no valid client updates to aggregate")
    if mode == "fedavg":
        return fedavg(updates)
    if mode == "svd":
        return svd_of_products(updates)
    if mode == "ffa":
        return ffa(updates, reference)
    raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {', '.join(MODES)}")
