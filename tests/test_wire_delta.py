"""The int8 wire encoding (``zk0.shared.wire_delta``) and protocol 2.5's delta on the wire:
the codec on real tiny adapters, hostile deltas, the hub's offer, and agents that take it,
cannot take it, or find it corrupted (real sockets, CURVE)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import numpy as np
import pytest
from loguru import logger

from conftest import wait_until
from zk0.agent.distribution.fetch import Download, Target
from zk0.hub.fleet import FleetTable
from zk0.hub.serving import FaultLog, FetchService, VersionCache
from zk0.shared.artifact import TENSORS_FILE, load_arrays, save_adapter_arrays, write_tensors
from zk0.shared.distribution import protocol as p
from zk0.shared.safetensors_file import safetensors_layout
from zk0.shared.store import AdapterStore
from zk0.shared.wire_delta import (
    BLOCK,
    DELTA_FILE,
    MAX_SCALE,
    DeltaError,
    DeltaOrigin,
    apply,
    delta_bytes,
    delta_path,
    encode,
    rebuild,
    save_delta,
)

ORIGIN = DeltaOrigin(3, "a" * 64, 9, "b" * 64)


def master(tiny_adapters: list[Path], index: int, seed: int = 0) -> dict[str, Any]:
    """A float32 'master' near template ``index``: its values plus noise bf16 cannot hold."""
    rng = np.random.default_rng(seed)
    return {
        name: value + rng.normal(0, 1e-4, value.shape).astype(np.float32)
        for name, value in load_arrays(tiny_adapters[index]).items()
    }


def store_delta_version(rig: Any, parent: int, target: dict[str, Any]) -> tuple[int, Any]:
    """Store the next version as ``parent`` + the int8 delta towards ``target``, as the hub
    does with ``wire-encoding int8``: (version, delta)."""
    parent_folder = rig.store.path(parent)
    parent_arrays = load_arrays(parent_folder)
    delta = encode(parent_arrays, target)
    with rig.store.allocate() as (version, path):
        tensors = apply(parent_arrays, delta)
        save_adapter_arrays(parent_folder, path, tensors, version=version, parent_version=parent)
    return version, delta


def keep_delta(rig: Any, parent: int, version: int, delta: Any) -> Path:
    store: AdapterStore = rig.store
    return save_delta(
        store.root, (parent, store.path(parent)), (version, store.path(version)), delta
    )


def publish_delta_version(rig: Any, parent: int, target: dict[str, Any]) -> int:
    """A delta version (``store_delta_version``), its delta kept, made current."""
    version, delta = store_delta_version(rig, parent, target)
    keep_delta(rig, parent, version, delta)
    rig.store.set_current(version)
    return version


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """What the hub and agents log, from INFO up, a line each."""
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    yield lines
    logger.remove(handler)


# -- the codec ---------------------------------------------------------------------------------


def test_rebuild_gives_the_bits_of_the_version_written_from_apply(
    tiny_adapters: list[Path], tmp_path: Path
) -> None:
    parent_file = tiny_adapters[3] / TENSORS_FILE
    parent, target = load_arrays(tiny_adapters[3]), master(tiny_adapters, 9)
    delta = encode(parent, target)
    version = apply(parent, delta)
    write_tensors(tmp_path / "expected.safetensors", version)
    (tmp_path / "delta").write_bytes(delta_bytes(delta, ORIGIN))
    rebuild(parent_file, tmp_path / "delta", tmp_path / "rebuilt.safetensors")
    expected = (tmp_path / "expected.safetensors").read_bytes()
    assert (tmp_path / "rebuilt.safetensors").read_bytes() == expected
    assert DeltaOrigin.of(tmp_path / "delta") == ORIGIN
    assert (tmp_path / "delta").stat().st_size < 0.75 * parent_file.stat().st_size
    for name, value in version.items():  # half a step, plus bf16's rounding (2^-8 relative)
        step = np.repeat(delta[f"s/{name}"], BLOCK)[: value.size].reshape(value.shape)
        error = np.abs(value - target[name])
        bound = step / 2 + np.abs(value) * 2.0**-8 + 1e-12
        assert (error <= bound).all(), name
        assert np.abs(delta[f"q/{name}"]).max() == 127  # each tensor moved: steps used fully


def _hostile(delta: dict[str, Any]) -> dict[str, bytes]:
    first = sorted(name[2:] for name in delta if name.startswith("q/"))[0]
    q, s = f"q/{first}", f"s/{first}"

    def variant(**changes: Any) -> bytes:
        changed = {**delta, **changes}
        return delta_bytes({k: v for k, v in changed.items() if v is not None}, ORIGIN)

    valid = delta_bytes(delta, ORIGIN)
    return {
        "wrong shape": variant(**{q: delta[q].reshape(-1)}),
        "wrong dtype": variant(**{q: delta[q].astype(np.int16)}),
        "extra tensor": variant(**{"q/extra": np.zeros(3, np.int8)}),
        "missing tensor": variant(**{s: None}),
        "NaN scale": variant(**{s: np.full_like(delta[s], np.nan)}),
        "negative scale": variant(**{s: -delta[s] - 1e-3}),
        "huge scale": variant(**{s: np.full_like(delta[s], MAX_SCALE * 10)}),
        "truncated": valid[: len(valid) - 100],
        "header only": valid[:8],
        "not safetensors": b"\xff" * 64,
    }


def test_a_hostile_delta_is_one_line_of_delta_error(
    tiny_adapters: list[Path], tmp_path: Path
) -> None:
    parent = load_arrays(tiny_adapters[3])
    delta = encode(parent, master(tiny_adapters, 9))
    for what, raw in _hostile(delta).items():
        (tmp_path / "delta").write_bytes(raw)
        with pytest.raises(DeltaError) as caught:
            rebuild(tiny_adapters[3] / TENSORS_FILE, tmp_path / "delta", tmp_path / "out")
        assert "\n" not in str(caught.value) and str(caught.value), what
        assert not (tmp_path / "out").exists(), what
    (tmp_path / "delta").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(DeltaError, match="no delta origin"):
        DeltaOrigin.of(tmp_path / "delta")


def test_save_delta_keeps_only_a_delta_that_rebuilds_the_version(rig: Any) -> None:
    parent = rig.new_version(template=3)
    target = master(rig.templates, 9)
    with rig.store.allocate() as (version, path):  # the master itself, not parent + delta
        save_adapter_arrays(
            rig.store.path(parent), path, target, version=version, parent_version=parent
        )
    delta = encode(load_arrays(rig.store.path(parent)), target)
    with pytest.raises(DeltaError, match="does not rebuild it exactly"):
        save_delta(
            rig.store.root,
            (parent, rig.store.path(parent)),
            (version, rig.store.path(version)),
            delta,
        )
    assert list(delta_path(rig.store.root, version).parent.iterdir()) == []  # nor trial files


# -- the protocol and the hub ------------------------------------------------------------------


def _offer(**changes: Any) -> p.DeltaOffer:
    fields: dict[str, Any] = dict(from_version=3, from_artifact_id="a" * 64, file=DELTA_FILE)
    fields.update(rebuilds=TENSORS_FILE, size=100, sha256="c" * 64)
    return p.DeltaOffer(**{**fields, **changes})


def test_the_manifest_reply_carries_the_offer_and_a_2_4_reply_still_decodes() -> None:
    reply = p.ManifestReply(version=9, artifact_id="b" * 64, manifest=b"{}", delta=_offer())
    assert p.decode_reply(p.encode(reply)) == (reply, None)
    old = {"p": "2.4", "t": "manifest", "version": 9, "artifact_id": "b" * 64, "manifest": b"{}"}
    decoded, _ = p.decode_reply([msgpack.packb(old)])
    assert isinstance(decoded, p.ManifestReply) and decoded.delta is None
    for field, value in (("sha256", "C" * 64), ("file", "../x"), ("size", -1)):
        bad = {**old, "delta": {**_offer().model_dump(), field: value}}
        with pytest.raises(p.ProtocolError, match=rf"manifest\.delta\.{field}"):
            p.decode_reply([msgpack.packb(bad)])


def _service(store: AdapterStore) -> FetchService:
    none: dict[str, Any] = dict(version=None, artifact_id=None, size=None, base_id=None)
    latest = p.Latest(hub="0" * 16, seq=0, heartbeat_s=1.0, **none)
    return FetchService(
        VersionCache(store), FleetTable(None, 1.0), FaultLog(), None, lambda _: latest
    )


def _ask(service: FetchService, request: p.Message) -> tuple[p.Reply, bytes | None]:
    return p.decode_reply(service.handle(p.encode(request), None, b"agent"))


def test_the_hub_offers_a_fitting_delta_serves_its_chunks_and_drops_a_stale_one(
    rig: Any, logged: list[str]
) -> None:
    parent = rig.new_version(template=3)
    version, delta = store_delta_version(rig, parent, master(rig.templates, 9))
    artifact_id = rig.store.manifest(version).artifact_id
    service = _service(rig.store)
    reply, _ = _ask(service, p.GetManifest(version=version, artifact_id=artifact_id))
    assert isinstance(reply, p.ManifestReply) and reply.delta is None  # none kept yet
    path = keep_delta(rig, parent, version, delta)  # kept after the version was first served
    reply, _ = _ask(service, p.GetManifest(version=version, artifact_id=artifact_id))
    assert isinstance(reply, p.ManifestReply)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    parent_id = rig.store.manifest(parent).artifact_id
    assert reply.delta == _offer(
        from_version=parent, from_artifact_id=parent_id, size=path.stat().st_size, sha256=sha256
    )
    size = path.stat().st_size
    ask = dict(version=version, artifact_id=artifact_id, file=DELTA_FILE)
    chunk, data = _ask(service, p.GetChunk(**ask, offset=size - 10, length=10))
    assert isinstance(chunk, p.ChunkReply) and data == path.read_bytes()[-10:]
    error, _ = _ask(service, p.GetChunk(**ask, offset=size - 10, length=11))
    assert isinstance(error, p.ErrorReply) and error.code == "bad_request"
    assert service.bytes_served == 2 * len(reply.manifest) + 10
    parent_reply, _ = _ask(service, p.GetManifest(version=parent, artifact_id=parent_id))
    assert isinstance(parent_reply, p.ManifestReply) and parent_reply.delta is None

    rig.store.discard(parent)  # the delta's parent is gone: no offer, the version still served
    stale = _service(rig.store)
    for _ in range(2):  # verified again (an agent refused it): logged once all the same
        stale.cache.forget(version)
        reply, _ = _ask(stale, p.GetManifest(version=version, artifact_id=artifact_id))
        assert isinstance(reply, p.ManifestReply) and reply.delta is None
        error, _ = _ask(stale, p.GetChunk(**ask, offset=0, length=10))
        assert isinstance(error, p.ErrorReply) and error.code == "bad_request"
    assert len([w for w in logged if f"int8 delta of version {version}" in w]) == 1
    other = rig.new_version(template=5)
    path.rename(delta_path(rig.store.root, other))  # names another version: not offered
    other_id = rig.store.manifest(other).artifact_id
    reply, _ = _ask(_service(rig.store), p.GetManifest(version=other, artifact_id=other_id))
    assert isinstance(reply, p.ManifestReply) and reply.delta is None
    assert any(f"it rebuilds v{version}" in w for w in logged)


def test_a_version_file_named_like_the_delta_wins_and_no_delta_is_offered(
    rig: Any, logged: list[str]
) -> None:
    parent = rig.new_version(template=3)
    parent_folder, parent_arrays = rig.store.path(parent), load_arrays(rig.store.path(parent))
    delta = encode(parent_arrays, master(rig.templates, 9))
    with rig.store.allocate() as (version, path):
        tensors = apply(parent_arrays, delta)
        save_adapter_arrays(parent_folder, path, tensors, version=version, parent_version=parent,
                            extra_files={DELTA_FILE: b"the version's own file"})  # fmt: skip
    keep_delta(rig, parent, version, delta)
    artifact_id = rig.store.manifest(version).artifact_id
    service = _service(rig.store)
    reply, _ = _ask(service, p.GetManifest(version=version, artifact_id=artifact_id))
    assert isinstance(reply, p.ManifestReply) and reply.delta is None
    ask = p.GetChunk(version=version, artifact_id=artifact_id, file=DELTA_FILE, offset=0, length=9)
    assert _ask(service, ask)[1] == b"the versi"


def _fetch(
    hub: AdapterStore, agent: AdapterStore, version: int, tamper: Callable[[Any], Any]
) -> Download:
    """One download driven by hand against the hub's ``FetchService``, installed if whole."""
    artifact_id = hub.manifest(version).artifact_id
    service = _service(hub)
    download = Download(Target(version, artifact_id, None, None), agent, 4096, 4)
    reply, _ = _ask(service, download.manifest_request())
    download.on_manifest(tamper(reply), None)
    while not download.complete:
        for request in download.next_requests():
            chunk, data = _ask(service, request)
            assert isinstance(chunk, p.ChunkReply) and data is not None
            assert download.on_chunk(chunk, data)
    download.finalize(None, None)
    assert DELTA_FILE not in {path.name for path in download.partial.iterdir()}
    agent.install(download.partial, artifact_id)
    download.discard()
    agent.verify(version, artifact_id)
    return download


def test_a_delta_that_does_not_hash_to_the_offer_costs_the_file_not_the_version(
    rig: Any, tmp_path: Path, logged: list[str]
) -> None:
    parent = rig.new_version(template=3)
    version = publish_delta_version(rig, parent, master(rig.templates, 9))
    agent = AdapterStore(tmp_path / "agent")
    agent.install(rig.store.path(parent))
    tensors = rig.store.manifest(version).files[TENSORS_FILE].size
    delta_size = delta_path(rig.store.root, version).stat().st_size

    taken = _fetch(rig.store, agent, version, lambda reply: reply)
    assert taken.delta is not None and taken.delta.used
    assert taken.fetched_bytes == delta_size < tensors and taken.local_bytes > 0

    def offer(**changes: Any) -> Callable[[Any], Any]:
        return lambda reply: reply.model_copy(
            update={"delta": reply.delta.model_copy(update=changes)}
        )

    agent.discard(version)
    fallback = _fetch(rig.store, agent, version, offer(sha256="0" * 64))
    assert fallback.delta is not None and not fallback.delta.used
    assert fallback.fetched_bytes == delta_size + tensors
    assert any(f"v{version}: the int8 delta did not rebuild" in w and "sha256" in w for w in logged)

    agent.discard(version)
    whole = _fetch(rig.store, agent, version, offer(size=tensors))  # no gain: not taken
    assert whole.delta is None and whole.fetched_bytes == tensors


# -- end to end: real sockets, CURVE -----------------------------------------------------------


def _wire_bytes(server: Any, agent_id: str) -> int:
    return int(server.service.bytes_by_agent[agent_id])


def test_an_agent_holding_the_parent_takes_the_version_from_its_delta(
    rig: Any, logged: list[str]
) -> None:
    parent = rig.new_version(template=3)
    server = rig.start_hub()
    server.publish(parent)
    holder = rig.subscriber("arm-a", server)
    wait_until(lambda: holder.status().applied == parent, what="the parent version")
    before = _wire_bytes(server, "arm-a")

    version = publish_delta_version(rig, parent, master(rig.templates, 9))
    wait_until(lambda: holder.status().applied == version, what="the delta version")
    manifest = rig.store.manifest(version)
    tensors = manifest.files[TENSORS_FILE].size
    fetched = _wire_bytes(server, "arm-a") - before  # its manifest and the delta's chunks
    assert fetched < tensors, f"{fetched:,} bytes over the wire for a {tensors:,}-byte file"
    assert holder.store.verify(version, manifest.artifact_id).artifact_id == manifest.artifact_id
    stored = sorted(path.name for path in holder.store.path(version).iterdir())
    assert stored == sorted(path.name for path in rig.store.path(version).iterdir())
    assert any(f"version {version} verified" in w and "int8 delta from v0" in w for w in logged)

    newcomer = rig.subscriber("arm-b", server)  # holds no parent: the file comes whole
    wait_until(lambda: newcomer.status().applied == version, what="arm-b on the delta version")
    assert _wire_bytes(server, "arm-b") > tensors
    newcomer.store.verify(version, manifest.artifact_id)


def test_a_corrupted_delta_on_the_hub_costs_the_file_never_the_version(
    rig: Any, logged: list[str]
) -> None:
    parent = rig.new_version(template=3)
    server = rig.start_hub()
    server.publish(parent)
    agent = rig.subscriber("arm-a", server)
    wait_until(lambda: agent.status().applied == parent, what="the parent version")
    before = _wire_bytes(server, "arm-a")

    version, delta = store_delta_version(rig, parent, master(rig.templates, 9))
    kept = keep_delta(rig, parent, version, delta)
    raw = bytearray(kept.read_bytes())
    steps = next(t for name, t in sorted(safetensors_layout(kept).items()) if name[:2] == "q/")
    for at in range(steps.start, steps.start + 64):  # int8 steps: a valid delta, wrong values
        raw[at] ^= 0x55
    kept.write_bytes(bytes(raw))
    rig.store.set_current(version)

    wait_until(lambda: agent.status().applied == version, what="the version, despite its delta")
    manifest = rig.store.manifest(version)
    tensors = manifest.files[TENSORS_FILE].size
    fetched = _wire_bytes(server, "arm-a") - before
    assert fetched >= tensors + len(raw), "the delta, then the file whole"
    # (flipped steps either rebuild another file or hold -128, which the encoding never makes)
    assert any(f"v{version}: the int8 delta did not rebuild" in w for w in logged)
    assert agent.status().error is None
    agent.store.verify(version, manifest.artifact_id)
    assert DELTA_FILE not in {path.name for path in agent.store.path(version).iterdir()}
