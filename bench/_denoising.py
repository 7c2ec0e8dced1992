"""The number of denoising steps (``EngineConfig.denoising_steps``) against what it buys, for
``zk0 bench inference``: the tiny base's chunk latency and its closed-loop success on its base
task, in simulated time (``zk0.agent.inference.simulated``: never-recorded scenes, the same
scenes and noise for every step count, so the counts are compared pairwise)."""

from __future__ import annotations

from typing import Any

from zk0.bench._common import random_observation, time_calls

POLICY = "tiny-sim-base"
STEPS = (10, 5, 3, 2, 1)


def success_by_steps(episodes: int, steps: tuple[int, ...] = STEPS) -> dict[str, Any]:
    import torch

    from zk0.agent.inference.evaluation import base_task_stats
    from zk0.agent.inference.simulated import evaluate_policy, evaluation_scenes, torch_chunk_fn
    from zk0.agent.robots import make_robot
    from zk0.shared.features import PolicyFeatures
    from zk0.shared.policy_factory import build_policy, make_processors
    from zk0.shared.sim_variants import BASE_VARIANT, SIM_ROBOT, variant_config

    robot_config = variant_config(BASE_VARIANT, 8.0)
    loaded = build_policy(POLICY, PolicyFeatures.from_robot_config(robot_config), device="cpu")
    policy = loaded.policy
    pre, post = make_processors(policy.config, base_task_stats(policy.config))
    chunk = torch_chunk_fn(policy, pre, post)
    frame = random_observation(policy, 0, robot_config.task)
    noise = torch.zeros(1, policy.config.chunk_size, policy.config.max_action_dim)
    scenes = evaluation_scenes(episodes)
    robot = make_robot(robot_config)
    robot.connect(calibrate=False)
    results: dict[str, Any] = {}
    try:
        for count in steps:
            policy.config.num_steps = count
            report = evaluate_policy(robot_config, policy, pre, post, scenes, seed=0, robot=robot)
            results[str(count)] = {
                "success": report.success.model_dump(),
                "chunk_s": time_calls(lambda: chunk(frame, noise), 10, warmup=2)["median_s"],
            }
    finally:
        robot.disconnect()
    return {"policy": POLICY, "robot": SIM_ROBOT, "episodes": episodes, "by_steps": results}
