"""Adapter artifacts: save/load is exact, tampering is caught, merging matches, PEFT loads it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import SIM_ROBOT, predict, train_steps
from zk0.shared.artifact import (
    ID_FILE,
    MANIFEST,
    TENSORS_FILE,
    ArtifactError,
    as_stored,
    load_adapter,
    load_arrays,
    save_adapter,
    save_adapter_arrays,
    verify_artifact,
)
from zk0.shared.lora import LoraSpec, adapter_state, apply_lora, load_adapter_state, merged_copy
from zk0.shared.policy_factory import LoadedPolicy


@pytest.fixture(scope="module")
def trained(
    make_tiny: Callable[[], LoadedPolicy], tmp_path_factory: pytest.TempPathFactory
) -> tuple[LoadedPolicy, object, Path]:
    """A tiny policy whose adapter was trained a few steps, saved as version 1; the model then
    holds the version's values (as stored, bfloat16)."""
    tiny = make_tiny()
    peft_model = apply_lora(tiny.policy, LoraSpec(), tiny.base.name_or_path)
    train_steps(peft_model, tiny.preprocessor, steps=4, seed=1)
    trained_state = {name: value.clone() for name, value in adapter_state(peft_model).items()}
    folder = tmp_path_factory.mktemp("artifacts") / "v1"
    save_adapter(
        peft_model,
        folder,
        version=1,
        parent_version=0,
        base=tiny.base,
        lora=LoraSpec(),
        round_=1,
        metrics={"loss": 0.5},
    )
    stored = as_stored({name: value.numpy() for name, value in trained_state.items()})
    load_adapter_state(peft_model, {name: torch.from_numpy(v) for name, v in stored.items()})
    return tiny, peft_model, folder


def _zk0(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zk0.cli", *args], capture_output=True, text=True, check=False
    )


def test_save_then_load_reproduces_actions_bit_exactly(trained, make_tiny) -> None:  # type: ignore[no-untyped-def]
    tiny, peft_model, folder = trained
    fresh = make_tiny()
    reloaded = apply_lora(fresh.policy, LoraSpec())
    manifest = load_adapter(reloaded, folder, base=fresh.base)
    assert manifest.version == 1 and manifest.parent_version == 0 and manifest.round == 1
    original = predict(peft_model, tiny.preprocessor)
    assert torch.equal(predict(reloaded, fresh.preprocessor), original)
    untrained = predict(make_tiny().policy, fresh.preprocessor)
    assert not torch.allclose(untrained, original), "the adapter should change the actions"


def test_manifest_covers_every_file_and_tensor(trained) -> None:  # type: ignore[no-untyped-def]
    _, peft_model, folder = trained
    manifest = verify_artifact(folder)
    assert set(manifest.files) == {"adapter_config.json", TENSORS_FILE, "config.json"}
    assert set(manifest.tensors) == set(adapter_state(peft_model))
    assert all(entry.dtype == "BF16" for entry in manifest.tensors.values())
    assert manifest.lora == LoraSpec()
    assert (folder / ID_FILE).read_text().strip() == manifest.artifact_id
    assert manifest.metrics == {"loss": 0.5}


def test_peft_and_lerobot_load_the_folder_as_it_is(trained) -> None:  # type: ignore[no-untyped-def]
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from peft import PeftConfig, PeftModel

    tiny, peft_model, folder = trained
    config = PeftConfig.from_pretrained(str(folder))  # what LeRobot's factory does with use_peft
    base = SmolVLAPolicy.from_pretrained(config.base_model_name_or_path)
    plain = PeftModel.from_pretrained(base, str(folder), config=config)
    assert torch.equal(predict(plain, tiny.preprocessor), predict(peft_model, tiny.preprocessor))


def test_merged_inference_and_swapping_match_unmerged(trained, make_tiny) -> None:  # type: ignore[no-untyped-def]
    tiny, peft_model, _ = trained
    base = make_tiny()
    other = make_tiny()
    other_peft = apply_lora(other.policy, LoraSpec())
    train_steps(other_peft, other.preprocessor, steps=3, seed=2)
    for unmerged, state in (
        (peft_model, adapter_state(peft_model)),
        (other_peft, adapter_state(other_peft)),
    ):
        merged = merged_copy(
            base.policy, LoraSpec(), state
        )  # a swap is a new merge on the same base
        torch.testing.assert_close(
            predict(merged, base.preprocessor),
            predict(unmerged, tiny.preprocessor),
            rtol=0,
            atol=1e-5,
        )
    assert all(not n.endswith(("lora_A", "lora_B")) for n, _ in base.policy.named_modules())


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path) -> None:
    text = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(text.replace('"loss": 0.5', '"loss": 0.1'))


TAMPERINGS: dict[str, tuple[Callable[[Path], None], str]] = {
    "one flipped bit": (
        lambda f: _flip_bit(f / TENSORS_FILE, (f / TENSORS_FILE).stat().st_size - 3),
        "sha256 differs",
    ),
    "flipped bit in config": (lambda f: _flip_bit(f / "adapter_config.json", 20), "sha256 differs"),
    "truncated file": (
        lambda f: (f / TENSORS_FILE).write_bytes((f / TENSORS_FILE).read_bytes()[:-100]),
        "truncated",
    ),
    "missing file": (lambda f: (f / "config.json").unlink(), "missing ['config.json']"),
    "extra file": (lambda f: (f / "evil.py").write_text("import os"), "unexpected ['evil.py']"),
    "edited manifest": (_edit_manifest, "manifest edited"),
    "missing manifest": (lambda f: (f / MANIFEST).unlink(), "no manifest.json"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_verify_refuses_damaged_copies_with_one_line(case: str, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, folder = trained
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert _zk0("adapter", "verify", str(copy)).returncode == 0
    damage, message = TAMPERINGS[case]
    damage(copy)
    result = _zk0("adapter", "verify", str(copy))
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    with pytest.raises(ArtifactError):
        verify_artifact(copy)


def test_verify_checks_base_and_id(trained) -> None:  # type: ignore[no-untyped-def]
    _, _, folder = trained
    manifest = verify_artifact(folder)
    ok = _zk0(
        "adapter",
        "verify",
        str(folder),
        "--base",
        "tiny",
        "--id",
        manifest.artifact_id,
        "--robot-config",
        str(SIM_ROBOT),
    )
    assert ok.returncode == 0, ok.stderr
    wrong_id = _zk0("adapter", "verify", str(folder), "--id", "0" * 64)
    assert wrong_id.returncode != 0 and "not the expected" in wrong_id.stderr
    other_robot = SIM_ROBOT.parent / "so101.yaml"  # 640x480 cameras: another tiny base
    wrong_base = _zk0(
        "adapter", "verify", str(folder), "--base", "tiny", "--robot-config", str(other_robot)
    )
    assert wrong_base.returncode != 0 and "built on base" in wrong_base.stderr


def test_init_writes_a_version_zero_adapter_that_changes_nothing(tmp_path: Path, make_tiny) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "v0"
    result = _zk0(
        "adapter", "init", "--policy", "tiny", "--out", str(out), "--robot-config", str(SIM_ROBOT)
    )
    assert result.returncode == 0, result.stderr
    manifest = verify_artifact(out)
    assert manifest.version == 0 and manifest.parent_version is None
    tiny = make_tiny()
    reference = predict(tiny.policy, tiny.preprocessor)
    peft_model = apply_lora(make_tiny().policy, LoraSpec())
    load_adapter(peft_model, out)
    assert torch.equal(predict(peft_model, tiny.preprocessor), reference)
    again = _zk0(
        "adapter", "init", "--policy", "tiny", "--out", str(out), "--robot-config", str(SIM_ROBOT)
    )
    assert again.returncode == 2 and "already exists" in again.stderr


def test_info_json_lists_version_and_id(trained) -> None:  # type: ignore[no-untyped-def]
    import json

    _, _, folder = trained
    result = _zk0("adapter", "info", str(folder), "--json")
    report = json.loads(result.stdout)
    assert report["version"] == 1 and report["artifact_id"] == verify_artifact(folder).artifact_id


def test_a_version_from_arrays_loads_like_one_from_the_model(trained, make_tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The hub writes aggregated versions from arrays, with no policy: PEFT loads them the same."""
    _, peft_model, folder = trained
    arrays = {name: array * 0.5 for name, array in load_arrays(folder).items()}
    manifest = save_adapter_arrays(
        folder, tmp_path / "v2", arrays, version=2, parent_version=1, round_=2
    )
    assert verify_artifact(tmp_path / "v2").artifact_id == manifest.artifact_id
    original = verify_artifact(folder)
    assert (manifest.base, manifest.lora, manifest.tensors) == (
        original.base,
        original.lora,
        original.tensors,
    )
    fresh = make_tiny()
    reloaded = apply_lora(fresh.policy, LoraSpec())
    load_adapter(reloaded, tmp_path / "v2", base=fresh.base)
    halved = {k: v * 0.5 for k, v in adapter_state(peft_model).items()}
    assert all(torch.equal(adapter_state(reloaded)[k], halved[k]) for k in halved)

    del arrays[sorted(arrays)[0]]
    with pytest.raises(ArtifactError, match="tensors do not match the adapter of"):
        save_adapter_arrays(folder, tmp_path / "v3", arrays, version=3, parent_version=2)
    assert not (tmp_path / "v3").exists() and list(tmp_path.iterdir()) == [tmp_path / "v2"]


def test_a_version_is_stored_in_bfloat16_half_the_bytes_of_float32(trained, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What agents fetch: bfloat16 tensors (the hub keeps float32 masters); float32 artifacts of
    earlier hubs still fit, other dtypes or shapes do not."""
    from safetensors.numpy import save_file

    from zk0.shared.artifact import misfit
    from zk0.shared.safetensors_file import TensorEntry

    _, _, folder = trained
    float32 = tmp_path / "f32.safetensors"
    save_file({k: v.copy() for k, v in load_arrays(folder).items()}, str(float32))
    stored = (folder / TENSORS_FILE).stat().st_size
    assert stored < 0.55 * float32.stat().st_size  # the header (names, shapes) aside: half
    tensors = verify_artifact(folder).tensors
    as_f32 = {k: TensorEntry(shape=e.shape, dtype="F32") for k, e in tensors.items()}
    assert misfit(as_f32, tensors) is None
    name = sorted(tensors)[0]
    assert "F16" in str(
        misfit({**as_f32, name: TensorEntry(shape=tensors[name].shape, dtype="F16")}, tensors)
    )
    assert "not" in str(misfit({**as_f32, name: TensorEntry(shape=(1, 1), dtype="F32")}, tensors))
