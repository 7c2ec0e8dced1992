"""The three console scripts answer --help, and the demo runs the end-to-end path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


@pytest.mark.parametrize(
    "command",
    [
        ["zk0", "--help"],
        ["zk0", "policy", "info", "--help"],
        ["zk0", "adapter", "verify", "--help"],
        ["zk0", "bench", "policy", "--help"],
        ["zk0-agent", "--help"],
        ["zk0-agent", "config", "check", "--help"],
        ["zk0-hub", "--help"],
        ["zk0-hub", "adapters", "list", "--help"],
    ],
)
def test_help_everywhere(command: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


@pytest.mark.parametrize(
    ("module", "usage"),
    [("zk0.cli", "demo"), ("zk0.hub.cli", "start-run"), ("zk0.agent.cli", "run-task")],
)
def test_every_entry_point_runs_as_a_module(module: str, usage: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert usage in result.stdout


def test_demo_options_are_the_models_with_its_bounds() -> None:
    result = subprocess.run(
        [str(BIN / "zk0"), "demo", "--agents", "9"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --agents: Input should be less than or equal to 4"
