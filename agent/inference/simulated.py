"""Closed-loop success in simulated time: the simulated arm waits for the policy.

Real-time evaluation (``zk0.agent.inference.evaluation``) measures the product as an arm lives
it: the policy races the clock, chunks arrive late, the queue starves. That is the right test of
inference, and the wrong ruler for comparing learning methods: on a loaded machine the same
adapter scores differently run to run. Here the simulator stands still while the policy thinks,
so an episode is a pure function of (policy, scene, noise seed)::

    scene(seed, index) --reset--> observation --policy--> chunk of actions
          ^                                                    |
          |         first `actions_per_chunk` actions, one control period each
          +---- success? horizon? <-- physics (simulated time) <+

Scenes for evaluation come from ``evaluation_scenes``: indices no recording ever reaches, so a
policy is never scored on a set-up it was trained on, and every method is scored on the same
(paired) scenes. Frames are rendered only at chunk boundaries, which makes an 8 s episode cost
about a second or two of CPU with the tiny policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger
from numpy.typing import NDArray

from zk0.agent.inference.frames import FrameLayout
from zk0.shared.config import RobotConfig
from zk0.shared.features import PolicyFeatures
from zk0.shared.success import SuccessRate

#: Raw policy frame and flow-matching noise -> ``(chunk, action_dim)`` actions in robot units.
ChunkFn = Callable[[dict[str, Any], Any], NDArray[np.floating]]

#: The first scene index reserved for evaluation. A simulated episode's set-up is a function of
#: (seed, episode index); recordings use indices 0, 1, 2, ... (an arm would need a million
#: episodes to reach this one), so evaluation scenes are never training scenes.
EVALUATION_SCENES_START = 1_000_000


def evaluation_scenes(count: int, offset: int = 0) -> list[int]:
    """``count`` scene indices for evaluation, disjoint from every recorded episode's."""
    if count < 0 or offset < 0:
        raise ValueError(f"evaluation scenes: count and offset must be >= 0, got {count}, {offset}")
    return list(range(EVALUATION_SCENES_START + offset, EVALUATION_SCENES_START + offset + count))


@dataclass(frozen=True)
class SimulatedEpisode:
    scene: int
    success: bool
    steps: int
    chunks: int
    describe: str


@dataclass(frozen=True)
class SimulatedReport:
    episodes: list[SimulatedEpisode]

    @property
    def success(self) -> SuccessRate:
        return SuccessRate.of_outcomes(e.success for e in self.episodes)


def torch_chunk_fn(model: Any, preprocessor: Any, postprocessor: Any) -> ChunkFn:
    """A ``ChunkFn`` over an in-memory policy (possibly PEFT-wrapped) and its processors."""
    import torch

    device = next(model.parameters()).device

    def chunk(frame: dict[str, Any], noise: Any) -> NDArray[np.floating]:
        with torch.no_grad():
            batch = preprocessor(dict(frame))
            normalized = model.predict_action_chunk(batch, noise=noise.to(device))
            actions = postprocessor(normalized)
        return np.asarray(actions.detach().cpu().numpy()[0], dtype=np.float64)

    return chunk


def noise_for(seed: int, scene: int, chunk: int, shape: tuple[int, ...]) -> Any:
    """Flow-matching noise of one chunk: the same for every method on the same scene."""
    import torch

    rng = np.random.default_rng([seed, scene, chunk])
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def run_simulated(
    robot_config: RobotConfig,
    chunk_fn: ChunkFn,
    scenes: Iterable[int],
    *,
    chunk_size: int,
    max_action_dim: int,
    actions_per_chunk: int,
    horizon_s: float | None = None,
    seed: int = 0,
    robot: Any | None = None,
) -> SimulatedReport:
    """Run one episode per scene index on the simulated arm, in simulated time.

    An episode ends on success or after ``horizon_s`` (default: the robot config's
    ``episode_time_s``) of simulated time. ``robot`` reuses a connected ``SimSO101`` (one
    renderer set-up for many evaluations); otherwise one is made and closed here.
    """
    from zk0.agent.robots import make_robot

    if robot_config.robot.type != "sim_so101":
        raise ValueError(
            f"simulated-time evaluation needs the simulated arm, not {robot_config.robot.type!r}"
        )
    if not 1 <= actions_per_chunk <= chunk_size:
        raise ValueError(
            f"actions_per_chunk must lie in [1, {chunk_size}], got {actions_per_chunk}"
        )
    horizon = round((horizon_s or robot_config.episode_time_s) * robot_config.fps)
    owns_robot = robot is None
    arm = make_robot(robot_config) if robot is None else robot
    if not arm.is_connected:
        arm.connect(calibrate=False)
    layout = FrameLayout.for_robot(
        list(arm.action_features), PolicyFeatures.from_robot_config(robot_config)
    )
    episodes = []
    try:
        for scene in scenes:
            episodes.append(
                _episode(
                    arm, layout, chunk_fn, scene, robot_config.task, horizon,
                    actions_per_chunk, (1, chunk_size, max_action_dim), seed,
                )
            )  # fmt: skip
    finally:
        if owns_robot:
            arm.disconnect()
    report = SimulatedReport(episodes)
    logger.info("simulated-time evaluation: {}", report.success.describe())
    return report


def _episode(
    arm: Any,
    layout: FrameLayout,
    chunk_fn: ChunkFn,
    scene: int,
    task: str,
    horizon: int,
    actions_per_chunk: int,
    noise_shape: tuple[int, ...],
    seed: int,
) -> SimulatedEpisode:
    arm.start_episode(scene)
    describe = arm.describe_episode()
    steps = chunks = 0
    success = False
    while steps < horizon and not success:
        frame = layout.policy_frame(arm.get_observation(), task)
        actions = chunk_fn(frame, noise_for(seed, scene, chunks, noise_shape))
        chunks += 1
        for values in actions[:actions_per_chunk]:
            arm.send_action(layout.action(values))
            steps += 1
            success = arm.scene.is_success()
            if success or steps >= horizon:
                break
    return SimulatedEpisode(scene, success, steps, chunks, describe)


def evaluate_policy(
    robot_config: RobotConfig,
    model: Any,
    preprocessor: Any,
    postprocessor: Any,
    scenes: Sequence[int],
    *,
    actions_per_chunk: int | None = None,
    seed: int = 0,
    robot: Any | None = None,
) -> SimulatedReport:
    """``run_simulated`` for an in-memory policy; chunk geometry from its config."""
    policy = model.base_model.model if hasattr(model, "base_model") else model
    config = policy.config
    model.eval()
    return run_simulated(
        robot_config,
        torch_chunk_fn(model, preprocessor, postprocessor),
        scenes,
        chunk_size=config.chunk_size,
        max_action_dim=config.max_action_dim,
        actions_per_chunk=actions_per_chunk or config.n_action_steps,
        seed=seed,
        robot=robot,
    )
