"""The hub daemon's side of the canary gate (``zk0.hub.gate``), run by the distribution loop.

It chooses each gated version's canaries, tells the distribution server what each agent is
offered and may fetch, and decides the gate from the canaries' reports: a promoted version
becomes the store's current one (announced to the fleet by the distribution server), a
rejected one is listed as withdrawn in every offer, so its canaries go back.
"""

from __future__ import annotations

import time

from loguru import logger

from zk0.hub.fleet import FleetTable
from zk0.hub.gate import GateBook, choose_canaries, decide
from zk0.shared.config import CanaryConfig
from zk0.shared.distribution.protocol import MAX_WITHDRAWN
from zk0.shared.gate_record import GateRecord
from zk0.shared.store import AdapterStore

#: How often the gate records are read again (they change once a round at most).
_REFRESH_S = 0.5


class GateKeeper:
    def __init__(self, store: AdapterStore, config: CanaryConfig, fleet: FleetTable) -> None:
        self.store, self.config, self.fleet = store, config, fleet
        self.book = GateBook(store.root)
        #: The gate now open (canaries assigned), and the versions rejected (newest last).
        self.open: GateRecord | None = None
        self.withdrawn: tuple[int, ...] = ()
        self._next_refresh = 0.0
        self._stamp: int | None = None

    def tick(self, now: float | None = None) -> bool:
        """Follow the records and decide an open gate; True if what agents are offered changed."""
        if time.monotonic() < self._next_refresh:
            return False
        self._next_refresh = time.monotonic() + _REFRESH_S
        try:  # records are replaced by rename: the folder's mtime moves with every change
            stamp = self.book.root.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if stamp == self._stamp and self.open is None:
            return False  # nothing new, nothing to decide
        self._stamp = stamp
        now = now or time.time()
        before = (self.open, self.withdrawn)
        records = self.book.records()  # read once a tick; again only after this tick wrote
        gate = self.book.open_gate(records)
        if gate is not None and not gate.canaries:
            known = [record.agent_id for record in self.fleet.records() if not record.revoked]
            gate = self.book.assign(gate.version, choose_canaries(self.config, known, gate.version))
            if gate is not None:
                logger.info("version {}: canaries {}", gate.version, ", ".join(gate.canaries))
        if gate is not None and gate.state == "open" and self._decide(gate, now):
            records = self.book.records()
            gate = None
        self._follow_promotions(records)
        self.open = gate if gate is not None and gate.state == "open" else None
        self.withdrawn = tuple(self.book.withdrawn(records)[-MAX_WITHDRAWN:])
        return (self.open, self.withdrawn) != before

    def canary_offer(self, agent_id: str | None) -> GateRecord | None:
        """The open gate if ``agent_id`` is one of its canaries (it is offered that version)."""
        gate = self.open
        return gate if gate is not None and agent_id in gate.canaries else None

    def may_fetch(self, agent_id: str | None, version: int) -> bool:
        """Non-canaries never fetch a version under gate; nobody fetches a withdrawn one."""
        if version in self.withdrawn:
            return False
        gate = self.open
        return gate is None or version != gate.version or agent_id in gate.canaries

    def _follow_promotions(self, records: list[GateRecord]) -> None:
        """Make the newest promoted version current (the distribution loop announces it); also
        after a crash between a decision and the switch."""
        promoted = [r.version for r in records if r.state == "promoted"]
        current = self.store.current()
        if promoted and (current is None or current.version < promoted[-1]):
            self.store.set_current(promoted[-1])

    def _decide(self, gate: GateRecord, now: float) -> bool:
        """Decide ``gate`` if its canaries' reports allow; True once it is decided."""
        evaluations = {
            record.agent_id: record.report.canary
            for record in self.fleet.records()
            if record.report.canary is not None and not record.revoked
        }
        decision = decide(self.config, gate, evaluations, now)
        if decision is None:
            return False
        record = self.book.close(gate.version, decision)
        log = logger.info if record.state == "promoted" else logger.warning
        log("version {} {} by its canary gate: {}", record.version, record.state, record.reason)
        return True
