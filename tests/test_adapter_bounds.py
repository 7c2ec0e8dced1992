"""Never publish or run a bad adapter: bounds on ‖ΔW‖, checked by the hub and by every agent.

The hub's ``Publisher`` and the agent's ``Updater`` run for real on real stores on disk; the
agent is driven without sockets (a fake hub answers its requests from the hub's store).
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_hub import FakeHub

from conftest import train_steps
from zk0.agent.distribution.state import StatusBox, SubscriberOptions
from zk0.agent.distribution.updater import Updater
from zk0.shared.adapter_bounds import (
    PEFT_PREFIX,
    AdapterBounds,
    base_weight_norms,
    check_adapter,
    delta_norm,
)
from zk0.shared.artifact import (
    ID_FILE,
    MANIFEST,
    TENSORS_FILE,
    ArtifactContentError,
    ArtifactError,
    Manifest,
    reversion_artifact,
    save_adapter_arrays,
    verify_artifact,
)
from zk0.shared.distribution import protocol as p
from zk0.shared.fsutil import sha256_file
from zk0.shared.lora import LoraSpec, adapter_state, apply_lora
from zk0.shared.policy_factory import COMMITTED_BASES, LoadedPolicy
from zk0.shared.safetensors_file import read_float_tensors
from zk0.shared.store import AdapterStore

MODULE = "model.vlm_with_expert.lm_expert.layers.0.self_attn.q_proj"
OTHER = "model.vlm_with_expert.lm_expert.layers.1.self_attn.v_proj"


def _adapter(seed: int, scale_b: float = 1.0) -> dict[str, np.ndarray]:
    """Two modules' LoRA factors (rank 4) under PEFT's names."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in (MODULE, OTHER):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = rng.normal(size=(4, 24)).astype("f4")
        b = rng.normal(size=(16, 4)) * 0.01 * scale_b
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.astype("f4")
    return tensors


BASE_NORMS = {MODULE: 4.0, OTHER: 4.0}


def test_gram_norm_equals_dense_norm() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 300)), rng.normal(size=(200, 8))
    assert delta_norm(a, b, 2.0) == pytest.approx(np.linalg.norm(2.0 * b @ a), rel=1e-12)
    huge = delta_norm(a * 1e30, b * 1e30, 2.0)  # float32 would overflow; float64 does not
    assert huge == pytest.approx(np.linalg.norm(2.0 * b @ a) * 1e60, rel=1e-12)
    assert delta_norm(a * 1e160, b, 1.0) == math.inf  # past float64: infinite, so refused


def test_bad_adapters_are_refused_with_the_module_named() -> None:
    bounds = AdapterBounds()
    honest = check_adapter(_adapter(1), 2.0, bounds, BASE_NORMS)
    assert honest.ok and set(honest.norms) == {MODULE, OTHER}

    poisoned = _adapter(1)
    poisoned[f"{PEFT_PREFIX}{OTHER}.lora_A.weight"][2, 3] = np.nan
    verdict = check_adapter(poisoned, 2.0, bounds, BASE_NORMS)
    assert (
        verdict.reason
        == f"tensor {PEFT_PREFIX}{OTHER}.lora_A.weight: 1 of 96 values are not finite"
    )

    scaled = check_adapter(_adapter(1, scale_b=1e4), 2.0, bounds, BASE_NORMS)
    assert scaled.reason is not None and "max_relative_norm 20 x ‖W‖ 4" in scaled.reason
    assert scaled.reason.startswith("module model.vlm_with_expert.lm_expert.layers.")
    assert "(and 1 more over a bound)" in scaled.reason

    # Within rho, but 30x the largest earlier norm of that module: too fast a jump.
    grown = _adapter(1)
    grown[f"{PEFT_PREFIX}{MODULE}.lora_B.weight"] *= 30
    previous = [honest.norms, {k: v / 2 for k, v in honest.norms.items()}]
    verdict = check_adapter(grown, 2.0, bounds, BASE_NORMS, previous)
    assert verdict.reason is not None
    assert verdict.reason.startswith(f"module {MODULE}: ‖ΔW‖ ")
    assert f"max_growth 10 x the largest earlier ‖ΔW‖ {honest.norms[MODULE]:.4g}" in verdict.reason
    assert check_adapter(_adapter(1), 2.0, bounds, BASE_NORMS, previous).ok  # same as before
    # Version 1 grows from B = 0: a zero norm is no reference.
    assert check_adapter(grown, 2.0, bounds, BASE_NORMS, [dict.fromkeys(BASE_NORMS, 0.0)]).ok


@pytest.fixture(scope="module")
def trained_tiny(make_tiny: Callable[[], LoadedPolicy]) -> tuple[LoadedPolicy, dict[str, Any]]:
    """The tiny policy and its adapter after 4 training steps (the test rigs' lr 1e-2)."""
    tiny = make_tiny()
    peft_model = apply_lora(tiny.policy, LoraSpec(), tiny.base.name_or_path)
    train_steps(peft_model, tiny.preprocessor, steps=4, seed=3)
    return tiny, {k: v.numpy().copy() for k, v in adapter_state(peft_model).items()}


def test_an_honest_trained_tiny_adapter_passes_with_a_wide_margin(
    trained_tiny: tuple[LoadedPolicy, dict[str, Any]],
) -> None:
    tiny, tensors = trained_tiny
    base = base_weight_norms(tiny.base)  # read from the checkpoint file with numpy
    weights = dict(tiny.policy.named_parameters())  # wrapped by LoRA: W is the base layer's
    assert base[MODULE] == pytest.approx(float(weights[f"{MODULE}.base_layer.weight"].norm()))
    spec = LoraSpec()
    verdict = check_adapter(tensors, spec.alpha / spec.rank, AdapterBounds(), base)
    assert verdict.ok, verdict.reason
    worst = max(verdict.norms[m] / base[m] for m in verdict.norms)
    assert 0 < worst < AdapterBounds().max_relative_norm / 5


# -- the hub -----------------------------------------------------------------------------------


def test_the_hub_does_not_store_a_bad_version_and_keeps_the_previous_current(
    trained_tiny: tuple[LoadedPolicy, dict[str, Any]], tmp_path: Path
) -> None:
    from zk0.hub.publisher import Publisher
    from zk0.shared.federation import RunSettings
    from zk0.shared.normalization import loads

    _, honest = trained_tiny
    stats = loads((COMMITTED_BASES / "tiny-sim-base" / "normalization.json").read_bytes())
    store = AdapterStore(tmp_path / "hub")
    publisher = Publisher(RunSettings(policy="tiny"), store)
    first, _ = publisher.fresh_adapter(stats)
    good = publisher.publish(honest, stats, parent=first, round_=1, metrics={})
    assert good == first + 1 and store.current().version == good

    scaled = {k: v * 1e4 if ".lora_B." in k else v for k, v in honest.items()}
    poisoned = {k: np.full_like(v, np.nan) if ".lora_A." in k else v for k, v in honest.items()}
    for bad in (scaled, poisoned):
        assert publisher.publish(bad, stats, parent=good, round_=2, metrics={}) == good
        assert store.versions() == [first, good] and store.current().version == good
    better = {k: v * 1.5 for k, v in honest.items()}  # the run goes on
    assert publisher.publish(better, stats, parent=good, round_=3, metrics={}) == good + 1


def test_the_same_run_seed_gives_the_same_version_0(tmp_path: Path) -> None:
    """The hub draws version 0's lora_A from the run's seed: runs compared on the same seeds
    start from the same adapter."""
    from zk0.hub.publisher import Publisher
    from zk0.shared.federation import RunSettings
    from zk0.shared.normalization import loads

    stats = loads((COMMITTED_BASES / "tiny-sim-base" / "normalization.json").read_bytes())
    files = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        store = AdapterStore(tmp_path / name)
        version, _ = Publisher(RunSettings(policy="tiny", seed=seed), store).fresh_adapter(stats)
        files[name] = store.manifest(version).files["adapter_model.safetensors"].sha256
    assert files["a"] == files["b"] != files["c"]


# -- the agent ---------------------------------------------------------------------------------


@pytest.fixture
def hub(tiny_adapters: list[Path], tmp_path: Path) -> FakeHub:
    """A hub store holding version 0: a real trained tiny adapter."""
    store = AdapterStore(tmp_path / "hub")
    with store.allocate() as (version, path):
        reversion_artifact(tiny_adapters[2], path, version=version, parent_version=None)
    return FakeHub(store)


def _agent(hub: FakeHub, root: Path, taken: list[int] | None = None) -> tuple[Updater, StatusBox]:
    status = StatusBox("arm-a")
    updater = Updater(
        AdapterStore(root),
        SubscriberOptions(refused_retry_s=0.05),  # the old retry delay, made short
        status,
        hub.send,
        hub.send_status,
        (lambda version, folder, manifest: taken.append(version)) if taken is not None else None,
        None,
        None,
    )
    updater.recover()
    return updater, status


def _manifest_requests(hub: FakeHub, updater: Updater, version: int) -> int:
    """Offer ``version``, serve what the agent asks, count its manifest requests."""
    updater.consider(hub.offer(version))
    asked = sum(isinstance(r, p.GetManifest) for r in hub.requests)
    hub.serve(updater)
    return asked


def test_an_agent_refuses_an_out_of_bounds_version_once_and_for_good(
    hub: FakeHub, tmp_path: Path
) -> None:
    template = hub.store.path(0)
    tensors = read_float_tensors(template / TENSORS_FILE)
    scaled = {k: v * 1e4 if ".lora_B." in k else v for k, v in tensors.items()}
    with hub.store.allocate() as (version, path):  # a hub without the check stored it
        save_adapter_arrays(template, path, scaled, version=version, parent_version=0)
    taken: list[int] = []
    updater, status = _agent(hub, tmp_path / "agent", taken)

    assert _manifest_requests(hub, updater, 0) == 1 and status.get().applied == 0
    assert _manifest_requests(hub, updater, 1) == 1
    error = status.get().error or ""
    assert error.startswith("refused v1: out of bounds: module model.vlm_with_expert.")
    assert "max_relative_norm 20 x ‖W‖" not in error  # no base weights here: growth caught it
    assert "max_growth 10 x the largest earlier ‖ΔW‖" in error
    assert status.get().applied == 0 and taken == [0]
    assert updater.store.versions() == [0] and updater.store.current().version == 0
    assert hub.statuses >= 2  # the refusal went out to the hub

    time.sleep(0.1)  # past the old retry delay: still not asked for again
    assert _manifest_requests(hub, updater, 1) == 0
    restarted, _ = _agent(hub, tmp_path / "agent")
    assert _manifest_requests(hub, restarted, 1) == 0, "a restarted agent remembers the refusal"


def test_an_agent_checks_against_its_own_base(
    hub: FakeHub, tmp_path: Path, trained_tiny: tuple[LoadedPolicy, dict[str, Any]]
) -> None:
    """With the base's norms, a first version (no earlier norm) is refused on rho alone."""
    tiny, _ = trained_tiny
    base = base_weight_norms(tiny.base)
    template = hub.store.path(0)
    tensors = read_float_tensors(template / TENSORS_FILE)
    scaled = {k: v * 1e4 if ".lora_B." in k else v for k, v in tensors.items()}
    with hub.store.allocate() as (version, path):
        save_adapter_arrays(template, path, scaled, version=version, parent_version=None)
    status = StatusBox("arm-b")
    updater = Updater(
        AdapterStore(tmp_path / "agent"),
        SubscriberOptions(),
        status,
        hub.send,
        hub.send_status,
        None,
        None,
        None,
        base_norms=lambda base_id: base if base_id == tiny.base.base_id else None,
    )
    assert _manifest_requests(hub, updater, 1) == 1
    assert "max_relative_norm 20 x ‖W‖" in (status.get().error or "")
    assert _manifest_requests(hub, updater, 0) == 1 and status.get().applied == 0


def _with_header(source: Path, out: Path, version: int, header: bytes) -> None:
    """A whole artifact (manifest and id match its bytes) whose tensor header is ``header``."""
    original = verify_artifact(source)
    out.mkdir(parents=True)
    for name in original.files:
        (out / name).write_bytes((source / name).read_bytes())
    weights = out / TENSORS_FILE
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    files = original.model_dump(mode="json")["files"]
    files[TENSORS_FILE] = {"sha256": sha256_file(weights), "size": weights.stat().st_size}
    manifest = Manifest.model_validate(
        {**original.model_dump(mode="json"), "version": version, "files": files}
    )
    (out / MANIFEST).write_bytes(manifest.canonical_bytes())
    (out / ID_FILE).write_text(manifest.artifact_id + "\n")


MALFORMED = {
    "a JSON list": b"[1, 2]",
    "a tensor that is a string": b'{"x": "F32"}',
    "a shape that is a number": b'{"x": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}}',
    "a dtype that is a number": b'{"x": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}',
    "offsets past the data": b'{"x": {"dtype": "F32", "shape": [99], "data_offsets": [0, 396]}}',
    "metadata that is a list": b'{"__metadata__": [1]}',
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_tensor_header_is_refused_once_with_a_reason(
    case: str, hub: FakeHub, tmp_path: Path
) -> None:
    _with_header(hub.store.path(0), hub.store.path(1), 1, MALFORMED[case])
    with pytest.raises(ArtifactContentError, match="safetensors header") as raised:
        verify_artifact(hub.store.path(1))
    assert isinstance(raised.value, ArtifactError) and "\n" not in str(raised.value)
    updater, status = _agent(hub, tmp_path / "agent")
    assert _manifest_requests(hub, updater, 1) == 1
    error = status.get().error or ""
    assert error.startswith("refused v1: ") and "safetensors header" in error
    assert status.get().applied is None and updater.store.versions() == []
    time.sleep(0.1)
    assert _manifest_requests(hub, updater, 1) == 0  # never fetched again
    assert json.loads((updater.store.root / "refused.json").read_text())[0]["version"] == 1


def test_a_bad_version_stored_before_a_crash_is_refused_not_switched_to(
    hub: FakeHub, tmp_path: Path
) -> None:
    template = hub.store.path(0)
    tensors = read_float_tensors(template / TENSORS_FILE)
    poisoned = {k: np.full_like(v, np.inf) if ".lora_B." in k else v for k, v in tensors.items()}
    with hub.store.allocate() as (version, path):
        save_adapter_arrays(template, path, poisoned, version=version, parent_version=0)
    taken: list[int] = []
    updater, status = _agent(hub, tmp_path / "agent", taken)
    assert _manifest_requests(hub, updater, 0) == 1
    updater.store.install(hub.store.path(1))  # installed, then the agent died before switching
    assert _manifest_requests(hub, updater, 1) == 0
    assert (status.get().error or "").startswith("refused v1: out of bounds: tensor ")
    assert "values are not finite" in (status.get().error or "")
    assert taken == [0] and updater.store.versions() == [0]
