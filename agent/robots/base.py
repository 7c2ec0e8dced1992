"""What the recorder needs from a robot and a teleoperator beyond LeRobot's own interface.

Every zk0 robot *is* a LeRobot ``Robot`` (``connect``, ``get_observation``, ``send_action``,
``disconnect``, ``observation_features``, ``action_features``) and every teleoperator a LeRobot
``Teleoperator``. The mixins here add the little a recorder must know to check and time data:

- ``clock``: the time base the arm lives in. Real arms and the synthetic robot run on the wall
  clock; the simulated arm on simulated time, so a slow renderer costs wall time, never
  simulated time, and the recorded timing stays exact.
- ``capture_stamps()``: for the last observation, when (on that clock) each stream was captured
  and, where the source counts frames, which frame it was. The data checks use them to find late
  and repeated frames.
- episode hooks (``start_episode``), and for teleoperators that know it, whether the task has
  succeeded (``success``, stored as LeRobot's ``next.success``) and whether they are done.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from zk0.shared.config import SO_ARM_JOINTS, ConfigError
from zk0.shared.validation import describe

#: Key of the joint-state stream in ``capture_stamps()``; cameras use their observation key.
STATE_STREAM = "state"


class RobotSetupError(ValueError):
    """A fixable setup problem (port, calibration, driver, renderer), said in one line.

    A ``ValueError`` so the command line prints it as ``error: ...`` and exits 2.
    """


@dataclass(frozen=True)
class FrameStamp:
    """When a stream's frame was captured (robot clock, seconds) and its frame counter if known."""

    t: float
    counter: int | None = None


class Clock(abc.ABC):
    """The time base a robot lives in."""

    @abc.abstractmethod
    def now(self) -> float:
        """Seconds on this clock."""

    @abc.abstractmethod
    def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (at once if it already is)."""


class WallClock(Clock):
    """``time.perf_counter``: the clock LeRobot's cameras stamp their frames with."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)


class VirtualClock(Clock):
    """A clock that jumps instead of waiting: loops run as fast as the machine allows.

    Every wait moves it forward by at least ``min_step`` (a loop pass never takes no time).
    """

    def __init__(self, start: float = 0.0, min_step: float = 1e-6) -> None:
        self._t = start
        self._min_step = min_step

    def now(self) -> float:
        return self._t

    def sleep_until(self, deadline: float) -> None:
        self._t = max(self._t + self._min_step, deadline)


class RecordingRobot(abc.ABC):
    """Mixin for LeRobot robots that the recorder can time and check."""

    clock: Clock = WallClock()

    @abc.abstractmethod
    def capture_stamps(self) -> dict[str, FrameStamp]:
        """Stamps of the streams returned by the last ``get_observation()``.

        Keys: ``STATE_STREAM`` for the joints, the camera's observation key for each camera.
        """

    def start_episode(self, episode_index: int) -> None:  # noqa: B027 (an optional hook)
        """Called right before an episode is recorded (the simulated arm resets its scene)."""

    def describe_episode(self) -> str:
        """One line about the current episode's set-up, for the log (empty if nothing to say)."""
        return ""


class RecordingTeleop:
    """Mixin for LeRobot teleoperators driven by the recorder."""

    #: True when ``success()`` answers; the dataset then gets LeRobot's ``next.success``.
    reports_success: bool = False

    def start_episode(self, episode_index: int) -> None:
        """Called right after the robot's ``start_episode``."""

    @property
    def episode_done(self) -> bool:
        """True once the operator has finished the episode (ends it before its time runs out)."""
        return False

    def success(self) -> bool | None:
        """Whether the task is achieved in the state after the last action (None: unknown)."""
        return None


class SoftwareDevice:
    """Mixin for the simulated, scripted and synthetic arms and leaders.

    They speak LeRobot's robot/teleoperator interface but have no motors to calibrate, so they
    skip LeRobot's ``__init__`` (which creates a calibration folder) and call ``init_identity``.
    """

    _connected: bool = False

    def init_identity(self, device_id: str) -> None:
        self.id = device_id
        self.calibration: dict[str, Any] = {}
        self.calibration_dir = None
        self.calibration_fpath = None

    @property
    def action_features(self) -> dict[str, Any]:
        return {f"{joint}.pos": float for joint in SO_ARM_JOINTS}

    @property
    def feedback_features(self) -> dict[str, Any]:
        return {}

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        """Nothing to calibrate: software joints read true angles."""

    def configure(self) -> None:
        """Nothing to configure."""

    def send_feedback(self, feedback: dict[str, Any]) -> None:
        """No motors to push back with."""


def parse_options[M: BaseModel](model: type[M], options: dict[str, Any], backend: str) -> M:
    """Validate a backend's ``options:``; a problem is one line naming the field."""
    try:
        return model.model_validate(options)
    except ValidationError as error:
        raise ConfigError(f"{describe(error, 'options')} ({backend})") from None
