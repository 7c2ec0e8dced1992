"""What every benchmark shares: timing, result files, synthetic policy batches."""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import typer

from zk0.shared.features import ACTION_KEY, STATE_KEY


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def source_revision() -> str | None:
    """The git commit of the checkout this bench runs from, ``-dirty`` if edited (None for an
    installed package): results finished in parts say which code measured each part."""
    try:
        completed = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=str(importlib.resources.files("zk0.bench")),  # a checkout's, or site-packages
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return None
    return completed.stdout.strip() or None if completed.returncode == 0 else None


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median, 95th percentile and spread of ``repeats`` timed calls of ``fn`` after ``warmup``
    untimed ones (the GPU synchronized around each)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - start)
    ordered = sorted(samples)
    return {
        "median_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "min_s": ordered[0],
        "max_s": ordered[-1],
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def flower_task_identity() -> Iterator[None]:
    """Within it, Flower ``Message``s can be built outside Flower's runtime: the ServerApp's
    runtime sets a task identity (Flower's private ``TaskIdentity``) before a strategy builds
    them; this sets one and restores what was there."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = 1
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def write_result(path: Path | None, result: dict[str, Any], summary: str) -> None:
    """Print the one-line summary; write the JSON (with the summary and machine) if asked."""
    result = {**result, "summary": summary, "machine": machine_info()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(summary)


def synthetic_batch(
    policy: Any, preprocessor: Any, batch_size: int, task: str = "pick the cube", seed: int = 0
) -> dict[str, Any]:
    """A preprocessed training batch of random frames shaped like the policy's inputs.

    Used where only cost or trainability matters; learning from real episodes lives with the
    recorder and the trainer.
    """
    config = policy.config
    generator = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(batch_size):
        frame: dict[str, Any] = {
            key: torch.rand(feature.shape, generator=generator)
            for key, feature in config.input_features.items()
        }
        frame["task"] = task
        frames.append(preprocessor(frame))
    batch = {
        key: torch.cat([f[key] for f in frames])
        if isinstance(frames[0][key], torch.Tensor)
        else frames[0][key]
        for key in frames[0]
        if key.startswith("observation.")
    }
    action_dim = config.output_features[ACTION_KEY].shape[0]
    device = batch[STATE_KEY].device
    batch[ACTION_KEY] = torch.randn(
        batch_size, config.chunk_size, action_dim, generator=generator
    ).to(device)
    batch["action_is_pad"] = torch.zeros(
        batch_size, config.chunk_size, dtype=torch.bool, device=device
    )
    return batch


def random_observation(policy: Any, seed: int, task: str = "pick the cube") -> dict[str, Any]:
    """One raw observation shaped like the policy's inputs (uniform noise, reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    frame: dict[str, Any] = {
        key: torch.rand(feature.shape, generator=generator)
        for key, feature in policy.config.input_features.items()
    }
    frame["task"] = task
    return frame


def total_episodes(dataset_root: Path) -> int:
    """Episodes a LeRobot dataset holds, from its ``meta/info.json``."""
    return int(json.loads((dataset_root / "meta" / "info.json").read_text())["total_episodes"])
