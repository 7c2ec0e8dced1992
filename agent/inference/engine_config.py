"""How the inference engine runs a policy on the arm (``zk0-agent eval`` options feed it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from zk0.agent.inference.action_queue import AggregateName
from zk0.agent.inference.metrics import Mode


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Field(
        default="async",
        description="async: the next chunk is computed while the arm moves; sync: the arm waits.",
    )
    aggregate: AggregateName = Field(
        default="weighted_average",
        description="How overlapping chunk actions merge (LeRobot's aggregate functions).",
    )
    threshold: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="async: ask for the next chunk once the queue holds at most this fraction "
        "of a chunk.",
    )
    actions_per_chunk: int | None = Field(
        default=None, gt=0, description="Actions used from each chunk (default: n_action_steps)."
    )
    seed: int = Field(default=0, description="Seed of the flow-matching noise.")
    denoising_steps: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Flow-matching steps per chunk (default: the policy's num_steps, 10). Fewer "
        "cut a chunk's latency by one expert step each (0.17 s full size on a CPU core), at a "
        "cost in success: see bench/results/inference_arch.json.",
    )
