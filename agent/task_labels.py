"""Task episodes and their operator labels: ``<data_root>/task_episodes.jsonl``.

On a real arm nothing knows whether the policy did the task but the operator watching it. Each
``run_task`` episode is stored as it ends (:class:`zk0.shared.agent_control.TaskEpisode`: its
job, times, the adapter version that drove it, the simulator's verdict where there is one);
``zk0-agent label`` (or the ``run-task --label`` prompt) adds the operator's verdict.

The file is append-only, one JSON object a line. A label appends the whole episode again, with
its label; when reading, the last line of an id wins. So every write is one short append (no
rewrite of a file that grows with every episode the arm ever ran), a crash can damage at most
the line being written, and a relabel keeps the earlier verdict in the file for whoever audits
it. A line that is not a task episode (a torn write, a hand edit) is skipped with a warning
naming the file and line; the others stand.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from loguru import logger
from pydantic import ValidationError

from zk0.shared import agent_control as ac
from zk0.shared.fsutil import fsync_dir
from zk0.shared.success import SuccessRate
from zk0.shared.validation import describe

if TYPE_CHECKING:
    from zk0.agent.inference.evaluation import Session
    from zk0.agent.inference.metrics import EpisodeResult
    from zk0.agent.jobs import Job

FILE_NAME = "task_episodes.jsonl"
#: ``labels`` lists per-version counts of this many versions (the newest), to bound its reply.
MAX_VERSIONS = 20


class LabelError(ValueError):
    """A label the store refuses (no such episode, labelled already, nothing to label)."""


def counts(episodes: Iterable[ac.TaskEpisode]) -> ac.TaskCounts:
    listed = list(episodes)
    return ac.TaskCounts(
        episodes=len(listed),
        labelled=sum(e.label is not None for e in listed),
        success=SuccessRate.of_outcomes(e.outcome for e in listed),
    )


class TaskEpisodeStore:
    """The task episodes of one agent, in memory and in ``path``; thread safe (the job thread
    adds episodes while the main loop labels them)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._episodes: dict[int, ac.TaskEpisode] = {}
        #: The file does not end with a newline (a write was cut short): the next append
        #: starts a new line first, so the torn line stays a line of its own.
        self._torn = False
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                episode = ac.TaskEpisode.model_validate_json(line)
            except ValidationError as error:
                logger.warning(
                    "{}:{}: skipped, not a task episode ({})", self.path, number, describe(error)
                )
                continue
            self._episodes[episode.id] = episode
        self._torn = bool(data) and not data.endswith(b"\n")

    # -- reading ----------------------------------------------------------------------------------
    def episodes(self) -> list[ac.TaskEpisode]:
        with self._lock:
            return sorted(self._episodes.values(), key=lambda e: e.id)

    def get(self, episode: int) -> ac.TaskEpisode | None:
        with self._lock:
            return self._episodes.get(episode)

    @property
    def last_job(self) -> int:
        """The highest job id any episode names (0 for none): new jobs are numbered after it."""
        with self._lock:
            return max((e.job for e in self._episodes.values()), default=0)

    def version_counts(self, version: int | None) -> ac.VersionCounts:
        """Task episodes under adapter ``version`` (None: the base policy) and their success."""
        mine = (e for e in self.episodes() if e.adapter_version == version)
        return ac.VersionCounts(**dict(counts(mine)), adapter_version=version)

    def view(self, job: int | None = None, limit: int = 20) -> ac.LabelsView:
        every = self.episodes()
        by_version: dict[int | None, list[ac.TaskEpisode]] = defaultdict(list)
        for episode in every:
            by_version[episode.adapter_version].append(episode)
        newest = sorted(by_version, key=lambda v: -1 if v is None else v)[-MAX_VERSIONS:]
        listed = [e for e in every if job is None or e.job == job]
        return ac.LabelsView(
            total=counts(every),
            by_version=[
                ac.VersionCounts(**dict(counts(by_version[v])), adapter_version=v) for v in newest
            ],
            episodes=listed[-limit:],
        )

    # -- writing ----------------------------------------------------------------------------------
    def add(
        self,
        *,
        job: int,
        started_at: float,
        ended_at: float,
        adapter_version: int | None,
        auto: bool | None,
    ) -> ac.TaskEpisode:
        """Store a task episode that has just ended; its id is the next after every stored one."""
        with self._lock:
            episode = ac.TaskEpisode(
                id=max(self._episodes, default=0) + 1,
                job=job,
                started_at=started_at,
                ended_at=ended_at,
                adapter_version=adapter_version,
                auto=auto,
            )
            self._append(episode)
            return episode

    def label(
        self,
        label: ac.LabelWord,
        episode: int | None = None,
        relabel: bool = False,
        now: float | None = None,
    ) -> ac.TaskEpisode:
        """Label ``episode`` (default: the newest unlabelled one); refuse with a one-line reason."""
        with self._lock:
            if not self._episodes:
                raise LabelError("no task episodes to label yet (zk0-agent run-task runs some)")
            if episode is None:
                unlabelled = [e for e in self._episodes.values() if e.label is None]
                if not unlabelled:
                    raise LabelError(
                        f"all {len(self._episodes)} task episodes are labelled; "
                        "change one with --episode ID --relabel"
                    )
                target = max(unlabelled, key=lambda e: e.id)
            else:
                found = self._episodes.get(episode)
                if found is None:
                    raise LabelError(
                        f"no task episode {episode} (the newest is {max(self._episodes)})"
                    )
                if found.label is not None and not relabel:
                    raise LabelError(
                        f"episode {episode} is labelled {found.label} already; "
                        "--relabel replaces the label"
                    )
                target = found
            labelled = target.model_copy(
                update={"label": label, "labelled_at": time.time() if now is None else now}
            )
            self._append(labelled)
            return labelled

    def _append(self, episode: ac.TaskEpisode) -> None:
        """Append ``episode`` durably (fsync: a label an operator gave survives a power cut)."""
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        line = episode.model_dump_json().encode() + b"\n"
        with self.path.open("ab") as handle:
            handle.write(b"\n" + line if self._torn else line)
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            fsync_dir(self.path.parent)
        self._torn = False
        self._episodes[episode.id] = episode


def _driven_by(result: EpisodeResult, fallback: int | None) -> int | None:
    """The adapter version that computed most of an episode's chunks (a hot swap can land
    during an episode: the version that drove most of it answers for it)."""
    versions = Counter(chunk.version for chunk in result.chunks)
    return versions.most_common(1)[0][0] if versions else fallback


class _EpisodeHook:
    """``session.engine`` as ``evaluate`` sees it, reporting each episode as it ends.

    ``evaluate`` hands back its episodes only once all have run, and the operator labels one
    while the next runs. Wrapping the engine (rather than copying the loop) keeps ``evaluate``
    the one place that decides scenes, horizon, mode and stopping.
    """

    def __init__(self, engine: Any, on_episode: Callable[[float, EpisodeResult], None]) -> None:
        self._engine, self._on_episode = engine, on_episode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def run_episode(self, *args: Any, **kwargs: Any) -> EpisodeResult:
        started_at = time.time()
        result: EpisodeResult = self._engine.run_episode(*args, **kwargs)
        self._on_episode(started_at, result)
        return result


def run_task(
    session: Session,
    store: TaskEpisodeStore,
    job: Job,
    episodes: int,
    horizon_s: float | None,
) -> ac.TaskResult:
    """``evaluate`` on the daemon's session, each episode stored as it ends; the result counts
    the labels given by the time the last episode ends."""
    from zk0.agent.inference.evaluation import evaluate

    stored: list[int] = []

    def keep(started_at: float, result: EpisodeResult) -> None:
        episode = store.add(
            job=job.id,
            started_at=started_at,
            ended_at=time.time(),
            adapter_version=_driven_by(result, session.slot.version),
            auto=result.success,
        )
        stored.append(episode.id)
        verdict = {True: "yes", False: "no", None: "unknown (zk0-agent label success|failure)"}
        job.report(
            f"episode {episode.id}: {result.duration_s:.1f} s, success {verdict[result.success]}"
        )

    hooked = dataclasses.replace(session, engine=cast(Any, _EpisodeHook(session.engine, keep)))
    report = evaluate(hooked, episodes, horizon_s, stop=job.stop)
    labels: Sequence[bool | None] = [_label_of(store.get(i)) for i in stored]
    return report.task_result(adapter_version=session.slot.version, labels=labels)


def _label_of(episode: ac.TaskEpisode | None) -> bool | None:
    if episode is None or episode.label is None:
        return None
    return episode.label == "success"
