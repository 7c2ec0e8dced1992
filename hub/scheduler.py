"""When to start a federated run: a pure decision, so that every rule is testable offline.

The hub daemon calls :func:`decide` on every loop turn with what it knows (the fleet as the
distribution server sees it, whether a run is active, when the last one started and ended)
and starts a run when it gets a :class:`RunPlan`. Rules (``runs:`` in hub.yaml):

* never while a run is active;
* a manual request (``zk0-hub start-run``) starts one at once, whatever the trigger, skipping
  only the cooldown: the operator asked for it now;
* otherwise never within ``cooldown_s`` of the last run's end, and then by trigger:

  - ``episodes``: at least ``min_agents`` online agents each report at least
    ``min_new_episodes`` episodes recorded since their last round;
  - ``schedule``: ``every_s`` after the last run started (or the hub started, so that a hub
    restarting in a loop does not start a run each time), with ``min_agents`` online;
  - ``manual``: only on request.

A run asks Flower for ``min_agents`` nodes (``min-nodes``): every connected SuperNode trains,
the plan's ``agents`` only say which agents made the trigger fire. Its other settings are the
run config's (``zk0.hub.runs.run_settings``); a manual request may override its rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zk0.shared.config import RunsConfig


@dataclass(frozen=True)
class AgentView:
    """What the scheduler needs of one agent."""

    agent_id: str
    online: bool
    episodes: int  # recorded since that agent's last round


@dataclass(frozen=True)
class ManualRequest:
    """An operator's ``start_run``; ``rounds`` overrides the run config's for that run."""

    rounds: int | None = None


@dataclass(frozen=True)
class RunPlan:
    trigger: str  # "episodes", "schedule" or "manual"
    agents: tuple[str, ...]  # the online agents that made it fire (all online ones if manual)
    reason: str  # one line for the log and the status
    rounds: int | None = None  # a manual request's rounds; None: the run config's


@dataclass(frozen=True)
class Idle:
    """No run now, and why (shown by ``zk0-hub status``)."""

    reason: str


def decide(
    runs: RunsConfig,
    agents: Sequence[AgentView],
    *,
    run_active: bool,
    last_started: float,
    last_ended: float | None,
    now: float,
    request: ManualRequest | None = None,
) -> RunPlan | Idle:
    """Start a run now (a :class:`RunPlan`) or not (:class:`Idle`, with the reason).

    ``last_started`` is when the last run started, or when the hub started if none did yet;
    ``last_ended`` when the last run ended (None if none did).
    """
    online = sorted(a.agent_id for a in agents if a.online)
    if run_active:
        return Idle("a run is in progress")
    if request is not None:
        return RunPlan("manual", tuple(online), f"requested, {len(online)} online", request.rounds)
    if last_ended is not None and now - last_ended < runs.cooldown_s:
        left = runs.cooldown_s - (now - last_ended)
        return Idle(f"cooling down for {left:.0f} s more")
    if runs.trigger == "manual":
        return Idle("trigger is manual: zk0-hub start-run")
    if runs.trigger == "schedule":
        assert runs.every_s is not None  # RunsConfig's validator requires it
        due_in = runs.every_s - (now - last_started)
        if due_in > 0:
            return Idle(f"next scheduled run in {due_in:.0f} s")
        if len(online) < runs.min_agents:
            return Idle(f"scheduled run due; {len(online)} of {runs.min_agents} agents online")
        return RunPlan(
            "schedule", tuple(online), f"every {runs.every_s:g} s, {len(online)} agents online"
        )
    ready = tuple(
        sorted(a.agent_id for a in agents if a.online and a.episodes >= runs.min_new_episodes)
    )
    if len(ready) < runs.min_agents:
        return Idle(
            f"{len(ready)} of {runs.min_agents} agents online with "
            f">= {runs.min_new_episodes} new episodes"
        )
    return RunPlan(
        "episodes",
        ready,
        f"{len(ready)} agents online with >= {runs.min_new_episodes} new episodes",
    )
