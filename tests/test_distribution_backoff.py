"""An agent whose hub stops answering mid-download probes it less and less often and keeps
what it fetched; a request the hub dropped is found by the reply to a later one.

The agent's ``Updater`` runs for real on real stores; the hub is ``FakeHub`` (no sockets), made
silent by dropping what the agent asks for, as a hub too busy to read its queue would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fake_hub import FakeHub

from zk0.agent.distribution.state import StatusBox, SubscriberOptions
from zk0.agent.distribution.updater import Updater
from zk0.shared.artifact import reversion_artifact
from zk0.shared.distribution import protocol as p
from zk0.shared.store import AdapterStore


def _fetching(
    tiny_adapters: list[Path], tmp_path: Path, **options: float
) -> tuple[FakeHub, Updater, StatusBox]:
    """An agent asking a hub for its version 0 (a real tiny adapter) in 4 kB chunks."""
    hub = FakeHub(AdapterStore(tmp_path / "hub"))
    with hub.store.allocate() as (version, path):
        reversion_artifact(tiny_adapters[2], path, version=version, parent_version=None)
    status = StatusBox("arm-a")
    updater = Updater(
        AdapterStore(tmp_path / "agent"), SubscriberOptions(chunk_bytes=4096, **options),
        status, hub.send, hub.send_status, None, None, None,
    )  # fmt: skip
    updater.consider(hub.offer(0))
    return hub, updater, status


def test_a_silent_hub_gets_backed_off_probes_and_no_chunk_is_fetched_twice(
    tiny_adapters: list[Path], tmp_path: Path
) -> None:
    hub, updater, status = _fetching(
        tiny_adapters, tmp_path, credit=2, request_timeout_s=0.05, max_request_timeout_s=0.4
    )
    served: list[tuple[str, int]] = []
    for _ in range(3):  # the manifest, then two rounds of the credit's two chunks
        asked = [(r.file, r.offset) for r in hub.requests if isinstance(r, p.GetChunk)]
        served += asked
        hub.serve(updater, limit=len(hub.requests))  # the agent asks for the next ones
    assert len(served) == 4 and status.get().sync == "fetching"

    # The hub goes silent: it reads nothing the agent sends (7 s at the old fixed 3 s
    # timeout and 3 retries would have thrown the four chunks away).
    hub.requests.clear()  # the two chunks in flight: dropped unread
    re_asks: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        updater.check_stall()
        if hub.requests:
            assert len(hub.requests) == 1  # a probe: the oldest request, not all in flight
            re_asks.append(time.monotonic() - started)
            hub.requests.clear()
        time.sleep(0.005)
    waits = [b - a for a, b in zip([0.0, *re_asks], re_asks, strict=False)]
    # 0.05, 0.1, 0.2, 0.4, then 0.4 s each (+-25 % jitter): 8 re-asks in 2 s, not 40.
    assert 5 <= len(re_asks) <= 10, waits
    assert waits[3] > 2 * waits[0] and min(waits[4:]) > 0.4 * 0.75 - 0.01, waits
    assert max(waits) < 0.4 * 1.25 + 0.2, waits  # the cap holds (a loaded CI sleeps late)
    assert updater.download is not None and status.get().sync == "fetching"

    # The hub answers again: the download goes on from where it was; no chunk comes twice.
    deadline = time.monotonic() + 2.0
    while status.get().applied is None and time.monotonic() < deadline:
        updater.check_stall()
        served += [(r.file, r.offset) for r in hub.requests if isinstance(r, p.GetChunk)]
        hub.serve(updater, limit=len(hub.requests))
        time.sleep(0.005)
    assert status.get().applied == 0 and status.get().sync == "up_to_date"
    twice = {chunk for chunk in served if served.count(chunk) > 1}
    assert not twice, f"fetched twice: {sorted(twice)}"


def test_a_request_the_hub_dropped_is_asked_again_on_the_next_reply_not_after_a_timeout(
    tiny_adapters: list[Path], tmp_path: Path
) -> None:
    hub, updater, status = _fetching(tiny_adapters, tmp_path, credit=4, request_timeout_s=60.0)
    hub.serve(updater, limit=1)  # the manifest: the agent asks for 4 chunks
    dropped = hub.requests.pop(1)  # the hub drops the second one unread (a full queue)
    assert isinstance(dropped, p.GetChunk)
    started = time.monotonic()
    hub.serve(updater)  # answers everything else, in order, and what its replies cause
    assert status.get().applied == 0, "the download should have finished without a timeout"
    assert time.monotonic() - started < 5.0
    again = [r for r in hub.served if r == dropped]
    assert len(again) == 1  # asked again once, after the reply to the chunk sent after it


def test_a_waiting_agent_leaves_out_heartbeat_statuses_that_say_nothing_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While its requests reach the hub (a queued agent's manifest asks, chunk requests), an
    agent's heartbeat status that says nothing new stays home: the hub counts any request as a
    sign of life. A status that says something new goes out at once, and so does the heartbeat
    once the agent has asked nothing for 2.5 heartbeats. Real sockets, the agent's clock made
    to step a heartbeat at a time."""
    import zmq

    from zk0.agent.distribution import subscriber as module
    from zk0.shared.config import HubAddress

    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    hub = HubAddress(host="127.0.0.1", publish_port=1, fetch_port=port)
    agent = module.AdapterSubscriber("arm-0", tmp_path / "adapters", hub, None, insecure=True)
    agent._dealer = ctx.socket(zmq.DEALER)
    agent._dealer.connect(f"tcp://127.0.0.1:{port}")

    def statuses_received() -> list[str]:
        syncs = []
        while router.poll(300):
            message = p.decode_request(router.recv_multipart()[1:])
            if isinstance(message, p.Status):
                syncs.append(message.sync)
        return syncs

    ask = p.GetManifest(version=1, artifact_id="a" * 64)
    try:
        agent._send_status()  # the first (at start): always
        assert statuses_received() == ["starting"]
        for second in range(8):  # queued: asks every other second, nothing new to say
            now[0] += 1.0
            if second % 2 == 0:
                assert agent._send(ask)
            agent._send_status(periodic=True)
        assert statuses_received() == []
        agent._status.update(sync="queued")  # something new: it goes out
        now[0] += 1.0
        assert agent._send(ask)
        agent._send_status(periodic=True)
        assert statuses_received() == ["queued"]
        for _ in range(4):  # no more asks: the heartbeat resumes 2.5 heartbeats after the last
            now[0] += 1.0
            agent._send_status(periodic=True)
        assert statuses_received() == ["queued", "queued"]
    finally:
        agent._dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()
