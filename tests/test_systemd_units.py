"""The service units in systemd/: valid for systemd, hardened, and calling our real commands.

``systemd-analyze verify`` exits 0 on unknown keys and bad values (it only warns on stderr),
so any stderr counts as a failure. CI installs systemd-analyze (.ci/run) and sets
ZK0_REQUIRE_SYSTEMD_ANALYZE=1, so there a missing binary fails instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from zk0.shared.sdnotify import CREDENTIAL_PREFIX

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
INSTALLED_BIN = "/opt/zk0/.venv/bin/"
VENV_BIN = Path(sys.executable).parent
#: Highest acceptable ``systemd-analyze security`` exposure (0 = locked down, 10 = exposed).
MAX_EXPOSURE = {"zk0-hub.service": 3.0, "zk0-agent.service": 5.0}
ANALYZE = shutil.which("systemd-analyze")

if ANALYZE is None and os.environ.get("ZK0_REQUIRE_SYSTEMD_ANALYZE") == "1":
    raise RuntimeError("systemd-analyze is required here; install it: apt-get install systemd")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = dict(os.environ, SYSTEMD_PAGER="", SYSTEMD_COLORS="0", LC_ALL="C.UTF-8")
    return subprocess.run(
        [ANALYZE, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )


def _stage(tmp_path: Path, unit: str, gpu: bool = False) -> Path:
    """The unit as installed, but starting this venv's script (verify needs a real path)."""
    text = (UNITS / unit).read_text()
    assert INSTALLED_BIN in text
    staged = tmp_path / unit
    staged.write_text(text.replace(INSTALLED_BIN, f"{VENV_BIN}/"))
    if gpu:
        dropin = (UNITS / "zk0-agent-gpu.conf").read_text()
        folder = tmp_path / f"{unit}.d"
        folder.mkdir()
        true = shutil.which("true") or "/bin/true"
        (folder / "gpu.conf").write_text(dropin.replace("/usr/bin/nvidia-modprobe", true))
    return staged


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return _analyze("verify", "--man=false", "--generators=false", path.name, cwd=path.parent)


def _sections(name: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key given several times keeps every value, in order)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def _service_section(unit: str) -> dict[str, list[str]]:
    return _sections(unit)["Service"]


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "gpu"),
    [("zk0-hub.service", False), ("zk0-agent.service", False), ("zk0-agent.service", True)],
    ids=["hub", "agent", "agent+gpu"],
)
def test_units_verify_without_a_single_warning(tmp_path: Path, unit: str, gpu: bool) -> None:
    result = _verify(_stage(tmp_path, unit, gpu))
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_analyze
def test_verify_check_catches_a_typo(tmp_path: Path) -> None:
    staged = _stage(tmp_path, "zk0-hub.service")
    staged.write_text(staged.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = _verify(staged)
    assert "Unknown key" in result.stderr  # with returncode 0: hence the stderr rule


@needs_analyze
@pytest.mark.parametrize("unit", sorted(MAX_EXPOSURE))
def test_units_are_hardened(tmp_path: Path, unit: str) -> None:
    limit = MAX_EXPOSURE[unit]
    staged = _stage(tmp_path, unit)
    result = _analyze(
        "security", "--offline=true", f"--threshold={int(limit * 10)}", staged.name, cwd=tmp_path
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    exposure = float(found.group(1))
    assert exposure <= limit, f"{unit}: exposure {exposure} > {limit}\n{result.stdout}"
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("unit", "role"), [("zk0-hub.service", "hub"), ("zk0-agent.service", "agent")]
)
def test_units_run_the_daemons_under_systemd_supervision(unit: str, role: str) -> None:
    service = _service_section(unit)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert f"zk0-{role}" in scripts
    assert service["ExecStart"] == [f"{INSTALLED_BIN}zk0-{role} run --config /etc/zk0/{role}.yaml"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"] and service["TimeoutStopSec"] == ["30"]
    assert int(service["WatchdogSec"][0]) > 0
    assert service["User"] == ["zk0"]
    assert service["StateDirectory"] == [f"zk0-{role}"]
    assert service["LogsDirectory"] == [f"zk0-{role}"]
    assert "MemoryDenyWriteExecute" not in service  # torch and ONNX Runtime JIT code
    # Secrets come as credentials keys_<file name>, the names credential_path() looks for.
    assert service["LoadCredential"] == [f"{CREDENTIAL_PREFIX.rstrip('_')}:/etc/zk0/keys"]


def test_agent_reaches_the_arm_and_cameras_and_nothing_else() -> None:
    service = _service_section("zk0-agent.service")
    assert service["DevicePolicy"] == ["closed"]
    assert {"char-ttyACM rw", "char-video4linux rw"} <= set(service["DeviceAllow"])
    assert service["SupplementaryGroups"] == ["dialout video"]
    assert "PrivateUsers" not in service  # it would unmap dialout and video


def test_gpu_dropin_only_adds_devices() -> None:
    sections = _sections("zk0-agent-gpu.conf")
    assert list(sections) == ["Service"]
    assert set(sections["Service"]) <= {"ExecStartPre", "DeviceAllow"}
    assert "/dev/nvidia-uvm rw" in sections["Service"]["DeviceAllow"]
