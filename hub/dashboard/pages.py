"""What each page shows, as plain rows: pure functions of a ``Snapshot``.

The templates only lay these out; every number a page prints is computed here, where a test can
read it without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zk0.hub.dashboard.charts import Chart, Series
from zk0.hub.dashboard.snapshot import RunInfo, Snapshot, VersionInfo
from zk0.shared.success import SuccessRate

#: Runs the Runs page draws (newest first); older ones stay in their folders.
SHOWN_RUNS = 5


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    online: bool
    last_seen: str
    applied: str
    in_use: str
    local_part: str
    episodes: int
    recorded_h: str
    last_round: str
    bytes_received: str
    state: str
    error: str | None


def ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def label(version: int | None) -> str:
    return "-" if version is None else f"v{version}"


def fleet_rows(snapshot: Snapshot) -> list[AgentRow]:
    rows = []
    for r in snapshot.agents:
        if r.revoked:
            continue
        report = r.report
        last = report.last_round
        state = report.state + (f" ({report.job})" if report.job else "")
        if r.sync != "up_to_date":  # fetching, queued, hub_silent, denied: worth a glance
            state += f", {r.sync.replace('_', ' ')}"
        rows.append(
            AgentRow(
                agent_id=r.agent_id,
                online=r.online(snapshot.taken_at, snapshot.heartbeat_s),
                last_seen=ago(snapshot.taken_at - r.last_seen),
                applied=label(r.applied),
                in_use=label(r.in_use),
                local_part="-" if report.personal_revision is None
                else f"local r{report.personal_revision}",
                episodes=report.episodes_total,
                recorded_h=f"{report.recorded_s / 3600:.2f}",
                last_round="-" if last is None
                else f"round {last.round} {last.phase}: {last.outcome}"
                + (f" ({last.reason})" if last.reason else ""),
                bytes_received=size(snapshot.bytes_by_agent.get(r.agent_id, 0)),
                state=state,
                error=r.error,
            )
        )  # fmt: skip
    return rows


def fleet_totals(snapshot: Snapshot) -> dict[str, Any]:
    rows = [r for r in snapshot.agents if not r.revoked]
    online = sum(1 for r in rows if r.online(snapshot.taken_at, snapshot.heartbeat_s))
    return {
        "agents": len(rows),
        "online": online,
        "current": label(snapshot.current),
        "on_current": sum(
            1 for r in rows if snapshot.current is not None and r.in_use == snapshot.current
        ),
        "episodes": sum(r.report.episodes_total for r in rows),
        "recorded_h": f"{sum(r.report.recorded_s for r in rows) / 3600:.2f}",
        "bytes_served": size(snapshot.bytes_served),
    }


@dataclass(frozen=True)
class VersionRow:
    version: str
    current: bool
    parent: str
    round: str
    aggregation: str
    created: str
    eval_mse: str
    success: str
    trained: str
    gate: str
    gate_numbers: str
    running: list[str]


def version_rows(snapshot: Snapshot) -> list[VersionRow]:
    running: dict[int, list[str]] = {}
    for r in snapshot.agents:
        if r.in_use is not None and not r.revoked:
            running.setdefault(r.in_use, []).append(r.agent_id)
    return [_version_row(v, snapshot, running.get(v.version, [])) for v in
            reversed(snapshot.versions)]  # fmt: skip


def _version_row(v: VersionInfo, snapshot: Snapshot, running: list[str]) -> VersionRow:
    m = v.metrics
    trained = m.get("clients_trained")
    gate, numbers = v.gate, ""
    if gate is not None and gate.numbers is not None:
        cand, cur = gate.numbers.candidate, gate.numbers.current
        numbers = (
            f"candidate MSE {_num(cand.mse)}, {cand.success.describe()}; "
            f"v{cur.version} MSE {_num(cur.mse)}, {cur.success.describe()}"
        )
    gate_text = "-" if gate is None else gate.state + (f": {gate.reason}" if gate.reason else "")
    success = m.get("eval_success_rate")
    episodes = m.get("eval_success_episodes")
    return VersionRow(
        version=label(v.version),
        current=v.version == snapshot.current,
        parent=label(v.parent),
        round="-" if v.round is None else str(v.round),
        aggregation=str(m.get("aggregation", "-")),
        created=ago(snapshot.taken_at - v.created_at),
        eval_mse=_num(m.get("eval_mse")),
        success="-" if not isinstance(success, float) else f"{success:.0%} of {episodes}",
        trained="-"
        if trained is None
        else f"{trained} trained, {m.get('clients_dropped', 0)} dropped, "
        f"{m.get('clients_skipped', 0)} skipped",
        gate=gate_text,
        gate_numbers=numbers,
        running=sorted(running),
    )


def _num(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-"


@dataclass(frozen=True)
class RoundRow:
    round: int
    mse: str
    success: str
    round_s: str
    aggregation_s: str
    dropped: list[str]
    skipped: list[str]


@dataclass(frozen=True)
class RunView:
    index: int
    started_at: str
    trigger: str
    aggregation: str
    rounds: list[RoundRow]
    mse_chart: Chart
    success_chart: Chart | None
    agents: list[str] = field(default_factory=list)


def run_views(snapshot: Snapshot) -> list[RunView]:
    return [_run_view(run) for run in reversed(snapshot.runs[-SHOWN_RUNS:])]


def _run_view(run: RunInfo) -> RunView:
    h = run.history
    rounds = [
        RoundRow(
            round=number,
            mse=_num(h.average[i]),
            success=_rate(h.success_average[i]),
            round_s=_num(h.round_s[i]),
            aggregation_s=_num(h.aggregation_s[i]),
            dropped=[f"{a}: {why}" for a, why in sorted(h.dropped[i].items())],
            skipped=[f"{a}: {why}" for a, why in sorted(h.skipped[i].items())],
        )
        for i, number in enumerate(h.rounds)
    ]
    mse_series = [Series(agent, _points(h.rounds, ys)) for agent, ys in sorted(h.clients.items())]
    mse_series.append(Series("average", _points(h.rounds, h.average), fleet=True))
    mse = Chart("Held-out action MSE by round", "MSE (normalized)", mse_series)
    success = None
    if h.measured_success:
        series = [Series(a, _rate_points(h.rounds, r)) for a, r in sorted(h.success.items())]
        series.append(Series("fleet (pooled)", _rate_points(h.rounds, h.success_average), True))
        success = Chart(
            "Closed-loop success by round (95 % Wilson interval)", "success", series, (0.0, 1.0)
        )
    return RunView(
        index=run.index,
        started_at=run.started_at,
        trigger=run.trigger,
        aggregation=h.aggregation,
        rounds=rounds,
        mse_chart=mse,
        success_chart=success,
        agents=sorted(h.clients),
    )


def _rate(rate: SuccessRate | None) -> str:
    return "-" if rate is None else rate.describe()


def _points(rounds: list[int], values: list[float | None]) -> list[tuple[float, ...]]:
    return [(r, y) for r, y in zip(rounds, values, strict=True) if y is not None]


def _rate_points(rounds: list[int], rates: list[SuccessRate | None]) -> list[tuple[float, ...]]:
    return [
        (r, rate.rate or 0.0, rate.low, rate.high)
        for r, rate in zip(rounds, rates, strict=True)
        if rate is not None and rate.episodes
    ]
