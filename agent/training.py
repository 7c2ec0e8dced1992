"""Local LoRA training and held-out evaluation on the agent's own LeRobot dataset.

The round's learning-rate schedule restarts every round (cosine from ``lr`` to 0 over the
round's ``local_steps``) because each round starts from a freshly merged global adapter.
Evaluation is deterministic: a fixed split by episode, fixed frames, fixed flow-matching noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from zk0.shared.features import ACTION_KEY, STATE_KEY
from zk0.shared.normalization import FeatureStats, Stats

#: Decode videos with PyAV, as recording encodes them: deterministic on every machine, and it skips
#: LeRobot's torchcodec probe (a long traceback per dataset where torchcodec cannot load).
VIDEO_BACKEND = "pyav"
#: Every fifth episode (4, 9, 14, ...) is held out for evaluation, and at least one.
HOLDOUT_EVERY = 5


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    #: Linear warm-up steps before the cosine decay (pretraining a base from scratch wants some).
    warmup_steps: int = 0
    #: AdamW's betas; SmolVLA's own training recipe uses (0.9, 0.95).
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-10
    grad_clip_norm: float = 10.0
    seed: int = 0
    #: FFA-LoRA: keep every lora_A frozen at its shared initialisation, train only lora_B.
    freeze_lora_a: bool = False


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    seconds: float
    examples: int


def split_episodes(num_episodes: int) -> tuple[list[int], list[int]]:
    """(training, held-out) episode indices; deterministic, by episode, never empty."""
    if num_episodes < 2:
        raise ValueError(
            f"need at least 2 episodes to hold one out, the dataset has {num_episodes}"
        )
    held_out = [i for i in range(num_episodes) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    held_out = held_out or [num_episodes - 1]
    return [i for i in range(num_episodes) if i not in held_out], held_out


def open_dataset(root: Path, policy_config: Any, episodes: list[int] | None = None) -> Any:
    """The agent's LeRobot dataset, yielding action chunks as the policy predicts them."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    meta_fps = _dataset_fps(root)
    horizon = [step / meta_fps for step in range(policy_config.chunk_size)]
    return LeRobotDataset(
        root.name,
        root=root,
        episodes=episodes,
        delta_timestamps={ACTION_KEY: horizon},
        video_backend=VIDEO_BACKEND,
    )


def _dataset_fps(root: Path) -> int:
    import json

    return int(json.loads((root / "meta" / "info.json").read_text())["fps"])


def dataset_stats(dataset: Any) -> Stats:
    """Count, mean, variance, min and max of state and action, read from the parquet columns."""
    columns = dataset.hf_dataset.with_format("numpy")
    return {
        key: FeatureStats.from_samples(np.stack(columns[key])) for key in (STATE_KEY, ACTION_KEY)
    }


def _batches(dataset: Any, batch_size: int, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    while True:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(dataset) > batch_size,
            generator=generator,
            num_workers=0,
        )
        yield from loader


def train_policy(model: Any, preprocessor: Any, dataset: Any, config: TrainConfig) -> TrainResult:
    """``config.local_steps`` optimizer steps on whatever ``model`` leaves trainable (LoRA
    adapters, or the whole expert when pretraining a base); AMP (bf16) on a GPU."""
    device = next(model.parameters()).device
    if config.freeze_lora_a:
        for name, parameter in model.named_parameters():
            if ".lora_A." in name:
                parameter.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    start, losses, examples = time.perf_counter(), [], 0
    batches = _batches(dataset, config.batch_size, config.seed)
    # The flow-matching noise and times SmolVLA samples, and LoRA's dropout, come from torch's
    # global generator: seeded here (and restored after), the same steps give the same adapter.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        for _ in range(config.local_steps):
            batch = preprocessor(next(batches))
            with autocast:
                loss, _ = model.forward(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            examples += len(batch[ACTION_KEY])
    model.eval()
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 4) :]
    logger.info(
        "trained {} steps in {:.1f}s, loss {:.4f}", config.local_steps, seconds, np.mean(tail)
    )
    return TrainResult(float(np.mean(tail)), config.local_steps, seconds, examples)


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine from 1 to 0."""
    warmup, total = config.warmup_steps, config.local_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


@torch.no_grad()
def evaluate_mse(
    model: Any,
    preprocessor: Any,
    dataset: Any,
    max_frames: int = 32,
    seed: int = 0,
    *,
    postprocessor: Any = None,
    scale: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Action MSE of predicted vs recorded chunks on ``dataset``'s frames, padded steps aside.

    In the policy's normalized units; or, with ``postprocessor`` and a per-joint ``scale``, in
    robot units divided by ``scale`` (comparable between policies that normalize differently).
    Frames are evenly spaced over the dataset and the noise is fixed, so the same adapter
    always gets the same number. Returns (mse, frames evaluated).
    """
    model.eval()
    policy = model.base_model.model if hasattr(model, "base_model") else model
    config = policy.config
    indices = np.linspace(0, len(dataset) - 1, num=min(max_frames, len(dataset))).astype(int)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(indices), config.chunk_size, config.max_action_dim, generator=generator)
    device = next(model.parameters()).device
    squared, count = 0.0, 0
    for row, index in enumerate(indices):
        frame = dataset[int(index)]
        batch = preprocessor({key: value for key, value in frame.items()})
        predicted = model.predict_action_chunk(batch, noise=noise[row : row + 1].to(device))
        if postprocessor is None:
            target = batch[ACTION_KEY].reshape(predicted.shape)
        else:
            predicted = postprocessor(predicted).to(frame[ACTION_KEY].device) / scale
            target = (frame[ACTION_KEY] / scale).reshape(predicted.shape)
        valid = ~frame[f"{ACTION_KEY}_is_pad"].reshape(1, -1, 1).to(predicted.device)
        valid = valid.expand_as(predicted)
        squared += float(((predicted - target) ** 2)[valid].sum())
        count += int(valid.sum())
    return squared / max(count, 1), len(indices)
