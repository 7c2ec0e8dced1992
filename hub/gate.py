"""Eval-gated canary rollout: a new version reaches the fleet only after canaries vouch for it.

Neither Flower, LeRobot nor the ZeroMQ guide's clone pattern has one; this module is the whole
of it on the hub: the gate records (a file per version, beside the store, never inside the
artifact whose id covers its bytes), the choice of canaries and the pure decision::

    ServerApp, round r                 hub daemon (DistributionServer loop)       canaries
    ------------------                 ------------------------------------       --------
    Publisher stores v, opens  -------> GateKeeper.tick: canaries chosen, kept
    gates/v.json; current stays p       latest to a canary: v, gate_baseline p ---> fetch v;
                                                                                    evaluate v
                                        <--- status.report.canary (v and p) -------- and p
                                        decide(): promote -> set_current(v), announced
                                                  reject  -> offers list v withdrawn --> back to p
    round r+1 waits for the decision (wait_for_decision) and starts from the newest promoted

Non-canaries never hear of a version under gate: the broadcast announce names the current
(promoted) version, and the hub refuses them its manifest and chunks. ``canary:`` in hub.yaml
(``zk0.shared.config.CanaryConfig``) configures it; without canaries nothing here runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from loguru import logger
from pydantic import ValidationError

from zk0.shared.agent_status import CanaryEvaluation, VersionScore
from zk0.shared.config import CanaryConfig
from zk0.shared.fsutil import atomic_write_bytes, file_lock
from zk0.shared.gate_record import GateNumbers, GateRecord, PooledScore
from zk0.shared.success import SuccessRate
from zk0.shared.validation import WireModel

GATES_DIR = "gates"
#: How often a waiting ServerApp looks for the decision.
_POLL_S = 0.5


class GateBook:
    """The gate records of one adapter store; every change atomic, under the book's own lock.

    Written by two processes (the ServerApp opens, the hub daemon decides; the ServerApp closes
    a gate nobody decided after its timeout), so a decision is made once: the first writer wins.
    """

    def __init__(self, store_root: Path) -> None:
        self.root = Path(store_root) / GATES_DIR
        self._lock = Path(store_root) / ".gates.lock"

    def path(self, version: int) -> Path:
        return self.root / f"v{version}.json"

    def get(self, version: int) -> GateRecord | None:
        try:
            return GateRecord.model_validate_json(self.path(version).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as error:  # unreadable: treated as rejected, loudly
            logger.error("gate record of version {} unreadable: {}", version, error)
            return GateRecord(version=version, baseline=-1, opened_at=0.0, state="rejected",
                              reason="gate record unreadable")  # fmt: skip

    def records(self) -> list[GateRecord]:
        found = []
        for path in sorted(self.root.glob("v*.json")):
            if path.stem[1:].isdigit() and (record := self.get(int(path.stem[1:]))) is not None:
                found.append(record)
        return sorted(found, key=lambda record: record.version)

    def open_gate(self, records: list[GateRecord] | None = None) -> GateRecord | None:
        """The gate still open, if any (opening one closes any other); from ``records`` when
        the caller has just read them."""
        pending = [r for r in (self.records() if records is None else records) if r.state == "open"]
        return pending[-1] if pending else None

    def withdrawn(self, records: list[GateRecord] | None = None) -> list[int]:
        """Rejected versions, newest last; from ``records`` when the caller has just read them."""
        found = self.records() if records is None else records
        return [record.version for record in found if record.state == "rejected"]

    def open(self, version: int, baseline: int, now: float | None = None) -> GateRecord:
        """Put ``version`` under gate; a gate still open (its run died) is superseded by it."""
        now = now or time.time()
        record = GateRecord(version=version, baseline=baseline, opened_at=now)
        with file_lock(self._lock):
            superseded = {
                "state": "rejected",
                "decided_at": now,
                "reason": f"superseded by version {version} before a decision",
            }
            for stale in (r for r in self.records() if r.state == "open"):
                self._write(stale.model_copy(update=superseded))
            self._write(record)
        logger.info("version {} is under gate (the fleet stays on version {})", version, baseline)
        return record

    def assign(self, version: int, canaries: Iterable[str]) -> GateRecord | None:
        """Record the canaries of an open gate (once); the record as it now stands."""
        with file_lock(self._lock):
            record = self.get(version)
            if record is None or record.state != "open" or record.canaries:
                return record
            record = record.model_copy(update={"canaries": tuple(sorted(canaries))})
            self._write(record)
        return record

    def close(self, version: int, decision: Decision, now: float | None = None) -> GateRecord:
        """Decide an open gate; a gate already decided keeps its first decision."""
        with file_lock(self._lock):
            record = self.get(version)
            if record is None:
                raise FileNotFoundError(f"no gate for version {version}")
            if record.state != "open":
                return record
            record = record.model_copy(
                update={
                    "state": decision.state,
                    "reason": decision.reason,
                    "numbers": decision.numbers,
                    "decided_at": now or time.time(),
                }
            )
            self._write(record)
        return record

    def _write(self, record: GateRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record.model_dump(mode="json"), indent=1) + "\n"
        atomic_write_bytes(self.path(record.version), text.encode())


class Decision(WireModel):
    state: Literal["promoted", "rejected"]
    reason: str
    numbers: GateNumbers | None = None


def choose_canaries(config: CanaryConfig, fleet: Iterable[str], version: int) -> set[str]:
    """``config.agents`` plus ``fraction`` of the other known agents, rounded up, drawn per
    version (by a hash, so every hub draws the same and the risk rotates over the fleet)."""
    chosen = set(config.agents)
    others = sorted(set(fleet) - chosen)
    count = math.ceil(config.fraction * (len(others) + len(chosen))) - len(chosen)
    ranked = sorted(others, key=lambda a: hashlib.sha256(f"{version}:{a}".encode()).digest())
    return chosen | set(ranked[: max(0, count)])


def pool(version: int, scores: Iterable[VersionScore]) -> PooledScore:
    scores = list(scores)
    frames = sum(score.mse_frames for score in scores if score.mse is not None)
    weighted = sum(score.mse * score.mse_frames for score in scores if score.mse is not None)
    return PooledScore(
        version=version,
        mse=weighted / frames if frames else None,
        mse_frames=frames,
        success=SuccessRate.of(
            sum(score.successes for score in scores), sum(score.episodes for score in scores)
        ),
    )


def decide(
    config: CanaryConfig,
    gate: GateRecord,
    evaluations: Mapping[str, CanaryEvaluation],
    now: float,
) -> Decision | None:
    """Promote or reject ``gate``'s version from the canaries' evaluations; None: wait.

    Waits until every canary has a complete evaluation of this candidate against this
    baseline, or until ``timeout_s``. Rejects when fewer than ``min_episodes`` closed-loop
    episodes per canary arrived; when the candidate's success (pooled over canaries, each on
    its paired episodes) is worse beyond doubt: the upper end of its 95 % Wilson interval lies
    more than ``margin_pp`` points below the current version's rate; or when its held-out MSE
    (frame-weighted) exceeds the current's by more than ``mse_margin`` (relative). Otherwise
    promotes.
    """
    relevant = {
        agent: evaluation
        for agent, evaluation in evaluations.items()
        if agent in gate.canaries
        and evaluation.complete
        and evaluation.candidate.version == gate.version
        and evaluation.current.version == gate.baseline
    }
    timed_out = now - gate.opened_at >= config.timeout_s
    if len(relevant) < len(gate.canaries) and not timed_out:
        return None
    numbers = GateNumbers(
        candidate=pool(gate.version, (e.candidate for e in relevant.values())),
        current=pool(gate.baseline, (e.current for e in relevant.values())),
        agents=dict(sorted(relevant.items())),
    )
    new, old = numbers.candidate, numbers.current
    missing = sorted(set(gate.canaries) - set(relevant))
    needed = config.min_episodes * len(gate.canaries)
    if not gate.canaries:
        return Decision(state="rejected", reason="no canary was available", numbers=numbers)
    if new.success.episodes < needed or (config.min_episodes == 0 and new.mse is None):
        waited = f" (no report from {', '.join(missing)})" if missing else ""
        return Decision(
            state="rejected",
            reason=f"{new.success.episodes} of {needed} closed-loop episodes and "
            f"{new.mse_frames} MSE frames arrived in {config.timeout_s:.0f} s{waited}",
            numbers=numbers,
        )
    if new.success.rate is not None and old.success.rate is not None:
        # Worse beyond doubt: even the candidate's 95 % upper bound lies more than the margin
        # below the current version's rate. A few episodes alone then cannot reject a version
        # by chance (0/2 against 1/2 is no evidence); held-out MSE still can.
        shortfall_pp = 100 * (old.success.rate - new.success.high)
        if shortfall_pp > config.margin_pp:
            return Decision(
                state="rejected",
                reason=f"success {_rate(new.success)} vs {_rate(old.success)} on the current "
                f"version: worse by {100 * (old.success.rate - new.success.rate):.1f} points, "
                f"{shortfall_pp:.1f} beyond its 95 % interval (margin {config.margin_pp:g})",
                numbers=numbers,
            )
    if new.mse is not None and old.mse is not None and new.mse > old.mse * (1 + config.mse_margin):
        return Decision(
            state="rejected",
            reason=f"held-out MSE {new.mse:.4g} vs {old.mse:.4g} on the current version: "
            f"{new.mse / old.mse - 1:+.1%} (margin {config.mse_margin:.0%})",
            numbers=numbers,
        )
    mse = f", MSE {new.mse:.4g} vs {old.mse:.4g}" if new.mse is not None and old.mse else ""
    return Decision(
        state="promoted",
        reason=f"success {_rate(new.success)} vs {_rate(old.success)}{mse}"
        f" on {len(relevant)} canaries",
        numbers=numbers,
    )


def _rate(success: SuccessRate) -> str:
    if success.rate is None:
        return "n/a (0 episodes)"
    return (
        f"{success.successes}/{success.episodes} = {success.rate:.0%} "
        f"[{success.low:.0%}, {success.high:.0%}]"
    )


def wait_for_decision(
    book: GateBook, version: int, timeout_s: float, grace_s: float = 60.0
) -> GateRecord:
    """Block until ``version``'s gate is decided (the ServerApp, before its next round).

    The hub daemon decides; should none (the daemon is down, or the run was started by hand
    without one), the gate is closed here as rejected after its timeout plus ``grace_s``, so a
    run never waits forever and a version nobody vouched for never reaches the fleet.
    """
    deadline = time.monotonic() + timeout_s + grace_s
    while (record := book.get(version)) is not None and record.state == "open":
        if time.monotonic() > deadline:
            return book.close(
                version,
                Decision(state="rejected", reason=f"no decision within {timeout_s:.0f} s"),
            )
        time.sleep(_POLL_S)
    if record is None:
        raise FileNotFoundError(f"no gate for version {version}")
    return record
