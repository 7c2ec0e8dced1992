"""What the engine measures, on one monotonic clock: chunks, ticks, queue depth, starvation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["async", "sync"]


@dataclass(frozen=True)
class ChunkRecord:
    episode: int
    index: int
    obs_step: int
    observed_at: float
    ready_at: float
    compute_s: float
    backend: str
    version: int | None
    must_go: bool
    depth_at_request: int
    stale: int
    merged: int
    appended: int

    @property
    def latency_s(self) -> float:
        """Observation captured -> chunk merged into the queue."""
        return self.ready_at - self.observed_at


@dataclass
class EpisodeResult:
    index: int
    mode: Mode
    period_s: float
    started_at: float
    success: bool | None = None
    ticks: int = 0
    actions: int = 0
    duration_s: float = 0.0
    first_chunk_s: float | None = None
    starved_ticks: int = 0
    missed_ticks: int = 0
    #: When (s since start) the loop found itself more than a period late, and by how many ticks.
    missed_at: list[tuple[float, int]] = field(default_factory=list)
    max_late_s: float = 0.0
    chunks: list[ChunkRecord] = field(default_factory=list)
    #: Per tick: time (s since start), queue depth before the pop, starved (after first chunk).
    trace_t: list[float] = field(default_factory=list)
    trace_depth: list[int] = field(default_factory=list)
    trace_starved: list[bool] = field(default_factory=list)

    @property
    def ticks_after_first_chunk(self) -> int:
        if self.first_chunk_s is None:
            return 0
        return sum(1 for t in self.trace_t if t >= self.first_chunk_s)

    @property
    def starved_fraction(self) -> float:
        return self.starved_ticks / max(1, self.ticks_after_first_chunk)

    @property
    def idle_s(self) -> float:
        """Time the arm stood still waiting for the model, the first chunk's wait excluded."""
        return self.starved_ticks * self.period_s

    def starved_between(self, start: float, end: float) -> int:
        """Starved ticks in ``[start, end]`` (monotonic clock), e.g. during a hot swap."""
        return sum(
            1
            for t, starved in zip(self.trace_t, self.trace_starved, strict=True)
            if starved and start <= self.started_at + t <= end
        )

    def missed_between(self, start: float, end: float) -> int:
        """Ticks the loop missed in ``[start, end]`` (monotonic clock)."""
        return sum(n for t, n in self.missed_at if start <= self.started_at + t <= end)

    def summary(self) -> dict[str, Any]:
        latencies = [c.latency_s for c in self.chunks]
        return {
            "index": self.index,
            "mode": self.mode,
            "success": self.success,
            "ticks": self.ticks,
            "actions": self.actions,
            "duration_s": self.duration_s,
            "first_chunk_s": self.first_chunk_s,
            "starved_ticks": self.starved_ticks,
            "starved_fraction": self.starved_fraction,
            "idle_s": self.idle_s,
            "missed_ticks": self.missed_ticks,
            "max_late_s": self.max_late_s,
            "chunks": len(self.chunks),
            "chunk_latency_s": latencies,
            "backends": sorted({c.backend for c in self.chunks}),
            "versions": [c.version for c in self.chunks],
        }
