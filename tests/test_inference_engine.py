"""The engine on the simulated arm, paced in real time: hot swaps, rollback, async vs sync.

The arm runs at 10 fps with 30-action chunks requested at 90 % (so the tiny policy computes
chunks back to back and a swap shows up within a chunk or two); the queue then still covers
2.7 s, far more than a chunk takes, so a starved tick here would be the engine's fault.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loguru import logger

from conftest import SIM_ROBOT, wait_until
from zk0.agent.inference.engine_config import EngineConfig
from zk0.agent.inference.evaluation import Session, open_session
from zk0.agent.inference.metrics import EpisodeResult
from zk0.shared.artifact import reversion_artifact
from zk0.shared.config import load_robot_config
from zk0.shared.store import AdapterStore

SWAPS = 10


@pytest.fixture(scope="module")
def store(tiny_adapters: list[Path], tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    """Versions 1..10 of the tiny policy's adapter; neighbouring versions differ."""
    store = AdapterStore(tmp_path_factory.mktemp("inference-store"))
    for version in range(1, SWAPS + 1):
        source = tiny_adapters[version % 3]
        reversion_artifact(source, store.path(version), version=version, parent_version=None)
    return store


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    robot = load_robot_config(SIM_ROBOT).model_copy(update={"fps": 10})
    config = EngineConfig(threshold=0.9, actions_per_chunk=30)
    with open_session(robot, "tiny", engine_config=config) as session:
        yield session


def test_ten_hot_swaps_during_an_episode_starve_no_tick(
    session: Session, store: AdapterStore
) -> None:
    engine = session.engine
    in_use: list[int | None] = []
    engine.on_version_in_use = in_use.append
    assert in_use == [None], "wired after the warm-up, the callback hears the base at once"
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO", format="{message}")
    box: dict[str, EpisodeResult] = {}
    runner = threading.Thread(
        target=lambda: box.update(result=engine.run_episode(0, horizon_steps=100_000, max_s=300))
    )
    runner.start()
    try:
        wait_until(
            lambda: any(line.startswith("chunk 0.0 ") for line in lines),
            timeout_s=60,
            what="the first chunk",
        )
        for version in range(1, SWAPS + 1):
            engine.offer_adapter(version, store.path(version), store.manifest(version))
            wait_until(
                lambda v=version: in_use[-1] == v, timeout_s=60, what=f"a chunk of v{version}"
            )
        engine.rollback()
        wait_until(lambda: in_use[-1] == SWAPS - 1, timeout_s=60, what="a chunk after rollback")
    finally:
        engine.end_episode()
        runner.join(120)
        logger.remove(sink)
        engine.on_version_in_use = None
    result = box["result"]

    offers = [s for s in session.slot.swaps if s.kind == "offer"]
    assert [s.version for s in offers] == list(range(1, SWAPS + 1))
    assert not session.slot.errors
    # Every chunk was computed wholly by one version; versions advanced one swap at a time.
    versions = [c.version for c in result.chunks]
    assert [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]] == [
        None,
        *range(1, SWAPS + 1),
        SWAPS - 1,
    ]
    # The version in use is in every chunk's log line.
    chunk_lines = [line for line in lines if line.startswith("chunk 0.")]
    assert len(chunk_lines) == len(result.chunks)
    for line, chunk in zip(chunk_lines, result.chunks, strict=True):
        label = "base" if chunk.version is None else f"v{chunk.version}"
        assert f"adapter {label} " in line
    # No tick starved from a swap's offer until a chunk of the new version was ready. (Ticks the
    # loop missed because this shared machine was busy are reported by the bench, not asserted.)
    for swap in offers:
        first = next(c for c in result.chunks if c.version == swap.version)
        starved = result.starved_between(swap.offered_at, first.ready_at)
        assert starved == 0, (swap, result.summary())
    assert result.starved_ticks == 0, result.summary()


def test_a_version_swapped_in_between_episodes_is_put_to_use_without_the_arm(
    session: Session, store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, slot = session.engine, session.slot
    engine.offer_adapter(1, store.path(1), store.manifest(1))
    wait_until(lambda: engine.version_in_use == 1, timeout_s=60, what="v1 in use")
    for read in ("observe", "fresh_observation", "start_episode"):  # another job may hold it
        monkeypatch.setattr(session.arm, read, lambda *_: pytest.fail("the probe read the arm"))
    in_use: list[int | None] = []
    engine.on_version_in_use = in_use.append
    try:
        engine.offer_adapter(2, store.path(2), store.manifest(2))
        wait_until(lambda: in_use == [1, 2], timeout_s=60, what="v2 in use with no episode")
        assert engine.rollback().version == 1
        wait_until(lambda: in_use == [1, 2, 1], timeout_s=60, what="v1 in use after rollback")
        slot.load(store.path(3))
        wait_until(lambda: in_use == [1, 2, 1, 3], timeout_s=60, what="a loaded v3 in use")
    finally:
        engine.on_version_in_use = None
    assert [s.kind for s in slot.swaps[-3:]] == ["offer", "rollback", "load"]


def test_rollback_returns_the_previous_versions_outputs(
    session: Session, store: AdapterStore
) -> None:
    engine, slot = session.engine, session.slot
    observation = session.arm.fresh_observation()
    noise = engine.noise(7, 0)
    slot.load(store.path(4))
    before, _, version = engine.predict(observation, noise)
    assert version == 4
    slot.load(store.path(5))
    after, _, version = engine.predict(observation, noise)
    assert version == 5 and np.abs(before - after).max() > 1e-3
    assert slot.rollback().version == 4
    rolled_back, _, version = engine.predict(observation, noise)
    assert version == 4
    np.testing.assert_array_equal(rolled_back, before)


def test_sync_mode_waits_for_each_chunk_and_async_overlaps_them(session: Session) -> None:
    engine = session.engine
    runs: dict[str, Any] = {}
    for mode in ("sync", "async"):
        runs[mode] = engine.run_episode(1, horizon_steps=45, mode=mode)  # type: ignore[arg-type]
    sync, overlapped = runs["sync"], runs["async"]
    for result in (sync, overlapped):
        assert result.actions == 45 and result.success is not True
    # sync: compute, execute the whole chunk, repeat: every request finds the queue empty.
    assert len(sync.chunks) == 2
    assert all(c.must_go and c.stale == 0 and c.merged == 0 for c in sync.chunks)
    assert [c.obs_step for c in sync.chunks] == [0, 30]
    # async: the next chunk is asked for while actions remain, and merged over them.
    assert all(not c.must_go for c in overlapped.chunks[1:])
    assert all(c.merged > 0 for c in overlapped.chunks[1:])
    assert len(overlapped.chunks) > len(sync.chunks)
