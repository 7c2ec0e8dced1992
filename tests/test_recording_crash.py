"""Nothing recorded is lost: real recording processes, real signals, plain LeRobot reading after.

SIGKILL at any moment (while frames are added, inside ``save_episode``/finalize) costs at most
the episode in progress; SIGTERM finalizes cleanly; ``--resume`` continues the numbering. The
synthetic robot runs the loop; the simulated arm takes one trial.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO_ROOT, SIM_ROBOT, SYNTHETIC_ROBOT, check_recorded_dataset
from zk0.agent.recording import recover_dataset

BIN = REPO_ROOT / ".venv" / "bin"
SAVED = re.compile(r"^episode (\d+): .*\(saved in", re.MULTILINE)


def _config(tmp_path: Path, name: str, **changes: Any) -> Path:
    raw = yaml.safe_load(SYNTHETIC_ROBOT.read_text())
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Recorder:
    """``zk0-agent record --resume`` in its own process, watched through the dataset's journal."""

    def __init__(self, tmp_path: Path, config: Path, root: Path, episodes: int = 1000) -> None:
        self.root = root
        self.stderr = (tmp_path / "stderr.log").open("a")
        env = {**os.environ, "ZK0_OUTPUTS": str(tmp_path / "outputs")}
        self.process = subprocess.Popen(
            [
                *(str(BIN / "zk0-agent"), "record", "--robot-config", str(config)),
                *("--root", str(root), "--episodes", str(episodes), "--resume", "--no-progress"),
            ],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.stdout = ""

    def journal(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads((self.root / ".zk0" / "journal.json").read_text())
        except FileNotFoundError:
            return None
        return state

    def wait_for(self, condition: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                self.finish()
                pytest.fail(f"recorder exited early ({self.process.returncode}): {self.stdout}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail("recorder never reached the point to interrupt")
            time.sleep(0.005)

    def committed(self) -> int:
        state = self.journal()
        return int(state["committed_episodes"]) if state else 0

    def saving(self, at_least: int) -> bool:
        state = self.journal()
        return bool(state and state["pending"] and state["pending"]["episode_index"] >= at_least)

    def adding_frames(self, after: int) -> bool:
        """Past ``after`` episodes, frames go to the streaming encoders (``tmp*/``) or PNGs."""
        staging = (self.root / "images").exists() or any(self.root.glob("tmp*"))
        return self.committed() > after and staging

    def finish(self, timeout: float = 120.0) -> int:
        out, _ = self.process.communicate(timeout=timeout)
        self.stdout += out
        self.stderr.close()
        return self.process.returncode

    def saved(self) -> list[int]:
        return [int(index) for index in SAVED.findall(self.stdout)]


def _pending(root: Path) -> dict[str, Any] | None:
    pending: dict[str, Any] | None = json.loads((root / ".zk0" / "journal.json").read_text())[
        "pending"
    ]
    return pending


def test_sigkill_loses_at_most_the_episode_in_progress(tmp_path: Path) -> None:
    # Same features, two paces: unpaced for kills inside saves (they come quickly), real time
    # (1 s of frames per episode) for kills while frames are being added.
    fast = _config(tmp_path, "fast", episode_time_s=3, options={"realtime": False})
    paced = _config(tmp_path, "paced", episode_time_s=1)
    root = tmp_path / "ds"
    delays = [0.0, 0.03, 0.08, 0.15, 0.25]
    saved: list[int] = []
    inside_save = 0
    for trial in range(10):
        before = len(saved)
        in_save_mode = trial % 2 == 0
        recorder = Recorder(tmp_path, fast if in_save_mode else paced, root)
        if in_save_mode:  # inside save_episode / finalize / the journal's commit
            recorder.wait_for(functools.partial(recorder.saving, at_least=before))
        else:  # while the next episode's frames are being added
            recorder.wait_for(functools.partial(recorder.adding_frames, after=before))
        time.sleep(delays[trial // 2])
        recorder.process.send_signal(signal.SIGKILL)
        assert recorder.finish() == -signal.SIGKILL
        printed = recorder.saved()
        assert printed == list(range(before, before + len(printed)))  # resumed without gaps
        saved += printed
        pending = _pending(root)
        if in_save_mode:
            inside_save += pending is not None
        else:  # killed between saves: the files are whole, plain LeRobot reads them as they are
            assert pending is None
            assert len(check_recorded_dataset(root)) >= len(saved)
        report = recover_dataset(root)  # the step every recording session starts with
        assert report.rolled_back == (pending["episode_index"] if pending else None)
        lengths = check_recorded_dataset(root)
        assert len(lengths) in (len(saved), len(saved) + 1)  # +1: killed before it was printed
        assert set(lengths) <= {30, 90}
        saved = list(range(len(lengths)))
    assert inside_save >= 3, f"only {inside_save} kills landed inside a save"
    assert len(saved) >= 5  # every paced trial kept at least the episode before the kill
    assert not (root / "images").exists() and not list(root.glob("tmp*"))


def test_sigterm_and_ctrl_c_finalize_the_dataset_cleanly(tmp_path: Path) -> None:
    config = _config(tmp_path, "realtime", episode_time_s=2)
    root = tmp_path / "ds"
    total = 0
    trials = [
        ("frames", signal.SIGTERM, 0),
        ("saving", signal.SIGTERM, 0),
        ("frames", signal.SIGTERM, 0),
        ("frames", signal.SIGINT, 130),  # Ctrl-C
    ]
    for mode, signum, code in trials:
        recorder = Recorder(tmp_path, config, root)
        if mode == "frames":
            recorder.wait_for(functools.partial(recorder.adding_frames, after=total))
            time.sleep(0.5)
        else:
            recorder.wait_for(functools.partial(recorder.saving, at_least=total))
        recorder.process.send_signal(signum)
        assert recorder.finish() == code
        assert f"stopped by {signal.Signals(signum).name}" in recorder.stdout
        assert _pending(root) is None  # nothing to recover: plain LeRobot reads it as it is
        printed = recorder.saved()
        assert printed == list(range(total, total + len(printed)))
        lengths = check_recorded_dataset(root)
        assert len(lengths) == total + len(printed)
        if mode == "frames":  # the episode it stopped was kept, shorter
            assert f"interrupted by {signal.Signals(signum).name}" in recorder.stdout
            assert 2 <= lengths[-1] < 60
        total = len(lengths)
        assert not (root / "images").exists()


def test_sigkill_inside_a_save_on_the_simulated_arm(tmp_path: Path) -> None:
    root = tmp_path / "sim"
    recorder = Recorder(tmp_path, SIM_ROBOT, root, episodes=3)
    recorder.wait_for(lambda: recorder.saving(at_least=1))
    recorder.process.send_signal(signal.SIGKILL)
    assert recorder.finish() == -signal.SIGKILL
    assert recorder.saved() == [0]
    pending = _pending(root)
    assert pending is not None and pending["episode_index"] == 1  # killed inside its save
    result = subprocess.run(
        [str(BIN / "zk0-agent"), "recover", str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "rolled back unfinished episode 1" in result.stdout
    lengths = check_recorded_dataset(root)
    assert len(lengths) == 1 and lengths[0] > 100  # the whole first pick-and-place
