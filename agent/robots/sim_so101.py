"""``sim_so101``: a simulated SO-101 follower that looks to zk0 exactly like the real one.

Same joints (``shoulder_pan.pos`` ... ``gripper.pos``: five in degrees, the gripper 0..100),
the same six values as action, a front and a wrist camera under the standard image keys. It
lives on simulated time (``SimClock``): ``send_action`` advances physics by one control period,
and waiting for a frame costs wall time, never simulated time, so datasets are timed exactly
whatever the renderer's speed. Each camera renders in its own thread from snapshots.

Backend options (``options:`` in the robot YAML, validated by ``SimOptions``)::

    options:
      seed: 0
      cube_region: {x: [0.15, 0.22], y: [-0.10, 0.10]}   # where cubes start (metres)
      goal_region: {x: [0.22, 0.30], y: [-0.10, 0.10]}   # where they must go
      light_jitter: 0.3        # light intensity x U(1-j, 1+j) per episode
      camera_jitter_m: 0.02    # front camera moved by U(-j, j) per axis per episode
"""

from __future__ import annotations

from typing import Annotated, Any, Self

import numpy as np
from lerobot.robots.robot import Robot
from pydantic import BaseModel, ConfigDict, Field, model_validator

from zk0.agent.robots import robot_options
from zk0.agent.robots.base import (
    STATE_STREAM,
    Clock,
    FrameStamp,
    RecordingRobot,
    RobotSetupError,
    SoftwareDevice,
)
from zk0.agent.robots.sim_camera import SimCamera
from zk0.agent.robots.sim_scene import (
    FRONT_CAMERA,
    REACHABLE_X,
    REACHABLE_Y,
    WRIST_CAMERA,
    PickPlaceScene,
    Variant,
)
from zk0.shared.config import SO_ARM_JOINTS, ConfigError, RobotConfig

SIM_CAMERAS = {"front": FRONT_CAMERA, "wrist": WRIST_CAMERA}
_SAMPLING_TRIES = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Region(_Strict):
    """An axis-aligned box on the table, metres in the robot's base frame."""

    x: tuple[float, float] = REACHABLE_X
    y: tuple[float, float] = REACHABLE_Y

    @model_validator(mode="after")
    def _inside_reach(self) -> Self:
        for name, (low, high), (reach_low, reach_high) in (
            ("x", self.x, REACHABLE_X),
            ("y", self.y, REACHABLE_Y),
        ):
            if low > high:
                raise ValueError(f"{name}: {low} > {high}")
            if low < reach_low - 1e-9 or high > reach_high + 1e-9:
                raise ValueError(
                    f"{name}: [{low}, {high}] leaves the reachable range "
                    f"[{reach_low}, {reach_high}] m"
                )
        return self

    def sample(self, rng: np.random.Generator) -> tuple[float, float]:
        return float(rng.uniform(*self.x)), float(rng.uniform(*self.y))


class SimOptions(_Strict):
    """The simulated arm's task variant and rendering behaviour."""

    seed: int = 0
    cube_region: Region = Region()
    goal_region: Region = Region()
    min_goal_distance_m: Annotated[float, Field(ge=0.05, le=0.2)] = 0.08
    light_jitter: Annotated[float, Field(ge=0.0, le=0.8)] = 0.0
    camera_jitter_m: Annotated[float, Field(ge=0.0, le=0.05)] = 0.0
    #: True: each observation waits for the frames of its own state (recording). False: the
    #: cameras' latest frames, never waiting (frames may then repeat; the data checks see it).
    wait_for_render: bool = True
    render_timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @model_validator(mode="after")
    def _feasible(self) -> Self:
        self.variant(0)  # raises if no goal can be far enough from a cube
        return self

    def variant(self, episode_index: int) -> Variant:
        """Episode ``episode_index``'s set-up: a pure function of (seed, episode index)."""
        rng = np.random.default_rng([self.seed, episode_index])
        for _ in range(_SAMPLING_TRIES):
            cube, goal = self.cube_region.sample(rng), self.goal_region.sample(rng)
            if np.hypot(goal[0] - cube[0], goal[1] - cube[1]) >= self.min_goal_distance_m:
                break
        else:
            raise ValueError(
                f"cube_region and goal_region leave no goal {self.min_goal_distance_m} m "
                "from a cube; move them apart"
            )
        return Variant(
            cube_xy=cube,
            goal_xy=goal,
            light_scale=float(1.0 + rng.uniform(-self.light_jitter, self.light_jitter)),
            camera_offset=tuple(
                float(v) for v in rng.uniform(-self.camera_jitter_m, self.camera_jitter_m, 3)
            ),  # type: ignore[arg-type]
        )


class SimClock(Clock):
    """Simulated time: waiting steps the physics, holding the last targets."""

    def __init__(self, robot: SimSO101) -> None:
        self._robot = robot

    def now(self) -> float:
        return self._robot.scene.time

    def sleep_until(self, deadline: float) -> None:
        scene = self._robot.scene
        stepped = False
        while scene.time < deadline - 0.5 / scene.fps / 20:
            scene.step()
            stepped = True
        if stepped:
            self._robot.state_changed()


class SimSO101(RecordingRobot, SoftwareDevice, Robot):  # type: ignore[misc]
    """The simulated follower arm (LeRobot ``Robot`` interface)."""

    name = "sim_so101"
    config_class = RobotConfig

    def __init__(self, config: RobotConfig) -> None:
        self.robot_type = self.name
        self.init_identity(config.robot.id)
        self.config = config
        options = robot_options(config)  # the one validation, shared with `config check`
        assert isinstance(options, SimOptions)
        self.options = options
        self.cameras: dict[str, SimCamera] = {}
        for name, camera in config.cameras.items():
            if camera.type != "sim" or name not in SIM_CAMERAS:
                raise ConfigError(
                    f"cameras.{name}: the simulated arm has cameras 'front' and 'wrist' of "
                    f"type sim, got {name!r} of type {camera.type}"
                )
            key = camera.policy_key.removeprefix("observation.images.")
            self.cameras[key] = SimCamera(
                key, SIM_CAMERAS[name], camera.width, camera.height, config.fps
            )
        self._scene: PickPlaceScene | None = None
        self._version = 0
        self._published = -1
        self._stamps: dict[str, FrameStamp] = {}
        self.clock: Clock = SimClock(self)

    # -- LeRobot's interface ---------------------------------------------------------------------
    @property
    def observation_features(self) -> dict[str, Any]:
        cameras = {key: (cam.height, cam.width, 3) for key, cam in self.cameras.items()}
        return {**self.action_features, **cameras}

    @property
    def is_connected(self) -> bool:
        return self._scene is not None

    def connect(self, calibrate: bool = False) -> None:
        if self._scene is not None:
            raise RobotSetupError(f"{self} is already connected")
        self._scene = PickPlaceScene(self.config.fps)
        self._scene.reset(self.options.variant(0))
        try:
            for camera in self.cameras.values():
                camera.connect()
        except BaseException:
            self.disconnect()
            raise
        self.state_changed()

    def get_observation(self) -> dict[str, Any]:
        scene = self.scene
        positions = scene.joint_positions()
        observation: dict[str, Any] = {
            f"{joint}.pos": float(np.rad2deg(value))
            for joint, value in zip(SO_ARM_JOINTS[:5], positions[:5], strict=True)
        }
        observation["gripper.pos"] = 100.0 * scene.gripper_fraction(float(positions[5]))
        stamps = {STATE_STREAM: FrameStamp(t=scene.time, counter=self._version)}
        if self._published != self._version:
            self._publish()
        for key, camera in self.cameras.items():
            if self.options.wait_for_render:
                frame, stamp = camera.frame_for(self._version, self.options.render_timeout_s)
            else:
                frame, stamp = camera.latest()
            observation[key] = frame
            stamps[key] = stamp
        self._stamps = stamps
        return observation

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
        """Set the six joint targets (degrees; gripper 0..100) and advance one control period."""
        missing = [key for key in self.action_features if key not in action]
        if missing:
            raise ValueError(f"{self}: action lacks {missing}")
        scene = self.scene
        targets = np.array([np.deg2rad(float(action[f"{j}.pos"])) for j in SO_ARM_JOINTS[:5]])
        gripper = scene.gripper_angle(float(action["gripper.pos"]) / 100.0)
        applied = scene.set_joint_targets(np.append(targets, gripper))
        scene.step()
        self.state_changed()
        sent = {
            f"{j}.pos": float(np.rad2deg(v))
            for j, v in zip(SO_ARM_JOINTS[:5], applied[:5], strict=True)
        }
        sent["gripper.pos"] = 100.0 * scene.gripper_fraction(float(applied[5]))
        return sent

    def disconnect(self) -> None:
        for camera in self.cameras.values():
            camera.disconnect()
        if self._scene is not None:
            self._scene.close()
        self._scene = None

    # -- zk0's recording hooks -------------------------------------------------------------------
    def capture_stamps(self) -> dict[str, FrameStamp]:
        return dict(self._stamps)

    def start_episode(self, episode_index: int) -> None:
        self.scene.reset(self.options.variant(episode_index))
        self.state_changed()

    def describe_episode(self) -> str:
        return self.scene.variant.describe()

    # -- internals -------------------------------------------------------------------------------
    @property
    def scene(self) -> PickPlaceScene:
        if self._scene is None:
            raise RuntimeError(f"{self} is not connected")
        return self._scene

    def state_changed(self) -> None:
        """The physics moved: a new state version, whose frames the cameras start on at once."""
        self._version += 1
        self._publish()

    def _publish(self) -> None:
        snapshot = self.scene.snapshot(self._version)
        for camera in self.cameras.values():
            camera.submit(snapshot)
        self._published = self._version

    def render_stats(self) -> dict[str, float]:
        """Frames rendered and seconds spent rendering, summed over cameras."""
        return {
            "frames": float(sum(c.frames_rendered for c in self.cameras.values())),
            "render_s": sum(c.render_s for c in self.cameras.values()),
        }
