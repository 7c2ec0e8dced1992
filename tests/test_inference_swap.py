"""A version is verified, merged exactly as PEFT merges, and refused whole if it does not fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import wait_until
from zk0.agent.inference.swap import AdapterSlot, expert_weights, merge_lora
from zk0.shared.artifact import TENSORS_FILE, ArtifactError, read_manifest
from zk0.shared.lora import merged_copy
from zk0.shared.policy_factory import LoadedPolicy


def test_merged_weights_are_exactly_pefts_merge_and_unload(
    make_tiny: Callable[[], LoadedPolicy], tiny_adapters: list[Path]
) -> None:
    base = make_tiny()
    state = load_file(tiny_adapters[2] / TENSORS_FILE)
    spec = read_manifest(tiny_adapters[2]).lora
    reference = dict(merged_copy(base.policy, spec, state).named_parameters())
    merged = merge_lora(expert_weights(base.policy), spec, state)
    assert len(merged) == 16
    changed = 0
    for name, weight in merged.items():
        assert torch.equal(weight, reference[name].detach()), name
        changed += not torch.equal(weight, dict(base.policy.named_parameters())[name])
    assert changed == len(spec.targets) * 4  # every wrapped projection of the 4 expert layers


def test_a_foreign_or_broken_adapter_is_refused_and_the_active_version_stays(
    make_tiny: Callable[[], LoadedPolicy], tiny_adapters: list[Path], tmp_path: Path
) -> None:
    slot = AdapterSlot(make_tiny()).start()
    try:
        slot.load(tiny_adapters[1])
        assert slot.version == 1
        state = load_file(tiny_adapters[2] / TENSORS_FILE)
        broken = {k: v.clone() for k, v in state.items()}
        first_b = next(k for k in broken if ".lora_B." in k)
        broken[first_b][0, 0] = float("nan")
        with pytest.raises(ValueError, match="not finite"):
            merge_lora(
                expert_weights(slot.base.policy), read_manifest(tiny_adapters[2]).lora, broken
            )
        with pytest.raises(ValueError, match="do not fit"):
            merge_lora(
                expert_weights(slot.base.policy),
                read_manifest(tiny_adapters[2]).lora,
                {k.replace("layers.0", "layers.9"): v for k, v in state.items()},
            )
        with pytest.raises(ArtifactError):
            slot.build(tmp_path / "missing")
        slot.offer(7, tmp_path / "missing")  # e.g. a callback for a folder that vanished
        wait_until(lambda: slot.idle() and bool(slot.errors), timeout_s=30, what="the refusal")
        assert slot.version == 1 and "v7" in slot.errors[0]
        slot.offer(5, tiny_adapters[2])  # offered under another number than it holds
        wait_until(lambda: slot.idle() and len(slot.errors) == 2, timeout_s=30, what="refusal")
        assert slot.version == 1 and "holds version 2" in slot.errors[1]
        slot.offer(2, tiny_adapters[2])
        wait_until(lambda: slot.version == 2, timeout_s=30, what="the swap")
        assert slot.rollback().version == 1
        assert slot.rollback().version is None  # the base
        with pytest.raises(ValueError, match="nothing to roll back"):
            slot.rollback()
    finally:
        slot.stop()
