"""The local control socket of a zk0 daemon: its CLI and its round worker talk to it here.

ZeroMQ request/reply over ``ipc://`` (a Unix socket file, mode 0660: the service user and its
group). The daemon owns a ROUTER that its main loop polls, so a request is answered between
two loop turns and a handler never blocks the loop; a client that must wait for something
(the round worker waiting for permission to train) asks again. One JSON object each way::

    -> {"v": "2.0", "cmd": "status", "args": {...}}
    <- {"v": "2.0", "ok": true, "result": {...}}     or   {"v": "2.0", "ok": false, "error": "..."}

Each daemon speaks one protocol, a set of :class:`Command` models with their replies, in one
module: ``zk0.shared.agent_control`` and ``zk0.shared.hub_control``. Both ends use those models:
the server validates ``args`` with the command's model and the client validates ``result`` with
its reply model, so a malformed message is refused with one line naming the field. ``v`` is the
protocol's ``MAJOR.MINOR``; a peer of another major is refused with one line naming both (see
``zk0.shared.validation.Protocol``). Every daemon also answers ``ping``.

Faults: no daemon (no socket file, or nobody bound to it) and a daemon that does not answer
within the timeout both raise :class:`ControlError` naming the socket; a request the daemon
refuses raises it with the daemon's one-line reason. A daemon that starts while a stale socket
file of a dead one is still there replaces it; one that finds a live daemon on it refuses to
start.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, cast

import zmq
from loguru import logger
from pydantic import Field, ValidationError

from zk0.shared.validation import Protocol, ProtocolVersionError, WireModel, describe

MAX_MESSAGE_BYTES = 64 * 1024
#: Replies may be larger than requests (a hub's status lists its fleet).
MAX_REPLY_BYTES = 16 * MAX_MESSAGE_BYTES
#: Linux's limit on a Unix socket path (``sun_path``), less its terminating NUL.
MAX_PATH_CHARS = 107


class ControlError(RuntimeError):
    """The daemon is not there, did not answer, or refused the request (one line)."""


class RefusedError(ValueError):
    """Raised by a handler: the request is understood but refused now; the text says why."""


class Command[R: WireModel](WireModel):
    """A request of a daemon's protocol; ``R`` is the model of its reply.

    A protocol module declares a base per protocol (setting ``protocol``) and one subclass per
    command (setting ``cmd``); the fields are the command's arguments.
    """

    protocol: ClassVar[Protocol]
    cmd: ClassVar[str]

    @classmethod
    def reply_model(cls) -> type[R]:
        for klass in cls.__mro__:
            meta = getattr(klass, "__pydantic_generic_metadata__", None)
            if meta and meta["args"]:
                return cast(type[R], meta["args"][0])
        raise TypeError(f"{cls.__name__} names no reply model (Command[Reply])")


class _Envelope(WireModel):
    v: object
    cmd: str
    args: dict[str, Any] = Field(default_factory=dict)


Handler = Callable[[Any], WireModel]


def _endpoint(path: Path) -> str:
    path = Path(path).absolute()
    if len(str(path)) > MAX_PATH_CHARS:
        raise ControlError(f"control socket path {path} is longer than {MAX_PATH_CHARS} characters")
    return f"ipc://{path}"


class ControlServer:
    """A ROUTER on ``path`` speaking ``protocol``; :meth:`serve` answers what arrived, from the
    owner's main loop. Handlers are registered per command model with :meth:`on`."""

    def __init__(self, path: Path, protocol: Protocol, name: str) -> None:
        self.path, self.protocol, self.name = Path(path), protocol, name
        self._handlers: dict[str, tuple[type[Command[Any]], Handler]] = {}
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        #: Whether ``start`` found the socket file of a daemon that died without closing it.
        self.replaced_stale = False

    def on[C: Command[Any]](self, command: type[C], handler: Callable[[C], WireModel]) -> None:
        """Answer ``command`` with ``handler``, which returns the command's reply model."""
        if command.protocol != self.protocol:
            raise TypeError(f"{command.__name__} is not a command of {self.protocol.name}")
        self._handlers[command.cmd] = (command, handler)

    def start(self) -> ControlServer:
        if self.path.exists():
            try:
                _exchange(self.path, self.protocol, "ping", {}, timeout_s=1.0)
            except ControlError:
                self.path.unlink()  # a stale file left by a daemon that was killed
                self.replaced_stale = True
            else:
                raise ControlError(f"{self.path}: another {self.name} is running")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.bind(_endpoint(self.path))
        self.path.chmod(0o660)  # the service user and its group (the CLI's users)
        self._socket = sock
        logger.info("{} control socket {}", self.name, self.path)
        return self

    def serve(self, timeout_s: float) -> int:
        """Answer every request that arrives within ``timeout_s``; returns how many."""
        if self._socket is None:
            raise RuntimeError("ControlServer.serve() before start()")
        answered = 0
        timeout_ms = max(0, int(timeout_s * 1000))
        while self._socket.poll(timeout_ms if answered == 0 else 0):
            frames = self._socket.recv_multipart()
            reply = self.answer(frames[-1])
            self._socket.send_multipart([*frames[:-1], json.dumps(reply).encode()])
            answered += 1
        return answered

    def answer(self, body: bytes) -> dict[str, Any]:
        """The reply to one request body (socket-free: what ``serve`` sends back)."""
        version = self.protocol.version
        try:
            envelope = _Envelope.model_validate_json(body)
            self.protocol.check(envelope.v)
            if envelope.cmd == "ping":
                return {"v": version, "ok": True, "result": {"name": self.name}}
            if envelope.cmd not in self._handlers:
                known = ", ".join(sorted(self._handlers))
                raise RefusedError(f"unknown command {envelope.cmd!r} (known: {known})")
            model, handler = self._handlers[envelope.cmd]
            try:
                command = model.model_validate_json(json.dumps(envelope.args))
            except ValidationError as error:
                raise RefusedError(describe(error, envelope.cmd)) from None
            result = handler(command)
            if not isinstance(result, model.reply_model()):
                raise TypeError(f"{envelope.cmd} answered with a {type(result).__name__}")
            return {"v": version, "ok": True, "result": result.model_dump(mode="json")}
        except ValidationError as error:
            return {"v": version, "ok": False, "error": describe(error, "request")}
        except (RefusedError, ProtocolVersionError, ValueError) as error:
            return {"v": version, "ok": False, "error": str(error).splitlines()[0]}
        except Exception as error:  # a bug in a handler must not take the daemon down
            logger.exception("control command failed")
            return {"v": version, "ok": False, "error": f"internal error: {error}"}

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
            self.path.unlink(missing_ok=True)
        self._context.term()


def request[R: WireModel](path: Path, command: Command[R], timeout_s: float = 10.0) -> R:
    """Send ``command`` to the daemon at ``path`` and return its reply, validated."""
    result = _exchange(
        Path(path), command.protocol, command.cmd, command.model_dump(mode="json"), timeout_s
    )
    try:
        return command.reply_model().model_validate_json(json.dumps(result))
    except ValidationError as error:
        raise ControlError(f"{path}: malformed reply: {describe(error, command.cmd)}") from None


def _exchange(
    path: Path, protocol: Protocol, cmd: str, args: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    if not path.exists():
        raise ControlError(f"no daemon at {path} (is the service running?)")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        sock.connect(_endpoint(path))
        sock.send(json.dumps({"v": protocol.version, "cmd": cmd, "args": args}).encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise ControlError(f"{path}: no answer to {cmd!r} within {timeout_s:.0f} s")
        body = sock.recv()
    finally:
        sock.close(linger=0)
        context.term()
    try:
        reply = json.loads(body)
        if not isinstance(reply, dict):
            raise ValueError("not a JSON object")
        protocol.check(reply.get("v"))
    except (ValueError, ProtocolVersionError) as error:
        raise ControlError(f"{path}: {str(error).splitlines()[0]}") from None
    if reply.get("ok") is not True:
        raise ControlError(f"{cmd}: {reply.get('error', 'refused')}")
    result = reply.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"{path}: {cmd}: the reply carries no result object")
    return result
