"""``zk0 demo --inject-bad-version``: a deliberately broken version through the canary gate.

After the federated run, the demo does what a faulty round (or a hostile insider) would: it
stores a version whose LoRA B factors are the current version's times -1 and puts it under the
gate, exactly as the ServerApp's Publisher does with a round's version. Then it watches every
agent until the hub has decided: the broken version must be rejected on the canary's numbers,
applied by no other agent, and the canary must be back on the current version soon after.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from zk0.hub.demo_fleet import Demo
from zk0.hub.gate import GateBook
from zk0.shared import agent_control as ac
from zk0.shared.artifact import load_arrays, save_adapter_arrays
from zk0.shared.gate_record import GateRecord
from zk0.shared.normalization import NORMALIZATION_FILE
from zk0.shared.store import AdapterStore

#: How long the demo waits for the canary to evaluate and the hub to decide.
DECISION_TIMEOUT_S = 900.0


class InjectedVersion(BaseModel):
    """What became of the broken version (``demo_results.json``)."""

    gate: GateRecord
    #: Agents other than the canaries that ever applied it (none, if the gate holds).
    applied_by_others: list[str]
    #: Seconds from the decision until every canary ran the current version again.
    back_after_s: float | None


def store_negated(store: AdapterStore, version: int) -> int:
    """A new version: ``version``'s adapter with every LoRA B factor times -1."""
    source = store.path(version)
    tensors = {
        name: -value if ".lora_B." in name else value for name, value in load_arrays(source).items()
    }
    with store.allocate() as (bad, path):
        save_adapter_arrays(
            source,
            path,
            tensors,
            version=bad,
            parent_version=version,
            metrics={"injected": f"B x -1 of version {version}"},
            extra_files={NORMALIZATION_FILE: (source / NORMALIZATION_FILE).read_bytes()},
        )
    return bad


def inject_bad_version(demo: Demo) -> InjectedVersion:
    assert demo.hub_config is not None
    store = AdapterStore(demo.hub_config.store_root)
    pointer = store.current()
    assert pointer is not None, "the demo injects after a run has published a version"
    current = pointer.version
    bad = store_negated(store, current)
    book = GateBook(store.root)
    book.open(bad, baseline=current)
    canaries = set(demo.options.canary.agents)
    others: set[str] = set()
    back_at: list[float] = []

    def decided_and_settled() -> bool:
        statuses = {agent.name: agent.answer(ac.Status()) for agent in demo.agents}
        others.update(
            name
            for name, status in statuses.items()
            if status is not None and name not in canaries and status.applied == bad
        )
        record = book.get(bad)
        if record is None or record.state == "open":
            return False
        if record.state == "promoted":  # the gate let it through: shown as such, not waited on
            return True
        back = [statuses[name] for name in canaries]  # stored and running it again
        if all(s is not None and s.applied == s.in_use == current for s in back):
            back_at.append(time.time())
            return True
        return False

    demo.wait(decided_and_settled, f"the gate's decision on version {bad}", DECISION_TIMEOUT_S)
    record = book.get(bad)
    assert record is not None and record.decided_at is not None
    return InjectedVersion(
        gate=record,
        applied_by_others=sorted(others),
        back_after_s=back_at[0] - record.decided_at if back_at else None,
    )


def describe(injected: InjectedVersion) -> list[str]:
    """Lines for the demo's console: the decision, its numbers, where the version went."""
    gate = injected.gate
    lines = [
        f"injected version {gate.version} (B x -1 of version {gate.baseline}): "
        f"{gate.state} by the canary gate: {gate.reason}"
    ]
    if gate.numbers is not None:
        for agent, evaluation in gate.numbers.agents.items():
            new, old = evaluation.candidate, evaluation.current
            lines.append(
                f"  canary {agent}: v{new.version} MSE {new.mse or float('nan'):.4f}, success "
                f"{new.successes}/{new.episodes}; v{old.version} MSE "
                f"{old.mse or float('nan'):.4f}, success {old.successes}/{old.episodes}"
            )
    others = injected.applied_by_others
    line = f"  applied by {len(others)} non-canary agents" + (
        f" ({', '.join(others)})" if others else ""
    )
    if (back := injected.back_after_s) is not None:
        line += f"; canaries back on v{gate.baseline} {back:.1f} s after the decision"
    lines.append(line)
    return lines
