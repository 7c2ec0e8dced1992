"""The committed ``tiny-sim-base`` is what its generator says, and it has learned the task."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from zk0.agent.base_builder import RECIPE, RECIPE_FILE
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

BASE = COMMITTED_BASES / "tiny-sim-base"


def test_committed_base_matches_the_generator_recipe() -> None:
    report = json.loads((BASE / RECIPE_FILE).read_text())
    assert report["recipe_sha256"] == RECIPE.digest(), "recipe changed: run `zk0 base build`"
    weights = (BASE / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == report["weights_sha256"]
    assert len(weights) < 2 * 1024 * 1024
    assert report["heldout_mse_trained"] <= 0.5 * report["heldout_mse_untrained"]


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
