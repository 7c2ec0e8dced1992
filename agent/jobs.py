"""The arm's jobs in the agent daemon (a recording, a task under the policy), one at a time.

A job runs in its own thread so the daemon's main loop keeps answering and pinging the
watchdog; its progress, result or one-line error stay readable through ``status``
(``zk0.shared.agent_control.JobView``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from itertools import count
from typing import Literal

from loguru import logger

from zk0.shared.agent_control import JobView, RecordResult, TaskResult

JobKind = Literal["record", "run_task"]
JobResult = RecordResult | TaskResult


class Job:
    def __init__(self, job_id: int, kind: JobKind, work: Callable[[Job], JobResult]) -> None:
        self.id = job_id
        self.kind, self.work = kind, work
        self.stop = threading.Event()
        self.state: Literal["running", "done", "failed"] = "running"
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.progress: list[str] = []
        self.result: JobResult | None = None
        self.error: str | None = None

    def report(self, line: str) -> None:
        self.progress.append(line)

    def view(self) -> JobView:
        return JobView(
            id=self.id,
            kind=self.kind,
            state=self.state,
            started_at=self.started_at,
            ended_at=self.ended_at,
            progress=self.progress[-20:],
            result=self.result,
            error=self.error,
        )


class JobRunner:
    """Runs one job at a time; ``on_end`` frees the arm when a job ends, however it ends;
    ``on_stop`` ends an episode under the policy at once when a stop is asked for.

    Job ids count from ``first_id``: the daemon starts after the last job its stored task
    episodes name, so a job id names one job across restarts.
    """

    def __init__(
        self, on_end: Callable[[], None], on_stop: Callable[[], None], first_id: int = 1
    ) -> None:
        self.on_end, self.on_stop = on_end, on_stop
        self.current: Job | None = None
        self._thread: threading.Thread | None = None
        self._ids = count(first_id)

    def new(self, kind: JobKind, work: Callable[[Job], JobResult]) -> Job:
        return Job(next(self._ids), kind, work)

    def start(self, job: Job) -> None:
        self.current = job
        self._thread = threading.Thread(target=self._run, args=(job,), name=f"job-{job.kind}")
        self._thread.start()

    def _run(self, job: Job) -> None:
        logger.info("job {} ({}) started", job.id, job.kind)
        try:
            job.result = job.work(job)
            job.state = "done"
            logger.info("job {} ({}) done: {}", job.id, job.kind, job.result)
        except Exception as error:
            first_line = str(error).splitlines()[0] if str(error) else ""
            job.error = f"{type(error).__name__}: {first_line}"
            job.state = "failed"
            logger.exception("job {} ({}) failed", job.id, job.kind)
        finally:
            job.ended_at = time.time()
            self.on_end()

    def view(self) -> JobView | None:
        return self.current.view() if self.current is not None else None

    @property
    def running(self) -> Job | None:
        job = self.current
        return job if job is not None and job.state == "running" else None

    def stop_current(self) -> bool:
        """Ask the running job to stop: a recording saves its episode, a task ends its episode."""
        job = self.running
        if job is None:
            return False
        job.stop.set()
        self.on_stop()
        return True

    def stop(self, timeout_s: float = 25.0) -> None:
        """Stop the running job and wait for it (the daemon is stopping)."""
        self.stop_current()
        if self._thread is not None:
            self._thread.join(timeout_s)
