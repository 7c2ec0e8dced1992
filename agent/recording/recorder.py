"""The recording loop: teleoperated episodes into the arm's own LeRobot dataset.

``record_episodes`` is the whole job, for the CLI (``zk0-agent record``) and for code that
needs recorded episodes (training fixtures): connect the arm and its operator, then per episode
start the episode, run the control loop at the config's fps for ``episode_time_s`` (or until
the operator is done), check every frame, save it crash-safely, and let the operator reset for
``reset_time_s``.

SIGTERM (what systemd sends) or Ctrl-C stop at the next frame: the episode in progress is
saved (if it passes the checks), the dataset is left finalized, and ``stopped_by`` says so. A
second Ctrl-C aborts at once; the journal rolls back a save it cut short at the next start.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from loguru import logger

from zk0.agent.recording.checks import CheckLimits, EpisodeChecker, EpisodeRejectedError, check_task
from zk0.agent.recording.progress import Progress
from zk0.agent.recording.writer import SUCCESS_KEY, EpisodeWriter, dataset_features
from zk0.agent.robots import STATE_STREAM, make_robot, make_teleoperator
from zk0.shared.config import RobotConfig, load_robot_config

#: Episodes shorter than this (frames) are not worth a file: an interrupted start.
MIN_EPISODE_FRAMES = 2


class RecordingAbortedError(ValueError):
    """Recording cannot go on (e.g. episode after episode fails the data checks)."""


@dataclass
class EpisodeSummary:
    """How one recorded episode went. ``index`` is its dataset index (None: not saved)."""

    index: int | None
    frames: int
    duration_s: float
    success: bool | None
    reason: str = ""
    wall_s: float = 0.0
    save_s: float = 0.0
    io_s: float = 0.0
    overhead_s: float = 0.0
    late_frames: int = 0
    setup: str = ""

    @property
    def saved(self) -> bool:
        return self.index is not None

    def describe(self) -> str:
        if not self.saved:
            return f"episode dropped after {self.frames} frames: {self.reason}"
        success = {True: "yes", False: "no", None: "unknown"}[self.success]
        note = f", {self.reason}" if self.reason else ""
        return (
            f"episode {self.index}: {self.frames} frames, {self.duration_s:.2f} s, "
            f"success {success}{note} (saved in {self.save_s:.2f} s)"
        )


@dataclass
class RecordResult:
    root: Path
    repo_id: str
    total_episodes: int
    episodes: list[EpisodeSummary] = field(default_factory=list)
    stopped_by: str | None = None

    @property
    def saved(self) -> list[EpisodeSummary]:
        return [e for e in self.episodes if e.saved]

    @property
    def success_rate(self) -> float | None:
        known = [e.success for e in self.saved if e.success is not None]
        return sum(known) / len(known) if known else None


class _Stop:
    """SIGTERM/SIGINT handling: the first asks to stop, a second Ctrl-C aborts. A daemon that
    records in a worker thread (no signal handlers there) asks through ``event`` instead."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self._requested: str | None = None
        self._event = event

    @property
    def requested(self) -> str | None:
        if self._requested is None and self._event is not None and self._event.is_set():
            return "a stop request"
        return self._requested

    def handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            logger.warning("{}: finishing this episode and closing the dataset", name)
        self._requested = name


@contextmanager
def _stop_on_signals(event: threading.Event | None) -> Iterator[_Stop]:
    stop = _Stop(event)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def record_episodes(
    robot_config: RobotConfig | Path,
    root: Path,
    episodes: int,
    *,
    task: str | None = None,
    resume: bool = False,
    repo_id: str | None = None,
    episode_time_s: float | None = None,
    reset_time_s: float | None = None,
    progress: bool = False,
    max_dropped_in_a_row: int = 3,
    image_writer_threads: int = 4,
    on_episode: Callable[[EpisodeSummary], None] | None = None,
    robot: Any | None = None,
    stop: threading.Event | None = None,
) -> RecordResult:
    """Record ``episodes`` more episodes into the dataset at ``root``; returns what happened.

    The dataset is created if missing; an existing one needs ``resume=True`` and the same
    features. Times default to the robot config's. Dropped episodes are re-recorded, up to
    ``max_dropped_in_a_row`` in a row. ``image_writer_threads``: LeRobot's background PNG
    writers (0: in the control loop) when the robot config's ``video`` is not streaming. A
    daemon passes the ``robot`` it keeps connected (it stays connected) and a ``stop`` event,
    which ends recording like SIGTERM does.
    """
    config = load_robot_config(robot_config) if isinstance(robot_config, Path) else robot_config
    task = config.task if task is None else task
    check_task(task, config.max_task_chars)
    if episodes < 1:
        raise ValueError(f"episodes: must be at least 1, got {episodes}")
    episode_s = config.episode_time_s if episode_time_s is None else episode_time_s
    reset_s = config.reset_time_s if reset_time_s is None else reset_time_s
    owns_robot = robot is None
    robot = make_robot(config) if robot is None else robot
    teleop = make_teleoperator(config, robot)
    features = dataset_features(robot, teleop)
    limits = CheckLimits(fps=config.fps, max_task_chars=config.max_task_chars)
    writer = EpisodeWriter(
        root, features, config.fps, config.robot.type, resume, repo_id, image_writer_threads,
        config.video,
    )  # fmt: skip
    with writer, _stop_on_signals(stop) as stopping, Progress(episodes, enabled=progress) as bar:
        result = RecordResult(writer.root, writer.repo_id, writer.num_episodes)
        if owns_robot:
            robot.connect(calibrate=False)
        try:
            teleop.connect(calibrate=False)
            loop = _Loop(robot, teleop, writer, limits, task, stopping, bar)
            dropped = 0
            while len(result.saved) < episodes and stopping.requested is None:
                summary = loop.episode(round(episode_s * config.fps))
                result.episodes.append(summary)
                (logger.info if summary.saved else logger.warning)(summary.describe())
                if on_episode is not None:
                    on_episode(summary)
                dropped = 0 if summary.saved else dropped + 1
                if dropped >= max_dropped_in_a_row:
                    raise RecordingAbortedError(
                        f"{dropped} episodes in a row failed the data checks "
                        f"(last: {summary.reason})"
                    )
                if len(result.saved) < episodes and reset_s > 0 and stopping.requested is None:
                    loop.run(round(reset_s * config.fps), record=False)
        finally:
            if teleop.is_connected:
                teleop.disconnect()
            if owns_robot:
                robot.disconnect()
        result.total_episodes = writer.num_episodes
        result.stopped_by = stopping.requested
    logger.info(
        "dataset {}: {} episodes ({} new){}",
        result.root,
        result.total_episodes,
        len(result.saved),
        f", stopped by {result.stopped_by}" if result.stopped_by else "",
    )
    return result


class _Loop:
    """The control loop shared by recorded episodes and unrecorded reset periods."""

    def __init__(
        self,
        robot: Any,
        teleop: Any,
        writer: EpisodeWriter,
        limits: CheckLimits,
        task: str,
        stop: _Stop,
        bar: Progress,
    ) -> None:
        self.robot, self.teleop, self.writer = robot, teleop, writer
        self.limits, self.task, self.stop, self.bar = limits, task, stop, bar
        self.features = writer.features
        self.streams = (STATE_STREAM, *_camera_keys(self.features))
        self.fps = limits.fps

    def episode(self, max_frames: int) -> EpisodeSummary:
        index = self.writer.num_episodes
        self.robot.start_episode(index)
        self.teleop.start_episode(index)
        setup = self.robot.describe_episode()
        if setup:
            logger.info("episode {}: {}", index, setup)
        wall = time.perf_counter()
        self.writer.begin_episode()
        summary = EpisodeSummary(index=None, frames=0, duration_s=0.0, success=None, setup=setup)
        try:
            checker = EpisodeChecker(self.limits, self.features, self.streams, self.task)
            self.bar.start_episode(index, max_frames)
            self.run(max_frames, record=True, checker=checker, summary=summary)
            summary.late_frames = checker.late_frames
        except EpisodeRejectedError as rejected:
            summary.reason = str(rejected)
        summary.wall_s = time.perf_counter() - wall
        if summary.reason or summary.frames < MIN_EPISODE_FRAMES:
            summary.reason = summary.reason or f"only {summary.frames} frames"
            self.writer.discard()
            self.bar.end_episode(summary)
            return summary
        if self.stop.requested and summary.frames < max_frames and not self.teleop.episode_done:
            summary.reason = f"interrupted by {self.stop.requested}"
        try:
            summary.save_s = self.writer.save()
        except EpisodeRejectedError as rejected:  # rolled back: the dataset is as it was
            summary.reason = str(rejected)
            self.bar.end_episode(summary)
            return summary
        summary.index = index
        self.bar.end_episode(summary)
        return summary

    def run(
        self,
        frames: int,
        record: bool,
        checker: EpisodeChecker | None = None,
        summary: EpisodeSummary | None = None,
    ) -> None:
        """``frames`` control periods of teleoperation, paced by the robot's clock."""
        clock = self.robot.clock
        start = clock.now()
        for k in range(frames):
            if self.stop.requested:
                return
            clock.sleep_until(start + k / self.fps)
            began = time.perf_counter()
            observation = self.robot.get_observation()
            stamps = self.robot.capture_stamps()
            sent = self.robot.send_action(self.teleop.get_action())
            success = self.teleop.success() if self.teleop.reports_success else None
            io_done = time.perf_counter()
            if record and checker is not None and summary is not None:
                frame = self._frame(observation, sent, success)
                checker.check_frame(k, frame, stamps)
                self.writer.add_frame(frame)
                summary.frames = k + 1
                summary.duration_s = clock.now() - start
                summary.success = success
                summary.io_s += io_done - began
                summary.overhead_s += time.perf_counter() - io_done
                self.bar.frame()
            if self.teleop.episode_done:
                return

    def _frame(
        self, observation: dict[str, Any], sent: dict[str, Any], success: bool | None
    ) -> dict[str, Any]:
        from lerobot.utils.feature_utils import build_dataset_frame

        frame: dict[str, Any] = {
            **build_dataset_frame(self.features, observation, "observation"),
            **build_dataset_frame(self.features, sent, "action"),
            "task": self.task,
        }
        if SUCCESS_KEY in self.features:
            frame[SUCCESS_KEY] = np.array([bool(success)])
        return frame


def _camera_keys(features: dict[str, Any]) -> list[str]:
    return [
        key.removeprefix("observation.images.")
        for key, spec in features.items()
        if spec["dtype"] in ("image", "video")
    ]
