"""The daemons' control protocols: every command is a model of its protocol module, and a
malformed request or another major version is refused with one line naming the field or the
versions, over a real ZeroMQ ``ipc://`` socket."""

from __future__ import annotations

import json
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import zmq

from zk0.shared import agent_control, hub_control
from zk0.shared.control import Command, ControlError, ControlServer, request
from zk0.shared.validation import WireModel

PROTOCOLS = {"agent": agent_control, "hub": hub_control}


def commands(module: ModuleType) -> list[type[Command[Any]]]:
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, Command) and "cmd" in value.__dict__
    ]


class Served:
    """A daemon's control server on a real socket, served from a thread, that records what
    reached its handlers (nothing malformed may)."""

    def __init__(self, module: ModuleType, folder: Path) -> None:
        self.path = folder / "daemon.sock"
        self.server = ControlServer(self.path, module.PROTOCOL, f"test-{module.__name__}")
        self.handled: list[Command[Any]] = []
        for command in commands(module):
            self.server.on(command, self._handle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _handle(self, command: Command[Any]) -> WireModel:
        self.handled.append(command)
        if isinstance(command, agent_control.StopJob):
            return agent_control.JobStopped(stopped=False)
        if isinstance(command, hub_control.RegisterKeys):
            return hub_control.KeySync()
        raise ValueError(f"{command.cmd} reached its handler")

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.server.serve(0.05)

    def raw(self, body: bytes) -> dict[str, Any]:
        """Send bytes as they are; the reply as JSON."""
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = context.socket(zmq.REQ)
        try:
            sock.connect(f"ipc://{self.path}")
            sock.send(body)
            assert sock.poll(5000), "no reply"
            reply: dict[str, Any] = json.loads(sock.recv())
        finally:
            sock.close(linger=0)
            context.term()
        return reply

    def send(self, cmd: str, args: Any, version: Any) -> dict[str, Any]:
        return self.raw(json.dumps({"v": version, "cmd": cmd, "args": args}).encode())


@pytest.fixture(params=sorted(PROTOCOLS))
def served(request: pytest.FixtureRequest) -> Iterator[tuple[ModuleType, Served]]:
    module = PROTOCOLS[request.param]
    with tempfile.TemporaryDirectory(prefix="zk0-ctl-", dir="/tmp") as folder:
        daemon = Served(module, Path(folder))
        daemon.server.start()
        daemon._thread.start()
        try:
            yield module, daemon
        finally:
            daemon._stop.set()
            daemon._thread.join(5)
            daemon.server.close()


def _malformed(command: type[Command[Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field, args) pairs each breaking one field of ``command`` in one way."""
    valid = {
        "pid": 4242,
        "round": 1,
        "phase": "train",
        "outcome": "replied",
        "episodes": 2,
        "rounds": 2,
        "label": "success",
    }
    for name, field in command.model_fields.items():
        others = {k: v for k, v in valid.items() if k in command.model_fields and k != name}
        yield name, {**others, name: [1]}  # no field of any command is a list
        yield name, {**others, name: {"nested": True}}
        if field.annotation not in (str, bool) and "phase" not in name and "outcome" not in name:
            yield name, {**others, name: True}  # never a boolean for a number
        for bound in field.metadata:
            for attr, nudge in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
                limit = getattr(bound, attr, None)
                if isinstance(limit, int | float):
                    yield name, {**others, name: limit + nudge}
        if field.is_required():
            yield name, others


#: Bounds of optional numbers, which ``_malformed`` cannot read off a union's metadata.
OPTIONAL_BOUNDS = [
    ("start_run", {"rounds": 0}, "rounds"),
    ("start_run", {"rounds": 10_001}, "rounds"),
    ("run_task", {"horizon_s": 0}, "horizon_s"),
    ("run_task", {"horizon_s": 1e9}, "horizon_s"),
    ("run_task", {"horizon_s": "1.5"}, "horizon_s"),
    ("label", {"label": "maybe"}, "label"),
    ("label", {"label": "success", "episode": 0}, "episode"),
    ("label", {"label": "success", "episode": 2**53 + 1}, "episode"),
    ("label", {"label": "success", "episode": "3"}, "episode"),
    ("label", {"label": "success", "relabel": 1}, "relabel"),
    ("label", {"label": "success", "relabel": "yes"}, "relabel"),
    ("labels", {"job": 0}, "job"),
    ("labels", {"job": 2**53 + 1}, "job"),
]


def test_every_command_is_a_model_with_a_reply_model_of_its_protocol() -> None:
    for module in PROTOCOLS.values():
        found = commands(module)
        assert found, module.__name__
        names = [command.cmd for command in found]
        assert len(set(names)) == len(names)
        for command in found:
            assert command.protocol == module.PROTOCOL
            assert issubclass(command.reply_model(), WireModel)
    assert {c.cmd for c in commands(agent_control)} == {
        "status", "record", "run_task", "stop_job", "rollback", "label", "labels",
        "compute_begin", "compute_end",
    }  # fmt: skip
    assert {c.cmd for c in commands(hub_control)} == {"status", "start_run", "register_keys"}


def test_each_malformed_argument_is_refused_naming_the_field(
    served: tuple[ModuleType, Served],
) -> None:
    module, daemon = served
    version = module.PROTOCOL.version
    cases = 0
    known = {command.cmd for command in commands(module)}
    extra = [(cmd, args, name) for cmd, args, name in OPTIONAL_BOUNDS if cmd in known]
    every = [(c.cmd, args, name) for c in commands(module) for name, args in _malformed(c)]
    for cmd, args, name in every + extra:
        reply = daemon.send(cmd, args, version)
        assert reply["ok"] is False and reply["v"] == version, (cmd, args, reply)
        assert reply["error"].startswith(f"{cmd}.{name}: "), (args, reply)
        assert "\n" not in reply["error"]
        cases += 1
    fields = sum(len(command.model_fields) for command in commands(module))
    assert cases >= 2 * fields + len(extra)
    assert daemon.handled == []  # nothing malformed reached a handler


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "request: Invalid JSON"),
        (b"[1, 2]", "request: Input should be an object"),
        (b'{"v": "2.0"}', "request.cmd: Field required"),
        (b'{"v": "2.0", "cmd": 7}', "request.cmd: Input should be a valid string"),
        (b'{"v": "2.0", "cmd": "status", "args": [1]}', "request.args: Input should be an"),
        (b'{"v": "2.0", "cmd": "explode"}', "unknown command 'explode' (known: "),
    ],
)
def test_malformed_envelopes_are_refused_in_one_line(
    served: tuple[ModuleType, Served], body: bytes, error: str
) -> None:
    module, daemon = served
    reply = daemon.raw(body.replace(b'"2.0"', f'"{module.PROTOCOL.version}"'.encode()))
    assert reply["ok"] is False and reply["error"].startswith(error), reply
    assert daemon.handled == []


@pytest.mark.parametrize("version", ["3.0", "1.4", 1, None, "two"])
def test_another_major_version_is_refused_naming_both(
    served: tuple[ModuleType, Served], version: Any
) -> None:
    module, daemon = served
    reply = daemon.send("status", {}, version)
    assert reply["ok"] is False and reply["v"] == module.PROTOCOL.version
    assert module.PROTOCOL.name in reply["error"]
    assert str(version) in reply["error"] and module.PROTOCOL.version in reply["error"]
    assert daemon.handled == []


def test_a_newer_minor_with_unknown_fields_is_understood(
    served: tuple[ModuleType, Served],
) -> None:
    module, daemon = served
    major = module.PROTOCOL.major
    cmd = "stop_job" if module is agent_control else "register_keys"
    reply = daemon.send(cmd, {"added_in_a_later_minor": 1}, f"{major}.9")
    assert reply["ok"] is True, reply
    assert len(daemon.handled) == 1


def test_the_client_refuses_a_reply_of_another_major_or_shape(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="zk0-ctl-", dir="/tmp") as folder:
        path = Path(folder) / "fake.sock"
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = context.socket(zmq.REP)
        sock.bind(f"ipc://{path}")
        replies = [
            {"v": "9.0", "ok": True, "result": {"stopped": True}},
            {"v": "2.0", "ok": True, "result": {"stopped": "maybe"}},
            {"v": "2.0", "ok": False, "error": "the arm is busy"},
        ]

        def answer() -> None:
            for reply in replies:
                sock.recv()
                sock.send(json.dumps(reply).encode())

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        try:
            ours = re.escape(agent_control.PROTOCOL.version)
            with pytest.raises(ControlError, match=rf"speaks 9\.0, this side speaks {ours}"):
                request(path, agent_control.StopJob(), timeout_s=5)
            with pytest.raises(ControlError, match=r"malformed reply: stop_job\.stopped: "):
                request(path, agent_control.StopJob(), timeout_s=5)
            with pytest.raises(ControlError, match=r"^stop_job: the arm is busy$"):
                request(path, agent_control.StopJob(), timeout_s=5)
        finally:
            thread.join(5)
            sock.close(linger=0)
            context.term()
