"""``zk0-agent run`` and the commands that talk to the running daemon over its control socket."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from zk0.shared.config import load_agent_config
from zk0.shared.control import ControlError, request

ConfigOption = Annotated[Path, typer.Option("--config", help="agent.yaml")]
WaitFlag = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Wait for the job and print its result.")
]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Also write the result here.")]


def _ask(config: Path, command: str, **args: Any) -> dict[str, Any]:
    return request(load_agent_config(config).control_socket_path, command, **args)


def _follow(config: Path, job_id: int, json_path: Path | None) -> dict[str, Any]:
    """Print a job's progress lines until it ends; its result (or a one-line failure)."""
    printed = 0
    while True:
        job = _ask(config, "status")["job"]
        if job is None or job["id"] != job_id:
            raise ControlError(f"job {job_id} is gone (the daemon restarted?)")
        lines = job["progress"]
        for line in lines[printed:] if len(lines) >= printed else lines:
            typer.echo(line)
        printed = len(lines)
        if job["state"] != "running":
            break
        time.sleep(0.5)
    if job["state"] == "failed":
        raise ControlError(f"{job['kind']} failed: {job['error']}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(job["result"], indent=1) + "\n")
    result: dict[str, Any] = job["result"]
    return result


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
        answer = _ask(config, "status")
        if as_json:
            typer.echo(json.dumps(answer, indent=1))
            return
        dataset, job, last = answer["dataset"], answer["job"], answer["last_round"]
        version = answer["in_use"]
        typer.echo(f"agent         {answer['agent_id']} (pid {answer['pid']})")
        typer.echo(f"state         {answer['state']}")
        typer.echo(
            f"adapter       in use {'v' + str(version) if version is not None else 'base'}, "
            f"applied {answer['applied']}, sync {answer['sync']}"
        )
        typer.echo(
            f"dataset       {dataset['episodes']} episodes, {dataset['frames']} frames "
            f"({answer['new_episodes']} new) in {dataset['root']}"
        )
        typer.echo(f"last round    {last['round'] if last else '-'}")
        supernode = answer["supernode"]
        typer.echo(
            f"supernode     {'running' if supernode['running'] else 'down'}, "
            f"{supernode['restarts']} restarts"
        )
        if job is not None:
            typer.echo(f"job           {job['id']} {job['kind']}: {job['state']}")

    @app.command("start-recording")
    def start_recording(
        config: ConfigOption,
        episodes: Annotated[int, typer.Option("--episodes", min=1)] = 1,
        wait: WaitFlag = True,
    ) -> None:
        """Record teleoperated episodes into the agent's dataset (the daemon owns the arm)."""
        job = _ask(config, "record", episodes=episodes)["job"]
        typer.echo(f"job {job['id']}: recording {episodes} episodes")
        if wait:
            result = _follow(config, job["id"], None)
            typer.echo(f"dataset: {result['total_episodes']} episodes ({result['saved']} new)")

    @app.command("run-task")
    def run_task(
        config: ConfigOption,
        episodes: Annotated[int, typer.Option("--episodes", min=1)] = 1,
        horizon_s: Annotated[
            float | None, typer.Option(help="Seconds of policy actions per episode.")
        ] = None,
        wait: WaitFlag = True,
        json_path: JsonOption = None,
    ) -> None:
        """Run the task closed loop with the policy in use (asynchronous inference)."""
        args: dict[str, Any] = {"episodes": episodes}
        if horizon_s is not None:
            args["horizon_s"] = horizon_s
        job = _ask(config, "run_task", **args)["job"]
        typer.echo(f"job {job['id']}: {episodes} episodes under the policy")
        if wait:
            result = _follow(config, job["id"], json_path)
            rate = result["success_rate"]
            typer.echo(
                f"adapter v{result['adapter_version']}: success "
                f"{'n/a' if rate is None else f'{rate:.0%}'}, "
                f"chunk latency p50 {result['chunk_latency_p50_s'] * 1e3:.0f} ms, "
                f"starved {result['starved_fraction']:.1%} of ticks"
            )

    @app.command("stop-job")
    def stop_job(config: ConfigOption) -> None:
        """Stop the recording or task in progress (a recording keeps its episodes)."""
        stopped = _ask(config, "stop_job")["stopped"]
        typer.echo("stopping the job in progress" if stopped else "no job in progress")

    @app.command("rollback")
    def rollback(config: ConfigOption) -> None:
        """Run the adapter version that ran before the current one again (this arm only)."""
        in_use = _ask(config, "rollback")["in_use"]
        typer.echo(f"now running {'v' + str(in_use) if in_use is not None else 'the base policy'}")
