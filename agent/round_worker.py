"""The agent's warm round worker: one long-lived child of the agent daemon runs every task of a
federated round for this arm, with the base policy built once for its life.

Flower starts a ClientApp process per message, and building the base in each one cost more
than a round's training on a small CPU (about 35 s per message beside 50 s of training in the
demo). So the ClientApp is a thin messenger (it imports neither torch nor LeRobot) and the
daemon keeps the worker warm, in a process of its own: the arm's control loop never shares an
interpreter with training::

    SuperNode --Message--> flwr-clientapp (zk0.agent.client_app)
                               | RoundTask + the Message (Flower's protobuf)   REQ
                               v
                           round worker (python -m zk0.agent.round_worker)    REP
                               | zk0.agent.round_tasks.handle(kind, message, configs)
                               v
    SuperNode <--reply---- RoundResult + the reply's RecordDict (Flower's protobuf)

Protocol (ZeroMQ REQ/REP over ``ipc://``, a socket file only the agent's user may open; one
task at a time; two frames each way, the header a JSON object)::

    -> {"v": "1.0", "kind": "train", "run_config": {...}, "node_config": {...}}  <Message>
    <- {"v": "1.0", "error": null}  <RecordDict>      or      {"v": "1.0", "error": "..."}

Faults: no socket file (no worker) fails the task at once; a worker that exits while it runs a
task (the daemon restarts it) fails the task when the connection drops; no reply within the
run's ``round-timeout-s`` fails it too. Each is one line naming the socket; Flower then returns
an error reply and the hub counts the agent dropped for that round.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import zmq
from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from zk0.shared.processes import ManagedProcess, Supervised
from zk0.shared.validation import Protocol, WireModel, describe

PROTOCOL = Protocol("round worker", "1.0")
#: The tasks of a round (the Flower message types the ClientApp registers).
TaskKind = Literal["query", "train", "evaluate"]
#: A Flower message of a round: a full-size fp32 adapter is 5.2 MB; far above it is not a round.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
POLL_MS = 200

ConfigValue = StrictBool | StrictInt | StrictFloat | StrictStr


class RoundTask(WireModel):
    """What the ClientApp asks: the task, with the run's and the node's config as Flower has
    them (the worker validates both, as the ClientApp did)."""

    v: str
    kind: TaskKind
    run_config: dict[str, ConfigValue]
    node_config: dict[str, ConfigValue]


class RoundResult(WireModel):
    """The worker's answer: ``error`` (one line) or, in a second frame, the reply's content."""

    v: str
    error: str | None = None


class RoundWorkerError(RuntimeError):
    """A task the worker could not run or answer; one line naming the socket."""


# -- the ClientApp's side -----------------------------------------------------------------------
def ask(
    socket_path: Path,
    kind: TaskKind,
    message: Any,
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    timeout_s: float,
) -> Any:
    """Run one task in the worker: the reply's content (a Flower ``RecordDict``)."""
    from flwr.common.serde import message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    if not socket_path.exists():
        raise RoundWorkerError(f"{socket_path}: no round worker (is the agent daemon running?)")
    header = RoundTask(
        v=PROTOCOL.version, kind=kind, run_config=dict(run_config), node_config=dict(node_config)
    )
    frames = [header.model_dump_json().encode(), message_to_proto(message).SerializeToString()]
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.REQ) as request:
        request.setsockopt(zmq.LINGER, 0)
        request.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # A worker that dies mid-task drops the connection: fail now, not at the timeout.
        monitor = request.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            request.connect(f"ipc://{socket_path}")
            request.send_multipart(frames)
            reply = _await_reply(request, monitor, socket_path, kind, timeout_s)
        finally:
            request.disable_monitor()
            monitor.close(linger=0)
    try:
        result = RoundResult.model_validate_json(reply[0])
        PROTOCOL.check(result.v)
    except (ValidationError, ValueError, IndexError) as error:
        why = describe(error) if isinstance(error, ValidationError) else str(error)
        raise RoundWorkerError(f"{socket_path}: malformed answer: {why}") from None
    if result.error is not None:
        raise RoundWorkerError(f"round worker ({kind}): {result.error}")
    if len(reply) != 2:
        raise RoundWorkerError(f"{socket_path}: an answer without its content")
    return recorddict_from_proto(ProtoRecordDict.FromString(reply[1]))


def _await_reply(
    request: zmq.Socket[bytes],
    monitor: zmq.Socket[bytes],
    socket_path: Path,
    kind: str,
    timeout_s: float,
) -> list[bytes]:
    from zmq.utils.monitor import recv_monitor_message

    poller = zmq.Poller()
    poller.register(request, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    waited_ms, limit_ms = 0, int(timeout_s * 1000)
    while waited_ms < limit_ms:
        ready = dict(poller.poll(POLL_MS))
        if request in ready:
            return request.recv_multipart()
        if monitor in ready and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            raise RoundWorkerError(f"{socket_path}: the round worker exited during the {kind} task")
        waited_ms += POLL_MS
    raise RoundWorkerError(f"{socket_path}: no answer to the {kind} task within {timeout_s:g} s")


# -- the worker's side --------------------------------------------------------------------------
def serve(socket_path: Path, stop: threading.Event) -> None:
    """Answer tasks on ``socket_path`` until ``stop`` is set (SIGTERM sets it)."""
    from zk0.agent.round_tasks import handle  # the heavy imports: once, in the worker

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.REP) as reply:
        reply.setsockopt(zmq.LINGER, 0)
        reply.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        socket_path.unlink(missing_ok=True)  # a dead worker's; the daemon runs one at a time
        umask = os.umask(0o077)  # the socket file: the agent's user alone
        try:
            reply.bind(f"ipc://{socket_path}")
        finally:
            os.umask(umask)
        while not stop.is_set():
            if reply.poll(POLL_MS):
                reply.send_multipart(_run(reply.recv_multipart(), handle))
    socket_path.unlink(missing_ok=True)


def _run(frames: list[bytes], handle: Any) -> list[bytes]:
    """One task: its frames in, the answer's frames out; every failure is a one-line error."""
    from flwr.common.serde import message_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from loguru import logger

    def failed(why: str) -> list[bytes]:
        return [RoundResult(v=PROTOCOL.version, error=why[:500]).model_dump_json().encode()]

    try:
        task = RoundTask.model_validate_json(frames[0])
        PROTOCOL.check(task.v)
        message = message_from_proto(ProtoMessage.FromString(frames[1]))
    except ValidationError as error:
        return failed(f"malformed task: {describe(error)}")
    except Exception as error:  # a bad version, a missing frame, a message that does not parse
        return failed(f"malformed task: {type(error).__name__}: {error}".splitlines()[0])
    try:
        content = handle(task.kind, message, task.run_config, task.node_config)
    except Exception as error:
        logger.exception("the {} task failed", task.kind)
        return failed(f"{type(error).__name__}: {error}".splitlines()[0])
    answer = RoundResult(v=PROTOCOL.version).model_dump_json().encode()
    return [answer, recorddict_to_proto(content).SerializeToString()]


def worker_process(socket_path: Path, log_path: Path, name: str, nice: int = 0) -> ManagedProcess:
    """The worker as a child of the daemon (it dies with it), at CPU niceness ``nice``; ready
    once its socket exists."""
    argv = [sys.executable, "-m", "zk0.agent.round_worker", "--socket", str(socket_path)]
    argv += ["--nice", str(nice)]
    return ManagedProcess(f"round-worker[{name}]", argv, dict(os.environ), log_path)


def supervised_worker(socket_path: Path, log_dir: Path, name: str, nice: int) -> Supervised:
    """The agent daemon's worker, started now and restarted with back-off when it exits."""

    def make() -> ManagedProcess:
        socket_path.unlink(missing_ok=True)  # ready means: this start's worker bound it
        return worker_process(socket_path, log_dir / "round-worker.log", name, nice)

    supervised = Supervised(make, ready=socket_path.exists)
    supervised.start()
    return supervised


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zk0.agent.round_worker")
    parser.add_argument("--socket", type=Path, required=True, help="ipc socket file to serve on")
    parser.add_argument("--nice", type=int, default=0, help="CPU niceness to add (0-19)")
    args = parser.parse_args(argv)
    os.nice(min(max(args.nice, 0), 19))  # before torch: its threads inherit it
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve(args.socket, stop)


if __name__ == "__main__":
    main()
