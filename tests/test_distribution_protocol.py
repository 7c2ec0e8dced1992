"""The wire protocol's codec: round trips, and strict refusal of everything else."""

from __future__ import annotations

import pickle
from pathlib import Path

import msgpack
import pytest

from zk0.shared.distribution import protocol as p

ID = "ab" * 32


def test_every_message_round_trips() -> None:
    announce = p.Announce("0123456789abcdef", 7, 0.5, 3, ID, 1234, "sha256:" + "0" * 64)
    assert p.decode_announce(p.encode_announce(announce)) == announce
    requests: list[p.Message] = [
        p.Status("arm-1", 3, 2, "recording", "fetching", 5, "refused v4: sha256 differs"),
        p.Status("arm-1", None, None, "idle", "starting", 0),
        p.GetManifest(3, ID),
        p.GetChunk(3, ID, "adapter_model.safetensors", 262144, 4096),
    ]
    for request in requests:
        assert p.decode_request(p.encode(request)) == request
    latest = p.Latest("0123456789abcdef", 8, 1.0, None, None, None, None)
    assert p.decode_reply(p.encode(latest)) == (latest, None)
    chunk = p.ChunkReply(3, ID, "config.json", 0)
    assert p.decode_reply(p.encode(chunk, b"\x00" * 10)) == (chunk, b"\x00" * 10)
    manifest = p.ManifestReply(3, ID, b'{"format": "zk0-adapter/1"}\n')
    assert p.decode_reply(p.encode(manifest)) == (manifest, None)


def _raw(**fields: object) -> list[bytes]:
    return [msgpack.packb({"p": 1, **fields})]


GOOD_CHUNK = dict(t="get_chunk", version=1, artifact_id=ID, file="a.json", offset=0, length=8)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([b""], "not msgpack"),
        ([b"\xc1\x00"], "not msgpack"),
        ([msgpack.packb([1, 2, 3])], "not a msgpack map"),
        ([msgpack.packb({str(i): i for i in range(40)})], "not a msgpack map"),
        ([b"x" * (p.MAX_REQUEST_BYTES + 1)], "more than"),
        (_raw(t="reboot"), "unexpected message type"),
        (_raw(t="manifest", version=1, artifact_id=ID, manifest=b""), "unexpected message type"),
        (_raw(**{**GOOD_CHUNK, "offset": -1}), "offset"),
        (_raw(**{**GOOD_CHUNK, "offset": True}), "offset"),
        (_raw(**{**GOOD_CHUNK, "length": p.MAX_CHUNK_BYTES + 1}), "length"),
        (_raw(**{**GOOD_CHUNK, "length": 0}), "length"),
        (_raw(**{**GOOD_CHUNK, "file": "../../etc/passwd"}), "file"),
        (_raw(**{**GOOD_CHUNK, "file": "sub/dir.json"}), "file"),
        (_raw(**{**GOOD_CHUNK, "artifact_id": "AB" * 32}), "artifact_id"),
        (_raw(**{k: v for k, v in GOOD_CHUNK.items() if k != "file"}), "missing file"),
        (
            _raw(
                t="status",
                agent_id="Arm 1",
                applied=0,
                in_use=0,
                state="idle",
                sync="x",
                episodes=0,
            ),
            "agent_id",
        ),
        (_raw(**GOOD_CHUNK) * 2, "1 frame"),
    ],
)
def test_malformed_requests_are_refused_with_one_line(frames: list[bytes], match: str) -> None:
    with pytest.raises(p.ProtocolError, match=match) as caught:
        p.decode_request(frames)
    assert "\n" not in str(caught.value) and caught.value.code == "bad_request"


def test_another_protocol_version_is_named() -> None:
    frames = [msgpack.packb({"p": 2, **GOOD_CHUNK})]
    with pytest.raises(p.ProtocolError, match="protocol version 2, this side speaks 1") as caught:
        p.decode_request(frames)
    assert caught.value.code == "protocol"


def test_unknown_extra_keys_are_ignored_for_forward_compatibility() -> None:
    request = p.decode_request(_raw(**GOOD_CHUNK, hint="newer agents may add fields"))
    assert isinstance(request, p.GetChunk) and request.length == 8


def test_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (marker.touch, ())  # type: ignore[return-value]

    with pytest.raises(p.ProtocolError):
        p.decode_request([pickle.dumps(Exploit())])
    assert not marker.exists()


def test_replies_and_announces_are_checked_too() -> None:
    with pytest.raises(p.ProtocolError, match="only a chunk reply"):
        p.decode_reply([p.ChunkReply(1, ID, "a.json", 0).body()])
    with pytest.raises(p.ProtocolError, match="more than"):
        p.decode_reply(p.encode(p.ChunkReply(1, ID, "a.json", 0), b"x" * (p.MAX_CHUNK_BYTES + 1)))
    with pytest.raises(p.ProtocolError, match="2 frames"):
        p.decode_announce([b"other.topic", b""])
    with pytest.raises(p.ProtocolError, match="code"):
        p.decode_reply(_raw(t="error", code="teapot", detail=""))
    with pytest.raises(ValueError, match="data frame"):
        p.encode(p.GetManifest(1, ID), b"data")
