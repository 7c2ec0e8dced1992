"""Shared fixtures. Everything runs offline; expensive artefacts are cached by recipe hash."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Set before lerobot/transformers are imported anywhere: nothing may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("ZK0_CACHE", str(REPO_ROOT / ".cache" / "zk0"))
os.environ.setdefault("HF_HOME", str(REPO_ROOT / ".cache" / "hf"))

import pytest  # noqa: E402
import torch  # noqa: E402

from zk0.shared.config import load_robot_config  # noqa: E402
from zk0.shared.features import PolicyFeatures  # noqa: E402
from zk0.shared.policy_factory import LoadedPolicy, build_policy  # noqa: E402

SIM_ROBOT = REPO_ROOT / "robot_configs" / "sim_so101.yaml"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sim_features() -> PolicyFeatures:
    return PolicyFeatures.from_robot_config(load_robot_config(SIM_ROBOT))


@pytest.fixture(scope="session")
def make_tiny(sim_features: PolicyFeatures) -> Callable[[], LoadedPolicy]:
    """Build a fresh tiny policy (each call a new object: LoRA wraps policies in place)."""

    def make() -> LoadedPolicy:
        return build_policy("tiny", sim_features, device="cpu")

    return make


def observation(policy: Any, seed: int, task: str = "pick the cube") -> dict[str, Any]:
    """One raw observation shaped like the policy's inputs."""
    generator = torch.Generator().manual_seed(seed)
    frame: dict[str, Any] = {
        key: torch.rand(feature.shape, generator=generator)
        for key, feature in policy.config.input_features.items()
    }
    frame["task"] = task
    return frame


def chunk_noise(policy: Any, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = policy.config
    return torch.randn(1, config.chunk_size, config.max_action_dim, generator=generator)


def predict(model: Any, preprocessor: Any, seed: int = 0) -> torch.Tensor:
    """Normalized action chunk for a fixed observation and fixed flow-matching noise."""
    policy = model.base_model.model if hasattr(model, "base_model") else model
    batch = preprocessor(observation(policy, seed))
    model.eval()
    return model.predict_action_chunk(batch, noise=chunk_noise(policy))


def train_steps(
    peft_model: Any, preprocessor: Any, steps: int, seed: int = 0, lr: float = 1e-2
) -> None:
    """A few optimizer steps on synthetic batches, enough to move the adapter weights."""
    from zk0.bench._common import synthetic_batch

    policy = peft_model.base_model.model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    peft_model.train()
    for step in range(steps):
        batch = synthetic_batch(policy, preprocessor, batch_size=2, seed=seed * 1000 + step)
        loss, _ = peft_model.forward(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peft_model.eval()
