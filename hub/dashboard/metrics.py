"""``/metrics``: the fleet in Prometheus' text format, computed from a snapshot at each scrape.

Nothing is counted twice: every series is derived from what the dashboard shows (the fleet
table, the store, the gate records, the runs' histories), so a scrape and a page always agree.
Round durations and aggregation times are histograms over every round the kept run folders
record.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from zk0.hub.dashboard.attention import KINDS, attention
from zk0.hub.dashboard.snapshot import SnapshotSource
from zk0.shared.dashboard_config import DashboardConfig

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUND_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 10.0, 30.0)


class FleetCollector(Collector):
    def __init__(self, source: SnapshotSource, config: DashboardConfig) -> None:
        self.source, self.config = source, config

    def collect(self) -> Iterator[Metric]:
        s = self.source.get()
        agents = [r for r in s.agents if not r.revoked]
        online = sum(1 for r in agents if r.online(s.taken_at, s.heartbeat_s))
        yield _gauge("zk0_agents", "Agents the hub knows (revoked ones left out).", len(agents))
        yield _gauge("zk0_agents_online", "Agents with a status within 3 heartbeats.", online)
        yield _gauge("zk0_versions", "Adapter versions in the store.", len(s.versions))
        yield _gauge(
            "zk0_current_version", "The fleet's version (-1: none yet).",
            -1 if s.current is None else s.current,
        )  # fmt: skip
        yield _counter(
            "zk0_bytes_served", "Bytes of manifests and chunks the fetch socket served.",
            s.bytes_served,
        )  # fmt: skip
        gates = CounterMetricFamily(
            "zk0_gate_decisions", "Canary gate decisions, by decision.", labels=["decision"]
        )
        for decision in ("promoted", "rejected"):
            count = sum(1 for v in s.versions if v.gate is not None and v.gate.state == decision)
            gates.add_metric([decision], count)
        yield gates
        rounds = [(run, i) for run in s.runs for i, n in enumerate(run.history.rounds) if n > 0]
        yield _histogram(
            "zk0_round_duration_seconds", "Federated rounds' wall time.",
            [run.history.round_s[i] for run, i in rounds], ROUND_BUCKETS,
        )  # fmt: skip
        yield _histogram(
            "zk0_aggregation_seconds", "Time to aggregate a round's replies.",
            [run.history.aggregation_s[i] for run, i in rounds], AGGREGATION_BUCKETS,
        )  # fmt: skip
        dropped = CounterMetricFamily(
            "zk0_dropped_replies",
            "Round replies the hub did not count, by why: dropped (refused or failed) or skipped "
            "(the arm was busy).",
            labels=["why"],
        )
        dropped.add_metric(["dropped"], sum(len(run.history.dropped[i]) for run, i in rounds))
        dropped.add_metric(["skipped"], sum(len(run.history.skipped[i]) for run, i in rounds))
        yield dropped
        items = GaugeMetricFamily(
            "zk0_attention_items", "Entries on the Attention page, by rule.", labels=["kind"]
        )
        found = attention(s, self.config)
        for kind in KINDS:
            items.add_metric([kind], sum(1 for item in found if item.kind == kind))
        yield items


def registry_for(source: SnapshotSource, config: DashboardConfig) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(source, config))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _histogram(
    name: str, doc: str, values: Iterable[float | None], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    measured = [v for v in values if v is not None]
    cumulative = [(f"{edge:g}", float(sum(1 for v in measured if v <= edge))) for edge in buckets]
    cumulative.append(("+Inf", float(len(measured))))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=sum(measured))
