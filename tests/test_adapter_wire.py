"""The adapter in Flower's messages: one Array, whatever the adapter's tensor count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from zk0.shared.adapter_wire import AdapterLayout, WireError, pack, unpack, unpack_torch
from zk0.shared.federation import ARRAYS_KEY, CONFIG_KEY


def _adapter(modules: int) -> dict[str, torch.Tensor]:
    """A PEFT-shaped adapter state: (lora_A, lora_B) per module, in PEFT's (unsorted) order."""
    generator = torch.Generator().manual_seed(modules)
    state = {}
    for i in reversed(range(modules)):
        state[f"expert.layers.{i}.q_proj.lora_A.weight"] = torch.randn(16, 24, generator=generator)
        state[f"expert.layers.{i}.q_proj.lora_B.weight"] = torch.randn(32, 16, generator=generator)
    return state


def _objects(arrays: ArrayRecord) -> int:
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": 1})})
    message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    return len(get_all_nested_objects(message))


@pytest.mark.usefixtures("task_identity")
def test_the_hub_reads_what_the_arm_packed_tensor_for_tensor_in_a_message_of_few_objects() -> None:
    arm = _adapter(16)
    record = pack(arm)
    # The hub knows the layout from its own reference, whose order is not the arm's.
    reference = {name: arm[name].numpy() for name in sorted(arm, reverse=True)}
    received = unpack(record, AdapterLayout.of(reference))
    assert set(received) == set(arm)
    for name, tensor in arm.items():
        np.testing.assert_array_equal(received[name], tensor.numpy())
    # And the arm reads the hub's message into tensors it can train.
    back = unpack_torch(pack(reference), arm)
    assert all(torch.equal(back[name], arm[name]) for name in arm)
    back[next(iter(back))].add_(1.0)  # writable: a copy, not a view of the message's bytes
    # 32 tensors cross Flower as one Array: a fixed handful of objects, not one per tensor.
    named = ArrayRecord({name: tensor for name, tensor in arm.items()})
    assert _objects(record) == _objects(pack(_adapter(2))) < _objects(named) - 60


def test_an_adapter_of_another_size_is_refused_with_the_sizes() -> None:
    arm = _adapter(2)
    other = _adapter(3)
    with pytest.raises(WireError, match=r"adapter has 1792 values, the layout 2688"):
        unpack(pack(arm), AdapterLayout.of(other))
    with pytest.raises(WireError, match=r"not \['adapter'\]"):
        unpack_torch(ArrayRecord(arm), arm)
