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


def test_demo_publishes_a_version_the_agent_verifies(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "zk0"), "demo", "--outputs", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "hub" / "adapters" / "current.json").exists()
    assert (
        run_dir / "agents" / "sim-01" / "adapters" / "versions" / "0" / "manifest.json"
    ).exists()
    assert "runs version 0" in (run_dir / "demo" / "demo.log").read_text()
