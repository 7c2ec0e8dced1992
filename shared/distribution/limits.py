"""How much adapter distribution may ask for, hold and queue: one model for hub and agent.

``AgentConfig.distribution_limits`` and ``HubConfig.distribution_limits`` both hold a
``DistributionLimits``; each side uses the fields named for it. Without them a hub (or anyone
holding its key) could declare a 4 TiB file and have an agent plan millions of chunk requests,
and an admitted agent that sends requests but never reads the replies could make the hub
buffer hundreds of MB.

ZeroMQ's high-water marks count messages, not bytes; a reply is at most
``MAX_CHUNK_BYTES`` + 64 KiB (``protocol.MAX_REPLY_BYTES``), so the hub holds at most
``max_queued_replies`` x 1.06 MiB for one connection (6 MiB at the default 256 KiB chunks).

This module imports nothing from zk0: ``zk0.shared.config`` imports it.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1024 * 1024


class DistributionLimits(BaseModel):
    """Bounds on the distribution path; each field says which side enforces it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_artifact_bytes: int = Field(
        default=64 * MIB,
        gt=0,
        le=2**40,
        description=(
            "Agent: the most bytes a version may declare (manifest plus files); a manifest "
            "over it is refused before any chunk is requested. The full-size SmolVLA LoRA "
            "adapter is about 5.2 MB."
        ),
    )
    max_files: int = Field(
        default=16,
        gt=0,
        le=1024,
        description="Agent: the most files a version may list (a SmolVLA adapter has 3).",
    )
    max_chunks_in_flight: int = Field(
        default=16,
        gt=0,
        le=256,
        description=(
            "Agent: the ceiling on the credit, the chunk requests one download keeps in "
            "flight (the agent's default credit is 8)."
        ),
    )
    max_queued_replies: int = Field(
        default=24,
        gt=0,
        le=1000,
        description=(
            "Hub: replies queued for one connection (ROUTER ZMQ_SNDHWM); when they are not "
            "read, that agent's requests are dropped, not buffered."
        ),
    )
    max_queued_requests: int = Field(
        default=64,
        gt=0,
        le=1000,
        description=(
            "Hub: requests queued from one connection (ROUTER ZMQ_RCVHWM); beyond it libzmq "
            "stops reading that peer, so a flood waits at the sender."
        ),
    )

    max_downloads: int = Field(
        default=64,
        gt=0,
        le=100_000,
        description=(
            "Hub: downloads it serves at once; an agent asking for a manifest beyond them is "
            "told to ask again a little later (busy), so that the requests queued at the hub, "
            "and the time each waits, do not grow with the fleet."
        ),
    )

    @model_validator(mode="after")
    def _room_for_a_full_credit(self) -> Self:
        # An agent at the credit ceiling plus its status replies must fit in the hub's queue,
        # or it would be taken for a peer that does not read.
        if self.max_queued_replies <= self.max_chunks_in_flight:
            raise ValueError(
                f"max_queued_replies ({self.max_queued_replies}) must exceed "
                f"max_chunks_in_flight ({self.max_chunks_in_flight})"
            )
        return self
