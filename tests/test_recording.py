"""Recording into a LeRobot dataset: the CLI on the simulated arm, resuming, the data checks."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loguru import logger

from conftest import REPO_ROOT, SIM_ROBOT, check_recorded_dataset, synthetic_robot_config
from zk0.agent.recording import (
    CheckLimits,
    EpisodeChecker,
    EpisodeRejectedError,
    EpisodeSummary,
    RecordingAbortedError,
    record_episodes,
)
from zk0.agent.robots import FrameStamp
from zk0.shared.video import VideoConfig

BIN = REPO_ROOT / ".venv" / "bin"
VIRTUAL = {"realtime": False}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def test_cli_records_sim_episodes_that_plain_lerobot_opens(tmp_path: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path / "sim_ds"
    result = subprocess.run(
        [
            *(str(BIN / "zk0-agent"), "record", "--robot-config", str(SIM_ROBOT)),
            *("--episodes", "3", "--root", str(root)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ZK0_OUTPUTS": str(tmp_path / "outputs")},
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("episode")] == [
        "episode 0",
        "episode 1",
        "episode 2",
    ]
    assert all("success yes" in line for line in lines if line.startswith("episode"))
    assert f"dataset {root}: 3 episodes (3 new, success 100%)" in result.stdout

    dataset = LeRobotDataset("zk0/sim_ds", root=root, video_backend="pyav")
    assert dataset.num_episodes == 3 and dataset.fps == 30
    features = dataset.features
    assert features["observation.state"]["shape"] == (6,)
    assert features["action"]["shape"] == (6,)
    assert features["observation.state"]["names"] == [
        "shoulder_pan.pos",
        "shoulder_lift.pos",
        "elbow_flex.pos",
        "wrist_flex.pos",
        "wrist_roll.pos",
        "gripper.pos",
    ]
    assert sorted(dataset.meta.video_keys) == [
        "observation.images.camera1",
        "observation.images.camera2",
    ]
    assert features["observation.images.camera1"]["shape"] == (96, 128, 3)
    assert features["next.success"]["dtype"] == "bool"
    table = dataset.hf_dataset.with_format("numpy")
    success = np.asarray(table["next.success"]).reshape(-1)
    ends = np.cumsum([int(length) for length in dataset.meta.episodes["length"]]) - 1
    assert success[ends].all() and not success[0]  # placed at the end, not at the start
    assert check_recorded_dataset(root) == [int(n) for n in dataset.meta.episodes["length"]]
    frame = dataset[0]
    assert frame["observation.images.camera2"].shape == (3, 96, 128)
    assert frame["task"] == "pick the cube, place in bin"


def test_resume_continues_numbering_and_refuses_without_it(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    config = synthetic_robot_config(episode_time_s=0.5, options=VIRTUAL)
    first = record_episodes(config, root, 2)
    assert [e.index for e in first.episodes] == [0, 1] and first.total_episodes == 2
    with pytest.raises(ValueError, match=r"already holds a dataset \(2 episodes\): pass --resume"):
        record_episodes(config, root, 1)
    second = record_episodes(config, root, 2, resume=True)
    assert [e.index for e in second.episodes] == [2, 3] and second.total_episodes == 4
    assert check_recorded_dataset(root) == [15, 15, 15, 15]
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    table = LeRobotDataset("zk0/ds", root=root, video_backend="pyav").hf_dataset
    table = table.with_format("numpy")
    state, action = np.asarray(table["observation.state"]), np.asarray(table["action"])
    assert np.allclose(state[1:15], action[:14])  # the synthetic servo follows one frame late
    other = synthetic_robot_config(
        cameras={"front": config.cameras["front"]}, episode_time_s=0.5, options=VIRTUAL
    )
    with pytest.raises(ValueError, match="holds other features"):
        record_episodes(other, root, 1, resume=True)


def test_real_time_recording_keeps_the_configured_pace(tmp_path: Path) -> None:
    config = synthetic_robot_config(episode_time_s=1.0)
    result = record_episodes(config, tmp_path / "ds", 1)
    (episode,) = result.saved
    assert episode.frames == 30
    assert episode.wall_s >= 29 / 30  # paced by the wall clock, not as fast as possible
    assert episode.duration_s == pytest.approx(29 / 30, abs=0.2)


def _record_with_faults(root: Path, **options: Any) -> list[EpisodeSummary]:
    summaries: list[EpisodeSummary] = []
    config = synthetic_robot_config(episode_time_s=1.0, options={**VIRTUAL, **options})
    with contextlib.suppress(RecordingAbortedError):  # after 3 dropped episodes in a row
        record_episodes(config, root, 1, resume=True, on_episode=summaries.append)
    return summaries


def test_a_late_frame_is_logged_and_the_episode_kept(tmp_path: Path) -> None:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        (episode,) = _record_with_faults(tmp_path / "ds", stall_frames=[10], stall_s=0.04)
    finally:
        logger.remove(sink)
    assert episode.saved and episode.late_frames == 1
    assert any(
        "frame 10: state came 73 ms after the previous one (limit 50 ms)" in m for m in messages
    )


@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        (
            {"stall_frames": [10, 11, 12], "stall_s": 0.06},
            "frame 12: 3 late frames in a row on state (gaps over 50 ms)",
        ),
        ({"stall_frames": [10], "stall_s": 0.5}, "frame 10: state froze for 533 ms"),
        ({"duplicate_frames": [7]}, "frame 7: camera1 delivered its frame"),
    ],
)
def test_a_violation_drops_the_episode_never_the_dataset(
    tmp_path: Path, faults: dict[str, Any], reason: str
) -> None:
    root = tmp_path / "ds"
    record_episodes(synthetic_robot_config(episode_time_s=0.5, options=VIRTUAL), root, 1)
    summaries = _record_with_faults(root, **faults)
    assert len(summaries) == 3  # re-recorded, then given up after 3 in a row
    assert all(not s.saved and s.reason.startswith(reason) for s in summaries)
    assert check_recorded_dataset(root) == [15]  # what was there is untouched
    assert not (root / "images").exists()


def test_each_codec_streams_every_frame_and_a_video_short_of_frames_is_never_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import av
    from lerobot.datasets.video_utils import StreamingVideoEncoder

    root = tmp_path / "ds"
    for index, codec in enumerate(("h264", "hevc", "libsvtav1")):
        config = synthetic_robot_config(
            episode_time_s=0.5, options=VIRTUAL, video=VideoConfig(codec=codec)
        )
        record_episodes(config, root, 1, resume=index > 0)
        for camera in ("camera1", "camera2"):
            (video,) = (root / "videos" / f"observation.images.{camera}").rglob(
                f"file-{index:03d}.mp4"
            )
            with av.open(str(video)) as container:
                stream = container.streams.video[0]
                assert (stream.codec_context.codec.canonical_name, stream.frames) == (
                    {"h264": "h264", "hevc": "hevc", "libsvtav1": "av1"}[codec],
                    15,
                )
    assert check_recorded_dataset(root) == [15, 15, 15]
    assert not (root / "images").exists()  # streamed: no PNG staging

    # The encoder falls behind (LeRobot drops a frame whose queue is full, with a warning).
    feed = StreamingVideoEncoder.feed_frame

    def drop_frame_7(encoder: Any, key: str, image: Any) -> None:
        fed = getattr(encoder, "fed", 0)
        encoder.fed = fed + 1
        if fed != 7:
            feed(encoder, key, image)

    monkeypatch.setattr(StreamingVideoEncoder, "feed_frame", drop_frame_7)
    summaries = _record_with_faults(root)
    assert len(summaries) == 3 and not any(s.saved for s in summaries)
    assert "holds 29 of 30 frames (the video encoder fell behind" in summaries[0].reason
    assert check_recorded_dataset(root) == [15, 15, 15]  # rolled back, the rest untouched
    assert not list(root.glob("tmp*")) and not (root / "images").exists()


def test_bad_task_text_fails_before_anything_is_written(tmp_path: Path) -> None:
    config = synthetic_robot_config(options=VIRTUAL)
    with pytest.raises(ValueError, match="task: 31 characters, more than max_task_chars=30"):
        record_episodes(config, tmp_path / "ds", 1, task="x" * 31)
    with pytest.raises(ValueError, match="task: must not be empty"):
        record_episodes(config, tmp_path / "ds", 1, task="  ")
    assert not (tmp_path / "ds").exists()


def _checker() -> EpisodeChecker:
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
        "observation.images.camera1": {"dtype": "video", "shape": (4, 4, 3), "names": None},
    }
    return EpisodeChecker(CheckLimits(fps=30, max_task_chars=30), features, ("state",), "pick")


def _frame(**changes: Any) -> dict[str, Any]:
    frame = {
        "observation.state": np.zeros(6, np.float32),
        "observation.images.camera1": np.zeros((4, 4, 3), np.uint8),
        "task": "pick",
    }
    return {**frame, **changes}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_frame(**{"observation.state": np.zeros(5, np.float32)}), "expected shape (6,), got (5,)"),
        (_frame(**{"observation.state": np.full(6, np.nan, np.float32)}), "not finite"),
        (
            _frame(**{"observation.images.camera1": np.zeros((4, 4, 3), np.float32)}),
            "expected a uint8 image (4, 4, 3)",
        ),
        ({"task": "pick"}, "missing features ['observation.images.camera1', 'observation.state']"),
        (_frame(extra=1), "unexpected ['extra']"),
        (_frame(task="place"), "task changed to 'place'"),
    ],
)
def test_frames_with_wrong_features_are_rejected(frame: dict[str, Any], reason: str) -> None:
    with pytest.raises(EpisodeRejectedError, match="frame 0: ") as error:
        _checker().check_frame(0, frame, {"state": FrameStamp(t=0.0)})
    assert reason in str(error.value)


def test_capture_stamps_must_advance() -> None:
    checker = _checker()
    checker.check_frame(0, _frame(), {"state": FrameStamp(t=0.0, counter=4)})
    with pytest.raises(EpisodeRejectedError, match="state delivered its frame 4 again"):
        checker.check_frame(1, _frame(), {"state": FrameStamp(t=0.033, counter=4)})
    with pytest.raises(EpisodeRejectedError, match="no capture stamp for state"):
        _checker().check_frame(0, _frame(), {})
