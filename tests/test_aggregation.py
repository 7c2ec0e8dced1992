"""Aggregation is a pure function: exact where the maths says so, robust to bad replies."""

from __future__ import annotations

import re

import numpy as np
import pytest

from zk0.hub.aggregation import (
    ClientUpdate,
    aggregate,
    ffa_violation,
    lora_pairs,
    validate_update,
)
from zk0.shared.normalization import FeatureStats, combine_all, dumps, loads

A = "m.layers.0.q_proj.lora_A.weight"
B = "m.layers.0.q_proj.lora_B.weight"


def _update(
    seed: int, examples: int, rank: int = 4, shared_a: np.ndarray | None = None
) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    a = shared_a if shared_a is not None else rng.normal(size=(rank, 12)).astype(np.float32)
    b = rng.normal(size=(10, rank)).astype(np.float32)
    return ClientUpdate(f"c{seed}", {A: a, B: b}, examples)


def _product(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return arrays[B].astype(np.float64) @ arrays[A].astype(np.float64)


def test_fedavg_is_the_example_weighted_mean() -> None:
    updates = [_update(1, 10), _update(2, 30)]
    merged = aggregate("fedavg", updates, updates[0].arrays)
    np.testing.assert_allclose(
        merged[A], 0.25 * updates[0].arrays[A] + 0.75 * updates[1].arrays[A], rtol=1e-6
    )
    assert merged[A].dtype == np.float32


def test_replies_read_into_rows_average_as_tensor_by_tensor_and_a_dropped_nan_row_is_not_read() -> (
    None
):
    from flwr.app import Array, ArrayRecord

    from zk0.hub.update_rows import ReplyRows
    from zk0.shared.adapter_wire import ADAPTER_ARRAY, AdapterLayout, WireError, pack

    updates = [_update(seed, examples) for seed, examples in ((1, 10), (2, 30), (3, 60))]
    layout = AdapterLayout.of(updates[0].arrays)
    rows = ReplyRows(layout, 4)
    poisoned = {A: np.full_like(updates[0].arrays[A], np.nan), B: updates[0].arrays[B]}
    read = []
    for update in [*updates[:2], ClientUpdate("nan", poisoned, 5), *updates[2:]]:
        row = rows.add(pack(update.arrays))
        read.append(ClientUpdate(update.client, rows.arrays(row), update.num_examples, rows, row))
    kept = [u for u in read if u.client != "nan"]  # validation drops the NaN reply
    merged = aggregate("fedavg", kept, kept[0].arrays)
    expected = aggregate("fedavg", updates, updates[0].arrays)  # tensor by tensor, float64
    for name in (A, B):
        np.testing.assert_allclose(merged[name], expected[name], rtol=1e-6, atol=1e-7)
        assert merged[name].dtype == np.float32 and np.isfinite(merged[name]).all()
    # A reply that is not an adapter of this layout is refused with its reason, and not read.
    float64 = ArrayRecord({ADAPTER_ARRAY: Array(np.zeros(layout.size, np.float64))})
    named = ArrayRecord({A: Array(updates[0].arrays[A])})
    for record, reason in [
        (pack({B: updates[0].arrays[B]}), "values, the layout"),
        (float64, "not a float32 vector"),
        (named, "not ['adapter']"),
    ]:
        fresh = ReplyRows(layout, 1)
        with pytest.raises(WireError, match=re.escape(reason)):
            fresh.add(record)
        assert fresh.count == 0


def test_fedavg_of_factors_is_not_the_mean_update_but_svd_is_its_best_rank_r_fit() -> None:
    updates = [_update(seed, 10 * seed) for seed in (1, 2, 3)]
    weights = np.array([10, 20, 30]) / 60
    true_mean = sum(w * _product(u.arrays) for w, u in zip(weights, updates, strict=True))
    naive_error = np.linalg.norm(
        _product(aggregate("fedavg", updates, updates[0].arrays)) - true_mean
    )
    svd = aggregate("svd", updates, updates[0].arrays)
    svd_error = np.linalg.norm(_product(svd) - true_mean)
    singular = np.linalg.svd(true_mean, compute_uv=False)
    best_rank_4_error = np.sqrt((singular[4:] ** 2).sum())  # Eckart-Young
    assert svd_error == pytest.approx(best_rank_4_error, rel=1e-4)
    assert svd_error < naive_error / 2
    assert svd[A].shape == (4, 12) and svd[B].shape == (10, 4)


def test_ffa_averaging_is_exact_and_keeps_a() -> None:
    shared_a = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    updates = [_update(seed, 10, shared_a=shared_a) for seed in (1, 2, 3)]
    merged = aggregate("ffa", updates, updates[0].arrays)
    true_mean = sum(_product(u.arrays) for u in updates) / 3
    np.testing.assert_allclose(_product(merged), true_mean, rtol=1e-5, atol=1e-6)
    assert np.array_equal(merged[A], shared_a)
    moved = _update(4, 10)
    assert ffa_violation(moved, updates[0].arrays) is not None
    assert ffa_violation(updates[1], updates[0].arrays) is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda arrays: arrays.update({B: np.full((10, 4), np.nan, np.float32)}), "non-finite"),
        (
            lambda arrays: arrays.update({B: np.zeros((10, 8), np.float32)}),
            "expected float32[10, 4]",
        ),
        (lambda arrays: arrays.update({B: np.zeros((10, 4), np.float64)}), "float64"),
        (lambda arrays: arrays.pop(B), "missing"),
        (lambda arrays: arrays.update({"evil": np.zeros(1, np.float32)}), "unexpected ['evil']"),
    ],
)
def test_bad_replies_are_refused_with_a_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    reference = _update(0, 1).arrays
    bad = _update(1, 10)
    mutate(bad.arrays)
    message = validate_update(bad, reference)
    assert message is not None and reason in message
    assert validate_update(_update(2, 10), reference) is None
    assert "example count" in (validate_update(_update(3, 0), reference) or "")


def test_lora_pairs_match_a_with_b() -> None:
    assert lora_pairs([B, A]) == [(A, B)]
    with pytest.raises(ValueError, match="no matching lora_B"):
        lora_pairs([A])


def test_combined_statistics_equal_those_of_the_union() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc=i, scale=i + 1, size=(50 * (i + 1), 6)) for i in range(3)]
    combined = combine_all([{"action": FeatureStats.from_samples(p)} for p in parts])["action"]
    union = FeatureStats.from_samples(np.concatenate(parts))
    assert combined.count == union.count == 300
    for field in ("mean", "var", "min", "max"):
        np.testing.assert_allclose(getattr(combined, field), getattr(union, field), rtol=1e-12)
    restored = loads(dumps({"action": combined}))["action"]
    assert restored.count == combined.count
    for field in ("mean", "var", "min", "max"):
        assert np.array_equal(
            getattr(restored, field), getattr(combined, field)
        )  # exact round trip


def test_corrupt_statistics_are_refused() -> None:
    stats = FeatureStats.from_samples(np.ones((3, 2))).as_dict()
    stats["var"] = [-1.0, 0.0]
    with pytest.raises(ValueError, match="negative variance"):
        FeatureStats.from_dict(stats)


def test_svd_of_few_clients_through_the_thin_core_is_the_same_best_rank_r_fit() -> None:
    from zk0.hub.aggregation import factors_of_product, rank_r_factors

    rng = np.random.default_rng(7)
    left, right = rng.normal(size=(40, 12)), rng.normal(size=(12, 30))  # 3 clients of rank 4
    thin_b, thin_a = factors_of_product(left, right, 4)
    dense_b, dense_a = rank_r_factors(left @ right, 4)
    np.testing.assert_allclose(
        thin_b.astype(np.float64) @ thin_a, dense_b.astype(np.float64) @ dense_a, atol=1e-4
    )
    u, sigma, vt = np.linalg.svd(left @ right)  # and it is the truncated SVD's
    best = (u[:, :4] * sigma[:4]) @ vt[:4]
    np.testing.assert_allclose(thin_b.astype(np.float64) @ thin_a, best, atol=1e-4)


@pytest.mark.parametrize("magnitude", [0.02, 1e30])
def test_svd_of_many_clients_is_the_best_rank_r_fit_at_any_magnitude(magnitude: float) -> None:
    """More clients than the projection's smaller side (the dense path, float32 eigh refined in
    float64): the truncated SVD's error, to float32 precision, and no overflow at 1e30."""
    from zk0.hub.aggregation import svd_of_weighted_products

    rng = np.random.default_rng(11)
    arrays = [
        {
            A: rng.normal(0, magnitude, (4, 30)).astype(np.float32),
            B: rng.normal(0, magnitude, (40, 4)).astype(np.float32),
        }
        for _ in range(20)  # 80 > 30
    ]
    weights = rng.random(20)
    weights /= weights.sum()
    true_mean = sum(
        w * x[B].astype(np.float64) @ x[A].astype(np.float64)
        for w, x in zip(weights, arrays, strict=True)
    )
    merged = svd_of_weighted_products(arrays, weights)
    assert all(np.isfinite(merged[name]).all() for name in (A, B))
    sigma = np.linalg.svd(true_mean, compute_uv=False)
    best = np.sqrt((sigma[4:] ** 2).sum())
    error = np.linalg.norm(true_mean - merged[B].astype(np.float64) @ merged[A])
    assert error == pytest.approx(best, rel=1e-5)
