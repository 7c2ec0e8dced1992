"""The personalized mode: each arm's local LoRA part trains beside the shared adapter, never leaves
the arm, resumes from its store after a restart, is verified before it runs, rolls back with the
fleet version, and runs hot-swapped exactly as PEFT computes both adapters."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import predict, train_steps, wait_until
from zk0.agent.personal import META, TENSORS, PersonalError, PersonalStore, shared_digest
from zk0.shared.adapter_wire import pack, unpack_torch
from zk0.shared.federation import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_MSE,
    METRICS_KEY,
    NORMALIZATION,
    NodeSettings,
    RunSettings,
)
from zk0.shared.lora import (
    LoraSpec,
    adapter_state,
    add_personal_adapter,
    apply_lora,
    load_adapter_state,
    personal_state,
)
from zk0.shared.policy_factory import LoadedPolicy

RUN = RunSettings(
    policy="tiny-sim-base", personal_rank=4, local_steps=2, batch_size=2, lr=1e-3, eval_frames=2
)
LOCAL = LoraSpec(rank=4, alpha=8.0)  # what personal-rank 4 gives


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's runtime sets before messages are built (restored after)."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(scope="module")
def arm() -> tuple[Path, dict[str, torch.Tensor], bytes]:
    """A cached two-episode simulated dataset, a fresh shared adapter and its normalization."""
    from zk0.agent import round_tasks
    from zk0.agent.episode_cache import recorded
    from zk0.agent.training import dataset_stats, open_dataset
    from zk0.shared.normalization import dumps
    from zk0.shared.sim_variants import CLIENT_VARIANTS

    data_root = recorded("fed-success", CLIENT_VARIANTS["sim-00"], episodes=2, episode_time_s=1.0)
    base = round_tasks._base(RUN.policy, str(RUN.robot_config_path))
    peft_model = apply_lora(copy.deepcopy(base.policy), RUN.lora, base.base.name_or_path)
    stats = dumps(dataset_stats(open_dataset(data_root, base.policy.config)))
    return data_root, adapter_state(peft_model), stats


def _message(shared: dict[str, torch.Tensor], stats: bytes, server_round: int) -> Message:
    config = ConfigRecord({NORMALIZATION: stats, "server-round": server_round})
    content = RecordDict({ARRAYS_KEY: pack(shared), CONFIG_KEY: config})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


@pytest.mark.usefixtures("task_identity")
def test_the_local_part_trains_and_never_leaves_the_arm_then_resumes_after_a_restart(
    arm: tuple[Path, dict[str, torch.Tensor], bytes], tmp_path: Path
) -> None:
    from zk0.agent import round_tasks
    from zk0.agent.personal_round import attach

    data_root, shared, stats = arm
    sim_root = tmp_path / "sim"
    sim_root.mkdir()
    (sim_root / "sim-00").symlink_to(data_root)
    simulation = RUN.model_copy(update={"sim_data_root": str(sim_root)})
    node = NodeSettings.from_node_config({"partition-id": 0}, simulation)
    assert node.personal_dir == str(sim_root / "sim-00.personal")  # simulation's local parts
    store = PersonalStore(Path(node.personal_dir))

    reply = RecordDict(round_tasks._train(_message(shared, stats, 1), RUN, node, 1))
    # Only the shared adapter travels: exactly its values and bytes, nothing of rank 4.
    assert list(reply.array_records) == [ARRAYS_KEY]
    arrays = reply.array_records[ARRAYS_KEY]
    sent = unpack_torch(arrays, shared)
    assert arrays.count_bytes() == pack(shared).count_bytes()
    assert any(not torch.equal(sent[k], shared[k]) for k in shared)  # the shared part trained
    first = store.load_current()
    assert first is not None and (first.revision, first.meta.parent) == (1, None)
    assert first.meta.server_round == 1 and first.meta.shared_sha256 == shared_digest(shared)
    sent_shapes = {tensor.shape for tensor in sent.values()}
    assert all(4 in t.shape and t.shape not in sent_shapes for t in first.state.values())
    assert any(t.abs().sum() > 0 for k, t in first.state.items() if ".lora_B." in k)

    # A restart: a new process holds nothing but the disk. The next round resumes from r1.
    round_tasks._base.cache_clear()
    base = round_tasks._base(RUN.policy, str(RUN.robot_config_path))
    fresh = apply_lora(copy.deepcopy(base.policy), RUN.lora, base.base.name_or_path)
    load_adapter_state(fresh, sent)
    resumed = attach(fresh, RUN, node, sent)
    assert resumed is not None and resumed.parent == 1
    assert all(torch.equal(v, first.state[k]) for k, v in personal_state(fresh).items())
    # With ffa only the shared A stays frozen: the local part is never averaged.
    ffa = apply_lora(copy.deepcopy(base.policy), RUN.lora, base.base.name_or_path)
    attach(ffa, RUN.model_copy(update={"aggregation": "ffa"}), node, sent)
    trainable = {n.split(".lora_")[1] for n, p in ffa.named_parameters() if p.requires_grad}
    assert trainable == {"B.default.weight", "A.personal.weight", "B.personal.weight"}
    round_tasks._train(_message(sent, stats, 2), RUN, node, 2)
    second = store.load_current()
    assert second is not None and (second.revision, second.meta.parent) == (2, 1)
    assert any(not torch.equal(second.state[k], first.state[k]) for k in first.state)

    # Evaluation runs what the arm runs (shared + local); a node without a store, shared alone.
    def eval_mse(on: NodeSettings) -> object:
        metrics = round_tasks._evaluate(_message(sent, stats, 2), RUN, on, 2)[METRICS_KEY]
        return metrics[EVAL_MSE]

    assert eval_mse(node) != eval_mse(node.model_copy(update={"personal_dir": ""}))
    assert store.revisions() == [1, 2]  # evaluating writes nothing


def _state(seed: int, nan: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {
        f"m.layers.{i}.q_proj.lora_{k}.weight": torch.randn(shape, generator=generator)
        for i in range(2)
        for k, shape in (("A", (4, 8)), ("B", (8, 4)))
    }
    if nan:
        next(iter(state.values()))[0, 0] = float("nan")
    return state


def _save(store: PersonalStore, state: dict[str, torch.Tensor], parent: int | None) -> int:
    """A round's revision; 0 where the pointer had moved since ``parent`` (kept, not current)."""
    revision, current = store.save(
        state, LOCAL, parent=parent, shared_sha256="0" * 64, server_round=1
    )
    return revision if current else 0


def test_a_tampered_or_non_finite_revision_is_refused_and_rollback_passes_it_over(
    tmp_path: Path,
) -> None:
    from safetensors.torch import save_file

    store = PersonalStore(tmp_path / "personal", keep=3)
    assert store.load_current() is None and store.revisions() == []
    with pytest.raises(PersonalError, match="not finite"):  # never stored
        _save(store, _state(0, nan=True), parent=None)
    for revision in (1, 2, 3):
        assert _save(store, _state(revision), parent=revision - 1 or None) == revision
    assert store.current() == 3

    # r3: one flipped byte. r2: a NaN, with a meta.json rewritten to match (sha256 alone passes).
    data = bytearray((store.path(3) / TENSORS).read_bytes())
    data[-1] ^= 1
    (store.path(3) / TENSORS).write_bytes(bytes(data))
    save_file(_state(2, nan=True), str(store.path(2) / TENSORS))
    from zk0.shared.fsutil import sha256_file

    meta = json.loads((store.path(2) / META).read_text())
    meta["sha256"] = sha256_file(store.path(2) / TENSORS)
    (store.path(2) / META).write_text(json.dumps(meta))
    for revision, why in ((3, "does not match its sha256"), (2, "is not finite")):
        with pytest.raises(PersonalError, match=why) as refused:
            store.load(revision)
        assert "\n" not in str(refused.value) and f"r{revision}" in str(refused.value)
    part, skipped = store.load_usable()
    assert part is not None and part.revision == 1 and "sha256" in skipped[0]

    assert store.rollback().revision == 1 and store.current() == 1  # r2 passed over
    with pytest.raises(PersonalError, match="no local revision before r1"):
        store.rollback()
    # A round that started from r3 ends after the rollback: r4 is kept, but r1 stays current.
    assert _save(store, _state(4), parent=3) == 0 and store.revisions()[-1] == 4
    assert store.current() == 1
    assert _save(store, _state(5), parent=1) == 5
    assert store.revisions() == [3, 4, 5] and store.current() == 5  # bounded; current kept


def test_the_hot_swap_runtime_with_a_local_part_is_pefts_forward_with_both_adapters(
    make_tiny: Callable[[], LoadedPolicy], tmp_path: Path
) -> None:
    from zk0.agent.inference.backends import InferencePolicy
    from zk0.agent.inference.swap import AdapterSlot
    from zk0.agent.personal_follow import PersonalFollower
    from zk0.shared.artifact import as_stored, save_adapter
    from zk0.shared.control import RefusedError

    tiny = make_tiny()
    peft_model = apply_lora(copy.deepcopy(tiny.policy), LoraSpec(), tiny.base.name_or_path)
    add_personal_adapter(peft_model, LOCAL)
    assert peft_model.base_model.active_adapters == ["default", "personal"]
    shared_before = {k: v.clone() for k, v in adapter_state(peft_model).items()}
    local_before = {k: v.clone() for k, v in personal_state(peft_model).items()}
    train_steps(peft_model, tiny.preprocessor, steps=2)  # both parts train, jointly
    shared, local = adapter_state(peft_model), personal_state(peft_model)
    assert all(not torch.equal(shared_before[k], shared[k]) for k in shared)
    assert all(not torch.equal(local_before[k], local[k]) for k in local)

    # The fleet version as the hub publishes it (from a model holding the shared adapter alone).
    publisher = apply_lora(copy.deepcopy(tiny.policy), LoraSpec(), tiny.base.name_or_path)
    load_adapter_state(publisher, shared)
    save_adapter(publisher, tmp_path / "v1", version=1, base=tiny.base, lora=LoraSpec())
    # The arm runs the version as stored (bfloat16), and so does the reference below.
    stored = as_stored({k: v.numpy() for k, v in shared.items()})
    load_adapter_state(peft_model, {k: torch.from_numpy(v) for k, v in stored.items()})
    store = PersonalStore(tmp_path / "personal")

    def write(scale: float, parent: int | None) -> int:
        return _save(store, {k: v * scale for k, v in local.items()}, parent)

    slot = AdapterSlot(tiny)
    follower = PersonalFollower(store.root, slot)
    follower.start()  # no revision yet (inference-only, newly enrolled): the fleet version alone
    follower.check()
    assert slot.active.label == "base" and not store.root.exists()  # following creates nothing
    with pytest.raises(RefusedError, match="nothing to roll back to") as refused:
        follower.rollback()
    assert "\n" not in str(refused.value)

    slot.start()
    try:
        slot.load(tmp_path / "v1")
        assert (write(1.0, None), write(0.5, 1)) == (1, 2)
        follower.check()  # what the ClientApp process wrote is followed
        wait_until(lambda: slot.active.label == "v1+r2", timeout_s=30, what="r2 swapped in")
        rolled = follower.rollback()
        assert rolled.summary == "now running the base policy (was v1) with local r1 (was r2)"
        assert (rolled.in_use, rolled.personal_revision, store.current()) == (None, 1, 1)
        slot.load(tmp_path / "v1")  # a fleet version swapped in keeps the local part
        runtime = slot.active
        assert (runtime.version, runtime.personal_revision) == (1, 1)

        # Merged weights = PEFT's merge of both adapters; outputs = PEFT's forward with both.
        expected = predict(peft_model, tiny.preprocessor)
        inference = InferencePolicy(tiny.policy).apply(runtime)
        assert float((predict(inference, tiny.preprocessor) - expected).abs().max()) < 1e-5
        reference = dict(peft_model.merge_and_unload().named_parameters())
        assert max(float((w - reference[n]).abs().max()) for n, w in runtime.weights.items()) < 1e-5

        # A tampered revision is refused with one line and never runs.
        write(2.0, 1)
        data = (store.path(3) / TENSORS).read_bytes()
        (store.path(3) / TENSORS).write_bytes(bytes([data[0] ^ 1]) + data[1:])
        follower.check()
        wait_until(lambda: slot.idle() and bool(slot.errors), timeout_s=30, what="the refusal")
        assert slot.personal_revision == 1 and "r3" in slot.errors[-1]
        assert "sha256" in slot.errors[-1]
        assert "\n" not in slot.errors[-1]
    finally:
        slot.stop()
