"""The simulated clients of ``zk0 bench learning`` and how a policy is measured on one.

A client is a task variant of the simulated SO-101 (``options:`` of ``sim_so101.yaml``) with its
recorded episodes (scripted expert, cached): every fifth held out for the MSE, the rest for
training. A measurement point is the held-out action MSE and the closed-loop success on the
client's evaluation scenes, the same scenes for every method.

MSE here is in each client's own standardized units (raw action error divided by the standard
deviation of the client's training actions), not in the policy's normalized units: methods
normalize with different statistics (their own, the fleet's, the base's), and their errors must
be read on one ruler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from zk0.agent.decoded_frames import DecodedFrames
from zk0.agent.episode_cache import recorded
from zk0.agent.inference.simulated import evaluate_policy, evaluation_scenes
from zk0.agent.robots import robot_options
from zk0.agent.training import (
    VIDEO_BACKEND,
    dataset_stats,
    evaluate_mse,
    open_dataset,
    split_episodes,
)
from zk0.shared.config import ConfigError, RobotConfig, load_robot_config
from zk0.shared.features import ACTION_KEY
from zk0.shared.normalization import Stats
from zk0.shared.policy_factory import make_processors
from zk0.shared.sim_variants import SIM_ROBOT, variant_config
from zk0.shared.success import SuccessRate


def load_variants(path: Path) -> dict[str, dict[str, Any]]:
    """A YAML mapping client name -> ``options:`` of ``sim_so101.yaml``, each validated."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: {error}".splitlines()[0]) from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of client name -> options")
    variants: dict[str, dict[str, Any]] = {}
    for name, options in raw.items():
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: {name}: expected a mapping of options")
        try:
            robot_options(variant_config(options, 8.0))
        except (ValueError, ConfigError) as error:
            raise ConfigError(f"{path}: {name}: {str(error).splitlines()[0]}") from None
        variants[str(name)] = options
    return variants


@dataclass
class Client:
    name: str
    options: dict[str, Any]
    root: Path
    train_episodes: list[int]
    held_out: list[int]
    #: Statistics of the client's own training episodes.
    stats: Stats
    expert_successes: int
    expert_episodes: int
    robot_config: RobotConfig
    _robot: Any = field(default=None, repr=False)

    @property
    def action_std(self) -> torch.Tensor:
        return torch.as_tensor(np.sqrt(self.stats[ACTION_KEY].var), dtype=torch.float32)

    def robot(self) -> Any:
        """The client's simulated arm, connected once and reused for every measurement."""
        if self._robot is None:
            from zk0.agent.robots import make_robot

            self._robot = make_robot(self.robot_config)
            self._robot.connect(calibrate=False)
        return self._robot

    def close(self) -> None:
        if self._robot is not None:
            self._robot.disconnect()
            self._robot = None


def make_clients(
    variants: dict[str, dict[str, Any]], episodes: int, policy_config: Any
) -> list[Client]:
    """Record (cached) ``episodes`` expert episodes per variant and split them."""
    episode_time_s = load_robot_config(SIM_ROBOT).episode_time_s
    clients = []
    for name, options in variants.items():
        root = recorded(name, options, episodes, episode_time_s)
        train, held = split_episodes(episodes)
        successes = _expert_successes(root)
        clients.append(
            Client(
                name=name,
                options=options,
                root=root,
                train_episodes=train,
                held_out=held,
                stats=dataset_stats(open_dataset(root, policy_config, train)),
                expert_successes=sum(successes),
                expert_episodes=len(successes),
                robot_config=variant_config(options, episode_time_s),
            )
        )
    return clients


def _expert_successes(root: Path) -> list[bool]:
    """Per recorded episode: did the scripted expert's demonstration end in success?"""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset(root.name, root=root, video_backend=VIDEO_BACKEND)
    columns = dataset.hf_dataset.with_format("numpy")
    episodes = np.asarray(columns["episode_index"])
    success = np.asarray(columns["next.success"]).astype(bool).reshape(-1)
    return [bool(success[episodes == e].any()) for e in np.unique(episodes)]


def training_frames(client: Client, chunk_size: int) -> DecodedFrames:
    return DecodedFrames(client.root, chunk_size, client.train_episodes)


def measure(
    model: Any,
    stats: dict[str, Any],
    client: Client,
    round_: int,
    *,
    episodes: int,
    mse_frames: int,
    seed: int,
) -> dict[str, Any]:
    """One point of ``methods.<m>.clients.<c>.by_round``: held-out MSE and success."""
    policy = model.base_model.model if hasattr(model, "base_model") else model
    preprocessor, postprocessor = make_processors(policy.config, stats)
    # In the client's standardized action units: methods normalize with different statistics.
    mse, frames = evaluate_mse(
        model,
        preprocessor,
        open_dataset(client.root, policy.config, client.held_out),
        mse_frames,
        seed,
        postprocessor=postprocessor,
        scale=client.action_std.clamp_min(1e-6),
    )
    success: SuccessRate | None = None
    if episodes:
        success = evaluate_policy(
            client.robot_config,
            model,
            preprocessor,
            postprocessor,
            evaluation_scenes(episodes),
            seed=seed,
            robot=client.robot(),
        ).success
    return {
        "round": round_,
        "mse": mse,
        "mse_frames": frames,
        "success": None if success is None else success.model_dump(),
    }


def realtime(client: Client, policy: str, adapter: Path | None, episodes: int) -> dict[str, Any]:
    """Success as the product runs it (``zk0-agent eval``): asynchronous inference racing the
    real clock on the client's evaluation scenes, with starved ticks."""
    from zk0.agent.inference.evaluation import evaluate, open_session

    with open_session(client.robot_config, policy, adapter=adapter) as session:
        summary = evaluate(session, episodes).summary()
    return {
        "success": summary["success"],
        "starved_ticks": summary["starved_ticks"],
        "starved_fraction": summary["starved_fraction"],
        "chunk_latency_p95_s": summary["chunk_latency_p95_s"],
    }
