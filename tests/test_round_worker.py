"""The agent's warm round worker: a real child process on a real ipc socket, real Flower messages.

Tasks handed over by the ClientApp's side run in one process that builds the base once; a task
that cannot run, a worker that is missing or dies mid-task, each fail with one line naming the
socket, promptly (never at the round's timeout).
"""

from __future__ import annotations

import copy
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from conftest import wait_until
from zk0.agent.round_worker import RoundWorkerError, ask, worker_process
from zk0.shared.adapter_wire import pack
from zk0.shared.federation import (
    AGENT_ID,
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_MSE,
    META_KEY,
    METRICS_KEY,
    NORMALIZATION,
    STATS_KEY,
    NodeSettings,
    RunSettings,
)

RUN = RunSettings(policy="tiny-sim-base", local_steps=2, batch_size=2, eval_frames=2, seed=1)
BUILT = "building the base"


@pytest.fixture(scope="module")
def arm() -> tuple[NodeSettings, RecordDict]:
    """A cached two-episode dataset as this node's, and a round's content for its adapter."""
    from zk0.agent import round_tasks
    from zk0.agent.episode_cache import recorded
    from zk0.agent.training import dataset_stats, open_dataset
    from zk0.shared.lora import adapter_state, apply_lora
    from zk0.shared.normalization import dumps
    from zk0.shared.sim_variants import CLIENT_VARIANTS

    data_root = recorded("fed-success", CLIENT_VARIANTS["sim-00"], episodes=2, episode_time_s=1.0)
    base = round_tasks._base(RUN.policy, str(RUN.robot_config_path))
    fresh = apply_lora(copy.deepcopy(base.policy), RUN.lora, base.base.name_or_path)
    stats = dumps(dataset_stats(open_dataset(data_root, base.policy.config)))
    config = ConfigRecord({NORMALIZATION: stats, "server-round": 1})
    content = RecordDict({ARRAYS_KEY: pack(adapter_state(fresh)), CONFIG_KEY: config})
    return NodeSettings(agent_id="sim-00", data_root=data_root), content


@pytest.fixture
def worker(tmp_path: Path) -> Any:
    socket_path = tmp_path / "agent.worker.sock"
    process = worker_process(socket_path, tmp_path / "round-worker.log", "sim-00", nice=3)
    process.start()
    wait_until(socket_path.exists, timeout_s=60, what="the worker's socket")
    yield socket_path, process
    process.stop()


def _ask(
    socket_path: Path, kind: Any, arm: tuple[NodeSettings, RecordDict], run: RunSettings = RUN
) -> Any:
    node, content = arm
    message_type = {"query": MessageType.QUERY, "train": MessageType.TRAIN}
    message = Message(
        content, dst_node_id=0, message_type=message_type.get(kind, MessageType.EVALUATE)
    )
    return ask(socket_path, kind, message, run.to_flower(), node.to_flower(), timeout_s=600)


@pytest.mark.usefixtures("task_identity")
def test_every_task_of_a_round_runs_in_one_warm_process(
    worker: Any, arm: tuple[NodeSettings, RecordDict], tmp_path: Path
) -> None:
    socket_path, process = worker
    stats = _ask(socket_path, "query", arm)
    assert stats[META_KEY][AGENT_ID] == "sim-00" and NORMALIZATION in stats[STATS_KEY]
    trained = _ask(socket_path, "train", arm)
    sent, back = arm[1].array_records[ARRAYS_KEY], trained.array_records[ARRAYS_KEY]
    assert list(back) == list(sent) and back.count_bytes() == sent.count_bytes()
    evaluated = _ask(socket_path, "evaluate", arm)
    assert evaluated.metric_records[METRICS_KEY][EVAL_MSE] > 0  # type: ignore[operator]
    # Three tasks, one process, the base built once.
    log = (tmp_path / "round-worker.log").read_text()
    assert log.count(BUILT) == 1 and process.running
    # At the niceness it was started with (the daemon passes agent.yaml's round_worker_nice).
    assert os.getpriority(os.PRIO_PROCESS, process.process.pid) == os.getpriority(
        os.PRIO_PROCESS, 0
    ) + min(3, 19 - os.getpriority(os.PRIO_PROCESS, 0))


@pytest.mark.usefixtures("task_identity")
def test_a_task_that_fails_is_one_line_and_the_worker_serves_the_next(
    worker: Any, arm: tuple[NodeSettings, RecordDict], tmp_path: Path
) -> None:
    socket_path, _ = worker
    node, content = arm
    elsewhere = (node.model_copy(update={"data_root": tmp_path}), content)
    with pytest.raises(RoundWorkerError, match=r"node config: data-root: .* is not a LeRobot"):
        _ask(socket_path, "query", elsewhere)
    # Not a task at all: refused, and the worker still answers.
    with zmq.Context.instance().socket(zmq.REQ) as request:
        request.connect(f"ipc://{socket_path}")
        request.send_multipart([b'{"v": "1.0", "kind": "fly"}', b""])
        assert request.poll(30_000)
        assert b"malformed task: kind" in request.recv_multipart()[0]
    assert STATS_KEY in _ask(socket_path, "query", arm)


@pytest.mark.usefixtures("task_identity")
def test_no_worker_fails_at_once(arm: tuple[NodeSettings, RecordDict], tmp_path: Path) -> None:
    with pytest.raises(RoundWorkerError, match="no round worker"):
        ask(tmp_path / "none.sock", "query", Message(arm[1], 0, MessageType.QUERY), {}, {}, 600)


@pytest.mark.usefixtures("task_identity")
def test_a_worker_killed_mid_task_fails_the_task_not_the_round_timeout(
    worker: Any, arm: tuple[NodeSettings, RecordDict], tmp_path: Path
) -> None:
    socket_path, process = worker
    long_run = RUN.model_copy(update={"local_steps": 100_000})
    failure: list[BaseException] = []

    def train() -> None:
        try:
            _ask(socket_path, "train", arm, long_run)
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=train)
    thread.start()
    log = tmp_path / "round-worker.log"
    wait_until(lambda: BUILT in log.read_text(), timeout_s=120, what="the task to start")
    os.kill(process.process.pid, signal.SIGKILL)
    thread.join(timeout=60)  # the round's timeout is 600 s: this fails well before it
    assert not thread.is_alive()
    assert isinstance(failure[0], RoundWorkerError)
    assert "exited during the train task" in str(failure[0])
