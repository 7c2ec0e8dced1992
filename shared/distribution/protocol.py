"""The adapter distribution protocol: every message as a model, and the codec. The contract.

Hub (``zk0.hub.distribution``, ``zk0.hub.serving``, ``zk0.hub.fleet``), agent
(``zk0.agent.distribution``) and bench build and read messages only through these models; the
prose is ``zk0/shared/protocol.md``.

A message body is one msgpack map: ``p`` (the sender's protocol version, ``"MAJOR.MINOR"``),
``t`` (the message type) and the model's fields; chunk data travels as a second, raw frame.

Version rule (``PROTOCOL``): peers of the same major understand each other, because a minor
version only adds optional fields and unknown fields are ignored; a message of another major is
refused with one line naming both versions (``ProtocolError`` with code ``protocol``). Any change
of meaning bumps the major.

Decoding never unpickles; it bounds the frame, every map's size and every field (type, range,
pattern, length; an integer is never a boolean) and raises ``ProtocolError`` with one line that
names the field, e.g. ``status.applied: Input should be a valid integer``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import msgpack  # type: ignore[import-untyped]
from pydantic import Field, ValidationError

from zk0.shared.agent_status import AgentReport
from zk0.shared.config import AGENT_ID_PATTERN
from zk0.shared.validation import Protocol, ProtocolVersionError, WireModel, describe

PROTOCOL = Protocol("adapter distribution", "2.5")
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
#: Withdrawn versions an offer lists (the newest; older ones are far below any applied one).
MAX_WITHDRAWN = 16
#: Keys of any map in a message, nested ones included.
MAX_MAP_KEYS = 32
MAX_INT = 2**53
#: A file an agent may ask for: a plain name inside the artifact folder, never a path.
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
FILE_NAME = re.compile(FILE_NAME_PATTERN)

#: Versions, sequence numbers, offsets and sizes.
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
ArtifactId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
HubId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
AgentId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]
FileName = Annotated[str, Field(pattern=FILE_NAME_PATTERN)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Word = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Detail = Annotated[str, Field(max_length=300)]
#: denied (key not in the allow-list), protocol (another major version), bad_request (malformed
#: or out of range), unknown_version (not stored, or another artifact), unavailable (the hub
#: cannot read or verify that version), busy (2.3: the hub serves its ``max_downloads``; ask
#: for the manifest again after ``retry_after_s``).
ErrorCode = Literal["denied", "protocol", "bad_request", "unknown_version", "unavailable", "busy"]


class ProtocolError(ValueError):
    """A frame is not a valid message of this protocol; ``code`` says how (see ``ErrorCode``)."""

    def __init__(self, message: str, code: ErrorCode = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class Message(WireModel):
    """A protocol message; each type declares ``t``, its name on the wire."""

    def body(self) -> bytes:
        packed: bytes = msgpack.packb({"p": PROTOCOL.version, **self.model_dump()})
        return packed


class Offer(Message):
    """The version every agent should run; every field but ``hub``, ``seq`` and
    ``heartbeat_s`` is None while the hub has none."""

    hub: HubId  # new per hub start
    seq: Count
    heartbeat_s: Annotated[float, Field(ge=0.01, le=3600.0, allow_inf_nan=False)]
    version: Count | None
    artifact_id: ArtifactId | None
    size: Count | None  # the manifest's bytes plus every file's
    base_id: Annotated[str, Field(max_length=512)] | None
    #: Versions a canary gate rejected (2.2): an agent that applied one goes back to ``version``.
    withdrawn: Annotated[tuple[Count, ...], Field(max_length=MAX_WITHDRAWN)] = ()


class Announce(Offer):
    """Hub -> all agents (PUB): sent on every publish, to every new subscriber, every heartbeat."""

    t: Literal["announce"] = "announce"


class Latest(Offer):
    """Hub -> one agent (ROUTER): the announce's content, as the reply to a ``Status``."""

    t: Literal["latest"] = "latest"
    #: Canary rollout (2.2): set only in the reply to a canary, whose offer is then the version
    #: under gate; the canary evaluates it against this version, the one the fleet runs.
    gate_baseline: Count | None = None
    #: ... and the closed-loop episodes it needs from each canary (the hub's ``min_episodes``).
    gate_episodes: Count | None = None


class Status(Message):
    """Agent -> hub, every heartbeat and after every change: where this agent stands."""

    t: Literal["status"] = "status"
    agent_id: AgentId
    applied: Count | None  # verified, stored, ``current`` in the agent's store
    in_use: Count | None  # the version the inference engine computed its last chunk with
    report: AgentReport  # what the agent does and the episodes it holds
    sync: Word  # the subscriber's own state (up_to_date, fetching, hub_silent, ...)
    error: Detail | None = None  # the last distribution error, e.g. a refused artifact


class GetManifest(Message):
    """Agent -> hub: the canonical ``manifest.json`` of ``version`` (which must have that id)."""

    t: Literal["get_manifest"] = "get_manifest"
    version: Count
    artifact_id: ArtifactId


class GetChunk(Message):
    """Agent -> hub: ``length`` bytes of ``file`` of ``version`` from ``offset``; one credit."""

    t: Literal["get_chunk"] = "get_chunk"
    version: Count
    artifact_id: ArtifactId
    file: FileName
    offset: Count
    length: Annotated[int, Field(ge=1, le=MAX_CHUNK_BYTES)]


class DeltaOffer(WireModel):
    """2.5: ``file``, fetched with ``get_chunk`` like the version's own files, rebuilds its
    file ``rebuilds`` from that file of ``from_version`` (``zk0.shared.wire_delta``)."""

    from_version: Count
    from_artifact_id: ArtifactId
    file: FileName  # not one of the version's files
    rebuilds: FileName
    size: Count
    sha256: Sha256  # of ``file``; the rebuilt file must still hash to the manifest's entry


class ManifestReply(Message):
    t: Literal["manifest"] = "manifest"
    version: Count
    artifact_id: ArtifactId
    manifest: Annotated[bytes, Field(max_length=MAX_MANIFEST_BYTES)]
    #: 2.5: set when the hub keeps an int8 delta of this version (agents may ignore it).
    delta: DeltaOffer | None = None


class ChunkReply(Message):
    """Hub -> agent: two frames, this header and the raw bytes (``data``, not in the map)."""

    t: Literal["chunk"] = "chunk"
    version: Count
    artifact_id: ArtifactId
    file: FileName
    offset: Count


class ErrorReply(Message):
    t: Literal["error"] = "error"
    code: ErrorCode
    detail: Detail
    version: Count | None = None
    retry_after_s: Annotated[float, Field(ge=0, le=3600)] | None = None  # 2.3, with busy


Request = Status | GetManifest | GetChunk
Reply = Latest | ManifestReply | ChunkReply | ErrorReply


def _by_type[M: Message](*models: type[M]) -> dict[str, type[M]]:
    return {str(model.model_fields["t"].default): model for model in models}


ANNOUNCES = _by_type(Announce)
REQUESTS: dict[str, type[Request]] = _by_type(Status, GetManifest, GetChunk)
REPLIES: dict[str, type[Reply]] = _by_type(Latest, ManifestReply, ChunkReply, ErrorReply)


def _decode[M: Message](raw: bytes, allowed: Mapping[str, type[M]], max_bytes: int) -> M:
    if len(raw) > max_bytes:
        raise ProtocolError(f"message of {len(raw)} bytes, more than {max_bytes}")
    try:
        body = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=False,
            timestamp=0,
            max_map_len=MAX_MAP_KEYS,
        )
    except Exception as error:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError(
            f"not msgpack, or a map of more than {MAX_MAP_KEYS} keys ({type(error).__name__})"
        ) from None
    if type(body) is not dict:
        raise ProtocolError("not a msgpack map of a protocol message")
    try:
        PROTOCOL.check(body.get("p"))
    except ProtocolVersionError as error:
        raise ProtocolError(str(error), code="protocol") from None
    kind = body.get("t")
    model = allowed.get(kind) if type(kind) is str else None
    if model is None:
        raise ProtocolError(f"unexpected message type {kind!r:.40}")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise ProtocolError(describe(error, prefix=str(kind))) from None


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
    return _decode(frames[1], ANNOUNCES, MAX_ANNOUNCE_BYTES)


def decode_request(frames: Sequence[bytes]) -> Request:
    """A request as the hub's ROUTER receives it, without the routing frame."""
    if len(frames) != 1:
        raise ProtocolError(f"a request is 1 frame, got {len(frames)}")
    return _decode(frames[0], REQUESTS, MAX_REQUEST_BYTES)


def decode_reply(frames: Sequence[bytes]) -> tuple[Reply, bytes | None]:
    """A reply as the agent's DEALER receives it: the message and, for chunks, the data."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a reply is 1 or 2 frames, got {len(frames)}")
    message = _decode(frames[0], REPLIES, MAX_REPLY_BYTES)
    if isinstance(message, ChunkReply) != (len(frames) == 2):
        raise ProtocolError("only a chunk reply carries a data frame, and it must")
    if len(frames) == 2 and len(frames[1]) > MAX_CHUNK_BYTES:
        raise ProtocolError(f"chunk of {len(frames[1])} bytes, more than {MAX_CHUNK_BYTES}")
    return message, frames[1] if len(frames) == 2 else None
