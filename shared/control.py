"""The local control socket of a zk0 daemon: its CLI and its Flower ClientApp talk to it here.

ZeroMQ request/reply over ``ipc://`` (a Unix socket file, mode 0660: the service user and its
group). The daemon owns a ROUTER that its main loop polls, so a request is answered between
two loop turns and a handler never blocks the loop; a client that must wait for something
(the ClientApp waiting for permission to train) asks again. One JSON object each way::

    -> {"v": 1, "cmd": "status", "args": {...}}
    <- {"v": 1, "ok": true, "result": {...}}        or   {"v": 1, "ok": false, "error": "one line"}

Faults: no daemon (no socket file, or nobody bound to it) and a daemon that does not answer
within the timeout both raise :class:`ControlError` naming the socket; a request the daemon
refuses raises it with the daemon's one-line reason. A daemon that starts while a stale socket
file of a dead one is still there replaces it; one that finds a live daemon on it refuses to
start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
#: Linux's limit on a Unix socket path (``sun_path``), less its terminating NUL.
MAX_PATH_CHARS = 107

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(RuntimeError):
    """The daemon is not there, did not answer, or refused the request (one line)."""


class RefusedError(ValueError):
    """Raised by a handler: the request is understood but refused now; the text says why."""


def _endpoint(path: Path) -> str:
    path = Path(path).absolute()
    if len(str(path)) > MAX_PATH_CHARS:
        raise ControlError(f"control socket path {path} is longer than {MAX_PATH_CHARS} characters")
    return f"ipc://{path}"


class ControlServer:
    """A ROUTER on ``path``; :meth:`serve` answers what arrived, from the owner's main loop."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler], name: str) -> None:
        self.path, self.handlers, self.name = Path(path), dict(handlers), name
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None

    def start(self) -> ControlServer:
        if self.path.exists():
            try:
                request(self.path, "ping", timeout_s=1.0)
            except ControlError:
                self.path.unlink()  # a stale file left by a daemon that was killed
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
            reply = self._answer(frames[-1])
            self._socket.send_multipart([*frames[:-1], json.dumps(reply).encode()])
            answered += 1
        return answered

    def _answer(self, body: bytes) -> dict[str, Any]:
        try:
            message = json.loads(body)
            if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
                raise RefusedError(f"expected a control message of version {PROTOCOL_VERSION}")
            command, args = message.get("cmd"), message.get("args") or {}
            if command == "ping":
                return {"v": PROTOCOL_VERSION, "ok": True, "result": {"name": self.name}}
            handler = self.handlers.get(str(command))
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise RefusedError(f"unknown command {command!r} (known: {known})")
            if not isinstance(args, dict):
                raise RefusedError("args must be an object")
            return {"v": PROTOCOL_VERSION, "ok": True, "result": handler(args)}
        except (RefusedError, ValueError, KeyError, TypeError) as error:
            return {"v": PROTOCOL_VERSION, "ok": False, "error": str(error).splitlines()[0]}
        except Exception as error:  # a bug in a handler must not take the daemon down
            logger.exception("control command failed")
            return {"v": PROTOCOL_VERSION, "ok": False, "error": f"internal error: {error}"}

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
            self.path.unlink(missing_ok=True)
        self._context.term()


def request(path: Path, command: str, timeout_s: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one command to the daemon at ``path`` and return its result."""
    path = Path(path)
    if not path.exists():
        raise ControlError(f"no daemon at {path} (is the service running?)")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES * 16)
        sock.connect(_endpoint(path))
        sock.send(json.dumps({"v": PROTOCOL_VERSION, "cmd": command, "args": args}).encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise ControlError(f"{path}: no answer to {command!r} within {timeout_s:.0f} s")
        reply = json.loads(sock.recv())
    finally:
        sock.close(linger=0)
        context.term()
    if not reply.get("ok"):
        raise ControlError(f"{command}: {reply.get('error', 'refused')}")
    result: dict[str, Any] = reply.get("result") or {}
    return result
