"""``zk0 demo``: a hub and simulated SO-101 agents on one machine, offline, end to end.

Everything runs as it would on real machines, through the same commands and daemons:

1. Enrolment: ``zk0-hub keys init``; per agent ``zk0-agent keys init`` (CURVE and SuperNode
   key pairs) and ``zk0-hub keys add`` (allow-list and Flower SuperNode registration).
2. The daemons: ``zk0-hub run`` (Flower SuperLink with TLS, SuperNode authentication and a
   database, the adapter distribution server, the run scheduler) and one ``zk0-agent run``
   per agent (its own task variant: the federation has genuinely different data). The demo
   supervises them as systemd would: a daemon that dies is started again.
3. Each agent records its episodes with the scripted teleoperator (``record`` on its control
   socket). The hub starts a federated run by itself once every agent reports enough new
   episodes; each round's version is pushed to every agent over ZeroMQ and hot-swapped into
   its running policy.
4. Every round's federated evaluation measures each agent's held-out MSE and, on its simulated
   arm in simulated time, its closed-loop success on scenes it never recorded (the same scenes
   for every version): ``eval-episodes`` before the first round and after the last,
   ``mid-eval-episodes`` in between. The table shows success before and after with its 95 %
   Wilson interval; the run's chart shows MSE and success by round.

``--inject-bad-version`` gates every version on a canary (the last agent) and, after the run,
publishes a broken version (B x -1) through that gate (``zk0.hub.demo_inject``).

``--chaos-kill-round N`` SIGKILLs the first agent while it trains in round N: the round
completes with the others, the demo restarts the agent, and it catches up with the newest
version.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

from loguru import logger
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from zk0.hub.demo_fleet import Demo, DemoOptions
from zk0.hub.demo_inject import InjectedVersion, describe, inject_bad_version
from zk0.hub.history import CHART_FILE, HISTORY_FILE, EvalHistory
from zk0.shared import agent_control as ac
from zk0.shared import hub_control as hc
from zk0.shared.logs import RUN_DIR_ENV, new_run_dir, setup_logging
from zk0.shared.sim_variants import CLIENT_VARIANTS
from zk0.shared.success import SuccessRate

RESULTS_FILE = "demo_results.json"


class AgentResult(BaseModel):
    status: ac.AgentStatus
    restarts: int


class DemoResults(BaseModel):
    """What the demo ends with (``demo_results.json`` in its run folder)."""

    hub: hc.HubStatus
    agents: dict[str, AgentResult]
    newest: int
    #: ``--inject-bad-version``: what the canary gate did with the broken version.
    injected: InjectedVersion | None = None


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def run_demo(options: DemoOptions) -> Path:
    started = time.monotonic()
    run_dir = new_run_dir(options.outputs).resolve()
    setup_logging(run_dir, "demo", console=False)
    console = Console()
    # Unix socket paths are short (107 bytes): the daemons' control sockets live in /tmp.
    with tempfile.TemporaryDirectory(prefix="zk0-demo-") as sockets:
        env = {
            **os.environ,
            RUN_DIR_ENV: str(run_dir),
            "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        demo = Demo(options, run_dir, Path(sockets), env)
        try:
            results = _run(demo, console)
            (run_dir / RESULTS_FILE).write_text(results.model_dump_json(indent=1) + "\n")
            _print_table(console, run_dir, results)
            console.print(f"demo wall time {time.monotonic() - started:.0f} s")
            if options.keep_serving:
                _keep_serving(demo, console, results.hub.hub.dashboard)
        finally:
            demo.stop()
    return run_dir


def _keep_serving(demo: Demo, console: Console, dashboard: str | None) -> None:
    """Leave the hub (and its dashboard) and the agents up, supervised, until Ctrl-C."""
    console.print(f"the hub and its agents keep running; dashboard {dashboard}; Ctrl-C stops them")
    try:
        while True:
            demo.supervise()
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping the hub and the agents")


def _start(demo: Demo, console: Console) -> None:
    agent_ids = sorted(CLIENT_VARIANTS)[: demo.options.agents]
    with console.status("starting the hub (SuperLink, distribution, scheduler)"):
        hub = demo.start_hub()
        demo.wait(lambda: hub.answer(hc.Status()) is not None, "the hub", 120)
    console.print(f"dashboard   {hub.ask(hc.Status()).hub.dashboard}", soft_wrap=True)
    with console.status(f"enrolling and starting {len(agent_ids)} agents"):
        for agent_id in agent_ids:
            demo.enrol_and_start_agent(agent_id)

        def every_agent_up() -> bool:
            return all(agent.answer(ac.Status()) is not None for agent in demo.agents)

        demo.wait(every_agent_up, "the agents", 600)
    console.print(f"[green]hub and {len(agent_ids)} agents up[/], run folder", soft_wrap=True)
    console.print(str(demo.run_dir), soft_wrap=True)


def _run(demo: Demo, console: Console) -> DemoResults:
    options = demo.options
    _start(demo, console)
    hub = demo.hub
    assert hub is not None
    with _progress(console) as bars:
        recording = {
            a.name: bars.add_task(f"{a.name} recording", total=options.episodes, note="")
            for a in demo.agents
        }
        for agent in demo.agents:
            agent.ask(ac.Record(episodes=options.episodes))

        def recorded() -> bool:
            done = True
            for agent in demo.agents:
                status = agent.answer(ac.Status())
                episodes = status.report.episodes_total if status else 0
                bars.update(recording[agent.name], completed=episodes)
                done &= status is not None and status.report.state != "recording" and episodes > 0
            return done

        demo.wait(recorded, "the recordings", options.timeout_s)

        rounds = bars.add_task("federated LoRA rounds", total=options.rounds, note="")
        victim = demo.agents[0]

        def federated() -> bool:
            status = hub.answer(hc.Status())
            if status is None:
                return False
            if status.run is not None:
                note = f"run {status.run.index}"
                bars.update(rounds, completed=status.run.completed_rounds, note=note)
            last = status.last_run
            if last is not None and last.returncode != 0:
                raise RuntimeError(f"the federated run failed: {last.error}")
            return status.run is None and status.runs_completed >= 1

        def chaos() -> None:
            if options.chaos_kill_round is None or victim.killed:
                return
            status = victim.answer(ac.Status())
            training = status.training if status else None
            if training and training.round == options.chaos_kill_round:
                assert victim.supervised.pid is not None
                os.kill(victim.supervised.pid, signal.SIGKILL)
                victim.killed += 1
                logger.warning("chaos: SIGKILLed {} in round {}", victim.name, training.round)
                bars.update(rounds, note=f"SIGKILLed {victim.name} in round {training.round}")

        demo.wait(federated, "the federated run", options.timeout_s, chaos)
        bars.update(rounds, completed=options.rounds)

        def gates_decided() -> bool:  # the last round's version may still be under gate
            status = hub.answer(hc.Status())
            return status is not None and all(g.state != "open" for g in status.gates)

        demo.wait(gates_decided, "the canary gate on the last version", options.timeout_s)

        newest = hub.ask(hc.Status()).current_version
        assert newest is not None
        pushed = bars.add_task(f"pushing v{newest} to every agent", total=len(demo.agents), note="")

        def converged() -> bool:
            statuses = [a.answer(ac.Status()) for a in demo.agents]
            count = sum(1 for s in statuses if s is not None and s.in_use == newest)
            bars.update(pushed, completed=count)
            return count == len(demo.agents)

        demo.wait(converged, f"every agent on v{newest}", 300)
    injected = None
    if options.inject_bad_version:
        with console.status("injecting a broken version (B x -1) through the canary gate"):
            injected = inject_bad_version(demo)
    agents = {
        agent.name: AgentResult(status=agent.ask(ac.Status()), restarts=agent.supervised.restarts)
        for agent in demo.agents
    }
    return DemoResults(hub=hub.ask(hc.Status()), agents=agents, newest=newest, injected=injected)


def _compact(rate: SuccessRate | None) -> str:
    """``3/10 [11-60%]``: the count and its 95 % Wilson interval, narrow enough for a table."""
    if rate is None or rate.rate is None:
        return "-"
    return f"{rate.successes}/{rate.episodes} [{rate.low:.0%}-{rate.high:.0%}]"


def _print_table(console: Console, run_dir: Path, results: DemoResults) -> None:
    assert results.hub.last_run is not None
    federated_run = Path(results.hub.last_run.run_dir)
    history = EvalHistory.from_dict(json.loads((federated_run / HISTORY_FILE).read_text()))
    table = Table(
        title=f"zk0 demo: {len(results.agents)} simulated SO-101 agents, "
        f"newest version {results.newest}"
    )
    columns = ("agent", "episodes", "MSE round 0 -> last", "success round 0", "success last")
    for column in (*columns, "adapter", "MB in", "restarts"):
        table.add_column(column, justify="left" if column == "agent" else "right")
    before, after = [], []
    for agent_id, agent in results.agents.items():
        status = agent.status
        series = [v for v in history.clients.get(agent_id, []) if v is not None]
        measured = [s for s in history.success.get(agent_id, []) if s is not None]
        first, last = (measured[0], measured[-1]) if len(measured) > 1 else (None, None)
        if first is not None and last is not None and first.rate is not None:
            before.append(first.rate)
            after.append(last.rate or 0.0)
        table.add_row(
            agent_id,
            str(status.report.episodes_total),
            f"{series[0]:.4f} -> {series[-1]:.4f}" if series else "-",
            _compact(first),
            _compact(last),
            f"v{status.in_use}",
            f"{status.bytes_received / 1e6:.2f}",
            str(agent.restarts),
        )
    console.print(table)
    if before:
        console.print(
            f"mean success over agents: {sum(before) / len(before):.0%} before the first round "
            f"-> {sum(after) / len(after):.0%} after the last"
        )
    if results.injected is not None:
        for line in describe(results.injected):
            console.print(line, soft_wrap=True)
    for label, path in (
        ("run folder", run_dir),
        ("history", federated_run / HISTORY_FILE),
        ("chart", federated_run / CHART_FILE),
    ):
        console.print(f"{label:<11} {path}", soft_wrap=True)  # paths stay whole, to copy
    logger.info("demo finished: {}", run_dir)
