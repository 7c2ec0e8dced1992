"""Crash-safe episodes into a LeRobot v3.0 dataset, written by LeRobot's own writer.

Each episode is written by a fresh ``LeRobotDataset.resume(...)`` writer that is finalized
right after ``save_episode``: LeRobot then starts new data, video and episode-metadata files
for it, and closes them, so no Parquet writer stays open across episodes (an open one is
unreadable after a crash and takes the episodes before it along). ``Journal`` brackets every
save so an interrupted one can be rolled back (see ``journal.py``). Video is encoded in this
process (no encoder subprocesses that could outlive a SIGKILL and write after recovery): by
default while frames arrive (LeRobot's streaming encoder, one thread per camera writing into a
``tmp*/`` folder that recovery clears), else from PNGs staged in ``images/`` on save. Before a
save is committed, every camera's new video must hold every frame: a streaming encoder that fell
behind drops frames, and such an episode is rolled back and reported, never kept.

The cost: one data/video/metadata file per episode instead of LeRobot's ~100 MB shards, which
is what an arm's own dataset (hundreds of episodes) can afford.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from zk0.agent.recording.checks import LEROBOT_DEFAULTS, EpisodeRejectedError
from zk0.agent.recording.journal import (
    JOURNAL_DIR,
    Journal,
    RecoveryReport,
    dataset_lock,
    publish,
    remove_stale_staging,
    staging_path,
)
from zk0.shared.video import VideoConfig

SUCCESS_KEY = "next.success"
#: Encoder options that keep a codec's per-file report off stderr (x265 prints it itself).
_QUIET: dict[str, dict[str, str]] = {
    "libsvtav1": {}, "h264": {}, "hevc": {"x265-params": "log-level=error"}
}  # fmt: skip


def dataset_features(robot: Any, teleop: Any) -> dict[str, dict[str, Any]]:
    """LeRobot dataset features for a robot (and ``next.success`` if the operator knows it)."""
    from lerobot.utils.feature_utils import hw_to_dataset_features

    features = {
        **hw_to_dataset_features(robot.action_features, "action", use_video=True),
        **hw_to_dataset_features(robot.observation_features, "observation", use_video=True),
    }
    if getattr(teleop, "reports_success", False):
        features[SUCCESS_KEY] = {"dtype": "bool", "shape": (1,), "names": None}
    return features


def _comparable(features: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (spec["dtype"], tuple(spec["shape"]), spec.get("names"))
        for key, spec in features.items()
    }


@contextlib.contextmanager
def _datasets_cache(root: Path) -> Iterator[None]:
    """Point the ``datasets`` cache into the dataset while LeRobot loads its metadata.

    LeRobot reads ``meta/episodes`` through ``datasets``, which copies it into its cache under a
    new key whenever the file list changes: once per episode here, so the default cache would
    grow with the square of the episode count. This one is deleted after each episode.
    """
    import datasets.config  # type: ignore[import-untyped]

    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = root / JOURNAL_DIR / "cache"
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = previous
        shutil.rmtree(root / JOURNAL_DIR / "cache", ignore_errors=True)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars while LeRobot saves an episode (one per save, on stderr)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


class EpisodeWriter:
    """Episodes into the dataset at ``root``, one crash-safe save at a time.

    Use as a context manager: it holds the dataset's lock, and opening recovers from any
    earlier crash before anything else touches the dataset.
    """

    def __init__(
        self,
        root: Path,
        features: dict[str, dict[str, Any]],
        fps: int,
        robot_type: str,
        resume: bool,
        repo_id: str | None = None,
        image_writer_threads: int = 4,
        video: VideoConfig | None = None,
    ) -> None:
        """``image_writer_threads``: LeRobot's PNG writers when not streaming (0: in the loop)."""
        import av

        os.environ.setdefault("SVT_LOG", "1")  # LeRobot's AV1 encoder: errors only on stderr
        av.logging.set_libav_level(av.logging.ERROR)  # libx264 reports each file at INFO
        self.root = Path(root).absolute()
        self.repo_id = repo_id or f"zk0/{self.root.name}"
        self.features = features
        self.fps = fps
        self.robot_type = robot_type
        self.resume = resume
        self.image_writer_threads = image_writer_threads
        self.video = video or VideoConfig()
        self.recovery: RecoveryReport | None = None
        self._journal = Journal(self.root)
        self._lock: contextlib.ExitStack | None = None
        self._dataset: Any = None
        self._frames = 0  # added to the open episode

    def __enter__(self) -> EpisodeWriter:
        stack = contextlib.ExitStack()
        stack.enter_context(dataset_lock(self.root))
        try:
            self._open()
        except BaseException:
            stack.close()
            raise
        self._lock = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dataset is not None:
            self.discard()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _open(self) -> None:
        remove_stale_staging(self.root)
        if not (self.root / "meta" / "info.json").exists():
            if self.root.exists() and any(self.root.iterdir()):
                raise ValueError(f"{self.root} exists but is not a LeRobot dataset")
            self._create()
            return
        self.recovery = self._journal.recover()
        if not self.resume and self.recovery.committed_episodes > 0:
            raise ValueError(
                f"{self.root} already holds a dataset ({self.recovery.committed_episodes} "
                "episodes): pass --resume to add episodes, or choose another --root"
            )
        self._check_compatible()
        logger.info("resuming {}: {}", self.root, self.recovery.describe())

    def _create(self) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        if self.root.exists():
            self.root.rmdir()  # empty: checked above
        staging = staging_path(self.root)
        dataset = LeRobotDataset.create(
            self.repo_id,
            self.fps,
            self.features,
            root=staging,
            robot_type=self.robot_type,
            use_videos=True,
            video_backend="pyav",  # skips LeRobot's torchcodec probe (a traceback when broken)
        )
        dataset.finalize()
        Journal(staging).initialize(0)
        publish(staging, self.root)
        logger.info("created dataset {} ({} fps, {})", self.root, self.fps, sorted(self.features))

    def _check_compatible(self) -> None:
        import json

        info = json.loads((self.root / "meta" / "info.json").read_text())
        if int(info["fps"]) != self.fps:
            raise ValueError(
                f"{self.root} was recorded at {info['fps']} fps, this arm runs {self.fps}"
            )
        stored = {k: v for k, v in info["features"].items() if k not in LEROBOT_DEFAULTS}
        if set(stored) != set(self.features) or _comparable(stored) != _comparable(self.features):
            raise ValueError(
                f"{self.root} holds other features ({sorted(info['features'])}) than this "
                f"arm records ({sorted(self.features)}); choose another --root"
            )

    @property
    def num_episodes(self) -> int:
        return self._journal.committed_episodes

    def begin_episode(self) -> None:
        """Open LeRobot's writer for the next episode (``add_frame`` stages its images)."""
        from lerobot.configs.video import RGBEncoderConfig
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        if self._dataset is not None:
            raise RuntimeError("an episode is already open")
        video = self.video
        with _datasets_cache(self.root):
            self._dataset = LeRobotDataset.resume(
                self.repo_id,
                root=self.root,
                image_writer_threads=0 if video.streaming_encoding else self.image_writer_threads,
                video_backend="pyav",
                rgb_encoder=RGBEncoderConfig(vcodec=video.codec, extra_options=_QUIET[video.codec]),
                encoder_threads=video.encoder_threads,
                streaming_encoding=video.streaming_encoding,
                encoder_queue_maxsize=max(1, round(video.queue_s * self.fps)),
            )
        self._frames = 0

    def add_frame(self, frame: dict[str, Any]) -> None:
        self._dataset.add_frame(frame)
        self._frames += 1

    def discard(self) -> None:
        """Drop the open episode: its staged images go, the dataset stays as it was."""
        dataset, self._dataset = self._dataset, None
        if dataset is None:
            return
        try:
            if dataset.has_pending_frames():
                dataset.clear_episode_buffer(delete_images=True)
            dataset.writer.stop_image_writer()
        finally:
            shutil.rmtree(self.root / "images", ignore_errors=True)

    def save(self) -> float:
        """Save and close the open episode; returns seconds taken. Crash-safe (see module doc)."""
        dataset, self._dataset = self._dataset, None
        if dataset is None:
            raise RuntimeError("no episode is open")
        start = time.perf_counter()
        index = self._journal.committed_episodes
        self._journal.begin(index)
        try:
            with _quiet_datasets():
                dataset.save_episode(parallel_encoding=False)
            dataset.finalize()
            self._check_videos(index, self._journal.added())
        except BaseException:
            logger.error("saving episode {} failed: rolling it back", index)
            with contextlib.suppress(Exception):
                dataset.writer.stop_image_writer()
            self.recovery = self._journal.recover()
            raise
        shutil.rmtree(self.root / "images", ignore_errors=True)  # LeRobot's emptied staging
        self._journal.commit(index)
        return time.perf_counter() - start

    def _check_videos(self, index: int, added: list[str]) -> None:
        """Every camera's video of the episode just saved holds every frame, else
        ``EpisodeRejectedError`` (the save is then rolled back)."""
        import av

        videos = [name for name in added if name.startswith("videos/") and name.endswith(".mp4")]
        cameras = [k for k, spec in self.features.items() if spec["dtype"] == "video"]
        if len(videos) != len(cameras):
            raise EpisodeRejectedError(
                f"episode {index}: {len(videos)} new video files for {len(cameras)} cameras"
            )
        for name in videos:
            with av.open(str(self.root / name)) as container:
                frames = container.streams.video[0].frames
            if frames != self._frames:
                raise EpisodeRejectedError(
                    f"episode {index}: {name} holds {frames} of {self._frames} frames (the "
                    "video encoder fell behind: a lighter video.codec, or more CPU)"
                )
