"""The timestamped action queue between the policy worker and the control loop.

Every action carries the control step it is meant for (``step``: 0, 1, 2, ... counts the actions
the arm has executed this episode) and the time it is due on the engine's monotonic clock. A
chunk predicted from the observation taken before step ``s`` holds actions for steps ``s``,
``s + 1``, ...; by the time it is ready the arm may already have executed some of them:

* actions for steps already executed are dropped (they are stale);
* actions for steps the queue already holds are merged, ``aggregate(old, new)``;
* the others are appended.

The aggregate functions are LeRobot's (``lerobot.async_inference.configs``), on numpy arrays:

=================  ==================================  =========================================
name               merged action                       use
=================  ==================================  =========================================
weighted_average   ``0.3 * old + 0.7 * new``           default: newer chunk leads, smooth seams
latest_only        ``new``                             always act on the freshest observation
average            ``0.5 * old + 0.5 * new``           equal trust
conservative       ``0.7 * old + 0.3 * new``           older plan leads (smoothest)
=================  ==================================  =========================================
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float64]
AggregateName = Literal["weighted_average", "latest_only", "average", "conservative"]
Aggregate = Callable[[Vector, Vector], Vector]


def weighted_average(old: Vector, new: Vector) -> Vector:
    return 0.3 * old + 0.7 * new


def latest_only(old: Vector, new: Vector) -> Vector:
    return new.copy()


def average(old: Vector, new: Vector) -> Vector:
    return 0.5 * old + 0.5 * new


def conservative(old: Vector, new: Vector) -> Vector:
    return 0.7 * old + 0.3 * new


AGGREGATES: dict[str, Aggregate] = {
    "weighted_average": weighted_average,
    "latest_only": latest_only,
    "average": average,
    "conservative": conservative,
}


def get_aggregate(name: str) -> Aggregate:
    try:
        return AGGREGATES[name]
    except KeyError:
        raise ValueError(f"aggregate {name!r}: choose one of {', '.join(AGGREGATES)}") from None


@dataclass(frozen=True)
class TimedAction:
    """One action of a chunk: the step it is for, when it is due, and who computed it."""

    step: int
    due: float
    values: Vector
    chunk: int
    version: int | None = None


@dataclass(frozen=True)
class MergeReport:
    stale: int
    merged: int
    appended: int
    depth: int


def timed_chunk(
    values: NDArray[np.floating],
    first_step: int,
    first_due: float,
    period_s: float,
    chunk: int,
    version: int | None = None,
) -> list[TimedAction]:
    """Rows of ``values`` (``(n, action_dim)``) as actions for steps ``first_step`` onwards."""
    rows = np.asarray(values, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"a chunk is (steps, action_dim), got shape {rows.shape}")
    return [
        TimedAction(first_step + i, first_due + i * period_s, rows[i].copy(), chunk, version)
        for i in range(rows.shape[0])
    ]


class ActionQueue:
    """Actions by step, thread-safe: the worker merges chunks in, the control loop pops."""

    def __init__(self, aggregate: AggregateName | str = "weighted_average") -> None:
        self._aggregate = get_aggregate(aggregate)
        self._actions: dict[int, TimedAction] = {}
        self._last_executed = -1
        self._lock = threading.Lock()

    @property
    def last_executed(self) -> int:
        """The step of the last action popped (-1 before the first)."""
        with self._lock:
            return self._last_executed

    @property
    def next_step(self) -> int:
        """The step the next action popped will be for."""
        with self._lock:
            return self._last_executed + 1

    def depth(self) -> int:
        with self._lock:
            return len(self._actions)

    def steps(self) -> list[int]:
        with self._lock:
            return sorted(self._actions)

    def clear(self) -> None:
        """Forget every action and start counting steps from 0 (a new episode)."""
        with self._lock:
            self._actions.clear()
            self._last_executed = -1

    def merge(self, incoming: Iterable[TimedAction]) -> MergeReport:
        stale = merged = appended = 0
        with self._lock:
            for action in incoming:
                if action.step <= self._last_executed:
                    stale += 1
                    continue
                old = self._actions.get(action.step)
                if old is None:
                    self._actions[action.step] = action
                    appended += 1
                    continue
                values = self._aggregate(old.values, action.values)
                self._actions[action.step] = TimedAction(
                    action.step, action.due, values, action.chunk, action.version
                )
                merged += 1
            return MergeReport(stale, merged, appended, len(self._actions))

    def pop(self) -> TimedAction | None:
        """The action for the earliest pending step, or None if the queue is empty."""
        with self._lock:
            if not self._actions:
                return None
            action = self._actions.pop(min(self._actions))
            self._last_executed = action.step
            return action
