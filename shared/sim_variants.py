"""Task variants of the simulated SO-101: the base task and four non-IID client arms.

Plain data plus one helper, shared by the agent (recording the episodes), the hub's demo (which
hands each simulated agent its variant) and the benches.
"""

from __future__ import annotations

from typing import Any

from zk0.shared.config import RobotConfig, load_robot_config

#: The shipped robot config of the simulated SO-101 (``robot_configs/sim_so101.yaml``).
SIM_ROBOT = "sim_so101"
LEFT, RIGHT, ACROSS = (0.02, 0.10), (-0.10, -0.02), (-0.10, 0.10)

#: The base task the tiny base is pretrained on: cubes from the near half to the far half.
BASE_VARIANT: dict[str, Any] = {
    "seed": 1000,
    "cube_region": {"x": (0.15, 0.21), "y": ACROSS},
    "goal_region": {"x": (0.24, 0.30), "y": ACROSS},
}
#: Non-IID clients. They share one shift from the base task, the way a fleet's arms share what
#: sets them apart from pretraining data: cubes are placed *beside* themselves in the near band,
#: from the left half to the right half, where the base carries them away to the far half. Each
#: arm differs in the rest: where in that band its cubes start, its light, its front camera.
#: Chosen by measurement (README, "Does learning together pay?"): variants whose arms differ in
#: the task mapping itself (mirrored or crossing) made pooling hurt, and the full-width reverse
#: task was beyond one arm's 40 episodes (local-only LoRA 0/20 and 1/20).
NEAR = (0.15, 0.21)
CLIENT_VARIANTS: dict[str, dict[str, Any]] = {
    "sim-00": {
        "seed": 0,
        "cube_region": {"x": NEAR, "y": LEFT},
        "goal_region": {"x": NEAR, "y": RIGHT},
    },
    "sim-01": {
        "seed": 1,
        "light_jitter": 0.3,
        "cube_region": {"x": (0.15, 0.19), "y": LEFT},
        "goal_region": {"x": NEAR, "y": RIGHT},
    },
    "sim-02": {
        "seed": 2,
        "camera_jitter_m": 0.02,
        "cube_region": {"x": (0.17, 0.21), "y": LEFT},
        "goal_region": {"x": NEAR, "y": RIGHT},
    },
    "sim-03": {
        "seed": 3,
        "light_jitter": 0.2,
        "camera_jitter_m": 0.01,
        "cube_region": {"x": NEAR, "y": (0.04, 0.10)},
        "goal_region": {"x": NEAR, "y": (-0.10, -0.04)},
    },
}


def variant_config(options: dict[str, Any], episode_time_s: float) -> RobotConfig:
    """The simulated arm's robot config with a task variant and episode length."""
    config = load_robot_config(SIM_ROBOT)
    return RobotConfig.model_validate(
        {
            **config.model_dump(),
            "options": options,
            "episode_time_s": episode_time_s,
            "reset_time_s": 0,
        }
    )
