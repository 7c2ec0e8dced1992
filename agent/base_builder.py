"""``tiny-sim-base``: the tiny SmolVLA pretrained centrally on the simulated base task.

The way ``lerobot/smolvla_base`` was pretrained on community data before anyone fine-tunes it,
the tiny base learns the simulated pick-and-place of ``BASE_VARIANT``; federated LoRA then adapts
it to each arm's own variant. The tiny backbone is random (nothing pretrained to protect), so the
base trains its vision encoder and VLM too, not only the action expert: with the expert alone the
policy cannot see where the cube is (held-out MSE 3x worse, no closed-loop success). Saved, the
config says what LoRA fine-tuning expects (vision and VLM frozen).

    record (cached) -> decode once into memory -> pretrain -> held-out MSE -> closed-loop
    success on never-recorded scenes (simulated time) -> weights + recipe + normalization

Deterministic given the recipe; the result is committed with the recipe's hash, its held-out
MSE and its task success, and a test checks that the committed weights are what the current
recipe says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from zk0.agent.decoded_frames import DecodedFrames
from zk0.agent.episode_cache import recorded
from zk0.agent.inference.simulated import evaluate_policy, evaluation_scenes
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
from zk0.shared.sim_variants import BASE_VARIANT, SIM_ROBOT, variant_config

RECIPE_FILE = "recipe.json"
#: The normalization the base was pretrained with (its training episodes' statistics).
BASE_STATS_FILE = "normalization.json"


@dataclass(frozen=True)
class BaseRecipe:
    generator: int = 2
    architecture: str = "tiny"
    variant: str = json.dumps(BASE_VARIANT, sort_keys=True)
    #: Scripted-expert demonstrations; every fifth is held out for the MSE.
    episodes: int = 160
    episode_time_s: float = 8.0
    steps: int = 12_000
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 100
    #: Train the vision encoder and the VLM too (LeRobot still freezes lm_head, the text norm and
    #: the last VLM layer), not only the action expert.
    train_vision: bool = True
    seed: int = 0
    #: Closed-loop episodes, on scenes never recorded, that measure the base's task success.
    eval_episodes: int = 40

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


RECIPE = BaseRecipe()


def _set_trainable(policy: Any, train_vision: bool) -> None:
    """Vision encoder and VLM trainable too (``train_vision``), or LeRobot's default."""
    model = policy.model.vlm_with_expert
    if train_vision:
        for parameter in model.vlm.parameters():
            parameter.requires_grad_(True)
    model.freeze_vision_encoder = policy.config.freeze_vision_encoder = not train_vision
    model.train_expert_only = policy.config.train_expert_only = not train_vision
    model.set_requires_grad()


def build(
    out_dir: Path = COMMITTED_BASES / "tiny-sim-base", recipe: BaseRecipe = RECIPE
) -> dict[str, Any]:
    """Record the base-task episodes (cached), pretrain, check, write the base to ``out_dir``."""
    torch.manual_seed(recipe.seed)
    variant = json.loads(recipe.variant)
    root = recorded("base", variant, recipe.episodes, recipe.episode_time_s)
    robot_config = variant_config(variant, recipe.episode_time_s)
    features = PolicyFeatures.from_robot_config(robot_config)
    policy = build_fresh_policy(recipe.architecture, features)
    _set_trainable(policy, recipe.train_vision)
    train_episodes, held_out = split_episodes(recipe.episodes)
    stats = dataset_stats(open_dataset(root, policy.config, train_episodes))
    eval_set = open_dataset(root, policy.config, held_out)
    preprocessor, postprocessor = make_processors(policy.config, to_lerobot(stats))
    untrained, _ = evaluate_mse(policy, preprocessor, eval_set, max_frames=64)
    config = TrainConfig(
        local_steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        warmup_steps=recipe.warmup_steps,
        betas=(0.9, 0.95),
        seed=recipe.seed,
    )
    training = train_policy(
        policy, preprocessor, DecodedFrames(root, policy.config.chunk_size, train_episodes), config
    )
    trained, frames = evaluate_mse(policy, preprocessor, eval_set, max_frames=64)
    logger.info(
        "tiny-sim-base: held-out MSE {:.4f} -> {:.4f} ({} frames)", untrained, trained, frames
    )
    if trained > 0.5 * untrained:
        raise RuntimeError(
            f"pretraining did not halve the held-out MSE ({untrained:.4f} -> {trained:.4f})"
        )
    # Success at the robot config's own episode length (the scripted expert needs about 6 s).
    success = evaluate_policy(
        variant_config(variant, load_robot_config(SIM_ROBOT).episode_time_s),
        policy,
        preprocessor,
        postprocessor,
        evaluation_scenes(recipe.eval_episodes),
        seed=recipe.seed,
    ).success
    logger.info("tiny-sim-base: task success {}", success.describe())
    _set_trainable(policy, train_vision=False)  # what fine-tuning expects of the saved config
    out_dir.mkdir(parents=True, exist_ok=True)
    policy.config.vlm_model_name = f"{BACKBONE_SCHEME}{policy_backbone_name(recipe.architecture)}"
    policy.save_pretrained(out_dir)
    report = {
        "recipe": asdict(recipe),
        "recipe_sha256": recipe.digest(),
        "heldout_mse_untrained": untrained,
        "heldout_mse_trained": trained,
        "final_train_loss": training.loss,
        "train_seconds": training.seconds,
        "heldout_frames": frames,
        "task_success": success.model_dump(),
        "weights_sha256": hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out_dir / RECIPE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / BASE_STATS_FILE).write_bytes(dumps(stats))
    return report
