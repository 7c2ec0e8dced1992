"""The canary gate's record of one version (``zk0.hub.gate``): the file
``<store>/gates/v<version>.json`` that the ServerApp opens and the hub daemon decides, and what
``zk0-hub status`` shows of it. Kept beside the version, never inside the artifact.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from zk0.shared.agent_status import CanaryEvaluation
from zk0.shared.success import SuccessRate
from zk0.shared.validation import WireModel

GateState = Literal["open", "promoted", "rejected"]


class PooledScore(WireModel):
    """One version's numbers over the canaries: frame-weighted MSE and pooled success."""

    version: int
    mse: float | None
    mse_frames: int
    success: SuccessRate


class GateNumbers(WireModel):
    candidate: PooledScore
    current: PooledScore
    agents: dict[str, CanaryEvaluation]


class GateRecord(WireModel):
    """``<store>/gates/v<version>.json``: one version's gate, from opening to decision."""

    version: int
    baseline: Annotated[int, Field(description="The promoted version it is compared with.")]
    opened_at: float
    state: GateState = "open"
    canaries: tuple[str, ...] = ()
    decided_at: float | None = None
    reason: str | None = None
    numbers: GateNumbers | None = None
