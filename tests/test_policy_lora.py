"""The policy factory and LoRA on the action expert only."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import predict, train_steps
from zk0.shared.features import PolicyFeatures
from zk0.shared.lora import LoraSpec, apply_lora, is_lora_parameter, summarize
from zk0.shared.policy_factory import LoadedPolicy, PolicySpecError, build_policy, resolve_base

EXPERT_PROJECTION = r"model.vlm_with_expert.lm_expert.layers.{}.self_attn.{}"


def test_tiny_base_is_deterministic_and_named_by_content(
    make_tiny: Callable[[], LoadedPolicy], sim_features: PolicyFeatures
) -> None:
    first, second = make_tiny(), make_tiny()
    assert first.base.base_id == second.base.base_id
    assert first.base.base_id.startswith("sha256:")
    torch.testing.assert_close(
        predict(first.policy, first.preprocessor),
        predict(second.policy, second.preprocessor),
        rtol=0,
        atol=0,
    )
    other_cameras = PolicyFeatures(6, 6, {"observation.images.camera1": (3, 64, 64)})
    assert resolve_base("tiny", other_cameras).base_id != first.base.base_id


def test_features_come_from_the_robot_config(sim_features: PolicyFeatures) -> None:
    loaded = build_policy("tiny", sim_features, device="cpu")
    assert loaded.features == sim_features
    assert loaded.policy.config.input_features["observation.images.camera2"].shape == (3, 96, 128)


def test_local_checkpoint_folder_is_a_policy_spec(
    make_tiny: Callable[[], LoadedPolicy], tmp_path: Path
) -> None:
    tiny = make_tiny()
    tiny.policy.save_pretrained(tmp_path / "ckpt")
    loaded = build_policy(str(tmp_path / "ckpt"), device="cpu")
    assert loaded.base.base_id == resolve_base(str(tmp_path / "ckpt")).base_id
    assert loaded.base.name_or_path == str((tmp_path / "ckpt").resolve())
    torch.testing.assert_close(
        predict(loaded.policy, loaded.preprocessor),
        predict(tiny.policy, tiny.preprocessor),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("./no/such/folder", "no such folder"),
        ("not-a-spec", "not a Hub id"),
        ("lerobot/smolvla_base", "cannot fetch from the Hub"),  # offline: refused, not hung
    ],
)
def test_unknown_spec_is_one_clear_error(
    spec: str, message: str, sim_features: PolicyFeatures
) -> None:
    with pytest.raises(PolicySpecError, match=message):
        build_policy(spec, sim_features, device="cpu")


def test_lora_wraps_only_expert_attention_projections(
    make_tiny: Callable[[], LoadedPolicy],
) -> None:
    tiny = make_tiny()
    layers = len(tiny.policy.model.vlm_with_expert.lm_expert.layers)
    summary = summarize(apply_lora(tiny.policy, LoraSpec()))
    expected = {
        EXPERT_PROJECTION.format(i, proj)
        for i in range(layers)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert set(summary.wrapped_modules) == expected
    assert summary.trainable_params == summary.lora_params > 0
    assert summary.adapter_bytes_fp32 == 4 * summary.lora_params


def test_lora_rank_and_targets_are_configurable(make_tiny: Callable[[], LoadedPolicy]) -> None:
    tiny = make_tiny()
    summary = summarize(apply_lora(tiny.policy, LoraSpec(rank=4, targets=("q_proj", "v_proj"))))
    assert all(name.endswith(("q_proj", "v_proj")) for name in summary.wrapped_modules)
    default = summarize(apply_lora(make_tiny().policy, LoraSpec()))
    assert summary.lora_params < default.lora_params / 4


def test_training_moves_only_lora_weights(make_tiny: Callable[[], LoadedPolicy]) -> None:
    tiny = make_tiny()
    peft_model = apply_lora(tiny.policy, LoraSpec())
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    train_steps(peft_model, tiny.preprocessor, steps=3)
    after = dict(peft_model.named_parameters())
    frozen_changed = [
        n for n in before if not is_lora_parameter(n) and not torch.equal(before[n], after[n])
    ]
    lora_changed = [
        n for n in before if is_lora_parameter(n) and not torch.equal(before[n], after[n])
    ]
    assert frozen_changed == []
    assert lora_changed, "training did not move any adapter weight"
    trainable_outside = [
        n for n, p in after.items() if p.requires_grad and not is_lora_parameter(n)
    ]
    assert trainable_outside == []
    vision_or_text = [n for n in after if ".vlm." in n and is_lora_parameter(n)]
    assert vision_or_text == []


def test_local_training_gives_the_same_adapter_from_the_same_seed(
    make_tiny: Callable[[], LoadedPolicy],
) -> None:
    """SmolVLA samples its flow-matching noise and times from torch's global generator: a
    round's training seeds it (and leaves it as it was), so methods compared on the same seeds
    differ by their method, not by noise."""
    from zk0.agent.episode_cache import recorded
    from zk0.agent.training import TrainConfig, open_dataset, train_policy
    from zk0.shared.lora import adapter_state
    from zk0.shared.sim_variants import BASE_VARIANT

    root = recorded("base-check", {**BASE_VARIANT, "seed": 4242}, episodes=2, episode_time_s=6.0)

    def trained(seed: int) -> dict[str, torch.Tensor]:
        tiny = make_tiny()
        torch.manual_seed(0)  # the same lora_A draws: one version 0 trained three times
        peft_model = apply_lora(tiny.policy, LoraSpec())
        dataset = open_dataset(root, tiny.policy.config)
        outside = torch.random.get_rng_state()
        train_policy(peft_model, tiny.preprocessor, dataset, TrainConfig(local_steps=3, seed=seed))
        assert torch.equal(torch.random.get_rng_state(), outside)  # the caller's stream untouched
        return adapter_state(peft_model)

    first, again, other = trained(5), trained(5), trained(6)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def _policy_info(spec: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "zk0.cli", "policy", "info", "--policy", spec, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_policy_info_tiny_json() -> None:
    report = _policy_info("tiny")
    assert report["trainable_outside_lora"] == 0
    modules = report["wrapped_modules"]
    assert isinstance(modules, list) and modules
    assert all(".lm_expert.layers." in name for name in modules)


@pytest.mark.slow
def test_policy_info_full_size_matches_published_lora_size() -> None:
    report = _policy_info("smolvla-arch")
    assert report["lora_params"] == 1_290_240
    assert report["adapter_bytes_fp32"] == 5_160_960
    assert report["trainable_outside_lora"] == 0
    assert 440e6 < report["total_params"] < 460e6  # type: ignore[operator]


def test_base_id_does_not_depend_on_where_the_base_lives(
    sim_features: PolicyFeatures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hub and agents generate the tiny base in their own caches and must agree on its id."""
    here = resolve_base("tiny", sim_features)
    monkeypatch.setenv("ZK0_CACHE", str(tmp_path / "another-machine"))
    there = resolve_base("tiny", sim_features)
    assert there.name_or_path != here.name_or_path
    assert there.base_id == here.base_id
