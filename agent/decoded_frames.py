"""A LeRobot dataset's episodes decoded once into memory, yielding what ``LeRobotDataset`` yields.

``LeRobotDataset`` decodes the video around every sample it is asked for: seek to a key frame,
decode forward, keep one frame. For a training run of thousands of steps over the same few
thousand frames that is most of the cost (about 5 s per episode-pass here, against 0.25 s to
decode an episode once in order). ``DecodedFrames`` decodes each episode's videos once with
LeRobot's own decoder and then serves samples from memory: the same keys, the same action
chunk with the same padding at an episode's end (``action_is_pad``), bit-identical images.

Memory: ``frames x cameras x H x W x 3`` bytes (two 96 x 128 cameras: 74 KB a frame; 30,000
frames: 2.2 GB). Use it where a dataset is trained on many times (pretraining a base, benches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from zk0.agent.training import VIDEO_BACKEND
from zk0.shared.features import ACTION_KEY, STATE_KEY


class DecodedFrames(torch.utils.data.Dataset[dict[str, Any]]):
    """Frames of ``episodes`` of the dataset at ``root`` with ``chunk_size``-action targets."""

    def __init__(self, root: Path, chunk_size: int, episodes: list[int] | None = None) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
        from lerobot.datasets.video_utils import decode_video_frames

        root = Path(root)
        dataset = LeRobotDataset(
            root.name, root=root, episodes=episodes, video_backend=VIDEO_BACKEND
        )
        meta = dataset.meta
        columns = dataset.hf_dataset.with_format("numpy")
        episode_index = np.asarray(columns["episode_index"])
        timestamps = np.asarray(columns["timestamp"], dtype=np.float64)
        self.chunk_size = chunk_size
        self.video_keys: list[str] = list(meta.video_keys)
        self.states = torch.from_numpy(np.stack(columns[STATE_KEY]).astype(np.float32))
        self.actions = torch.from_numpy(np.stack(columns[ACTION_KEY]).astype(np.float32))
        # Every other column (index, frame_index, timestamp, episode_index, task_index, ...) as
        # LeRobotDataset returns it: a 0-d tensor per frame.
        self.columns = {
            key: torch.from_numpy(np.asarray(columns[key]))
            for key in dataset.hf_dataset.column_names
            if key not in (STATE_KEY, ACTION_KEY)
        }
        task_of = {int(i): str(task) for task, i in meta.tasks["task_index"].items()}
        self.tasks = [task_of[int(i)] for i in np.asarray(columns["task_index"])]
        # Rows of one episode are contiguous; where each row's episode ends (exclusive).
        self.episode_end = np.zeros(len(episode_index), dtype=np.int64)
        self.images: dict[str, torch.Tensor] = {}
        frames: dict[str, list[torch.Tensor]] = {key: [] for key in self.video_keys}
        boundaries = np.flatnonzero(np.diff(episode_index)) + 1
        for start, end in zip(
            [0, *boundaries.tolist()], [*boundaries.tolist(), len(episode_index)], strict=True
        ):
            self.episode_end[start:end] = end
            record = meta.episodes[int(episode_index[start])]
            for key in self.video_keys:
                offset = float(record[f"videos/{key}/from_timestamp"])
                path = root / meta.get_video_file_path(int(episode_index[start]), key)
                frames[key].append(
                    decode_video_frames(
                        path,
                        [offset + float(t) for t in timestamps[start:end]],
                        dataset.tolerance_s,
                        VIDEO_BACKEND,
                        return_uint8=True,
                    )
                )
        for key in self.video_keys:
            self.images[key] = torch.cat(frames[key]) if frames[key] else torch.empty(0)
        logger.info(
            "decoded {} frames of {} episodes of {} into memory ({:.0f} MB)",
            len(self),
            len(boundaries) + 1,
            root.name,
            sum(t.numel() for t in self.images.values()) / 1e6,
        )

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: int) -> dict[str, Any]:
        end = int(self.episode_end[index])
        targets = index + np.arange(self.chunk_size)
        rows = torch.from_numpy(np.minimum(targets, end - 1))
        item: dict[str, Any] = {
            STATE_KEY: self.states[index],
            ACTION_KEY: self.actions[rows],
            f"{ACTION_KEY}_is_pad": torch.from_numpy(targets >= end),
            **{key: column[index] for key, column in self.columns.items()},
            "task": self.tasks[index],
        }
        for key, images in self.images.items():
            item[key] = images[index].to(torch.float32).div_(255.0)
        return item
