"""``zk0-hub run``, ``status``, ``start-run``, ``distribute`` and ``config check``: the daemon and
the commands that talk to it over its control socket."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zk0.hub.cli.common import ConfigOption, ask_hub, version_label
from zk0.hub.runs import run_settings
from zk0.shared import hub_control as hc
from zk0.shared.cli import JsonFlag, from_options, new_app, option_help
from zk0.shared.config import load_hub_config
from zk0.shared.control import ControlError

config_app = new_app("Hub configuration.")


@config_app.command("check")
def config_check(config: ConfigOption) -> None:
    """Validate a hub config; print where the hub will listen and keep adapters."""
    hub = load_hub_config(config)
    typer.echo(
        f"listen        {hub.bind_host}: flower {hub.flower_port}, publish {hub.publish_port}, "
        f"fetch {hub.fetch_port}"
    )
    typer.echo(f"store         {hub.store_root}")
    typer.echo(f"state         {hub.hub_state_dir} (control socket {hub.control_socket_path})")
    typer.echo(f"policy        {hub.policy}")
    runs = hub.runs
    settings = run_settings(hub, Path("<a new run folder>"))
    typer.echo(
        f"runs          trigger {runs.trigger}, {settings.num_server_rounds} rounds, "
        f"min {runs.min_agents} agents, {settings.aggregation}, {settings.local_steps} local steps"
    )


def run(config: ConfigOption) -> None:
    """The hub daemon: Flower SuperLink, adapter distribution and run scheduling, until
    SIGTERM (systemd's zk0-hub.service runs this)."""
    from zk0.hub.service import HubService
    from zk0.shared.processes import raise_open_files_limit

    raise_open_files_limit()  # two connections per agent: a 1,000-arm fleet needs over 2,000
    hub = load_hub_config(config)
    try:
        HubService(hub, config).serve_forever()
    except (ControlError, RuntimeError, TimeoutError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def status(config: ConfigOption, as_json: JsonFlag = False) -> None:
    """Ask the running hub: SuperLink, versions, the run in progress, the fleet."""
    answer = ask_hub(load_hub_config(config), hc.Status())
    assert answer is not None
    if as_json:
        typer.echo(answer.model_dump_json(indent=2))
        return
    _print_status(answer)


def _print_status(s: hc.HubStatus) -> None:
    link, hub = s.superlink, s.hub
    state = "up" if link.up else link.state
    restarts = f", {link.restarts} restarts, last: {link.last_exit}" if link.restarts else ""
    typer.echo(f"hub        pid {hub.pid} since {hub.started_at}, trigger {hub.trigger}")
    typer.echo(f"superlink  {link.address} {state}{restarts}")
    if hub.dashboard:
        typer.echo(f"dashboard  {hub.dashboard}")
    versions = s.versions
    stored = f"{len(versions)} stored" + (f", v{versions[0]}..v{versions[-1]}" if versions else "")
    typer.echo(f"adapters   current v{version_label(s.current_version)} ({stored})")
    if s.run:
        typer.echo(
            f"run        {s.run.index}: round {s.run.completed_rounds}/{s.run.rounds}, "
            f"since {s.run.started_at}, {s.run.run_dir}"
        )
    else:
        typer.echo(f"run        none ({s.next_run})")
    last = s.last_run
    if last:
        outcome = "ok" if last.error is None else f"FAILED: {last.error}"
        typer.echo(f"last run   {last.index} {outcome}, ended {last.ended_at}, {last.run_dir}")
    typer.echo(f"runs       {s.runs_completed} completed, {s.runs_failed} failed")
    for gate in s.gates:
        canaries = ", ".join(gate.canaries) or "none yet"
        typer.echo(
            f"gate       v{gate.version} {gate.state} (against v{gate.baseline}; canaries "
            f"{canaries})" + (f": {gate.reason}" if gate.reason else "")
        )
    online = [a for a in s.agents if a.online]
    converged = "yes" if s.converged else "no"
    typer.echo(f"agents     {len(online)} online of {len(s.agents)}, converged: {converged}")
    for a in s.agents:
        node = s.enrolled.get(a.agent_id, "-")
        report = a.report
        last_round = report.last_round
        typer.echo(
            f"  {a.agent_id:<20} {'online' if a.online else 'offline':<8} "
            f"applied {version_label(a.applied):<5} in use {version_label(a.in_use):<5} "
            f"{report.state:<14} episodes {report.episodes_new}/{report.episodes_total:<6} "
            f"{report.recorded_s / 3600:.2f} h  node {node}"
            + (f"  last round {last_round.round}: {last_round.outcome}" if last_round else "")
            + ("" if a.converged else "  (behind)")
        )


def start_run(
    config: ConfigOption,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help=option_help(hc.StartRun, "rounds"))
    ] = None,
) -> None:
    """Ask the running hub to start a federated run now (whatever its trigger)."""
    run = ask_hub(load_hub_config(config), from_options(hc.StartRun, rounds=rounds))
    assert run is not None
    typer.echo(
        f"run {run.index} started: {run.rounds} rounds, min-nodes {run.min_nodes}, "
        f"folder {run.run_dir}"
    )


def distribute(config: ConfigOption) -> None:
    """Serve adapter versions to the fleet in the foreground (Ctrl-C or SIGTERM stops)."""
    import signal
    import threading

    from zk0.hub.distribution import DistributionServer
    from zk0.shared.logs import new_run_dir, setup_logging

    hub = load_hub_config(config)
    setup_logging(new_run_dir(), "hub")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = DistributionServer.from_config(hub).start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()


def register_daemon_commands(app: typer.Typer) -> None:
    """The top-level commands of ``zk0-hub`` that run or ask the daemon."""
    app.command("run")(run)
    app.command("status")(status)
    app.command("start-run")(start_run)
    app.command("distribute")(distribute)
