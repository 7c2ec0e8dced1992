"""The personalized mode inside a federated round: the round worker's half.

With ``personal-rank`` > 0 and a ``personal-dir`` on the node, the round's model is the base, the
shared adapter from the hub's message and this arm's local part (its current revision, or a fresh
one whose ``lora_B`` is zero, so that it starts as a no-op). Both train with the same optimizer
steps; the reply carries the shared adapter alone (``adapter_state``: PEFT's ``default`` adapter,
unchanged names and size); then the local part becomes a new revision in the arm's
``PersonalStore``. Evaluation runs with both. A node without a ``personal-dir`` trains and
evaluates the shared adapter alone, and says why once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from loguru import logger

from zk0.agent.personal import PersonalError, PersonalStore, shared_digest
from zk0.shared.adapter_wire import unpack_torch
from zk0.shared.federation import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FLEET_VERSION,
    NodeSettings,
    RunSettings,
)
from zk0.shared.lora import (
    ADAPTER_NAME,
    LoraSpec,
    adapter_state,
    add_personal_adapter,
    load_personal_state,
    personal_state,
)

#: (agent, reason) already logged: once per process, not once per round.
_told: set[tuple[str, str]] = set()


def personal_spec(run: RunSettings) -> LoraSpec:
    """The local part's LoRA: ``personal-rank``, alpha = 2 x rank (the shared r16/alpha32's
    scale alpha/r = 2, so a local rank-r update moves weights as much per unit as a shared one)."""
    rank = run.personal_rank
    return LoraSpec(rank=rank, alpha=2.0 * rank, dropout=run.lora_dropout)


@dataclass(frozen=True)
class PersonalRound:
    """The local part attached to this round's model, and where its next revision goes."""

    agent_id: str
    store: PersonalStore
    spec: LoraSpec
    parent: int | None
    shared_sha256: str
    fleet_version: int | None

    def commit(self, peft_model: Any, server_round: int, run_id: int | None = None) -> int | None:
        """Store the trained local part as a new revision (only if finite); its number."""
        try:
            revision, current = self.store.save(
                personal_state(peft_model),
                self.spec,
                parent=self.parent,
                shared_sha256=self.shared_sha256,
                server_round=server_round,
                fleet_version=self.fleet_version,
                run_id=run_id,
            )
        except PersonalError as error:  # a diverged local part is dropped, never stored
            logger.warning(
                "{}: local part of round {} not kept: {}", self.agent_id, server_round, error
            )
            return None
        if not current:
            logger.warning(
                "{}: local revision r{} kept but not made current: the current one changed "
                "during the round (a rollback?)",
                self.agent_id,
                revision,
            )
        else:
            logger.info(
                "{}: local revision r{} written (from {})",
                self.agent_id,
                revision,
                f"r{self.parent}" if self.parent is not None else "a fresh local part",
            )
        return revision


def _tell(agent_id: str, why: str) -> None:
    if (agent_id, why) not in _told:
        _told.add((agent_id, why))
        logger.info("{}: {}", agent_id, why)


def attach(
    peft_model: Any,
    run: RunSettings,
    node: NodeSettings,
    shared: Mapping[str, torch.Tensor],
    fleet_version: int | None = None,
) -> PersonalRound | None:
    """Add this arm's local part to ``peft_model`` (which holds the shared adapter ``shared``)
    and make both active; None where the run or the node has no local part."""
    if run.personal_rank == 0:
        return None
    if not node.personal_dir:
        _tell(node.agent_id, "personal-rank is set but this node has no personal-dir: "
              "training and evaluating the shared adapter alone")  # fmt: skip
        return None
    store = PersonalStore(Path(node.personal_dir), keep=node.personal_keep)
    spec = personal_spec(run)
    part, skipped = store.load_usable(spec.rank)
    for reason in skipped:
        logger.warning("{}: {}: not resumed from", node.agent_id, reason)
    # A fresh local part draws its lora_A from the run's seed: the same run starts the same.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        add_personal_adapter(peft_model, spec)
    if part is not None:
        device = next(peft_model.parameters()).device
        try:
            load_personal_state(peft_model, {k: v.to(device) for k, v in part.state.items()})
        except ValueError as error:  # verified, but for other projections or another base:
            # checked before anything loads, so the fresh part (B = 0) stays as it is
            logger.warning("{}: local revision r{}: {}", node.agent_id, part.revision, error)
            part = None
    if run.aggregation == "ffa":
        # FFA-LoRA freezes the shared A so that averaging B is exact; the local part is never
        # averaged, so both of its factors train.
        for name, parameter in peft_model.named_parameters():
            if f".lora_A.{ADAPTER_NAME}." in name:
                parameter.requires_grad_(False)
    parent = part.revision if part is not None else None
    logger.info(
        "{}: local part rank {} from {}",
        node.agent_id,
        spec.rank,
        f"r{parent}" if parent is not None else "scratch (no revision yet)",
    )
    return PersonalRound(node.agent_id, store, spec, parent, shared_digest(shared), fleet_version)


def attach_to_round(
    peft_model: Any, run: RunSettings, node: NodeSettings, message: Message
) -> PersonalRound | None:
    """``attach`` with the shared adapter (and fleet version, if sent) of the hub's message."""
    if run.personal_rank == 0:
        return None
    shared = unpack_torch(message.content.array_records[ARRAYS_KEY], adapter_state(peft_model))
    version = message.content[CONFIG_KEY].get(FLEET_VERSION)
    fleet_version = version if isinstance(version, int) and version >= 0 else None
    return attach(peft_model, run, node, shared, fleet_version)
