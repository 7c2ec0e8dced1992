"""The committed ``tiny-sim-base`` is what its generator says, and it has learned the task."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from zk0.agent.base_builder import RECIPE, RECIPE_FILE
from zk0.agent.decoded_frames import DecodedFrames
from zk0.agent.episode_cache import recorded
from zk0.agent.training import dataset_stats, evaluate_mse, open_dataset, split_episodes
from zk0.shared.features import PolicyFeatures
from zk0.shared.normalization import to_lerobot
from zk0.shared.policy_factory import (
    COMMITTED_BASES,
    build_fresh_policy,
    build_policy,
    make_processors,
)
from zk0.shared.sim_variants import BASE_VARIANT
from zk0.shared.success import SuccessRate

BASE = COMMITTED_BASES / "tiny-sim-base"


def test_committed_base_matches_the_generator_recipe() -> None:
    report = json.loads((BASE / RECIPE_FILE).read_text())
    assert report["recipe_sha256"] == RECIPE.digest(), "recipe changed: run `zk0 base build`"
    weights = (BASE / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == report["weights_sha256"]
    assert len(weights) < 2 * 1024 * 1024
    assert report["heldout_mse_trained"] <= 0.5 * report["heldout_mse_untrained"]
    # The base does its own task: closed loop, on scenes it was never trained on (recorded by
    # `zk0 base build`, which measures it in simulated time at the robot config's 8 s).
    success = SuccessRate.model_validate(report["task_success"])
    assert success.episodes >= 30 and success.rate is not None and success.rate >= 0.6, success


def test_decoded_frames_are_what_lerobot_dataset_yields(sim_features: PolicyFeatures) -> None:
    """Pretraining reads frames decoded once into memory; they must be LeRobot's, bit for bit."""
    root = recorded("base-check", {**BASE_VARIANT, "seed": 4242}, episodes=2, episode_time_s=6.0)
    config = build_fresh_policy("tiny", sim_features).config
    decoded, reference = DecodedFrames(root, config.chunk_size), open_dataset(root, config)
    assert len(decoded) == len(reference)
    episode_of = np.asarray(reference.hf_dataset["episode_index"])
    last_of_first = int((episode_of == 0).sum()) - 1  # its chunk is padded
    for index in (0, last_of_first, last_of_first + 1, len(decoded) - 1):
        ours, theirs = decoded[index], reference[index]
        assert set(theirs) <= set(ours)
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(ours[key].to(value.dtype), value), (index, key)
            else:
                assert ours[key] == value, (index, key)


def test_base_beats_the_untrained_policy_on_fresh_base_task_episodes(
    sim_features: PolicyFeatures, tmp_path: Path
) -> None:
    """Episodes the base never saw (another seed of the base task), same normalization."""
    root = recorded("base-check", {**BASE_VARIANT, "seed": 4242}, episodes=2, episode_time_s=6.0)
    base = build_policy("tiny-sim-base", sim_features, device="cpu")
    untrained = build_fresh_policy("tiny", sim_features)
    train_ids, held_out = split_episodes(2)
    preprocessor, _ = make_processors(
        base.policy.config,
        to_lerobot(dataset_stats(open_dataset(root, base.policy.config, train_ids))),
    )
    episodes = open_dataset(root, base.policy.config, held_out)
    trained_mse, _ = evaluate_mse(base.policy, preprocessor, episodes, max_frames=16)
    untrained_mse, _ = evaluate_mse(untrained, preprocessor, episodes, max_frames=16)
    assert trained_mse < 0.6 * untrained_mse
