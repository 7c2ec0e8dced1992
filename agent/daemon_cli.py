"""``zk0-agent run`` and the commands that talk to the running daemon over its control socket
(``zk0.shared.agent_control``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from zk0.shared import agent_control as ac
from zk0.shared.cli import from_options, option_help
from zk0.shared.config import load_agent_config
from zk0.shared.control import Command, ControlError, request
from zk0.shared.validation import WireModel

ConfigOption = Annotated[Path, typer.Option("--config", help="agent.yaml")]
WaitFlag = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Wait for the job and print its result.")
]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Also write the result here.")]
EpisodesOption = Annotated[
    int | None, typer.Option("--episodes", help=option_help(ac.Record, "episodes"))
]


def _ask[R: WireModel](config: Path, command: Command[R]) -> R:
    return request(load_agent_config(config).control_socket_path, command)


def _follow(config: Path, job_id: int, json_path: Path | None) -> ac.JobView:
    """Print a job's progress lines until it ends; the ended job (or a one-line failure)."""
    printed = 0
    while True:
        job = _ask(config, ac.Status()).job
        if job is None or job.id != job_id:
            raise ControlError(f"job {job_id} is gone (the daemon restarted?)")
        lines = job.progress
        for line in lines[printed:] if len(lines) >= printed else lines:
            typer.echo(line)
        printed = len(lines)
        if job.state != "running":
            break
        time.sleep(0.5)
    if job.state == "failed":
        raise ControlError(f"{job.kind} failed: {job.error}")
    if json_path is not None and job.result is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(job.result.model_dump_json(indent=1) + "\n")
    return job


def _version(version: int | None) -> str:
    return "base" if version is None else f"v{version}"


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(config: ConfigOption) -> None:
        """The robot-workstation daemon (what the systemd unit runs): arm, policy, recorder,
        adapter updates, Flower SuperNode, control socket. Stops cleanly on SIGTERM."""
        from zk0.agent.service import AgentService

        AgentService(load_agent_config(config)).run()

    @app.command("status")
    def status(
        config: ConfigOption,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """State, applied and in-use adapter versions, dataset size, last round, current job."""
        answer = _ask(config, ac.Status())
        if as_json:
            typer.echo(answer.model_dump_json(indent=1))
            return
        report, job, last = answer.report, answer.job, answer.report.last_round
        typer.echo(f"agent         {answer.agent_id} (pid {answer.pid})")
        typer.echo(f"state         {report.state}")
        typer.echo(
            f"adapter       in use {_version(answer.in_use)}, applied {answer.applied}, "
            f"sync {answer.sync}"
        )
        typer.echo(
            f"dataset       {report.episodes_total} episodes, {report.frames_total} frames, "
            f"{report.recorded_s / 60:.1f} min ({report.episodes_new} new) in "
            f"{answer.dataset_root}"
        )
        if last is None:
            typer.echo("last round    -")
        else:
            why = f": {last.reason}" if last.reason else ""
            typer.echo(f"last round    {last.round} ({last.phase}) {last.outcome}{why}")
        typer.echo(
            f"supernode     {'running' if answer.supernode.running else 'down'}, "
            f"{answer.supernode.restarts} restarts"
        )
        if job is not None:
            typer.echo(f"job           {job.id} {job.kind}: {job.state}")

    @app.command("start-recording")
    def start_recording(
        config: ConfigOption, episodes: EpisodesOption = None, wait: WaitFlag = True
    ) -> None:
        """Record teleoperated episodes into the agent's dataset (the daemon owns the arm)."""
        command = from_options(ac.Record, episodes=episodes)
        job = _ask(config, command).job
        typer.echo(f"job {job.id}: recording {command.episodes} episodes")
        if wait:
            result = _follow(config, job.id, None).result
            assert isinstance(result, ac.RecordResult)
            typer.echo(f"dataset: {result.total_episodes} episodes ({result.saved} new)")

    @app.command("run-task")
    def run_task(
        config: ConfigOption,
        episodes: EpisodesOption = None,
        horizon_s: Annotated[
            float | None, typer.Option(help=option_help(ac.RunTask, "horizon_s"))
        ] = None,
        wait: WaitFlag = True,
        json_path: JsonOption = None,
    ) -> None:
        """Run the task closed loop with the policy in use (asynchronous inference)."""
        command = from_options(ac.RunTask, episodes=episodes, horizon_s=horizon_s)
        job = _ask(config, command).job
        typer.echo(f"job {job.id}: {command.episodes} episodes under the policy")
        if wait:
            result = _follow(config, job.id, json_path).result
            assert isinstance(result, ac.TaskResult)
            rate = "n/a" if result.success_rate is None else f"{result.success_rate:.0%}"
            typer.echo(
                f"adapter {_version(result.adapter_version)}: success {rate} "
                f"({result.successes}/{result.episodes}), "
                f"chunk latency p50 {result.chunk_latency_p50_s * 1e3:.0f} ms, "
                f"starved {result.starved_fraction:.1%} of ticks"
            )

    @app.command("stop-job")
    def stop_job(config: ConfigOption) -> None:
        """Stop the recording or task in progress (a recording keeps its episodes)."""
        stopped = _ask(config, ac.StopJob()).stopped
        typer.echo("stopping the job in progress" if stopped else "no job in progress")

    @app.command("rollback")
    def rollback(config: ConfigOption) -> None:
        """Run the adapter version that ran before the current one again (this arm only)."""
        in_use = _ask(config, ac.Rollback()).in_use
        typer.echo(f"now running {'v' + str(in_use) if in_use is not None else 'the base policy'}")
