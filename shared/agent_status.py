"""What an agent says about itself: to its own CLI (the control socket's ``status``) and to the
hub (the distribution protocol's ``status``). One model, so both see the same numbers.

Every number is bounded here, at the edge: the hub schedules runs on ``episodes_new`` and will
weigh and show the totals, so an agent (buggy or hostile) cannot make it store absurd ones.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from zk0.shared.validation import WireModel

#: What an agent does: one of the daemon's states (``zk0.agent.arbiter.AgentState``: idle,
#: recording, running_policy, training), checked as a word so that a newer agent may add one.
Word = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
#: Ample for any arm: a billion episodes, ten years of recording at 240 fps.
MAX_EPISODES = 10**9
MAX_FRAMES = 10**11
MAX_SECONDS = 10**9
Reason = Annotated[str, Field(max_length=300)]
Phase = Literal["train", "evaluate"]
Outcome = Literal["trained", "evaluated", "skipped", "dropped"]


class RoundOutcome(WireModel):
    """How this agent's part in the last federated round it was asked into ended.

    ``trained``/``evaluated``: it replied. ``skipped``: the arm stayed busy for the agent's
    ``train_wait_s`` and the round went on without it. ``dropped``: its round task failed, or
    its worker died while it held the compute (``reason`` says how).
    """

    round: Annotated[int, Field(ge=0, le=10**9)]
    phase: Phase
    outcome: Outcome
    reason: Reason | None = None
    at: Annotated[float, Field(ge=0, allow_inf_nan=False)]


def skip_message(agent_id: str, why: str, server_round: int) -> str:
    """What an agent raises when it declines a round because its arm kept the compute busy
    (``zk0.agent.round_tasks``); the hub finds it in the error reply with :func:`skip_of` and
    counts the agent skipped, not dropped."""
    return f"{agent_id}: {why}; skipping round {server_round}"


# Anywhere in the reason: Flower wraps the ClientApp's exception ("<class '...'>:<'...'>"), the
# round worker prefixes its own ("round worker (train): RuntimeError: ...").
_SKIP = re.compile(r"(?<![\w.-])([a-z0-9][a-z0-9_-]{0,62}): (.+); skipping round \d+")


def skip_of(reason: str | None) -> tuple[str, str] | None:
    """(agent id, why) where an error reply's ``reason`` holds a :func:`skip_message`, else
    None (an error of any other kind, or none: the hub counts that agent dropped)."""
    match = _SKIP.search(reason or "")
    return (match[1], match[2]) if match else None


class VersionScore(WireModel):
    """How one version did on a canary: held-out MSE on the arm's own episodes and
    closed-loop success (simulated arms; operator labels on real arms), with what they rest on."""

    version: Annotated[int, Field(ge=0, le=2**53)]
    mse: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] | None = None
    mse_frames: Annotated[int, Field(ge=0, le=MAX_FRAMES)] = 0
    successes: Annotated[int, Field(ge=0, le=MAX_EPISODES)] = 0
    episodes: Annotated[int, Field(ge=0, le=MAX_EPISODES)] = 0

    @model_validator(mode="after")
    def _successes_within_episodes(self) -> Self:
        if self.successes > self.episodes:
            raise ValueError(f"successes {self.successes} exceed episodes {self.episodes}")
        return self


class CanaryEvaluation(WireModel):
    """A canary's verdict material on a version under gate: the candidate and the version the
    fleet runs, measured on the same episodes (paired scenes where the arm is simulated)."""

    candidate: VersionScore
    current: VersionScore
    #: False while the canary is still evaluating (partial numbers may be reported).
    complete: bool = False


#: Per-joint statistics, bounded far beyond any arm's units (degrees, millimetres, percent).
#: Strict floats, but a list is taken as well as a tuple (a wire map holds arrays; the hub's
#: ``agents.json`` is read back from JSON).
Mean = Annotated[float, Field(strict=True, ge=-1e6, le=1e6, allow_inf_nan=False)]
Variance = Annotated[float, Field(strict=True, ge=0, le=1e12, allow_inf_nan=False)]
MAX_JOINTS = 64
#: A status carries ``AgentReport.dataset`` at most this often (the hub keeps the last).
DATASET_STATS_EVERY_S = 60.0
Means = Annotated[tuple[Mean, ...], Field(min_length=1, max_length=MAX_JOINTS, strict=False)]
Variances = Annotated[
    tuple[Variance, ...], Field(min_length=1, max_length=MAX_JOINTS, strict=False)
]


class DatasetStats(WireModel):
    """The per-joint mean and variance of the arm's state and action over its whole dataset
    (LeRobot's own aggregated ``meta/stats.json``), so the hub can flag an arm whose data drifted
    from the normalization the fleet shares. A few hundred numbers, never frames."""

    #: The frames the statistics rest on.
    frames: Annotated[int, Field(ge=0, le=MAX_FRAMES)]
    state_mean: Means
    state_var: Variances
    action_mean: Means
    action_var: Variances

    @model_validator(mode="after")
    def _one_value_per_joint(self) -> Self:
        for name in ("state", "action"):
            means, variances = getattr(self, f"{name}_mean"), getattr(self, f"{name}_var")
            if len(means) != len(variances):
                raise ValueError(
                    f"{name}_mean has {len(means)} joints but {name}_var has {len(variances)}"
                )
        return self


class AgentReport(WireModel):
    """The agent's activity and its dataset, as it reports them."""

    state: Word = "idle"
    #: Episodes recorded since this agent last trained in a round (what the hub schedules on).
    episodes_new: Annotated[int, Field(ge=0, le=MAX_EPISODES)] = 0
    episodes_total: Annotated[int, Field(ge=0, le=MAX_EPISODES)] = 0
    frames_total: Annotated[int, Field(ge=0, le=MAX_FRAMES)] = 0
    recorded_s: Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)] = 0.0
    #: The arm's job in progress (``record``, ``run_task``), if any.
    job: Word | None = None
    last_round: RoundOutcome | None = None
    #: Personalized mode: the local revision the policy runs beside the fleet version (None:
    #: none, the fleet version alone). Agents older than this field send nothing: None.
    personal_revision: Annotated[int, Field(ge=1, le=2**53)] | None = None
    #: Canary rollout: this arm's evaluation of the version under gate (None: none done).
    canary: CanaryEvaluation | None = None
    #: The dataset's per-joint statistics: what the hub compares with the fleet's shared
    #: normalization. On one status a minute (``DATASET_STATS_EVERY_S``; None in between: the
    #: hub keeps the last it received); None too before the first episode.
    dataset: DatasetStats | None = None
