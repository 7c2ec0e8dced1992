"""Real SO-100/SO-101 arms through LeRobot's own classes, made safe for a daemon.

``ZK0SOFollower`` and ``ZK0SOLeader`` are LeRobot's ``SOFollower``/``SOLeader`` (same motors,
same normalisation: five joints in degrees, the gripper 0..100, same calibration files) with
two changes:

- they never prompt. LeRobot's ``connect()`` falls back to an interactive calibration (``input``)
  when the motors disagree with the calibration file; an agent is a daemon, so a missing port,
  a missing calibration file, a missing motor driver or a calibration mismatch is a one-line
  ``RobotSetupError`` saying what to run instead (``lerobot-calibrate``, ``lerobot-find-port``).
- camera frames come with their capture time (the OpenCV reader thread's own timestamp), for
  the recorder's late-frame and repeated-frame checks.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
from lerobot.cameras.opencv import OpenCVCamera, OpenCVCameraConfig
from lerobot.robots.so_follower import SOFollower, SOFollowerRobotConfig
from lerobot.teleoperators.so_leader import SOLeader, SOLeaderTeleopConfig
from lerobot.utils.constants import HF_LEROBOT_CALIBRATION, ROBOTS, TELEOPERATORS
from numpy.typing import NDArray

from zk0.agent.robots import robot_options
from zk0.agent.robots.base import (
    STATE_STREAM,
    FrameStamp,
    RecordingRobot,
    RecordingTeleop,
    RobotSetupError,
)
from zk0.shared.config import ArmConfig, RobotConfig

Image = NDArray[np.uint8]

FIND_PORT = "lerobot-find-port"


def calibration_file(arm: ArmConfig, kind: str, lerobot_name: str) -> Path:
    """Where LeRobot keeps (and ``lerobot-calibrate`` writes) this arm's calibration."""
    folder = arm.calibration_dir or HF_LEROBOT_CALIBRATION / kind / lerobot_name
    return Path(folder) / f"{arm.id}.json"


def preflight(arm: ArmConfig, role: str, kind: str, lerobot_name: str) -> None:
    """Fail in one line, before touching the bus, on what a person must fix by hand."""
    if not arm.port or not Path(arm.port).exists():
        raise RobotSetupError(
            f"{role}.port {arm.port} does not exist: is the {arm.type} ({arm.id}) plugged in "
            f"and powered? (`{FIND_PORT}` shows which port it is on)"
        )
    calibration = calibration_file(arm, kind, lerobot_name)
    if not calibration.is_file():
        flag = "robot" if kind == ROBOTS else "teleop"
        raise RobotSetupError(
            f"{role}: no calibration for {arm.id} at {calibration}; calibrate once with "
            f"`lerobot-calibrate --{flag}.type={arm.type} --{flag}.port={arm.port} "
            f"--{flag}.id={arm.id}`"
        )
    if importlib.util.find_spec("scservo_sdk") is None:  # LeRobot's Feetech driver (an extra)
        raise RobotSetupError(
            f"{role}: LeRobot's Feetech motor driver is missing: "
            "pip install 'lerobot[feetech]==0.6.1'"
        )


def _connect_bus(bus: Any, arm: ArmConfig, role: str) -> None:
    try:
        bus.connect()
    except (ConnectionError, OSError, RuntimeError, TimeoutError) as error:
        reason = " ".join(str(error).split())  # LeRobot lists the missing motors over many lines
        raise RobotSetupError(
            f"{role}: no answer from the motors of {arm.id} on {arm.port} ({reason[:200]}); "
            "check power and cabling"
        ) from None


def _refuse_mismatch(bus: Any, arm: ArmConfig, role: str, calibration: Path) -> None:
    if not bus.is_calibrated:
        bus.disconnect()
        raise RobotSetupError(
            f"{role}: the motors of {arm.id} disagree with {calibration}; run "
            f"`lerobot-calibrate` for it (zk0 never recalibrates or overwrites on its own)"
        )


class ZK0SOFollower(RecordingRobot, SOFollower):  # type: ignore[misc]
    """LeRobot's SO-100/SO-101 follower that never prompts and stamps camera frames."""

    def __init__(self, config: RobotConfig) -> None:
        arm = config.robot
        cameras = {}
        for name, camera in config.cameras.items():
            if camera.type != "opencv" or camera.index_or_path is None:
                raise RobotSetupError(f"cameras.{name}: a real arm takes opencv cameras")
            device = camera.index_or_path
            cameras[camera.policy_key.removeprefix("observation.images.")] = OpenCVCameraConfig(
                index_or_path=device if isinstance(device, int) else Path(device),
                fps=camera.fps,
                width=camera.width,
                height=camera.height,
            )
        robot_options(config)  # real arms take no options: refused here as by `config check`
        preflight(arm, "robot", ROBOTS, SOFollower.name)
        self._arm = arm
        lerobot_config = SOFollowerRobotConfig(
            port=arm.port,
            id=arm.id,
            calibration_dir=arm.calibration_dir,
            cameras=cameras,
            use_degrees=True,
        )
        super().__init__(lerobot_config)
        self._stamps: dict[str, FrameStamp] = {}

    def connect(self, calibrate: bool = False) -> None:
        """LeRobot's ``connect`` minus the interactive calibration fallback."""
        _connect_bus(self.bus, self._arm, "robot")
        _refuse_mismatch(self.bus, self._arm, "robot", self.calibration_fpath)
        try:
            for camera in self.cameras.values():
                camera.connect()
        except Exception as error:
            self.bus.disconnect(self.config.disable_torque_on_disconnect)
            raise RobotSetupError(f"robot: camera failed to open ({error})") from None
        self.configure()

    def calibrate(self) -> None:
        raise RobotSetupError(
            f"robot: {self.id} needs calibrating; run `lerobot-calibrate` (a daemon never prompts)"
        )

    def get_observation(self) -> dict[str, Any]:
        positions = self.bus.sync_read("Present_Position", num_retry=self.config.num_read_retries)
        stamps = {STATE_STREAM: FrameStamp(t=time.perf_counter())}
        observation: dict[str, Any] = {f"{motor}.pos": value for motor, value in positions.items()}
        for key, camera in self.cameras.items():
            observation[key], stamps[key] = latest_stamped(camera)
        self._stamps = stamps
        return observation

    def capture_stamps(self) -> dict[str, FrameStamp]:
        return dict(self._stamps)


def latest_stamped(camera: OpenCVCamera) -> tuple[Image, FrameStamp]:
    """The reader thread's latest frame with its capture time, read together under its lock."""
    with camera.frame_lock:
        frame, captured = camera.latest_frame, camera.latest_timestamp
    if frame is None or captured is None:
        raise RuntimeError(f"{camera} has not captured a frame yet")
    return frame, FrameStamp(t=float(captured))


class ZK0SOLeader(RecordingTeleop, SOLeader):  # type: ignore[misc]
    """LeRobot's SO-100/SO-101 leader arm that never prompts."""

    def __init__(self, arm: ArmConfig) -> None:
        preflight(arm, "leader", TELEOPERATORS, SOLeader.name)
        self._arm = arm
        super().__init__(
            SOLeaderTeleopConfig(
                port=arm.port, id=arm.id, calibration_dir=arm.calibration_dir, use_degrees=True
            )
        )

    def connect(self, calibrate: bool = False) -> None:
        _connect_bus(self.bus, self._arm, "leader")
        _refuse_mismatch(self.bus, self._arm, "leader", self.calibration_fpath)
        self.configure()

    def calibrate(self) -> None:
        raise RobotSetupError(
            f"leader: {self.id} needs calibrating; run `lerobot-calibrate` (a daemon never prompts)"
        )
