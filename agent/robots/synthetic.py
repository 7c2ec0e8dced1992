"""``synthetic``: an SO-shaped robot with instant synthetic cameras and a scripted leader.

For fast tests and benchmarks of everything that is neither physics nor rendering: recording,
data checks, crash safety, training pipelines. Joints follow the leader's targets with one
control period of lag; cameras return precomputed textured frames at once, each with its own
frame counter and capture time.

Options (``options:`` in the robot YAML, validated by ``SyntheticOptions``)::

    options:
      realtime: true            # false: a virtual clock, loops run as fast as they can
      seed: 0                   # the leader's motion
      stall_frames: [10]        # cameras stall stall_s before delivering these frames
      stall_s: 0.1
      duplicate_frames: [20]    # cameras deliver the previous frame again
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from lerobot.cameras.camera import Camera
from lerobot.robots.robot import Robot
from lerobot.teleoperators.teleoperator import Teleoperator
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from zk0.agent.robots import robot_options
from zk0.agent.robots.base import (
    STATE_STREAM,
    Clock,
    FrameStamp,
    RecordingRobot,
    RecordingTeleop,
    RobotSetupError,
    SoftwareDevice,
    VirtualClock,
    WallClock,
)
from zk0.shared.config import SO_ARM_JOINTS, ArmConfig, ConfigError, RobotConfig

Image = NDArray[np.uint8]

_PATTERNS = 8


class SyntheticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    realtime: bool = True
    seed: int = 0
    stall_frames: list[Annotated[int, Field(ge=0)]] = []
    stall_s: Annotated[float, Field(ge=0, le=10)] = 0.1
    duplicate_frames: list[Annotated[int, Field(ge=1)]] = []


class SyntheticCamera(Camera):  # type: ignore[misc]
    """Frames from memory: every read is a new frame, at once (unless a fault is configured)."""

    def __init__(
        self, key: str, width: int, height: int, fps: int, clock: Clock, seed: int
    ) -> None:
        self.fps, self.width, self.height = fps, width, height
        self.key = key
        self._clock = clock
        self._seed = seed
        self._patterns: list[Image] = []
        self._counter = -1
        self._last: tuple[Image, FrameStamp] | None = None

    @property
    def is_connected(self) -> bool:
        return bool(self._patterns)

    @staticmethod
    def find_cameras() -> list[dict[str, Any]]:
        return []

    def connect(self, warmup: bool = True) -> None:
        """Precompute a few frames: a gradient with camera-like noise (sigma 4), shifted."""
        rng = np.random.default_rng(self._seed)
        rows = np.linspace(0, 160, self.height)[:, None, None]
        cols = np.linspace(0, 80, self.width)[None, :, None]
        base = (
            rows
            + cols
            + np.array([0.0, 40.0, 80.0])
            + rng.normal(0, 4, (self.height, self.width, 3))
        )
        base = np.clip(base, 0, 255).astype(np.uint8)
        self._patterns = [np.roll(base, i * 3, axis=1) for i in range(_PATTERNS)]

    def capture(self, duplicate: bool = False) -> tuple[Image, FrameStamp]:
        """A new frame and its stamp (or, with ``duplicate``, the previous one again)."""
        if not self._patterns:
            raise RuntimeError(f"{self.key} is not connected")
        if duplicate and self._last is not None:
            return self._last
        self._counter += 1
        self._last = (
            self._patterns[self._counter % _PATTERNS],
            FrameStamp(t=self._clock.now(), counter=self._counter),
        )
        return self._last

    def read(self) -> Image:
        return self.capture()[0]

    def async_read(self, timeout_ms: float = 200) -> Image:
        return self.capture()[0]

    def read_latest(self, max_age_ms: int = 500) -> Image:
        return self._last[0] if self._last is not None else self.capture()[0]

    def disconnect(self) -> None:
        self._patterns = []


class SyntheticRobot(RecordingRobot, SoftwareDevice, Robot):  # type: ignore[misc]
    """Six SO-100 joints (degrees, gripper 0..100) and synthetic cameras."""

    name = "synthetic"
    config_class = RobotConfig

    def __init__(self, config: RobotConfig) -> None:
        self.robot_type = self.name
        self.init_identity(config.robot.id)
        self.config = config
        options = robot_options(config)  # the one validation, shared with `config check`
        assert isinstance(options, SyntheticOptions)
        self.options = options
        self.clock: Clock = WallClock() if self.options.realtime else VirtualClock()
        self.cameras: dict[str, SyntheticCamera] = {}
        for index, (name, camera) in enumerate(config.cameras.items()):
            if camera.type != "synthetic":
                raise ConfigError(f"cameras.{name}: the synthetic robot needs type synthetic")
            key = camera.policy_key.removeprefix("observation.images.")
            self.cameras[key] = SyntheticCamera(
                key, camera.width, camera.height, config.fps, self.clock, self.options.seed + index
            )
        self._positions: NDArray[np.float64] = np.zeros(len(SO_ARM_JOINTS))
        self._connected = False
        self._frame = 0
        self._stamps: dict[str, FrameStamp] = {}

    @property
    def observation_features(self) -> dict[str, Any]:
        cameras = {key: (cam.height, cam.width, 3) for key, cam in self.cameras.items()}
        return {**self.action_features, **cameras}

    def connect(self, calibrate: bool = False) -> None:
        for camera in self.cameras.values():
            camera.connect()
        self._connected = True

    def get_observation(self) -> dict[str, Any]:
        if not self._connected:
            raise RobotSetupError(f"{self} is not connected")
        if self._frame in self.options.stall_frames:
            self.clock.sleep_until(self.clock.now() + self.options.stall_s)
        duplicate = self._frame in self.options.duplicate_frames
        observation: dict[str, Any] = {
            f"{joint}.pos": float(value)
            for joint, value in zip(SO_ARM_JOINTS, self._positions, strict=True)
        }
        stamps = {STATE_STREAM: FrameStamp(t=self.clock.now(), counter=None)}
        for key, camera in self.cameras.items():
            observation[key], stamps[key] = camera.capture(duplicate=duplicate)
        self._stamps = stamps
        self._frame += 1
        return observation

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
        self._positions = np.array([float(action[f"{joint}.pos"]) for joint in SO_ARM_JOINTS])
        return {
            f"{joint}.pos": float(v)
            for joint, v in zip(SO_ARM_JOINTS, self._positions, strict=True)
        }

    def disconnect(self) -> None:
        for camera in self.cameras.values():
            camera.disconnect()
        self._connected = False

    def capture_stamps(self) -> dict[str, FrameStamp]:
        return dict(self._stamps)

    def start_episode(self, episode_index: int) -> None:
        self._frame = 0


class SyntheticLeader(RecordingTeleop, SoftwareDevice, Teleoperator):  # type: ignore[misc]
    """A leader arm waving smoothly: slow sinusoids, a different phase per joint and seed."""

    name = "synthetic_leader"
    config_class = ArmConfig

    def __init__(self, config: ArmConfig, robot: SyntheticRobot) -> None:
        self.init_identity(config.id)
        self._clock = robot.clock
        rng = np.random.default_rng(robot.options.seed)
        self._phase = rng.uniform(0, 2 * np.pi, len(SO_ARM_JOINTS))
        self._connected = False

    def connect(self, calibrate: bool = False) -> None:
        self._connected = True

    def get_action(self) -> dict[str, Any]:
        wave = np.sin(2 * np.pi * 0.25 * self._clock.now() + self._phase)
        values = 30.0 * wave
        values[-1] = 50.0 + 40.0 * wave[-1]  # gripper 10..90
        return {f"{joint}.pos": float(v) for joint, v in zip(SO_ARM_JOINTS, values, strict=True)}

    def disconnect(self) -> None:
        self._connected = False
