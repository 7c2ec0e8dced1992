"""The wire protocol's models and codec: round trips, the version rule, and strict refusal of
every malformed message with one line that names the field."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import msgpack
import pytest

from zk0.hub.fleet import FleetTable
from zk0.hub.serving import FaultLog, FetchService, VersionCache
from zk0.shared.agent_status import AgentReport, RoundOutcome
from zk0.shared.distribution import protocol as p
from zk0.shared.store import AdapterStore

ID = "ab" * 32
HUB = "0123456789abcdef"
MISSING = object()
REPORT = AgentReport(
    state="recording",
    episodes_new=5,
    episodes_total=40,
    frames_total=12_000,
    recorded_s=400.0,
    job="record",
    last_round=RoundOutcome(round=3, phase="train", outcome="trained", at=1.7e9),
)
#: One valid body (without ``p`` and ``t``) per message type.
GOOD: dict[str, dict[str, Any]] = {
    "announce": dict(
        hub=HUB,
        seq=7,
        heartbeat_s=0.5,
        version=3,
        artifact_id=ID,
        size=1234,
        base_id="sha256:" + "0" * 64,
    ),
    "status": dict(
        agent_id="arm-1",
        applied=3,
        in_use=2,
        report=REPORT.model_dump(),
        sync="fetching",
        error=None,
    ),
    "get_manifest": dict(version=3, artifact_id=ID),
    "get_chunk": dict(
        version=3, artifact_id=ID, file="adapter_model.safetensors", offset=0, length=4096
    ),
    "manifest": dict(version=3, artifact_id=ID, manifest=b"{}\n"),
    "chunk": dict(version=3, artifact_id=ID, file="config.json", offset=0),
    "error": dict(code="bad_request", detail="no", version=None),
}
GOOD["latest"] = GOOD["announce"]


def _body(t: str, protocol: object = p.PROTOCOL.version, /, **fields: Any) -> bytes:
    packed: bytes = msgpack.packb({"p": protocol, "t": t, **fields})
    return packed


def _decode(t: str, body: bytes) -> Any:
    """Decode ``body`` as the side that receives a message of type ``t`` does."""
    if t == "announce":
        return p.decode_announce([p.ANNOUNCE_TOPIC, body])
    if t in p.REQUESTS:
        return p.decode_request([body])
    return p.decode_reply([body, b"data"] if t == "chunk" else [body])[0]


def test_every_message_round_trips() -> None:
    announce = p.Announce(**GOOD["announce"])
    assert p.decode_announce(p.encode_announce(announce)) == announce
    requests: list[p.Message] = [
        p.Status(**{**GOOD["status"], "report": REPORT, "error": "refused v4: sha256 differs"}),
        p.Status(agent_id="arm-1", applied=None, in_use=None, report=AgentReport(), sync="up"),
        p.GetManifest(**GOOD["get_manifest"]),
        p.GetChunk(**GOOD["get_chunk"]),
    ]
    for request in requests:
        assert p.decode_request(p.encode(request)) == request
    latest = p.Latest(
        hub=HUB, seq=8, heartbeat_s=1.0, version=None, artifact_id=None, size=None, base_id=None
    )
    assert p.decode_reply(p.encode(latest)) == (latest, None)
    chunk = p.ChunkReply(**GOOD["chunk"])
    assert p.decode_reply(p.encode(chunk, b"\x00" * 10)) == (chunk, b"\x00" * 10)
    for reply in (p.ManifestReply(**GOOD["manifest"]), p.ErrorReply(**GOOD["error"])):
        assert p.decode_reply(p.encode(reply)) == (reply, None)


def test_every_good_body_here_is_valid() -> None:
    """The malformed cases below differ from these in one field only."""
    for t, fields in GOOD.items():
        assert _decode(t, _body(t, **fields)).t == t


BAD_REPORTS: list[tuple[object, str]] = [
    ("recording", "report"),
    ({"state": "Dancing!"}, "report.state"),
    ({"episodes_new": True}, "report.episodes_new"),
    ({"episodes_new": -1}, "report.episodes_new"),
    ({"episodes_total": 10**9 + 1}, "report.episodes_total"),
    ({"frames_total": "12"}, "report.frames_total"),
    ({"recorded_s": float("inf")}, "report.recorded_s"),
    ({"job": "Record now!"}, "report.job"),
    ({"last_round": {"round": 1, "outcome": "trained", "at": 0.0}}, "report.last_round.phase"),
    ({"last_round": {**REPORT.model_dump()["last_round"], "reason": "x" * 301}}, "reason"),
]
#: (message type, field, value or MISSING, where the one-line error must point).
BAD: list[tuple[str, str, object, str]] = [
    ("announce", "hub", MISSING, "hub"),
    ("announce", "hub", 12, "hub"),
    ("announce", "hub", "0123456789ABCDEF", "hub"),
    ("announce", "seq", True, "seq"),
    ("announce", "seq", -1, "seq"),
    ("announce", "seq", p.MAX_INT + 1, "seq"),
    ("announce", "heartbeat_s", "1", "heartbeat_s"),
    ("announce", "heartbeat_s", True, "heartbeat_s"),
    ("announce", "heartbeat_s", 0.001, "heartbeat_s"),
    ("announce", "heartbeat_s", 3601.0, "heartbeat_s"),
    ("announce", "heartbeat_s", float("nan"), "heartbeat_s"),
    ("announce", "version", MISSING, "version"),
    ("announce", "version", "3", "version"),
    ("announce", "artifact_id", "AB" * 32, "artifact_id"),
    ("announce", "artifact_id", "ab" * 33, "artifact_id"),
    ("announce", "size", -1, "size"),
    ("announce", "base_id", "x" * 513, "base_id"),
    ("latest", "version", True, "version"),
    ("latest", "heartbeat_s", MISSING, "heartbeat_s"),
    ("status", "agent_id", MISSING, "agent_id"),
    ("status", "agent_id", "Arm 1", "agent_id"),
    ("status", "agent_id", "a" * 64, "agent_id"),
    ("status", "applied", True, "applied"),
    ("status", "applied", -1, "applied"),
    ("status", "applied", "3", "applied"),
    ("status", "in_use", MISSING, "in_use"),
    ("status", "in_use", p.MAX_INT + 1, "in_use"),
    ("status", "report", MISSING, "report"),
    *[("status", "report", value, where) for value, where in BAD_REPORTS],
    ("status", "sync", "Up To Date", "sync"),
    ("status", "sync", "x" * 33, "sync"),
    ("status", "error", 5, "error"),
    ("status", "error", "x" * 301, "error"),
    ("get_manifest", "version", MISSING, "version"),
    ("get_manifest", "artifact_id", 5, "artifact_id"),
    ("get_manifest", "artifact_id", "zz", "artifact_id"),
    ("get_chunk", "file", MISSING, "file"),
    ("get_chunk", "file", "../../etc/passwd", "file"),
    ("get_chunk", "file", "sub/dir.json", "file"),
    ("get_chunk", "file", ".hidden", "file"),
    ("get_chunk", "file", "a" * 129, "file"),
    ("get_chunk", "file", b"config.json", "file"),
    ("get_chunk", "offset", True, "offset"),
    ("get_chunk", "offset", -1, "offset"),
    ("get_chunk", "offset", 1.0, "offset"),
    ("get_chunk", "length", 0, "length"),
    ("get_chunk", "length", p.MAX_CHUNK_BYTES + 1, "length"),
    ("manifest", "manifest", "{}", "manifest"),
    ("manifest", "manifest", b"x" * (p.MAX_MANIFEST_BYTES + 1), "manifest"),
    ("manifest", "version", False, "version"),
    ("chunk", "offset", MISSING, "offset"),
    ("chunk", "file", "a/b", "file"),
    ("error", "code", MISSING, "code"),
    ("error", "code", "teapot", "code"),
    ("error", "detail", "x" * 301, "detail"),
    ("error", "version", -1, "version"),
]


@pytest.mark.parametrize(("t", "field", "value", "where"), BAD)
def test_a_malformed_message_is_refused_with_one_line_naming_the_field(
    t: str, field: str, value: object, where: str
) -> None:
    fields = dict(GOOD[t])
    if value is MISSING:
        del fields[field]
    else:
        fields[field] = value
    with pytest.raises(p.ProtocolError) as caught:
        _decode(t, _body(t, **fields))
    text = str(caught.value)
    assert text.startswith(f"{t}.{field}") and f"{where}: " in text, text
    assert "\n" not in text and caught.value.code == "bad_request"


GOOD_CHUNK = _body("get_chunk", **GOOD["get_chunk"])


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([b""], "not msgpack"),
        ([b"\xc1\x00"], "not msgpack"),
        ([msgpack.packb([1, 2, 3])], "not a msgpack map"),
        ([msgpack.packb({str(i): i for i in range(40)})], "more than 32 keys"),
        ([_body("status", **{**GOOD["status"], "report": {str(i): 0 for i in range(40)}})], "32"),
        ([b"x" * (p.MAX_REQUEST_BYTES + 1)], "more than"),
        ([_body("reboot")], "unexpected message type 'reboot'"),
        ([_body("manifest", **GOOD["manifest"])], "unexpected message type 'manifest'"),
        ([_body("announce", **GOOD["announce"])], "unexpected message type 'announce'"),
        ([msgpack.packb({"p": p.PROTOCOL.version, **GOOD["get_chunk"]})], "type None"),
        ([GOOD_CHUNK] * 2, "1 frame"),
    ],
)
def test_malformed_frames_are_refused_with_one_line(frames: list[bytes], match: str) -> None:
    with pytest.raises(p.ProtocolError, match=match) as caught:
        p.decode_request(frames)
    assert "\n" not in str(caught.value) and caught.value.code == "bad_request"


@pytest.mark.parametrize("t", sorted(GOOD))
@pytest.mark.parametrize(("version", "named"), [("3.0", "3.0"), (1, "1"), ("1.9", "1.9")])
def test_another_major_version_is_refused_naming_both(t: str, version: object, named: str) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        _decode(t, _body(t, version, **GOOD[t]))
    text = str(caught.value)
    assert caught.value.code == "protocol" and "\n" not in text
    assert f"version {named}" in text or f"speaks {named}" in text, text
    assert f"this side speaks {p.PROTOCOL.version}" in text


@pytest.mark.parametrize("version", [None, "2", "two", 2.0, "2.0.1"])
def test_a_version_that_is_not_major_minor_is_refused(version: object) -> None:
    with pytest.raises(p.ProtocolError, match=r"not MAJOR\.MINOR") as caught:
        p.decode_request([_body("get_chunk", version, **GOOD["get_chunk"])])
    assert caught.value.code == "protocol"


@pytest.mark.parametrize("t", sorted(GOOD))
def test_a_newer_minor_with_unknown_fields_is_understood(t: str) -> None:
    major = p.PROTOCOL.version.split(".")[0]
    body = _body(t, f"{major}.9", hint="newer peers may add fields", **GOOD[t])
    message = _decode(t, body)
    assert message.t == t and "hint" not in message.model_dump()
    report = {**GOOD["status"]["report"], "battery": 0.8}  # nested models too
    status = p.decode_request([_body("status", **{**GOOD["status"], "report": report})])
    assert isinstance(status, p.Status) and status.report == REPORT


def test_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (marker.touch, ())  # type: ignore[return-value]

    with pytest.raises(p.ProtocolError):
        p.decode_request([pickle.dumps(Exploit())])
    assert not marker.exists()


def test_replies_and_announces_are_checked_too() -> None:
    chunk = p.ChunkReply(**GOOD["chunk"])
    with pytest.raises(p.ProtocolError, match="only a chunk reply"):
        p.decode_reply([chunk.body()])
    with pytest.raises(p.ProtocolError, match="more than"):
        p.decode_reply(p.encode(chunk, b"x" * (p.MAX_CHUNK_BYTES + 1)))
    with pytest.raises(p.ProtocolError, match="2 frames"):
        p.decode_announce([b"other.topic", b""])
    with pytest.raises(ValueError, match="data frame"):
        p.encode(p.GetManifest(**GOOD["get_manifest"]), b"data")


def test_the_hub_answers_another_major_with_one_line_and_records_statuses(
    tmp_path: Path,
) -> None:
    fleet = FleetTable(None, heartbeat_s=1.0)
    latest = p.Latest(**GOOD["announce"])
    service = FetchService(
        VersionCache(AdapterStore(tmp_path)), fleet, FaultLog(), None, lambda _agent: latest
    )
    reply, _ = p.decode_reply(
        service.handle([_body("get_chunk", "3.1", **GOOD["get_chunk"])], None)
    )
    assert isinstance(reply, p.ErrorReply) and reply.code == "protocol"
    assert "3.1" in reply.detail and p.PROTOCOL.version in reply.detail
    assert p.decode_reply(service.handle([_body("status", **GOOD["status"])], None)) == (
        latest,
        None,
    )
    [record] = fleet.records()
    assert (record.agent_id, record.applied, record.in_use, record.sync) == (
        "arm-1",
        3,
        2,
        "fetching",
    )
    assert record.report == REPORT
    summary = fleet.summary(current=3)
    assert summary["episodes_since_round"] == 5 and summary["frames_total"] == 12_000
