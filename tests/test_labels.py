"""Operator success labels: each ``run-task`` episode is stored as it ends, the operator labels
it (``zk0-agent label``, or the ``run-task --label`` prompt), and every success figure counts
labels (else the simulator's verdict), never a rate where nothing is known.

The store on its own first, then once end to end: a real ``zk0-agent run`` on the synthetic
arm (which cannot tell success) and its CLI over the control socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from loguru import logger
from pydantic import ValidationError
from test_agent_service import Daemon, running_daemon

from conftest import SYNTHETIC_ROBOT, DistributionRig, FakeSystemd, synthetic_robot_config
from zk0.agent.inference.evaluation import EvalReport, Session
from zk0.agent.inference.metrics import EpisodeResult
from zk0.agent.jobs import Job
from zk0.agent.task_labels import FILE_NAME, LabelError, TaskEpisodeStore, counts, run_task
from zk0.shared import agent_control as ac
from zk0.shared.control import ControlError, request
from zk0.shared.success import wilson_interval


def _add(store: TaskEpisodeStore, job: int = 1, auto: bool | None = None) -> ac.TaskEpisode:
    return store.add(job=job, started_at=10.0, ended_at=12.5, adapter_version=3, auto=auto)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda message: seen.append(str(message)), level="WARNING")
    yield seen
    logger.remove(sink)


def test_labels_are_stored_counted_with_their_interval_and_survive_a_reopen(
    tmp_path: Path,
) -> None:
    path = tmp_path / FILE_NAME
    store = TaskEpisodeStore(path)
    first, second = _add(store), _add(store)
    assert (first.id, second.id) == (1, 2)
    nothing = counts(store.episodes())
    assert nothing.success.rate is None and nothing.labelled == 0
    assert nothing.describe() == "2 task episodes, no labelled episodes"

    assert store.label("success", now=20.0).id == 2  # the newest unlabelled episode
    assert store.label("failure", episode=1).label == "failure"

    reopened = TaskEpisodeStore(path)
    assert [(e.id, e.label) for e in reopened.episodes()] == [(1, "failure"), (2, "success")]
    assert reopened.get(2) == second.model_copy(update={"label": "success", "labelled_at": 20.0})
    both = counts(reopened.episodes())
    low, high = wilson_interval(1, 2)
    assert (both.success.successes, both.success.episodes, both.labelled) == (1, 2, 2)
    assert (both.success.rate, both.success.low, both.success.high) == (0.5, low, high)
    assert both.describe() == "2 task episodes, 2 labelled: 1/2 = 50% [9, 91] %"
    assert reopened.version_counts(3) == ac.VersionCounts(**dict(both), adapter_version=3)
    assert reopened.version_counts(None).describe() == "no task episodes"

    # A relabel appends the episode again: the file keeps the first verdict, the last one counts.
    with pytest.raises(LabelError, match=r"^episode 1 is labelled failure already; --relabel"):
        reopened.label("success", episode=1)
    reopened.label("success", episode=1, relabel=True)
    assert len(path.read_text().splitlines()) == 5
    again = TaskEpisodeStore(path)
    assert counts(again.episodes()).success.successes == 2
    assert _add(again, job=7).id == 3 and again.last_job == 7  # ids go on after a restart


def test_refusals_are_one_line(tmp_path: Path) -> None:
    store = TaskEpisodeStore(tmp_path / FILE_NAME)
    with pytest.raises(LabelError, match=r"^no task episodes to label yet"):
        store.label("success")
    _add(store)
    with pytest.raises(LabelError, match=r"^no task episode 42 \(the newest is 1\)$"):
        store.label("success", episode=42)
    store.label("failure")
    with pytest.raises(LabelError, match=r"^all 1 task episodes are labelled; change one with"):
        store.label("success")
    for bad in ({"label": "maybe"}, {"label": "success", "episode": 0}, {"label": True}):
        with pytest.raises(ValidationError):
            ac.Label.model_validate(bad)


def test_a_corrupt_line_is_skipped_naming_file_and_line_and_the_others_stand(
    tmp_path: Path, warnings: list[str]
) -> None:
    path = tmp_path / FILE_NAME
    store = TaskEpisodeStore(path)
    for _ in range(3):
        _add(store)
    lines = path.read_text().splitlines()
    # A damaged record in the middle, and a last write cut short by a crash (no newline).
    path.write_text("\n".join([lines[0], "{not json", lines[1], lines[2][:30]]))
    damaged = TaskEpisodeStore(path)
    assert [e.id for e in damaged.episodes()] == [1, 2]
    assert len(warnings) == 2
    assert f"{path}:2: skipped" in warnings[0] and f"{path}:4: skipped" in warnings[1]

    added = _add(damaged)  # on a line of its own, after the torn one
    assert added.id == 3
    assert [e.id for e in TaskEpisodeStore(path).episodes()] == [1, 2, 3]


def test_task_results_count_labels_else_the_simulator_else_nothing() -> None:
    def episode(success: bool | None) -> EpisodeResult:
        return EpisodeResult(0, "async", 1 / 30, 0.0, success=success, duration_s=1.0)

    real_arm = EvalReport([episode(None), episode(None)], {})
    unknown = real_arm.task_result(adapter_version=None)
    assert unknown.success.rate is None and unknown.success_rate is None
    assert unknown.successes == 0 and unknown.episodes == 2
    labelled = real_arm.task_result(adapter_version=None, labels=[True, None])
    assert (labelled.success.successes, labelled.success.episodes) == (1, 1)

    simulated = EvalReport([episode(False), episode(True), episode(None)], {})
    result = simulated.task_result(adapter_version=4, labels=[True])  # the label wins
    assert (result.successes, result.success.episodes, result.success_rate) == (2, 2, 1.0)
    assert simulated.summary()["success"]["rate"] == 0.5


def test_a_run_task_stores_each_episode_as_it_ends_and_counts_labels_given_meanwhile(
    tmp_path: Path,
) -> None:
    store = TaskEpisodeStore(tmp_path / FILE_NAME)
    stored_before: list[int] = []

    class Engine:  # the daemon's engine, as evaluate() drives it
        config = SimpleNamespace(mode="async")

        def run_episode(self, index: int, horizon_steps: int, mode: str) -> EpisodeResult:
            stored_before.append(len(store.episodes()))
            if stored_before[-1] == 2:  # the operator labels while the third episode runs
                store.label("success", episode=1)
            return EpisodeResult(index, "async", 1 / 30, 0.0, success=None, duration_s=0.5)

    session = Session(
        engine=Engine(),  # type: ignore[arg-type]
        arm=None,  # type: ignore[arg-type]
        slot=SimpleNamespace(version=2),  # type: ignore[arg-type]
        backends=None,  # type: ignore[arg-type]
        robot_config=synthetic_robot_config(),
    )
    job = Job(5, "run_task", lambda _: pytest.fail("run by run_task"))
    result = run_task(session, store, job, episodes=3, horizon_s=0.1)
    assert stored_before == [0, 1, 2]
    assert [(e.id, e.job, e.adapter_version, e.auto) for e in store.episodes()] == [
        (i, 5, 2, None) for i in (1, 2, 3)
    ]
    assert job.progress[0] == "episode 1: 0.5 s, success unknown (zk0-agent label success|failure)"
    assert (result.episodes, result.success.successes, result.success.episodes) == (3, 1, 1)


def _one_line_error(result: Any, expected: str) -> None:
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"error: {expected}") and result.stderr.count("\n") == 1


@pytest.fixture
def hub_only(tmp_path: Path) -> Iterator[DistributionRig]:
    """The rig without its 24 adapter templates: this daemon never gets a version."""
    rig = DistributionRig(tmp_path, [])
    yield rig
    rig.close()


def test_run_task_on_the_synthetic_arm_then_labels_over_the_control_socket(
    hub_only: DistributionRig, short_dir: Path, systemd: FakeSystemd
) -> None:
    with running_daemon(hub_only, short_dir, systemd, SYNTHETIC_ROBOT) as daemon:
        systemd.until("READY=1", timeout_s=180)
        _run_and_label(daemon)


def _run_and_label(daemon: Daemon) -> None:
    _one_line_error(daemon.run("label", "success"), "label: no task episodes to label yet")
    assert daemon.status().tasks.describe() == "no task episodes"

    # The synthetic arm cannot tell success: no rate until someone labels.
    out = daemon.cli("run-task", "--episodes", "1", "--horizon-s", "0.2")
    assert "success unknown (zk0-agent label success|failure)" in out
    assert "adapter base: 1 task episode, no labelled episodes;" in out
    result = daemon.status().job
    assert result is not None and isinstance(result.result, ac.TaskResult)
    assert result.result.success.rate is None and result.result.success_rate is None

    # The operator's key after each episode, piped: the first a success, the second a failure.
    run = daemon.run("run-task", "--episodes", "2", "--horizon-s", "0.2", "--label", stdin="s\nf\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("success? [s]uccess / [f]ailure / [enter] skip") == 2
    assert "episode 2 labelled success" in run.stdout and "episode 3 labelled failure" in run.stdout
    assert "2 task episodes, 2 labelled: 1/2 = 50% [9, 91] %;" in run.stdout

    assert "episode 1 (job 1, adapter base) labelled failure" in daemon.cli("label", "failure")
    _one_line_error(daemon.run("label", "success", "--episode", "99"), "label: no task episode 99")
    _one_line_error(daemon.run("label", "maybe"), "a label is success or failure, not 'maybe'")
    with pytest.raises(ControlError, match=r"^label: all 3 task episodes are labelled; "):
        request(daemon.socket, ac.Label(label="success"))
    request(daemon.socket, ac.Label(label="success", episode=1, relabel=True))

    listed = daemon.cli("labels").splitlines()
    counted = "3 task episodes, 3 labelled: 2/3 = 67% [21, 94] %"
    assert listed[:2] == [f"all           {counted}", f"base          {counted}"]
    assert daemon.status().tasks == ac.VersionCounts(
        **dict(counts(TaskEpisodeStore(daemon.config.data_root / FILE_NAME).episodes())),
        adapter_version=None,
    )
    # What the operator said is on disk, one episode a line, as the daemon wrote it.
    stored = TaskEpisodeStore(daemon.config.data_root / FILE_NAME).episodes()
    assert [(e.id, e.job, e.label, e.auto) for e in stored] == [
        (1, 1, "success", None),
        (2, 2, "success", None),
        (3, 2, "failure", None),
    ]
