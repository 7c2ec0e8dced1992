"""ONNX Runtime computes the same chunks as torch, for the base and for hot-swapped adapters.

The graphs of the tiny policy are exported once and cached under ``$ZK0_CACHE/onnx`` by a hash
of base, shapes and versions (later runs load them); the background-export test exports into
its own folder, since what it checks is the switch from torch to ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import SIM_ROBOT, chunk_noise, observation, wait_until
from zk0.agent.inference.backends import (
    BackendSelector,
    InferencePolicy,
    OnnxBackend,
    TorchBackend,
    predict_chunk,
)
from zk0.agent.inference.onnx_export import OnnxExport
from zk0.agent.inference.onnx_graphs import signature_of
from zk0.agent.inference.swap import AdapterSlot, PolicyRuntime
from zk0.shared.config import load_robot_config
from zk0.shared.fsutil import sha256_file
from zk0.shared.policy_factory import LoadedPolicy

TASK = load_robot_config(SIM_ROBOT).task
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def slot(make_tiny: Callable[[], LoadedPolicy]) -> AdapterSlot:
    return AdapterSlot(make_tiny())


@pytest.fixture(scope="module")
def inference(slot: AdapterSlot) -> InferencePolicy:
    return InferencePolicy(slot.base.policy)


def _export(slot: AdapterSlot, inference: InferencePolicy, root: Path | None = None) -> OnnxExport:
    batch = slot.active.preprocessor(observation(inference.policy, 0, TASK))
    signature = signature_of(inference.policy, batch)
    return OnnxExport(slot.base.base, slot.base.features, signature, root=root)


@pytest.fixture(scope="module")
def onnx_backend(slot: AdapterSlot, inference: InferencePolicy) -> OnnxBackend:
    export = _export(slot, inference)
    export.export_now(inference.policy)  # once: cached for later runs and the CLI test
    return OnnxBackend(export.folder, export.signature, inference)


def _normalized(backend: Any, runtime: PolicyRuntime, seed: int) -> np.ndarray:
    policy = backend.policy.policy
    batch = runtime.preprocessor(observation(policy, seed, TASK))
    return np.asarray(backend.predict(runtime, batch, chunk_noise(policy, seed)))


def test_onnx_runtime_matches_torch_for_the_base_and_swapped_adapters(
    slot: AdapterSlot,
    inference: InferencePolicy,
    onnx_backend: OnnxBackend,
    tiny_adapters: list[Path],
) -> None:
    folder = onnx_backend.folder
    files = {p.name: sha256_file(p) for p in folder.iterdir()}
    reference_backend = TorchBackend(inference)
    runtimes = [slot.active, *(slot.build(a) for a in tiny_adapters[1:])]
    chunks = []
    for runtime in runtimes:
        for seed in (0, 1):
            reference = _normalized(reference_backend, runtime, seed)
            onnx = _normalized(onnx_backend, runtime, seed)
            assert reference.shape == onnx.shape == (1, 50, 6)
            assert np.abs(reference - onnx).max() < TOLERANCE, runtime.label
        chunks.append(onnx)
        frame = observation(inference.policy, 3, TASK)
        noise = chunk_noise(inference.policy, 3)
        actions = predict_chunk(runtime, onnx_backend, frame, noise)
        reference_actions = predict_chunk(runtime, reference_backend, frame, noise)
        assert np.abs(actions - reference_actions).max() < TOLERANCE
    # The adapters' merged weights reach the graph as inputs: outputs change, files do not.
    assert np.abs(chunks[0] - chunks[2]).max() > 1e-3
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == files


def test_int8_graphs_stay_close_to_torch_take_swapped_adapters_and_follow_the_step_count(
    slot: AdapterSlot,
    inference: InferencePolicy,
    onnx_backend: OnnxBackend,
    tiny_adapters: list[Path],
) -> None:
    int8 = OnnxBackend(onnx_backend.folder, onnx_backend.signature, inference, precision="int8")
    assert int8.name == "onnxruntime-int8"
    sizes = {p.name: p.stat().st_size for p in onnx_backend.folder.iterdir()}
    fp32 = sizes["prefix.onnx"] + sizes.get("prefix.onnx.data", 0)  # graph + its weights
    assert sizes["prefix.int8.onnx"] < 0.7 * fp32  # matrices stored in int8
    reference_backend = TorchBackend(inference)
    base, swapped = slot.active, slot.build(tiny_adapters[2])
    worst = 0.0
    for runtime in (base, swapped):
        frame, noise = observation(inference.policy, 4, TASK), chunk_noise(inference.policy, 4)
        actions = predict_chunk(runtime, int8, frame, noise)
        reference = predict_chunk(runtime, reference_backend, frame, noise)
        worst = max(worst, float(np.abs(actions - reference).max()))
    assert worst < 5.0  # robot units (degrees, gripper 0..100); measured in the bench
    moved = np.abs(_normalized(int8, base, 1) - _normalized(int8, swapped, 1)).max()
    assert moved > 1e-3  # the adapter's weights reach the int8 graph as inputs

    # Fewer denoising steps: torch and ONNX Runtime both take them from the policy's config.
    few = InferencePolicy(slot.base.policy, denoising_steps=2)
    two_torch = _normalized(TorchBackend(few), base, 2)
    two_onnx = _normalized(OnnxBackend(onnx_backend.folder, onnx_backend.signature, few), base, 2)
    assert np.abs(two_torch - two_onnx).max() < TOLERANCE
    assert np.abs(two_torch - _normalized(reference_backend, base, 2)).max() > 1e-3


def test_background_export_serves_torch_until_onnx_runtime_is_ready(
    slot: AdapterSlot, inference: InferencePolicy, tmp_path: Path
) -> None:
    export = _export(slot, inference, root=tmp_path / "onnx")
    assert not export.ready()
    selector = BackendSelector("onnx", inference, export).start(wait=False)
    try:
        runtime = slot.active
        frame = observation(inference.policy, 5, TASK)
        noise = chunk_noise(inference.policy, 5)
        served, backend = selector.predict(runtime, frame, noise)
        assert backend == "torch" and export.status == "exporting"
        assert export.wait(timeout_s=500), export.error
        wait_until(lambda: selector.onnx_ready, timeout_s=60, what="the ONNX sessions")
        again, backend = selector.predict(runtime, frame, noise)
        assert backend == "onnxruntime"
        assert np.abs(served - again).max() < TOLERANCE
        assert export.log_path.is_file()
    finally:
        export.cancel()
