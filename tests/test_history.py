"""The run's evaluation record keeps per round who was dropped or skipped and why, and the
round's seconds; the strategy tells an arm that stayed busy (skipped) from a failed reply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from conftest import GRID, train_reply
from zk0.hub.aggregation import Arrays
from zk0.hub.history import EvalHistory
from zk0.hub.strategy import LoRAFedAvg, to_record
from zk0.shared.agent_status import skip_message, skip_of

A = "m.layers.0.q_proj.lora_A.weight"
B = "m.layers.0.q_proj.lora_B.weight"


def test_drops_skips_and_seconds_round_trip_and_old_files_read(tmp_path: Path) -> None:
    history = EvalHistory("fedavg")
    history.add_round(0, {"a": 1.0, "b": 2.0}, {"a": 4, "b": 4})
    history.add_round(
        1,
        {"a": 0.5},
        {"a": 4},
        dropped={"node-7": "error reply: boom"},
        skipped={"b": "busy for 30 s (the arm is recording)"},
        round_s=12.5,
        aggregation_s=0.25,
    )
    history.add_round(2, {"a": 0.4}, {"a": 4}, round_s=9.0)  # nothing aggregated
    history_path, _ = history.write(tmp_path)
    data = json.loads(history_path.read_text())
    assert data["dropped"] == [{}, {"node-7": "error reply: boom"}, {}]
    assert data["skipped"] == [{}, {"b": "busy for 30 s (the arm is recording)"}, {}]
    assert data["round_s"] == [None, 12.5, 9.0]
    assert data["aggregation_s"] == [None, 0.25, None]
    assert EvalHistory.from_dict(data) == history

    old = {"rounds": [0, 1], "clients": {"a": [1.0, 0.5]}, "average": [1.0, 0.5]}
    read = EvalHistory.from_dict(old)
    assert read.dropped == [{}, {}] and read.skipped == [{}, {}]
    assert read.round_s == [None, None] and read.aggregation_s == [None, None]
    read.dropped[0]["x"] = "y"  # one dict per round, not one shared
    assert read.dropped[1] == {}


def test_a_skip_is_recognised_however_flower_and_the_round_worker_wrap_it() -> None:
    raised = skip_message("arm-01", "busy for 30 s (the arm is recording)", 3)
    assert raised == "arm-01: busy for 30 s (the arm is recording); skipping round 3"
    flower = f"<class 'RuntimeError'>:<'{raised}'>"
    worker = (
        "<class 'zk0.agent.round_worker.RoundWorkerError'>:"
        f"<'round worker (train): RuntimeError: {raised}'>"
    )
    for reason in (raised, flower, worker):
        assert skip_of(reason) == ("arm-01", "busy for 30 s (the arm is recording)"), reason
    assert skip_of("<class 'ValueError'>:<'arm-01: non-finite loss'>") is None
    assert skip_of("ClientApp stopped responding.") is None


def _reference() -> Arrays:
    rng = np.random.default_rng(0)
    return {
        A: rng.normal(size=(2, 5)).astype(np.float32),
        B: rng.normal(size=(4, 2)).astype(np.float32),
    }


def _error_reply(reason: str, node: int) -> Message:
    """A ClientApp's exception as the hub receives it: an error reply, no content."""
    request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
    return Message(error, reply_to=request)


@pytest.mark.usefixtures("task_identity")
def test_the_strategy_counts_a_busy_arm_skipped_and_a_failed_one_dropped() -> None:
    reference = _reference()
    busy = skip_message("arm-02", "busy for 30 s (the arm is recording)", 1)
    replies = [
        train_reply({k: v + 0.01 for k, v in reference.items()}, 100, "arm-00"),
        train_reply({k: v - 0.01 for k, v in reference.items()}, 100, "arm-01"),
        _error_reply(f"<class 'RuntimeError'>:<'{busy}'>", 12),
        _error_reply("<class 'ValueError'>:<'non-finite loss'>", 13),
    ]
    strategy = LoRAFedAvg(min_train_nodes=2, min_available_nodes=2)
    list(strategy.configure_train(1, to_record(reference), ConfigRecord(), GRID))
    record, _ = strategy.aggregate_train(1, replies)
    report = strategy.report(1)
    assert record is not None and report.trained == ["arm-00", "arm-01"]
    assert report.skipped == {"arm-02": "busy for 30 s (the arm is recording)"}
    assert list(report.dropped) == ["node-13"] and "non-finite loss" in report.dropped["node-13"]
    assert report.aggregation_s is not None and report.aggregation_s >= 0
    elapsed = report.elapsed_s()  # the round so far: its training and its aggregation
    assert elapsed is not None and elapsed >= report.train_wall_s + report.aggregation_s
    assert strategy.report(0).elapsed_s() is None  # round 0 trains nothing
