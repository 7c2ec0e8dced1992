"""``scripted_expert``: the teleoperator that stands in for a person on the simulated arm.

A person on a real workstation moves the leader arm; the follower copies its six joint
positions. On the simulated arm this teleoperator does the same job: it watches the scene (cube,
goal, gripper: privileged information no policy gets) and produces the six joint targets of a
pick-and-place, using ``lerobot-env-so101``'s ``PickPlaceController`` (hover, descend, close,
lift, traverse, lower, open, retreat) and the scene's top-down IK.

The controller decides at 10 Hz, the rate it was written for; between decisions the Cartesian
target is held and the IK tracks it every frame (at 30 fps this succeeded 20/20 in a row, where
calling the controller at 30 Hz directly fails often: its hold phases count decisions). It
reports, after every action, whether the task is achieved (LeRobot's ``next.success``), and ends
the episode shortly after the controller has finished.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lerobot.teleoperators.teleoperator import Teleoperator
from lerobot_env_so101.scripted import PickPlaceController
from numpy.typing import NDArray

from zk0.agent.robots.base import RecordingTeleop, RobotSetupError, SoftwareDevice
from zk0.agent.robots.sim_scene import ACTION_SCALE
from zk0.agent.robots.sim_so101 import SimSO101
from zk0.shared.config import SO_ARM_JOINTS, ArmConfig

DECISION_HZ = 10.0
#: Frames recorded after the controller is done, so episodes end on the settled result.
LINGER_S = 0.3


class ScriptedExpert(RecordingTeleop, SoftwareDevice, Teleoperator):  # type: ignore[misc]
    """Pick-and-place by script, as joint targets for ``SimSO101`` (LeRobot ``Teleoperator``)."""

    name = "scripted_expert"
    config_class = ArmConfig
    reports_success = True

    def __init__(self, config: ArmConfig, robot: SimSO101) -> None:
        self.init_identity(config.id)
        self.config = config
        self._robot = robot
        fps = robot.config.fps
        self._hold = max(1, round(fps / DECISION_HZ))
        self._linger = max(1, round(LINGER_S * fps))
        self._controller = PickPlaceController(action_scale=ACTION_SCALE)
        self._connected = False
        self._target: NDArray[np.float64] = np.zeros(3)
        self._grasp = 1.0
        self._last_zero = False
        self._calls = 0
        self._frames_done = 0

    def connect(self, calibrate: bool = False) -> None:
        if not self._robot.is_connected:
            raise RobotSetupError(f"{self}: connect the simulated arm {self._robot.id} first")
        self._connected = True
        self.start_episode(0)

    def get_action(self) -> dict[str, Any]:
        scene = self._robot.scene
        if self._calls % self._hold == 0:
            decision = self._controller.act(
                scene.grasp_point(), scene.block_pos(), scene.goal_pos()
            )
            delta = np.asarray(decision[:3], dtype=np.float64)
            self._grasp = float(decision[3])
            zero = bool(np.linalg.norm(delta) < 1e-6)
            if zero and not self._last_zero:  # hold where the gripper is, not the old target
                self._target = scene.grasp_point()
            elif not zero:
                self._target = self._target + delta * ACTION_SCALE
            self._last_zero = zero
        self._calls += 1
        if self._controller.done:
            self._frames_done += 1
        arm = np.rad2deg(scene.solve_arm_ik(self._target))
        action = {f"{joint}.pos": float(v) for joint, v in zip(SO_ARM_JOINTS[:5], arm, strict=True)}
        action["gripper.pos"] = 100.0 * self._grasp
        return action

    def disconnect(self) -> None:
        self._connected = False

    # -- zk0's recording hooks -------------------------------------------------------------------
    def start_episode(self, episode_index: int) -> None:
        self._controller.reset()
        self._target = self._robot.scene.grasp_point()
        self._grasp = 1.0
        self._last_zero = False
        self._calls = 0
        self._frames_done = 0

    @property
    def episode_done(self) -> bool:
        return self._controller.done and self._frames_done >= self._linger

    def success(self) -> bool | None:
        return self._robot.scene.is_success()
