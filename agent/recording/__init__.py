"""Recording: teleoperated episodes into the arm's own LeRobot v3.0 dataset, crash-safely.

``record_episodes`` records (``recorder.py``); ``EpisodeWriter`` writes one closed file set per
episode under an episode journal (``writer.py``, ``journal.py``); ``recover_dataset`` rolls back
an episode a crash cut short, so plain ``LeRobotDataset(repo_id, root=...)`` loads the rest;
``checks.py`` holds the data checks every frame passes before it is stored.
"""

from zk0.agent.recording.checks import CheckLimits, EpisodeChecker, EpisodeRejectedError
from zk0.agent.recording.journal import DatasetBusyError, RecoveryReport, recover_dataset
from zk0.agent.recording.recorder import (
    EpisodeSummary,
    RecordingAbortedError,
    RecordResult,
    record_episodes,
)
from zk0.agent.recording.writer import SUCCESS_KEY, EpisodeWriter, dataset_features

__all__ = [
    "SUCCESS_KEY",
    "CheckLimits",
    "DatasetBusyError",
    "EpisodeChecker",
    "EpisodeRejectedError",
    "EpisodeSummary",
    "EpisodeWriter",
    "RecordResult",
    "RecordingAbortedError",
    "RecoveryReport",
    "dataset_features",
    "record_episodes",
    "recover_dataset",
]
