"""``zk0-agent run`` and the commands that talk to the running daemon over its control socket
(``zk0.shared.agent_control``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO

import typer

from zk0.agent.task_labels import counts
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


def _follow(
    config: Path,
    job_id: int,
    json_path: Path | None,
    on_poll: Callable[[ac.JobView], None] | None = None,
) -> ac.JobView:
    """Print a job's progress lines until it ends; the ended job (or a one-line failure).
    ``on_poll`` sees the job after each look at it, the last (ended) one included."""
    printed = 0
    while True:
        job = _ask(config, ac.Status()).job
        if job is None or job.id != job_id:
            raise ControlError(f"job {job_id} is gone (the daemon restarted?)")
        lines = job.progress
        for line in lines[printed:] if len(lines) >= printed else lines:
            typer.echo(line)
        printed = len(lines)
        if on_poll is not None:
            on_poll(job)
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


ANSWERS: dict[str, ac.LabelWord | None] = {
    "s": "success",
    "success": "success",
    "f": "failure",
    "failure": "failure",
    "": None,
}


class LabelPrompt:
    """``run-task --label``: after each episode of the job, ask the operator for its verdict on
    ``stdin`` and store it (``label``). End of input stops asking; the job runs on."""

    def __init__(self, config: Path, job_id: int, stdin: TextIO) -> None:
        self.config, self.job_id, self.stdin = config, job_id, stdin
        self.asked: set[int] = set()
        self.done = False

    def __call__(self, _: ac.JobView) -> None:
        if self.done:
            return
        view = _ask(self.config, ac.Labels(job=self.job_id, limit=1000))
        for episode in view.episodes:
            if episode.id in self.asked or episode.label is not None:
                continue
            self.asked.add(episode.id)
            answer = self._answer(episode.id)
            if self.done:
                return
            if answer is None:
                continue
            try:
                _ask(self.config, ac.Label(label=answer, episode=episode.id))
            except ControlError as error:  # labelled meanwhile (zk0-agent label): keep going
                typer.echo(f"episode {episode.id} not labelled: {error}")
            else:
                typer.echo(f"episode {episode.id} labelled {answer}")

    def _answer(self, episode: int) -> ac.LabelWord | None:
        while True:
            typer.echo(
                f"episode {episode}: success? [s]uccess / [f]ailure / [enter] skip ", nl=False
            )
            line = self.stdin.readline()
            if not line:  # end of input: nobody is there to answer
                typer.echo()
                self.done = True
                return None
            word = line.strip().lower()
            if word in ANSWERS:
                return ANSWERS[word]
            typer.echo(f"{word!r}? answer s, f, or enter to skip")


def _label_word(word: str) -> ac.LabelWord:
    if word not in ("success", "failure"):
        raise ValueError(f"a label is success or failure, not {word!r:.40}")
    return "success" if word == "success" else "failure"


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(config: ConfigOption) -> None:
        """The robot-workstation daemon (what the systemd unit runs): arm, policy, recorder,
        adapter updates, Flower SuperNode, control socket. Stops cleanly on SIGTERM."""
        from zk0.agent.service import AgentService
        from zk0.shared.processes import raise_open_files_limit

        raise_open_files_limit()  # dataset and video files, the round worker's sockets
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
        local = report.personal_revision  # personalized mode: what runs is (fleet, local)
        both = f" (fleet {_version(answer.in_use)}, local r{local})" if local is not None else ""
        typer.echo(
            f"adapter       in use {_version(answer.in_use)}{both}, applied {answer.applied}, "
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
        tasks = answer.tasks
        typer.echo(f"tasks         {_version(tasks.adapter_version)}: {tasks.describe()}")

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
        label: Annotated[
            bool,
            typer.Option(
                "--label",
                help="After each episode ask on stdin: s (success), f (failure), enter (skip).",
            ),
        ] = False,
    ) -> None:
        """Run the task closed loop with the policy in use (asynchronous inference)."""
        if label and not wait:
            raise ValueError("--label waits for the episodes: drop --no-wait")
        command = from_options(ac.RunTask, episodes=episodes, horizon_s=horizon_s)
        job = _ask(config, command).job
        typer.echo(f"job {job.id}: {command.episodes} episodes under the policy")
        if wait:
            prompt = LabelPrompt(config, job.id, sys.stdin) if label else None
            result = _follow(config, job.id, json_path, prompt).result
            assert isinstance(result, ac.TaskResult)
            # Labels given after the job ended (the last episode's) count: ask for them now.
            mine = _ask(config, ac.Labels(job=job.id, limit=1000)).episodes
            typer.echo(
                f"adapter {_version(result.adapter_version)}: {counts(mine).describe()}; "
                f"chunk latency p50 {result.chunk_latency_p50_s * 1e3:.0f} ms, "
                f"starved {result.starved_fraction:.1%} of ticks"
            )

    @app.command("label")
    def label(
        word: Annotated[str, typer.Argument(metavar="success|failure", help="The verdict.")],
        config: ConfigOption,
        episode: Annotated[
            int | None, typer.Option("--episode", help=option_help(ac.Label, "episode"))
        ] = None,
        relabel: Annotated[
            bool, typer.Option("--relabel", help=option_help(ac.Label, "relabel"))
        ] = False,
    ) -> None:
        """Label a task episode a success or a failure (what counts on a real arm)."""
        command = from_options(ac.Label, label=_label_word(word), episode=episode, relabel=relabel)
        stored = _ask(config, command).episode
        typer.echo(
            f"episode {stored.id} (job {stored.job}, adapter "
            f"{_version(stored.adapter_version)}) labelled {stored.label}"
        )

    @app.command("labels")
    def labels(
        config: ConfigOption,
        job: Annotated[
            int | None, typer.Option("--job", help=option_help(ac.Labels, "job"))
        ] = None,
        limit: Annotated[
            int | None, typer.Option("--limit", help=option_help(ac.Labels, "limit"))
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Task episodes, their labels, and success per adapter version."""
        view = _ask(config, from_options(ac.Labels, job=job, limit=limit))
        if as_json:
            typer.echo(view.model_dump_json(indent=1))
            return
        typer.echo(f"all           {view.total.describe()}")
        for counted in view.by_version:
            typer.echo(f"{_version(counted.adapter_version):<13} {counted.describe()}")
        for shown in view.episodes:
            verdict = shown.label or "-"
            auto = {True: "success", False: "failure", None: "-"}[shown.auto]
            typer.echo(
                f"episode {shown.id:<5} job {shown.job:<4} {_version(shown.adapter_version):<5} "
                f"label {verdict:<8} simulator {auto}"
            )

    @app.command("stop-job")
    def stop_job(config: ConfigOption) -> None:
        """Stop the recording or task in progress (a recording keeps its episodes)."""
        stopped = _ask(config, ac.StopJob()).stopped
        typer.echo("stopping the job in progress" if stopped else "no job in progress")

    @app.command("rollback")
    def rollback(config: ConfigOption) -> None:
        """Run the adapter version that ran before the current one again (this arm only), and
        the local revision before the current one (personalized mode)."""
        answer = _ask(config, ac.Rollback())
        in_use = answer.in_use
        fallback = f"now running {'v' + str(in_use) if in_use is not None else 'the base policy'}"
        typer.echo(answer.summary or fallback)  # a daemon older than 2.2 sends no summary
