"""``tiny-sim-base``: the tiny SmolVLA pretrained centrally on the simulated base task.

The way ``lerobot/smolvla_base`` was pretrained on community data before anyone fine-tunes it,
the tiny base learns the simulated pick-and-place of ``BASE_VARIANT`` with the whole action
expert trainable; federated LoRA then adapts it to each arm's own variant. Deterministic
given the recipe; the result is committed (under 2 MB) with the recipe's hash, and a test
checks that the committed weights are what the current recipe says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from zk0.agent.episode_cache import recorded
from zk0.agent.training import (
    TrainConfig,
    dataset_stats,
    evaluate_mse,
    open_dataset,
    split_episodes,
    train_policy,
)
from zk0.shared.config import load_robot_config
from zk0.shared.features import PolicyFeatures
from zk0.shared.normalization import dumps, to_lerobot
from zk0.shared.policy_factory import (
    BACKBONE_SCHEME,
    COMMITTED_BASES,
    build_fresh_policy,
    make_processors,
    policy_backbone_name,
)
from zk0.shared.sim_variants import BASE_VARIANT, SIM_ROBOT

RECIPE_FILE = "recipe.json"
#: The normalization the base was pretrained with (its training episodes' statistics).
BASE_STATS_FILE = "normalization.json"


@dataclass(frozen=True)
class BaseRecipe:
    generator: int = 1
    architecture: str = "tiny"
    variant: str = json.dumps(BASE_VARIANT, sort_keys=True)
    episodes: int = 30
    episode_time_s: float = 6.0
    steps: int = 1200
    batch_size: int = 16
    lr: float = 5e-4
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


RECIPE = BaseRecipe()


def _train_full_expert(policy: Any, preprocessor: Any, dataset: Any, recipe: BaseRecipe) -> float:
    # LeRobot's SmolVLA default: VLM frozen, expert (and projections) trainable; same loop as LoRA.
    result = train_policy(
        policy,
        preprocessor,
        dataset,
        TrainConfig(
            local_steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed
        ),
    )
    return result.loss


def build(
    out_dir: Path = COMMITTED_BASES / "tiny-sim-base", recipe: BaseRecipe = RECIPE
) -> dict[str, Any]:
    """Record the base-task episodes (cached), pretrain, check, write the base to ``out_dir``."""
    torch.manual_seed(recipe.seed)
    root = recorded("base", BASE_VARIANT, recipe.episodes, recipe.episode_time_s)
    features = PolicyFeatures.from_robot_config(load_robot_config(SIM_ROBOT))
    policy = build_fresh_policy(recipe.architecture, features)
    train_episodes, held_out = split_episodes(recipe.episodes)
    train_set = open_dataset(root, policy.config, train_episodes)
    eval_set = open_dataset(root, policy.config, held_out)
    stats = dataset_stats(train_set)
    preprocessor, _ = make_processors(policy.config, to_lerobot(stats))
    untrained, _ = evaluate_mse(policy, preprocessor, eval_set, max_frames=64)
    loss = _train_full_expert(policy, preprocessor, train_set, recipe)
    trained, frames = evaluate_mse(policy, preprocessor, eval_set, max_frames=64)
    logger.info(
        "tiny-sim-base: held-out MSE {:.4f} -> {:.4f} ({} frames)", untrained, trained, frames
    )
    if trained > 0.5 * untrained:
        raise RuntimeError(
            f"pretraining did not halve the held-out MSE ({untrained:.4f} -> {trained:.4f})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    policy.config.vlm_model_name = f"{BACKBONE_SCHEME}{policy_backbone_name(recipe.architecture)}"
    policy.save_pretrained(out_dir)
    report = {
        "recipe": asdict(recipe),
        "recipe_sha256": recipe.digest(),
        "heldout_mse_untrained": untrained,
        "heldout_mse_trained": trained,
        "final_train_loss": loss,
        "heldout_frames": frames,
        "weights_sha256": hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out_dir / RECIPE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / BASE_STATS_FILE).write_bytes(dumps(stats))
    return report
