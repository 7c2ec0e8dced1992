"""``zk0-agent eval``: closed-loop episodes on the simulated arm, report and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import SIM_ROBOT
from zk0.agent.cli import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_eval_runs_episodes_with_an_adapter_on_onnx_runtime(
    tiny_adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZK0_OUTPUTS", str(tmp_path / "outputs"))
    robot = yaml.safe_load(SIM_ROBOT.read_text())
    robot["episode_time_s"] = 1.0
    robot_file = tmp_path / "robot.yaml"
    robot_file.write_text(yaml.safe_dump(robot))
    report_file, plot_file = tmp_path / "eval.json", tmp_path / "depth.png"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--robot-config",
            str(robot_file),
            "--policy",
            "tiny",
            "--adapter",
            str(tiny_adapters[1]),
            "--episodes",
            "2",
            "--mode",
            "async",
            "--backend",
            "onnx",
            "--json",
            str(report_file),
            "--plot",
            str(plot_file),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "chunk latency p50" in result.output
    assert list((tmp_path / "outputs").glob("*/eval/eval.log"))
    report = json.loads(report_file.read_text())
    assert report["episodes"] == 2 and report["adapter_version"] == 1
    assert report["success_rate"] == 0.0  # the untrained tiny policy never places the cube
    assert report["horizon_steps"] == 30
    # --onnx-wait (the default): every chunk ran in ONNX Runtime, with the adapter's weights.
    assert set(report["chunks_by_backend"]) == {"onnxruntime"}
    for episode in report["per_episode"]:
        assert episode["actions"] == 30
        assert set(episode["versions"]) == {1}
    for key in ("mean_episode_s", "chunk_latency_p50_s", "chunk_latency_p95_s", "starved_fraction"):
        assert isinstance(report[key], float) and report[key] >= 0.0
    assert report["chunk_latency_p50_s"] <= report["chunk_latency_p95_s"]
    trace = report["queue_depth_trace"][0]
    assert len(trace["t"]) == len(trace["depth"]) == report["per_episode"][0]["ticks"]
    assert max(trace["depth"]) <= 50 and trace["depth"][0] == 0
    assert plot_file.read_bytes()[:8] == PNG_MAGIC


def test_eval_refuses_an_unknown_mode_in_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "zk0.agent.cli", "eval", "--robot-config", str(SIM_ROBOT)]
    run = subprocess.run(
        [*argv, "--policy", "tiny", "--mode", "fast"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "error: --mode: Input should be 'async' or 'sync'"
