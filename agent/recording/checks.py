"""Data checks run on every frame before it joins an episode, and on the episode's task.

A violation drops the episode (with one log line saying why), never the dataset:

- capture clock: consecutive frames of every stream (joints and each camera) are at most
  ``late_factor / fps`` apart. A later frame is logged; ``late_run`` late frames in a row, or
  one gap longer than ``freeze_periods`` control periods, fail the episode.
- no frame delivered twice: a camera's frame counter must grow, and so must its capture time.
- every expected feature present with the right dtype and shape, nothing else.
- the task text is non-empty and within the configured length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from loguru import logger

from zk0.agent.robots.base import FrameStamp

#: Features LeRobot fills in itself; a frame must not carry them.
LEROBOT_DEFAULTS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
#: Late frames logged one by one per episode; later ones only counted.
_LOGGED_LATE = 5


class EpisodeRejectedError(Exception):
    """This episode violates a data check; the message says which and where."""


@dataclass(frozen=True)
class CheckLimits:
    fps: int
    max_task_chars: int
    late_factor: float = 1.5
    late_run: int = 3
    freeze_periods: float = 10.0

    @property
    def late_s(self) -> float:
        return self.late_factor / self.fps

    @property
    def freeze_s(self) -> float:
        return self.freeze_periods / self.fps


def check_task(task: str, max_chars: int) -> None:
    """Raise ``ValueError`` if ``task`` is empty or longer than ``max_chars``."""
    if not isinstance(task, str) or not task.strip():
        raise ValueError("task: must not be empty")
    if len(task) > max_chars:
        raise ValueError(f"task: {len(task)} characters, more than max_task_chars={max_chars}")


def _check_value(key: str, spec: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` does not fit feature ``spec`` (None if it does)."""
    shape = tuple(spec["shape"])
    dtype = spec["dtype"]
    array = np.asarray(value)
    if dtype in ("image", "video"):
        if array.dtype != np.uint8 or array.shape != shape:
            return f"{key}: expected a uint8 image {shape}, got {array.dtype} {array.shape}"
        return None
    if array.shape != shape:
        return f"{key}: expected shape {shape}, got {array.shape}"
    if array.dtype != np.dtype(dtype):
        return f"{key}: expected {dtype}, got {array.dtype}"
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        return f"{key}: not finite ({array.tolist()})"
    return None


@dataclass
class _Stream:
    last: FrameStamp | None = None
    late_run: int = 0


@dataclass
class EpisodeChecker:
    """Checks an episode's frames as they come (``check_frame`` raises on a violation)."""

    limits: CheckLimits
    features: dict[str, dict[str, Any]]
    streams: tuple[str, ...]
    task: str
    late_frames: int = 0
    worst_gap_s: float = 0.0
    _state: dict[str, _Stream] = field(default_factory=dict)
    _late_logged: int = 0

    def __post_init__(self) -> None:
        try:
            check_task(self.task, self.limits.max_task_chars)
        except ValueError as error:
            raise EpisodeRejectedError(str(error)) from None
        self._expected = {k: v for k, v in self.features.items() if k not in LEROBOT_DEFAULTS}
        self._state = {stream: _Stream() for stream in self.streams}

    def check_frame(self, index: int, frame: dict[str, Any], stamps: dict[str, FrameStamp]) -> None:
        """Check frame ``index`` (its values and the capture stamps of its streams)."""
        if frame.get("task") != self.task:
            raise EpisodeRejectedError(f"frame {index}: task changed to {frame.get('task')!r}")
        keys = set(frame) - {"task"}
        missing, extra = set(self._expected) - keys, keys - set(self._expected)
        if missing or extra:
            raise EpisodeRejectedError(
                f"frame {index}: missing features {sorted(missing)}, unexpected {sorted(extra)}"
            )
        for key, spec in self._expected.items():
            problem = _check_value(key, spec, frame[key])
            if problem:
                raise EpisodeRejectedError(f"frame {index}: {problem}")
        late = False
        for stream, state in self._state.items():
            stamp = stamps.get(stream)
            if stamp is None:
                raise EpisodeRejectedError(f"frame {index}: no capture stamp for {stream}")
            late = self._check_stamp(index, stream, state, stamp) or late
            state.last = stamp
        self.late_frames += late

    def _check_stamp(self, index: int, stream: str, state: _Stream, stamp: FrameStamp) -> bool:
        """Check one stream's stamp against its last; True if it came late."""
        last = state.last
        if last is None:
            return False
        if stamp.counter is not None and last.counter is not None and stamp.counter <= last.counter:
            raise EpisodeRejectedError(
                f"frame {index}: {stream} delivered its frame {stamp.counter} again "
                f"(previous {last.counter})"
            )
        gap = stamp.t - last.t
        if gap <= 0:
            raise EpisodeRejectedError(
                f"frame {index}: {stream} delivered the frame captured at {stamp.t:.4f} s again"
            )
        self.worst_gap_s = max(self.worst_gap_s, gap)
        if gap > self.limits.freeze_s:
            raise EpisodeRejectedError(
                f"frame {index}: {stream} froze for {gap * 1e3:.0f} ms "
                f"(more than {self.limits.freeze_periods:g} frame periods)"
            )
        if gap <= self.limits.late_s:
            state.late_run = 0
            return False
        state.late_run += 1
        self._late_logged += 1
        if self._late_logged <= _LOGGED_LATE:
            logger.warning(
                "frame {}: {} came {:.0f} ms after the previous one (limit {:.0f} ms)",
                index,
                stream,
                gap * 1e3,
                self.limits.late_s * 1e3,
            )
        if state.late_run >= self.limits.late_run:
            raise EpisodeRejectedError(
                f"frame {index}: {state.late_run} late frames in a row on {stream} "
                f"(gaps over {self.limits.late_s * 1e3:.0f} ms)"
            )
        return True
