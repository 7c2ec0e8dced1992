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
counts); a bad reply is dropped with its reason and the rest are aggregated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

Arrays = dict[str, NDArray[np.float32]]
Mode = Literal["fedavg", "svd", "ffa"]
MODES: tuple[Mode, ...] = ("fedavg", "svd", "ffa")
MAX_EXAMPLES_PER_CLIENT = 10_000_000


@dataclass(frozen=True)
class ClientUpdate:
    client: str
    arrays: Arrays
    num_examples: int


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


def fedavg(updates: list[ClientUpdate]) -> Arrays:
    """Example-weighted mean of every tensor (accumulated in float64)."""
    weights = _weights(updates)
    averaged: Arrays = {}
    for name, first in updates[0].arrays.items():
        total = np.zeros(first.shape, dtype=np.float64)
        for weight, update in zip(weights, updates, strict=True):
            total += weight * update.arrays[name]
        averaged[name] = total.astype(first.dtype)
    return averaged


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
    """Weighted mean of B_i·A_i per module, truncated back to rank r by SVD."""
    weights = _weights(updates)
    names = list(updates[0].arrays)
    result: Arrays = {}
    for a_name, b_name in lora_pairs(names):
        rank = updates[0].arrays[a_name].shape[0]
        # ΔW = Σ w_i B_i A_i = [w_1 B_1 … w_n B_n] · [A_1; …; A_n]: one matmul, no n big products.
        stacked_b = np.concatenate(
            [w * u.arrays[b_name] for w, u in zip(weights, updates, strict=True)], axis=1
        )
        stacked_a = np.concatenate([u.arrays[a_name] for u in updates], axis=0)
        delta = stacked_b.astype(np.float32) @ stacked_a.astype(np.float32)
        u_mat, singular, vt = np.linalg.svd(delta, full_matrices=False)
        root = np.sqrt(singular[:rank])
        result[b_name] = (u_mat[:, :rank] * root).astype(np.float32)
        result[a_name] = (root[:, None] * vt[:rank]).astype(np.float32)
    untouched = set(names) - set(result)
    if untouched:
        result |= fedavg(
            [
                ClientUpdate(u.client, {n: u.arrays[n] for n in untouched}, u.num_examples)
                for u in updates
            ]
        )
    return result


def ffa(updates: list[ClientUpdate], reference: Arrays) -> Arrays:
    """Average B; keep the frozen, shared A (clients that changed A are refused earlier)."""
    averaged = fedavg(updates)
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
