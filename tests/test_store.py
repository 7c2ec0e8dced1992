"""The adapter store: monotonic versions across processes, verified current pointer, pruning."""

from __future__ import annotations

import multiprocessing
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import train_steps
from zk0.shared.artifact import TENSORS_FILE, ArtifactError, save_adapter
from zk0.shared.lora import LoraSpec, apply_lora
from zk0.shared.policy_factory import LoadedPolicy
from zk0.shared.store import AdapterStore


@pytest.fixture(scope="module")
def hub_store(
    make_tiny: Callable[[], LoadedPolicy], tmp_path_factory: pytest.TempPathFactory
) -> AdapterStore:
    """A hub-side store with versions 0 (fresh), 1 and 2 (trained further each time)."""
    tiny = make_tiny()
    peft_model = apply_lora(tiny.policy, LoraSpec(), tiny.base.name_or_path)
    store = AdapterStore(tmp_path_factory.mktemp("hub") / "adapters")
    for round_ in range(3):
        if round_:
            train_steps(peft_model, tiny.preprocessor, steps=1, seed=round_)
        with store.allocate() as (version, path):
            save_adapter(
                peft_model,
                path,
                version=version,
                parent_version=version - 1 if version else None,
                base=tiny.base,
                lora=LoraSpec(),
                round_=round_,
            )
    return store


def _allocate_many(root: str, count: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = AdapterStore(Path(root))
    for _ in range(count):
        with store.allocate() as (version, path):
            path.mkdir()
            queue.put(version)


def test_versions_are_unique_and_gapless_across_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [
        context.Process(target=_allocate_many, args=(str(tmp_path), 5, queue)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    got = sorted(queue.get(timeout=5) for _ in range(20))
    assert got == list(range(20))
    assert AdapterStore(tmp_path).versions() == list(range(20))


def test_allocated_version_must_be_written(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(ArtifactError, match="nothing was written"), store.allocate():
        pass
    assert store.versions() == []


def test_current_pointer_switches_only_to_verified_versions(
    hub_store: AdapterStore, tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "copy")
    shutil.rmtree(store.root)
    shutil.copytree(hub_store.root, store.root)
    store.set_current(1)
    reopened = AdapterStore(store.root)  # survives a restart
    loaded = reopened.load_current()
    assert loaded is not None and loaded[0].version == 1
    tensors = store.path(2) / TENSORS_FILE
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x80
    tensors.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        store.set_current(2)
    pointer = store.current()
    assert pointer is not None and pointer.version == 1


def test_agent_installs_hub_versions_under_their_numbers(
    hub_store: AdapterStore, tmp_path: Path
) -> None:
    agent = AdapterStore(tmp_path / "agent")
    manifest = agent.install(hub_store.path(2), expected_id=hub_store.manifest(2).artifact_id)
    assert agent.versions() == [2] and manifest.version == 2
    assert agent.install(hub_store.path(2)).artifact_id == manifest.artifact_id  # idempotent
    with pytest.raises(ArtifactError, match="not the expected"):
        agent.install(hub_store.path(1), expected_id=manifest.artifact_id)
    assert agent.versions() == [2]


def test_install_refuses_another_artifact_under_a_taken_number(
    hub_store: AdapterStore, make_tiny: Callable[[], LoadedPolicy], tmp_path: Path
) -> None:
    agent = AdapterStore(tmp_path / "agent")
    agent.install(hub_store.path(1))
    rival = make_tiny()  # a second hub that also produced a "version 1"
    save_adapter(
        apply_lora(rival.policy, LoraSpec(rank=4)),
        tmp_path / "rival",
        version=1,
        base=rival.base,
        lora=LoraSpec(rank=4),
    )
    with pytest.raises(ArtifactError, match="already holds another artifact"):
        agent.install(tmp_path / "rival")
    assert agent.manifest(1).artifact_id == hub_store.manifest(1).artifact_id


def test_prune_keeps_newest_and_current_and_clears_crash_leftovers(
    hub_store: AdapterStore, tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "copy")
    shutil.rmtree(store.root)
    shutil.copytree(hub_store.root, store.root)
    (store.versions_dir / ".3.0123.staging").mkdir()  # a writer killed mid-write
    assert store.versions() == [0, 1, 2]
    store.set_current(0)
    assert store.prune(keep=1) == [1]
    assert store.versions() == [0, 2]
    assert not list(store.versions_dir.glob(".*"))


def test_store_imports_no_torch() -> None:
    """Agents' subscribers use the store; many run per host, so it must stay small."""
    import subprocess
    import sys

    code = (
        "import sys, zk0.shared.store\n"
        "heavy = [m for m in ('torch', 'lerobot', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_hub_trains_on_from_its_float32_master_only_while_it_is_the_versions(
    tmp_path: Path,
) -> None:
    """Versions hold bfloat16 (or, with the int8 wire encoding, their parent plus an int8
    difference); the hub's float32 master continues training only while it is the version's:
    written for its artifact id, or, for masters written before ids were kept, rounding to its
    stored tensors. Otherwise the stored ones, widened."""
    import numpy as np
    from safetensors.numpy import save_file

    from zk0.hub.masters import MasterAdapters
    from zk0.shared.artifact import as_stored

    rng = np.random.default_rng(0)
    master = {"m.lora_A.weight": rng.normal(0, 0.02, (4, 6)).astype(np.float32)}
    stored = as_stored(master)
    assert not np.array_equal(stored["m.lora_A.weight"], master["m.lora_A.weight"])
    masters = MasterAdapters(tmp_path)
    assert masters.starting_point(3, "a" * 64, stored) is stored  # no master: the version itself
    masters.save(3, master, "a" * 64)
    np.testing.assert_array_equal(
        masters.starting_point(3, "a" * 64, stored)["m.lora_A.weight"], master["m.lora_A.weight"]
    )
    assert masters.starting_point(3, "b" * 64, stored) is stored  # another artifact numbered 3
    quantized = {"m.lora_A.weight": stored["m.lora_A.weight"] + 2**-10}  # does not round to it
    np.testing.assert_array_equal(
        masters.starting_point(3, "a" * 64, quantized)["m.lora_A.weight"],
        master["m.lora_A.weight"],
    )
    save_file(master, str(masters.path(3)))  # written before ids were kept
    np.testing.assert_array_equal(
        masters.starting_point(3, "b" * 64, stored)["m.lora_A.weight"], master["m.lora_A.weight"]
    )
    other = as_stored({"m.lora_A.weight": master["m.lora_A.weight"] + 0.01})
    assert masters.starting_point(3, "b" * 64, other) is other  # a master of another version 3
