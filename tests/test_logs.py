"""Each process logs into its own file of the run folder, with Flower's and LeRobot's records."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zk0.shared.logs import RUN_DIR_ENV, log_file_for, new_run_dir


def _child(run_dir: Path, role: str, agent_id: str | None) -> None:
    code = textwrap.dedent(
        f"""
        import logging
        from pathlib import Path
        from loguru import logger
        from zk0.shared.logs import setup_logging
        setup_logging(Path({str(run_dir)!r}), {role!r}, {agent_id!r}, console=False)
        logger.info("own record")
        logging.getLogger("flwr").warning("flower record")
        logging.getLogger("lerobot.datasets").info("lerobot record")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hub_and_agents_write_their_own_files_with_bridged_records(tmp_path: Path) -> None:
    _child(tmp_path, "hub", None)
    _child(tmp_path, "agent", "arm-01")
    _child(tmp_path, "agent", "arm-02")
    for path in (
        tmp_path / "hub" / "hub.log",
        tmp_path / "agents" / "arm-01" / "agent.log",
        tmp_path / "agents" / "arm-02" / "agent.log",
    ):
        text = path.read_text()
        assert "own record" in text and "flower record" in text and "lerobot record" in text
    assert "arm-02" in (tmp_path / "agents" / "arm-02" / "agent.log").read_text()


def test_run_folders_are_fresh_per_run_or_inherited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert first != second and first.parent == tmp_path
    monkeypatch.setenv(RUN_DIR_ENV, str(first))
    assert new_run_dir(tmp_path) == first
    with pytest.raises(ValueError, match="agent id"):
        log_file_for(first, "agent")
