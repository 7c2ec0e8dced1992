"""The distribution protocol's messages and their codec (see ``zk0/shared/protocol.md``).

Every message body is one msgpack map holding ``p`` (the protocol version) and ``t`` (the message
type); chunk data travels as a second, raw frame. Decoding validates every field it uses (type,
range, pattern, length) and raises ``ProtocolError`` with one line; nothing is ever unpickled.
Unknown extra keys are ignored, so optional fields can be added without a new protocol version;
any change of meaning bumps ``PROTOCOL_VERSION``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar

import msgpack  # type: ignore[import-untyped]

PROTOCOL_VERSION = 1
#: First frame of every message on the PUB socket (agents subscribe to it).
ANNOUNCE_TOPIC = b"zk0.adapter"
#: Chunk size agents ask for by default, and the most the hub serves in one reply.
DEFAULT_CHUNK_BYTES = 256 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
#: A manifest is a few kB; this bounds what an agent accepts before it can hash it.
MAX_MANIFEST_BYTES = 1024 * 1024
#: ZMQ_MAXMSGSIZE per socket: a peer that sends more is disconnected by libzmq itself.
MAX_REQUEST_BYTES = 64 * 1024  # agent -> hub (ROUTER, XPUB upstream)
MAX_REPLY_BYTES = MAX_CHUNK_BYTES + 64 * 1024  # hub -> agent (DEALER)
MAX_ANNOUNCE_BYTES = 64 * 1024  # hub -> agent (SUB)
MAX_MAP_KEYS = 32

ARTIFACT_ID = re.compile(r"^[0-9a-f]{64}$")
AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
HUB_ID = re.compile(r"^[0-9a-f]{16}$")
#: A file an agent may ask for: a plain name inside the artifact folder, never a path.
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WORD = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_INT = 2**53


class ProtocolError(ValueError):
    """A frame is not a valid message of this protocol; ``code`` says how (see ``ErrorReply``)."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


Check = Callable[[str, Any], Any]


def _int(low: int = 0, high: int = MAX_INT, optional: bool = False) -> Check:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if type(value) is not int or not low <= value <= high:
            raise ProtocolError(
                f"{name}: expected an integer in [{low}, {high}], got {value!r:.40}"
            )
        return value

    return check


def _float(low: float, high: float) -> Check:
    def check(name: str, value: Any) -> Any:
        if type(value) not in (int, float) or not low <= value <= high:
            raise ProtocolError(f"{name}: expected a number in [{low}, {high}], got {value!r:.40}")
        return float(value)

    return check


def _str(
    pattern: re.Pattern[str] | None = None, max_len: int = 256, optional: bool = False
) -> Check:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if type(value) is not str or len(value) > max_len:
            raise ProtocolError(f"{name}: expected a string of at most {max_len} characters")
        if pattern is not None and not pattern.match(value):
            raise ProtocolError(f"{name}: {value!r:.80} is not a valid value")
        return value

    return check


def _bytes(max_len: int) -> Check:
    def check(name: str, value: Any) -> Any:
        if type(value) is not bytes or len(value) > max_len:
            raise ProtocolError(f"{name}: expected at most {max_len} bytes")
        return value

    return check


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str]
    CHECKS: ClassVar[dict[str, Check]]

    def body(self) -> bytes:
        packed: bytes = msgpack.packb({"p": PROTOCOL_VERSION, "t": self.TYPE, **asdict(self)})
        return packed


@dataclass(frozen=True)
class Announce(Message):
    """Hub -> all agents (PUB): the version every agent should run. Sent on every publish, to
    every new subscriber and every heartbeat. ``version`` is None while the hub has none."""

    TYPE: ClassVar[str] = "announce"
    hub: str
    seq: int
    heartbeat_s: float
    version: int | None
    artifact_id: str | None
    size: int | None
    base_id: str | None
    CHECKS: ClassVar[dict[str, Check]] = {
        "hub": _str(HUB_ID),
        "seq": _int(),
        "heartbeat_s": _float(0.01, 3600.0),
        "version": _int(optional=True),
        "artifact_id": _str(ARTIFACT_ID, optional=True),
        "size": _int(optional=True),
        "base_id": _str(max_len=512, optional=True),
    }


@dataclass(frozen=True)
class Latest(Announce):
    """Hub -> one agent (ROUTER): the announce's content, as the reply to a ``Status``."""

    TYPE: ClassVar[str] = "latest"


@dataclass(frozen=True)
class Status(Message):
    """Agent -> hub, every heartbeat and after every change: where this agent stands."""

    TYPE: ClassVar[str] = "status"
    agent_id: str
    applied: int | None  # verified, stored, ``current`` in the agent's store
    in_use: int | None  # running in the inference engine
    state: str  # what the agent is doing (idle, recording, training, ...)
    sync: str  # the subscriber's own state (up_to_date, fetching, hub_silent, ...)
    episodes: int  # episodes recorded since the last round
    error: str | None = None  # the last distribution error, e.g. a refused artifact
    CHECKS: ClassVar[dict[str, Check]] = {
        "agent_id": _str(AGENT_ID, max_len=63),
        "applied": _int(optional=True),
        "in_use": _int(optional=True),
        "state": _str(WORD, max_len=32),
        "sync": _str(WORD, max_len=32),
        "episodes": _int(high=10**9),
        "error": _str(max_len=300, optional=True),
    }


@dataclass(frozen=True)
class GetManifest(Message):
    """Agent -> hub: the canonical ``manifest.json`` of ``version`` (which must have that id)."""

    TYPE: ClassVar[str] = "get_manifest"
    version: int
    artifact_id: str
    CHECKS: ClassVar[dict[str, Check]] = {"version": _int(), "artifact_id": _str(ARTIFACT_ID)}


@dataclass(frozen=True)
class GetChunk(Message):
    """Agent -> hub: ``length`` bytes of ``file`` of ``version`` from ``offset``; one credit."""

    TYPE: ClassVar[str] = "get_chunk"
    version: int
    artifact_id: str
    file: str
    offset: int
    length: int
    CHECKS: ClassVar[dict[str, Check]] = {
        "version": _int(),
        "artifact_id": _str(ARTIFACT_ID),
        "file": _str(FILE_NAME, max_len=128),
        "offset": _int(),
        "length": _int(1, MAX_CHUNK_BYTES),
    }


@dataclass(frozen=True)
class ManifestReply(Message):
    TYPE: ClassVar[str] = "manifest"
    version: int
    artifact_id: str
    manifest: bytes
    CHECKS: ClassVar[dict[str, Check]] = {
        "version": _int(),
        "artifact_id": _str(ARTIFACT_ID),
        "manifest": _bytes(MAX_MANIFEST_BYTES),
    }


@dataclass(frozen=True)
class ChunkReply(Message):
    """Hub -> agent: two frames, this header and the raw bytes (``data``, not in the map)."""

    TYPE: ClassVar[str] = "chunk"
    version: int
    artifact_id: str
    file: str
    offset: int
    CHECKS: ClassVar[dict[str, Check]] = {
        "version": _int(),
        "artifact_id": _str(ARTIFACT_ID),
        "file": _str(FILE_NAME, max_len=128),
        "offset": _int(),
    }


#: Error codes: denied (key not in the allow-list), protocol (other protocol version),
#: bad_request (malformed or out of range), unknown_version (not stored, or another artifact),
#: unavailable (the hub cannot read or verify that version).
ERROR_CODES = ("denied", "protocol", "bad_request", "unknown_version", "unavailable")


@dataclass(frozen=True)
class ErrorReply(Message):
    TYPE: ClassVar[str] = "error"
    code: str
    detail: str
    version: int | None = None
    CHECKS: ClassVar[dict[str, Check]] = {
        "code": _str(re.compile("^(" + "|".join(ERROR_CODES) + ")$")),
        "detail": _str(max_len=300),
        "version": _int(optional=True),
    }


REQUESTS: dict[str, type[Message]] = {m.TYPE: m for m in (Status, GetManifest, GetChunk)}
REPLIES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Latest, ManifestReply, ChunkReply, ErrorReply)
}


def _decode(raw: bytes, allowed: dict[str, type[Message]], max_bytes: int) -> Message:
    if len(raw) > max_bytes:
        raise ProtocolError(f"message of {len(raw)} bytes, more than {max_bytes}")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=False, timestamp=0)
    except Exception as error:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError(f"not msgpack ({type(error).__name__})") from None
    if type(body) is not dict or len(body) > MAX_MAP_KEYS:
        raise ProtocolError("not a msgpack map of a protocol message")
    if body.get("p") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {body.get('p')!r:.20}, this side speaks {PROTOCOL_VERSION}",
            code="protocol",
        )
    kind = body.get("t")
    cls = allowed.get(kind) if type(kind) is str else None
    if cls is None:
        raise ProtocolError(f"unexpected message type {kind!r:.40}")
    values = {}
    for field in fields(cls):
        if field.name not in body and field.default is MISSING:
            raise ProtocolError(f"{kind}: missing {field.name}")
        values[field.name] = cls.CHECKS[field.name](f"{kind}.{field.name}", body.get(field.name))
    return cls(**values)


def encode(message: Message, data: bytes | None = None) -> list[bytes]:
    """Frames of ``message``: its body, plus the raw data frame of a ``ChunkReply``."""
    if isinstance(message, ChunkReply) != (data is not None):
        raise ValueError("a chunk reply carries a data frame, and only a chunk reply")
    return [message.body()] if data is None else [message.body(), data]


def encode_announce(announce: Announce) -> list[bytes]:
    return [ANNOUNCE_TOPIC, announce.body()]


def decode_announce(frames: Sequence[bytes]) -> Announce:
    if len(frames) != 2 or frames[0] != ANNOUNCE_TOPIC:
        raise ProtocolError(f"an announce is 2 frames (topic, body), got {len(frames)}")
    message = _decode(frames[1], {Announce.TYPE: Announce}, MAX_ANNOUNCE_BYTES)
    assert isinstance(message, Announce)
    return message


def decode_request(frames: Sequence[bytes]) -> Message:
    """A request as the hub's ROUTER receives it, without the routing frame."""
    if len(frames) != 1:
        raise ProtocolError(f"a request is 1 frame, got {len(frames)}")
    return _decode(frames[0], REQUESTS, MAX_REQUEST_BYTES)


def decode_reply(frames: Sequence[bytes]) -> tuple[Message, bytes | None]:
    """A reply as the agent's DEALER receives it: the message and, for chunks, the data."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a reply is 1 or 2 frames, got {len(frames)}")
    message = _decode(frames[0], REPLIES, MAX_REPLY_BYTES)
    if isinstance(message, ChunkReply) != (len(frames) == 2):
        raise ProtocolError("only a chunk reply carries a data frame, and it must")
    if len(frames) == 2 and len(frames[1]) > MAX_CHUNK_BYTES:
        raise ProtocolError(f"chunk of {len(frames[1])} bytes, more than {MAX_CHUNK_BYTES}")
    return message, frames[1] if len(frames) == 2 else None
