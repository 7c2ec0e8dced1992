"""The hub's side of the int8 wire encoding: a round's version is its parent plus an int8
difference, kept beside the store, that rebuilds it bit for bit (the agents' side, over real
sockets, is in ``test_wire_delta.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import train_steps
from zk0.hub.publisher import Publisher
from zk0.shared.artifact import TENSORS_FILE, load_arrays
from zk0.shared.federation import RunSettings
from zk0.shared.fsutil import sha256_file
from zk0.shared.lora import LoraSpec, adapter_state, apply_lora
from zk0.shared.normalization import loads
from zk0.shared.policy_factory import COMMITTED_BASES, LoadedPolicy
from zk0.shared.store import AdapterStore
from zk0.shared.wire_delta import delta_path, rebuild


@pytest.mark.parametrize("encoding", ["int8", "bf16"])
def test_a_round_version_is_its_parent_plus_a_delta_that_rebuilds_it_bit_for_bit(
    make_tiny: Callable[[], LoadedPolicy], tmp_path: Path, encoding: str
) -> None:
    tiny = make_tiny()
    peft_model = apply_lora(tiny.policy, LoraSpec(), tiny.base.name_or_path)
    stats = loads((COMMITTED_BASES / "tiny-sim-base" / "normalization.json").read_bytes())
    store = AdapterStore(tmp_path / "hub")
    publisher = Publisher(RunSettings(policy="tiny", wire_encoding=encoding), store)
    parent, _ = publisher.fresh_adapter(stats)
    for round_ in (1, 2):
        train_steps(peft_model, tiny.preprocessor, steps=2, seed=round_)
        master = {k: v.numpy().copy() for k, v in adapter_state(peft_model).items()}
        before = load_arrays(store.path(parent))
        version = publisher.publish(master, stats, parent=parent, round_=round_, metrics={})
        assert version == parent + 1 and store.current().version == version
        tensors_file = store.path(version) / TENSORS_FILE
        if encoding == "bf16":
            assert not delta_path(store.root, version).exists()
            parent = version
            continue
        # An agent holding the parent rebuilds the version exactly from about half the bytes.
        delta = delta_path(store.root, version)
        rebuilt = tmp_path / f"rebuilt-{version}"
        rebuild(store.path(parent) / TENSORS_FILE, delta, rebuilt)
        assert sha256_file(rebuilt) == store.manifest(version).files[TENSORS_FILE].sha256
        # (the tiny adapter's tensor names are a third of its file; at full size about 0.54)
        assert delta.stat().st_size < 0.7 * tensors_file.stat().st_size
        # The version is within int8's step (plus bfloat16's rounding) of the round's result,
        # and the next round trains from that float32 result, not from the version.
        stored = load_arrays(store.path(version))
        for name, value in master.items():
            step = np.abs(value - before[name]).max() / 127
            error = np.abs(stored[name] - value)
            assert (error <= step / 2 + np.abs(value) * 2**-8 + 1e-12).all(), name
        trained_from = publisher.arrays(version)
        assert all(np.array_equal(trained_from[k], master[k]) for k in master)
        parent = version
    assert store.versions() == [0, 1, 2]
    poisoned = {k: np.full_like(v, np.nan) for k, v in master.items()}
    assert publisher.publish(poisoned, stats, parent=2, round_=3, metrics={}) == 2  # refused
    assert store.versions() == [0, 1, 2] and store.current().version == 2
    store.prune(keep=1)
    kept = sorted(path.name for path in (store.root / "deltas").glob("*"))
    assert kept == (["2.safetensors"] if encoding == "int8" else [])  # pruned with versions
