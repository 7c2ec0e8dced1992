"""The action queue: aggregate functions and chunk merging, as documented (pure, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from zk0.agent.inference.action_queue import (
    AGGREGATES,
    ActionQueue,
    TimedAction,
    get_aggregate,
    timed_chunk,
)


def chunk(first_step: int, values: list[float], chunk_index: int = 0) -> list[TimedAction]:
    rows = np.array([[v, -v] for v in values])
    return timed_chunk(rows, first_step, 10.0 + first_step / 30, 1 / 30, chunk_index)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("weighted_average", 0.3 * 1.0 + 0.7 * 3.0),
        ("latest_only", 3.0),
        ("average", 2.0),
        ("conservative", 0.7 * 1.0 + 0.3 * 3.0),
    ],
)
def test_each_aggregate_merges_overlapping_steps_as_documented(name: str, expected: float) -> None:
    queue = ActionQueue(name)
    queue.merge(chunk(0, [1.0, 1.0, 1.0, 1.0]))
    report = queue.merge(chunk(2, [3.0, 3.0, 3.0, 3.0], chunk_index=1))
    assert (report.stale, report.merged, report.appended, report.depth) == (0, 2, 2, 6)
    popped = [queue.pop() for _ in range(6)]
    assert [a.step for a in popped if a] == [0, 1, 2, 3, 4, 5]
    values = [a.values[0] for a in popped if a]
    assert values[:2] == [1.0, 1.0]  # only the old chunk had them
    assert values[2:4] == pytest.approx([expected, expected])  # overlap: aggregated
    assert values[4:] == [3.0, 3.0]  # only the new chunk has them
    assert popped[2] is not None and popped[2].values[1] == pytest.approx(-expected)
    assert popped[2].chunk == 1  # a merged action is credited to the newer chunk
    assert queue.pop() is None


def test_actions_for_steps_already_executed_are_dropped() -> None:
    queue = ActionQueue()
    queue.merge(chunk(0, [0.0] * 5))
    for _ in range(3):
        queue.pop()
    assert queue.last_executed == 2 and queue.next_step == 3
    # A chunk computed from the observation before step 1 arrives after step 2 ran.
    report = queue.merge(chunk(1, [5.0] * 5, chunk_index=1))
    assert (report.stale, report.merged, report.appended) == (2, 2, 1)
    assert queue.steps() == [3, 4, 5]
    action = queue.pop()
    assert action is not None and action.step == 3
    assert action.values[0] == pytest.approx(0.7 * 5.0)


def test_a_chunk_into_an_empty_queue_is_taken_whole_and_clear_restarts_steps() -> None:
    queue = ActionQueue("latest_only")
    actions = chunk(0, [1.0, 2.0, 3.0])
    assert [a.due for a in actions] == pytest.approx([10.0, 10.0 + 1 / 30, 10.0 + 2 / 30])
    report = queue.merge(actions)
    assert (report.stale, report.merged, report.appended, report.depth) == (0, 0, 3, 3)
    queue.pop()
    queue.clear()
    assert queue.depth() == 0 and queue.next_step == 0 and queue.pop() is None


def test_the_four_lerobot_aggregates_exist_and_unknown_names_fail() -> None:
    assert set(AGGREGATES) == {"weighted_average", "latest_only", "average", "conservative"}
    old, new = np.array([2.0]), np.array([4.0])
    assert get_aggregate("weighted_average")(old, new)[0] == pytest.approx(3.4)
    with pytest.raises(ValueError, match="choose one of"):
        ActionQueue("median")
    with pytest.raises(ValueError, match="steps, action_dim"):
        timed_chunk(np.zeros(3), 0, 0.0, 0.1, 0)
