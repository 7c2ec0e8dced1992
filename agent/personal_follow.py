"""The personalized mode in the agent daemon: run the arm's local part, follow it, roll it back.

The daemon's policy runs (fleet version, local revision): the fleet version as the adapter
subscriber hands it over, the local revision as this arm's round worker writes it
(``zk0.agent.personal``). The round worker is another process, so the daemon polls the store's
``current.json`` from its main loop (a ``stat`` per turn) and hot-swaps a new revision in the same
verify-then-switch way as a fleet version. An arm without a revision (inference-only, newly
enrolled, or a run without a local part) runs the fleet version alone.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from zk0.agent.inference.swap import AdapterSlot
from zk0.agent.personal import PersonalError, PersonalStore
from zk0.shared import agent_control as ac
from zk0.shared.control import RefusedError

#: ``<data_root>/personal``: where the daemon's SuperNode keeps this arm's local part.
PERSONAL_DIR = "personal"


def _fleet(version: int | None) -> str:
    return "the base policy" if version is None else f"v{version}"


class PersonalFollower:
    """Keeps the slot's local part at the store's current revision."""

    def __init__(self, root: Path, slot: AdapterSlot) -> None:
        self.store, self.slot = PersonalStore(root), slot
        self._stamp: tuple[int, int] | None = None

    def start(self) -> None:
        """Run the current revision now (a bad one is refused: the newest older one that
        verifies runs instead, as the next round resumes from it)."""
        self._stamp = self.store.stamp()
        part, skipped = self.store.load_usable()
        for reason in skipped:
            logger.error("{}: not run", reason)
        if part is not None:
            self.slot.use_personal(part)

    def check(self) -> None:
        """Offer the current revision to the slot if the pointer moved (one ``stat`` if not)."""
        stamp = self.store.stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        revision = self.store.current_or_none()
        if revision is not None and revision != self.slot.personal_revision:
            logger.info("local revision r{} is current: loading it", revision)
            self.slot.offer_personal(revision, lambda: self.store.load(revision))

    def rollback(self) -> ac.RolledBack:
        """``zk0-agent rollback``: the fleet version that ran before (in memory, as before) and
        the local revision before the current one (the pointer moves, so the next round resumes
        from it too); refused only if neither has anything earlier."""
        before = self.slot.active
        fleet_error = local_error = None
        try:
            self.slot.rollback()
        except ValueError as error:
            fleet_error = str(error).removeprefix("nothing to roll back to: ")
        try:
            self.slot.use_personal(self.store.rollback())  # verified; merging checks the fit
        except PersonalError as error:
            local_error = str(error)
        except ValueError as error:
            local_error = f"the earlier local revision does not fit: {error}"
        self._stamp = self.store.stamp()
        if fleet_error is not None and local_error is not None:
            raise RefusedError(f"nothing to roll back to: {fleet_error}; {local_error}")
        after = self.slot.active
        line = f"now running {_fleet(after.version)}"
        line += f" (was {_fleet(before.version)})" if fleet_error is None else " (no earlier one)"
        if after.personal_revision is None:
            line += ", no local part"
        else:
            line += f" with local r{after.personal_revision}"
            if local_error is None and before.personal_revision is not None:
                line += f" (was r{before.personal_revision})"
            elif local_error is not None:
                line += " (no earlier one)"
        logger.info("rollback: {}", line)
        return ac.RolledBack(
            in_use=after.version, personal_revision=after.personal_revision, summary=line
        )
