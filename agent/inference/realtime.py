"""The arm as the control loop sees it: one control step per wall-clock tick.

A real arm lives in wall-clock time: whatever the model's latency, the world moves on and the
arm holds its last target until it gets a new one. For evaluation the simulated arm is driven
the same way: the engine ticks at the control rate on the wall clock, and every tick advances
the simulation by exactly one control period, either with the next action (``act``) or
holding the last targets when there is none (``hold``). So model latency costs what it costs on
a real arm.

Its cameras render in their own threads; ``realtime_config`` switches the simulated arm to
"latest frame" observations (``wait_for_render: false``), so a render never blocks a tick.
"""

from __future__ import annotations

import time
from typing import Any

from zk0.agent.robots.base import STATE_STREAM, WallClock
from zk0.shared.config import RobotConfig


def realtime_config(config: RobotConfig) -> RobotConfig:
    """``config`` for closed-loop control: the simulated arm never waits for a render."""
    if config.robot.type != "sim_so101":
        return config
    return config.model_copy(update={"options": {**config.options, "wait_for_render": False}})


class RealTimeArm:
    """A LeRobot robot driven at ``fps`` ticks per wall-clock second."""

    def __init__(self, robot: Any, fps: int) -> None:
        self.robot = robot
        self.fps = fps
        self.period_s = 1.0 / fps
        #: Simulated (or virtual) time: it only moves when the loop steps it.
        self.stepped = not isinstance(getattr(robot, "clock", WallClock()), WallClock)

    @property
    def action_features(self) -> list[str]:
        return list(self.robot.action_features)

    def connect(self) -> None:
        if not self.robot.is_connected:
            self.robot.connect()

    def disconnect(self) -> None:
        if self.robot.is_connected:
            self.robot.disconnect()

    def start_episode(self, index: int, timeout_s: float = 60.0) -> dict[str, Any]:
        """Reset (simulated arm: episode ``index``'s scene); an observation of the new state."""
        start_episode = getattr(self.robot, "start_episode", None)
        if start_episode is not None:
            start_episode(index)
        return self.fresh_observation(timeout_s)

    def fresh_observation(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """An observation whose camera frames show the current state (outside the timed loop)."""
        deadline = time.monotonic() + timeout_s
        while True:
            observation: dict[str, Any] | None
            try:
                observation = dict(self.robot.get_observation())
            except RuntimeError:  # no frame rendered yet
                observation = None
            if observation is not None and self._frames_current():
                return observation
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.robot}: no camera frame of the current state")
            time.sleep(0.005)

    def _frames_current(self) -> bool:
        stamps_of = getattr(self.robot, "capture_stamps", None)
        if stamps_of is None:
            return True
        stamps = stamps_of()
        state = stamps.get(STATE_STREAM)
        if state is None or state.counter is None:
            return True
        return all(s.counter is None or s.counter >= state.counter for s in stamps.values())

    def observe(self) -> dict[str, Any]:
        return dict(self.robot.get_observation())

    def act(self, action: dict[str, float]) -> None:
        self.robot.send_action(action)

    def hold(self) -> None:
        """No action this tick: the arm keeps its last targets; simulated time still advances."""
        if self.stepped:
            clock = self.robot.clock
            clock.sleep_until(clock.now() + self.period_s)

    def success(self) -> bool | None:
        """Whether the task is achieved (the simulated arm knows; a real arm does not)."""
        scene = getattr(self.robot, "scene", None)
        is_success = getattr(scene, "is_success", None)
        return bool(is_success()) if is_success is not None else None
