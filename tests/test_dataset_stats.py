"""The dataset statistics an agent reports (``AgentReport.dataset``): bounded on the wire, kept by
the hub between the statuses that carry them, read from a real LeRobot dataset at most once a
minute."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pyarrow.parquet as pq
import pytest
from loguru import logger

from zk0.agent.dataset_stats import (
    DatasetStatsPacer,
    read_dataset_stats,
)
from zk0.agent.episode_cache import recorded
from zk0.hub.fleet import FleetTable, load_fleet
from zk0.hub.serving import FaultLog, FetchService, VersionCache
from zk0.shared.agent_status import DATASET_STATS_EVERY_S, AgentReport, DatasetStats
from zk0.shared.distribution import protocol as p
from zk0.shared.sim_variants import CLIENT_VARIANTS
from zk0.shared.store import AdapterStore

STATS = DatasetStats(
    frames=60,
    state_mean=(1.0, -2.0, 3.0),
    state_var=(0.5, 0.0, 4.0),
    action_mean=(1.5, -2.5),
    action_var=(0.25, 1.0),
)


@pytest.fixture(scope="module")
def dataset() -> Path:
    """A small real dataset, shared with the federated-success tests (cached by recipe)."""
    return recorded("fed-success", CLIENT_VARIANTS["sim-00"], episodes=2, episode_time_s=1.0)


def _status_body(report: AgentReport | dict[str, Any]) -> bytes:
    if isinstance(report, AgentReport):
        report = report.model_dump()
    body = {"p": p.PROTOCOL.version, "t": "status", "agent_id": "arm-1", "applied": 3}
    packed: bytes = msgpack.packb({**body, "in_use": 3, "report": report, "sync": "up_to_date"})
    return packed


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("state_mean", (1.0, math.nan, 3.0), "state_mean.1: Input should be a finite number"),
        ("state_var", (0.5, math.inf, 4.0), "state_var.1: Input should be a finite number"),
        ("action_mean", (2e6, 0.0), "action_mean.0: Input should be less than or equal to"),
        ("action_var", (-1.0, 0.0), "action_var.0: Input should be greater than or equal to 0"),
        ("state_var", (0.5, 2e12, 4.0), "state_var.1: Input should be less than or equal to"),
        ("state_mean", ("1.0", 2.0, 3.0), "state_mean.0: Input should be a valid number"),
        ("action_mean", (), "action_mean: Tuple should have at least 1 item"),
        ("action_var", (0.0,) * 65, "action_var: Tuple should have at most 64 items"),
        ("frames", -1, "frames: Input should be greater than or equal to 0"),
        ("state_var", (0.5, 0.0), "state_mean has 3 joints but state_var has 2"),
        ("action_mean", (1.0,), "action_mean has 1 joints but action_var has 2"),
    ],
)
def test_the_hub_refuses_bad_stats_with_one_line_naming_the_field(
    field: str, value: object, where: str
) -> None:
    report = AgentReport().model_dump()
    report["dataset"] = {**STATS.model_dump(), field: value}
    with pytest.raises(p.ProtocolError) as caught:
        p.decode_request([_status_body(report)])
    text = str(caught.value)
    assert text.startswith("status.report.dataset") and where in text, text
    assert "\n" not in text


def test_stats_travel_and_the_hub_keeps_the_last_an_agent_sent(tmp_path: Path) -> None:
    fleet = FleetTable(tmp_path / "agents.json", heartbeat_s=1.0)
    latest = p.Latest(
        hub="0123456789abcdef",
        seq=1,
        heartbeat_s=1.0,
        version=None,
        artifact_id=None,
        size=None,
        base_id=None,
    )
    service = FetchService(
        VersionCache(AdapterStore(tmp_path / "store")), fleet, FaultLog(), None, lambda _: latest
    )
    with_stats = AgentReport(episodes_total=2, dataset=STATS)
    assert p.decode_request([_status_body(with_stats)]) == p.Status(
        agent_id="arm-1", applied=3, in_use=3, report=with_stats, sync="up_to_date"
    )
    for report in (with_stats, AgentReport(episodes_total=3)):  # the next minute: none sent
        service.handle([_status_body(report)], None)
    [record] = fleet.records()
    assert record.report.episodes_total == 3 and record.report.dataset == STATS
    fleet.save({})
    [stored] = load_fleet(tmp_path)[1]  # agents.json reads back (JSON arrays)
    assert stored.report.dataset == STATS
    means, variances = (-1e6 / 3,) * 64, (1e12 / 3,) * 64
    widest = AgentReport(
        dataset=DatasetStats(
            frames=10**11,
            state_mean=means,
            state_var=variances,
            action_mean=means,
            action_var=variances,
        )
    )
    status = p.Status(agent_id="a" * 63, applied=0, in_use=0, report=widest, sync="up_to_date")
    assert len(p.encode(status)[0]) < p.MAX_REQUEST_BYTES // 8  # bounded: a few KiB at most
    newer = STATS.model_copy(update={"frames": 90})
    service.handle([_status_body(AgentReport(episodes_total=3, dataset=newer))], None)
    assert fleet.records()[0].report.dataset == newer


def test_the_agent_reads_the_per_joint_mean_and_variance_of_its_dataset(dataset: Path) -> None:
    stats = read_dataset_stats(dataset)
    assert stats is not None
    table = pq.read_table(sorted((dataset / "data").rglob("*.parquet")))
    for name, mean, var in (
        ("observation.state", stats.state_mean, stats.state_var),
        ("action", stats.action_mean, stats.action_var),
    ):
        values = np.asarray(table.column(name).to_pylist(), dtype=np.float64)
        assert values.shape == (stats.frames, 6)
        assert np.allclose(mean, values.mean(axis=0), rtol=1e-5, atol=1e-6), name
        assert np.allclose(var, values.var(axis=0), rtol=1e-4, atol=1e-6), name


def test_stats_are_read_at_most_once_a_minute(dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(dataset / "meta", root / "meta")  # what the reading needs: no frames
    now = [1000.0]
    pacer = DatasetStatsPacer(root, clock=lambda: now[0])
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    stats_file = root / "meta" / "stats.json"
    good = stats_file.read_text()
    try:
        expected = read_dataset_stats(root)
        assert expected is not None and pacer.current() == expected  # the first report has them
        stats_file.write_text(good[: len(good) // 2])  # half written: not read again yet
        now[0] = 1000.0 + DATASET_STATS_EVERY_S - 0.1
        assert pacer.current() == expected and warnings == []
        now[0] = 1000.0 + DATASET_STATS_EVERY_S
        assert pacer.current() is None  # read, unreadable: one warning, no stats
        now[0] += 1.0
        assert pacer.current() is None
        assert len(warnings) == 1 and "dataset statistics not reported" in warnings[0]
        stats_file.write_text(good)
        now[0] = 1000.0 + 2 * DATASET_STATS_EVERY_S
        assert pacer.current() == expected
    finally:
        logger.remove(sink)


def test_no_stats_before_the_first_episode(tmp_path: Path) -> None:
    assert read_dataset_stats(tmp_path / "none") is None
    assert DatasetStatsPacer(tmp_path / "none", clock=lambda: 0.0).current() is None


def test_one_status_a_minute_carries_the_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zk0.agent.distribution import subscriber as module
    from zk0.shared.config import HubAddress

    now = [5000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    hub = HubAddress(host="127.0.0.1", publish_port=1, fetch_port=2)
    agent = module.AdapterSubscriber("arm-0", tmp_path / "adapters", hub, None, insecure=True)
    stats = DatasetStats(frames=10, state_mean=(1.0,), state_var=(2.0,), action_mean=(3.0,),
                         action_var=(4.0,))  # fmt: skip
    agent.set_report(AgentReport(episodes_total=3, dataset=stats))
    sent: list[p.Status] = []

    def send(message: p.Message) -> bool:  # the first three: no connection to the hub yet
        assert isinstance(message, p.Status)
        sent.append(message)
        return len(sent) > 3

    monkeypatch.setattr(agent, "_send", send)
    for _ in range(150):  # two and a half minutes of statuses, one a second
        agent._send_status()
        now[0] += 1.0
    carried = [i for i, status in enumerate(sent) if status.report.dataset is not None]
    # Each status until one goes out, then one a minute.
    assert carried == [0, 1, 2, 3, 63, 123]
    assert all(s.report.dataset in (None, stats) and s.report.episodes_total == 3 for s in sent)
