"""What needs an operator's attention: pure rules over a ``Snapshot``.

Each rule reads the snapshot and the thresholds of ``dashboard:`` in hub.yaml and returns
items that say, in one line with their numbers, what is wrong and where. Nothing here reads a
file or a clock: the snapshot carries its own time, so tests give any fleet at any moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from zk0.hub.dashboard.snapshot import Snapshot
from zk0.shared.config import SO_ARM_JOINTS
from zk0.shared.dashboard_config import DashboardConfig

Kind = Literal["offline", "behind", "missed_rounds", "rejected_version", "drift"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: A joint the fleet never moved has no spread to compare with: its floor, in robot units.
_STD_FLOOR = 1e-3


@dataclass(frozen=True)
class Item:
    kind: Kind
    subject: str  # an agent id, or "v<N>" for a version
    detail: str


def attention(snapshot: Snapshot, config: DashboardConfig) -> list[Item]:
    """Every item, grouped by rule, each rule's items sorted by subject."""
    return [
        *_offline(snapshot, config),
        *_behind(snapshot, config),
        *_missed_rounds(snapshot, config),
        *_rejected(snapshot),
        *_drift(snapshot, config),
    ]


def _offline(snapshot: Snapshot, config: DashboardConfig) -> list[Item]:
    items = []
    for record in snapshot.agents:
        silent = snapshot.taken_at - record.last_seen
        if not record.revoked and silent > config.offline_s:
            detail = f"silent for {silent:.0f} s (more than {config.offline_s:g} s)"
            items.append(Item("offline", record.agent_id, detail))
    return items


def _behind(snapshot: Snapshot, config: DashboardConfig) -> list[Item]:
    current, since = snapshot.current, snapshot.current_since
    if current is None or since is None:
        return []
    waited = snapshot.taken_at - since
    if waited <= config.behind_s:
        return []
    return [
        Item(
            "behind",
            record.agent_id,
            f"applied {'nothing' if record.applied is None else f'v{record.applied}'} while "
            f"v{current} has been the fleet's version for {waited:.0f} s "
            f"(more than {config.behind_s:g} s)",
        )
        for record in snapshot.agents
        if not record.revoked and (record.applied is None or record.applied < current)
    ]


def _missed_rounds(snapshot: Snapshot, config: DashboardConfig) -> list[Item]:
    """Agents dropped or skipped in at least ``missed_rounds`` of the fleet's latest rounds
    (across runs, newest last; round 0, the starting adapter's evaluation, is no round)."""
    rounds = [
        (run.index, number, dropped | skipped)
        for run in snapshot.runs
        for number, dropped, skipped in zip(
            run.history.rounds, run.history.dropped, run.history.skipped, strict=True
        )
        if number > 0
    ][-config.recent_rounds :]
    missed: dict[str, list[str]] = {}
    for run, number, reasons in rounds:
        for agent, reason in reasons.items():
            missed.setdefault(agent, []).append(f"run {run} round {number}: {reason}")
    return [
        Item(
            "missed_rounds",
            agent,
            f"dropped or skipped in {len(lines)} of the last {len(rounds)} rounds; "
            + "; ".join(lines),
        )
        for agent, lines in sorted(missed.items())
        if len(lines) >= config.missed_rounds
    ]


def _rejected(snapshot: Snapshot) -> list[Item]:
    return [
        Item("rejected_version", f"v{v.version}", v.gate.reason or "rejected by its gate")
        for v in snapshot.versions
        if v.gate is not None and v.gate.state == "rejected"
    ]


def _drift(snapshot: Snapshot, config: DashboardConfig) -> list[Item]:
    """Agents whose recorded data lies far from the fleet's shared normalization: a
    recalibrated or rebuilt arm, or one recording a different task."""
    shared = snapshot.normalization
    if shared is None:
        return []
    items = []
    for record in snapshot.agents:
        stats = record.report.dataset
        if stats is None or record.revoked:
            continue
        findings = []
        for label, feature, mean in (
            ("state", "observation.state", stats.state_mean),
            ("action", "action", stats.action_mean),
        ):
            fleet = shared.get(feature)
            if fleet is None:
                continue
            if len(mean) != fleet.mean.shape[0]:
                joints = fleet.mean.shape[0]
                findings.append(f"{label} has {len(mean)} joints, the fleet's {joints}")
                continue
            std = np.maximum(np.sqrt(fleet.var), _STD_FLOOR)
            z = np.abs(np.asarray(mean) - fleet.mean) / std
            findings += [
                f"{label} {_joint(j, len(mean))} mean {mean[j]:.3g} is {z[j]:.1f} sd from the "
                f"fleet's {fleet.mean[j]:.3g}"
                for j in np.flatnonzero(z > config.drift_sigma)
            ]
        if findings:
            items.append(Item("drift", record.agent_id, "; ".join(findings)))
    return items


def _joint(index: int, joints: int) -> str:
    return SO_ARM_JOINTS[index] if joints == len(SO_ARM_JOINTS) else f"joint {index}"
