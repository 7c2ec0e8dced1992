"""zk0 installed the way users install it, then run as they run it: from the wheel, not the tree.

Users ``pip install -c constraints.txt .`` (or build the Docker image, which installs the same
wheel) and run ``zk0-hub run`` and ``zk0-agent run`` as services. The other tests import the
editable install, whose finder maps ``zk0.*`` onto this checkout: a package, module, robot
config or base missing from the wheel, or code that finds files relative to the source tree,
passes there and fails for every user. Here:

* the wheel is built offline from what the Dockerfile copies (``pyproject.toml``,
  ``README.md`` and the package folders) and installed non-editable with ``pip install
  --target`` into ``$ZK0_CACHE/installed/<sha256[:16]>/`` (once per wheel content), reusing
  this venv's dependencies;
* every command runs from a folder outside the checkout with that install first on
  ``PYTHONPATH`` and ``PATH``. That shadows what the install has, but the venv's editable
  finder would still serve a module the install lacks from the checkout: a ``sitecustomize``
  on the same ``PYTHONPATH`` (test scaffolding, not product code) removes that finder from
  every Python process, Flower's included, and records where each ``zk0`` module came from;
* the hub and an agent are enrolled and started with the installed console scripts; the
  agent records synthetic episodes (the robot config inside the install), the hub runs one
  federated round on ``tiny-sim-base`` (the base inside the install), the agent applies and
  hot-swaps the new version; on SIGTERM both daemons exit 0 and leave no process behind.
  Every process that imported ``zk0`` (the daemons, their CLIs, Flower's ServerApp and
  ClientApp processes) imported it from the install.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from zk0.hub.demo_fleet import agent_config, loopback_hub_config, write_config
from zk0.shared import agent_control as ac
from zk0.shared import hub_control as hc
from zk0.shared.config import RunsConfig
from zk0.shared.control import Command, ControlError, request
from zk0.shared.validation import WireModel

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: Folder in the source tree -> its package (``agent`` -> ``zk0.agent``).
PACKAGE_DIRS: dict[str, str] = {
    folder: package for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items()
}
VENV_BIN = Path(sys.executable).parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
#: Fixed zip timestamps: the same sources give the same wheel, hence the same cached install.
SOURCE_DATE_EPOCH = "315532800"
#: Inherited settings that would point the children at another run or at systemd.
DROPPED_ENV = (
    "ZK0_RUN_DIR",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LOGS_DIRECTORY",
    "STATE_DIRECTORY",
    "PYTHONPATH",
)
IMPORT_LOG_ENV = "ZK0_TEST_IMPORT_LOG"  # read by SITECUSTOMIZE

#: Loaded by every Python process of the installed environment (it sits on PYTHONPATH). The
#: venv's editable install of this checkout adds a finder that serves any ``zk0`` module the
#: install lacks from the source tree; a user's install has no such fallback, so it goes.
SITECUSTOMIZE = '''\
"""tests/test_installed.py: no editable zk0 here; record where each zk0 module comes from."""
import json
import os
import sys


def _editable(obj):
    return getattr(obj, "__module__", "").startswith("__editable__")


sys.meta_path[:] = [finder for finder in sys.meta_path if not _editable(finder)]
sys.path_hooks[:] = [hook for hook in sys.path_hooks if not _editable(hook)]
sys.path[:] = [entry for entry in sys.path if not entry.startswith("__editable__")]
sys.path_importer_cache.clear()


class _ImportRecorder:
    """Appends (module, files) to <ZK0_TEST_IMPORT_LOG>/<pid>.jsonl for each zk0 import."""

    folder = os.environ.get("ZK0_TEST_IMPORT_LOG")

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if not cls.folder or not (name == "zk0" or name.startswith("zk0.")):
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is cls or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                where = [spec.origin] if spec.has_location else []
                where += list(spec.submodule_search_locations or [])
                record = os.path.join(cls.folder, f"{os.getpid()}.jsonl")
                with open(record, "a") as out:
                    if out.tell() == 0:
                        out.write(json.dumps({"argv": sys.argv}) + "\\n")
                    out.write(json.dumps({"module": name, "from": where}) + "\\n")
                return spec
        return None


sys.meta_path.insert(0, _ImportRecorder)
'''


@dataclass(frozen=True)
class Installed:
    """zk0 installed from its wheel into ``root`` (``pip install --target``)."""

    root: Path
    sha256: str
    scaffold: Path  # the sitecustomize above

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self, outputs: Path, imports: Path | None = None) -> dict[str, str]:
        """What a user's shell holds: the install first, offline, no systemd, no run folder."""
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update(
            PYTHONPATH=os.pathsep.join([str(self.root), str(self.scaffold)]),
            PATH=os.pathsep.join([str(self.bin), str(VENV_BIN), env.get("PATH", "")]),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            ZK0_OUTPUTS=str(outputs),
            OMP_NUM_THREADS="1",
        )
        if imports is not None:
            imports.mkdir(parents=True, exist_ok=True)
            env[IMPORT_LOG_ENV] = str(imports)
        return env


def _run(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(argv)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-3000:]}"
    )
    return result


def _build_wheel(work: Path) -> Path:
    """The project's wheel, built offline from exactly what the Dockerfile copies."""
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    wheels = work / "wheels"
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "OMP_NUM_THREADS": "1"}
    _run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), "."],
        cwd=source,
        env=env,
    )
    (wheel,) = wheels.glob("zk0-*.whl")
    return wheel


def _prune(installs: Path, keep: Path, max_idle_s: float = 2 * 86400) -> None:
    """Drop installs of older wheels nobody used for a while (one per source change)."""
    for other in installs.iterdir():
        if other != keep and time.time() - other.stat().st_mtime > max_idle_s:
            shutil.rmtree(other, ignore_errors=True)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(work)
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    installs = Path(os.environ["ZK0_CACHE"]) / "installed"
    root = installs / sha256[:16]
    if not root.is_dir():
        installs.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{sha256[:16]}-", dir=installs))
        _run(
            [*PIP, "install", "--no-deps", "--no-index", "--target", str(staging), str(wheel)],
            cwd=work,
        )
        (staging / "wheel.sha256").write_text(f"{sha256}  {wheel.name}\n")
        staging.chmod(0o755)  # mkdtemp made it 0700
        try:
            staging.rename(root)  # complete or absent, never half there
        except OSError:  # another session installed the same wheel meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    os.utime(root)
    _prune(installs, root)
    scaffold = work / "scaffold"
    scaffold.mkdir()
    (scaffold / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return Installed(root, sha256, scaffold)


@pytest.fixture
def outside() -> Iterator[Path]:
    """A short folder outside the checkout: the commands' cwd, configs, state and sockets
    (AF_UNIX paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="zk0-inst-", dir="/tmp") as folder:
        yield Path(folder)


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from its third field (state) on; [] once the process is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_table() -> dict[int, tuple[int, int]]:
    """Every live (not zombie) process: pid -> (parent pid, start time)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _group(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[2]) if fields else None


def _cmdline(pid: int) -> str:
    try:
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return f"{pid} (gone)"
    argv = raw.replace(b"\0", b" ").decode(errors="replace")
    return f"{pid} {argv[:200]}"


def _under(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_the_installed_package_is_the_one_that_runs(installed: Installed, outside: Path) -> None:
    root = installed.root
    # Every package of the source tree (a folder with __init__.py) shipped, and the data.
    for folder, package in PACKAGE_DIRS.items():
        target = root / Path(*package.split("."))
        for init in (REPO / folder).rglob("__init__.py"):
            shipped = target / init.parent.relative_to(REPO / folder) / "__init__.py"
            assert shipped.is_file(), f"{init.parent} is a package missing from the wheel"
    assert (root / "zk0" / "robot_configs" / "synthetic.yaml").is_file()
    assert (root / "zk0" / "shared" / "bases" / "tiny-sim-base").is_dir()
    for script in PYPROJECT["project"]["scripts"]:
        # Console scripts run this venv's python, as they run a user's venv's.
        shebang = (installed.bin / script).read_text().splitlines()[0]
        assert shebang == f"#!{sys.executable}", (script, shebang)

    probe = (
        "import json, sys, importlib.metadata as m, shutil, zk0, zk0.hub, zk0.agent, zk0.shared,"
        " zk0.robot_configs, zk0.cli, zk0.bench\n"
        "from zk0.shared.config import robot_config_path\n"
        "print(json.dumps({'files': [zk0.hub.__file__, zk0.agent.__file__, zk0.shared.__file__,"
        " zk0.robot_configs.__file__, zk0.cli.__file__, zk0.bench.__file__],"
        " 'zk0': list(zk0.__path__), 'dist': str(m.distribution('zk0').locate_file('')),"
        " 'script': shutil.which('zk0-hub'), 'synthetic': str(robot_config_path('synthetic')),"
        " 'finders': [repr(f) for f in sys.meta_path]}))"
    )
    # PYTHONPATH alone (no scaffold) wins over the venv's editable finder for what it holds...
    env = installed.env(outside / "outputs")
    env["PYTHONPATH"] = str(root)
    plain = json.loads(_run([sys.executable, "-c", probe], outside, env).stdout)
    assert all(_under(f, root) for f in plain["files"]), plain
    # ...and with the scaffold nothing can fall back to the checkout at all.
    isolated = json.loads(
        _run([sys.executable, "-c", probe], outside, installed.env(outside / "outputs")).stdout
    )
    assert all(_under(f, root) for f in isolated["files"]), isolated
    assert [Path(p) for p in isolated["zk0"]] == [root / "zk0"], isolated
    assert not any("editable" in f for f in isolated["finders"]), isolated
    assert _under(isolated["dist"], root) and _under(isolated["script"], root), isolated
    assert isolated["synthetic"] == str(root / "zk0" / "robot_configs" / "synthetic.yaml")


# -- the fleet ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The installed hub and agent on this machine, and what is needed to diagnose them."""

    installed: Installed
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    #: Per daemon: (pid, start time) of every process it started, as seen while it ran.
    family: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def imports(self) -> Path:
        return self.root / "imports"

    def step(self, what: str) -> None:
        self.steps.append(f"{time.monotonic() - self.started:6.1f} s  {what}")

    def cli(self, *argv: str, timeout_s: float = 120) -> str:
        self.step(" ".join(argv[:3]))
        result = subprocess.run(
            [str(self.installed.bin / argv[0]), *argv[1:]],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            )
        return result.stdout

    def start(self, name: str, program: str, config: Path) -> subprocess.Popen[bytes]:
        self.step(f"{program} run")
        with (self.root / f"{name}.out").open("wb") as out:
            process = subprocess.Popen(
                [str(self.installed.bin / program), "run", "--config", str(config)],
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Flower's processes join it
            )
        self.procs[name] = process
        return process

    def ask[R: WireModel](self, socket: Path, command: Command[R]) -> R | None:
        """The daemon's answer, or None while it starts (or is busy for a moment)."""
        try:
            return request(socket, command, 5.0)
        except ControlError:
            return None

    def wait[T](
        self, probe: Callable[[], T | None], timeout_s: float, what: str, running: bool = True
    ) -> T:
        """Poll ``probe`` every half second until it returns something; fail after
        ``timeout_s``, or at once when a daemon exits meanwhile (if they should be ``running``)."""
        self.step(f"waiting for {what}")
        deadline = time.monotonic() + timeout_s
        while True:
            found = probe()
            if running:
                self.note_family()
            if found is not None and found is not False:
                return found
            for name, process in self.procs.items() if running else ():
                if process.poll() is not None:
                    raise AssertionError(
                        f"{name} exited {process.returncode} while waiting for {what}"
                    )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.5)

    def stop(self, name: str, timeout_s: float = 60) -> int:
        self.step(f"SIGTERM to {name}")
        self.note_family()
        process = self.procs[name]
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running {timeout_s:.0f} s after SIGTERM") from None

    def note_family(self) -> None:
        """Remember every process the running daemons started so far (Flower's SuperExec
        starts a session of its own: neither the daemon's process group nor, once the daemon
        is gone, its parent link finds it)."""
        table = _process_table()
        for name, process in self.procs.items():
            family, frontier = self.family.setdefault(name, set()), [process.pid]
            while frontier:
                parent = frontier.pop()
                for pid, (ppid, started) in table.items():
                    if ppid == parent and (pid, started) not in family:
                        family.add((pid, started))
                        frontier.append(pid)

    def leftovers(self, name: str) -> list[str]:
        """What the daemon started that still runs (or its own group still holds)."""
        table, group = _process_table(), self.procs[name].pid
        family = self.family.get(name, set())
        return [
            _cmdline(pid)
            for pid, (_, started) in table.items()
            if (pid, started) in family or _group(pid) == group
        ]

    def kill_all(self) -> None:
        """SIGKILL every daemon, its process group and everything it started."""
        self.note_family()
        for name, process in self.procs.items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            table = _process_table()
            for pid, started in self.family.get(name, set()):
                if table.get(pid, (0, None))[1] == started:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            process.wait(30)

    def tails(self, chars: int = 2500) -> str:
        """The end of every daemon's output and of every log under ZK0_OUTPUTS."""
        logs = sorted(self.root.glob("*.out")) + sorted(
            p for p in self.outputs.rglob("*") if p.is_file() and p.suffix in (".log", ".txt")
        )
        parts = []
        for log in logs:
            text = log.read_text(errors="replace")
            parts.append(
                f"----- {log.relative_to(self.root)} (last {chars} chars)\n{text[-chars:]}"
            )
        return "\n".join(["----- steps", *self.steps, *parts])

    def imported(self) -> list[dict[str, Any]]:
        """Per process that imported zk0: its argv and where each zk0 module came from."""
        processes = []
        for record in sorted(self.imports.glob("*.jsonl")):
            lines = [json.loads(line) for line in record.read_text().splitlines() if line]
            processes.append({"argv": lines[0]["argv"], "modules": lines[1:]})
        return processes


@pytest.fixture
def fleet(installed: Installed, outside: Path) -> Iterator[Fleet]:
    fleet = Fleet(installed, outside)
    fleet.env = installed.env(fleet.outputs, fleet.imports)
    try:
        yield fleet
    finally:
        fleet.kill_all()


def _json(text: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def test_installed_hub_and_agent_enrol_record_train_and_hot_swap(fleet: Fleet) -> None:
    try:
        _fleet_round(fleet)
    except Exception as error:
        raise AssertionError(f"{error}\n\n{fleet.tails()}") from error


def _fleet_round(fleet: Fleet) -> None:
    root, install = fleet.root, fleet.installed.root
    hub_dir, agent_dir = root / "hub", root / "agent"
    hub = loopback_hub_config(
        hub_dir,
        control_socket=root / "hub.sock",
        policy="tiny-sim-base",
        runs=RunsConfig(
            trigger="manual",
            min_agents=1,
            run_config={
                "num-server-rounds": 1,
                "local-steps": 2,
                "batch-size": 2,
                "eval-frames": 4,
                "round-timeout-s": 300,
            },
        ),
    )
    hub_yaml = write_config(hub_dir / "hub.yaml", hub)
    # The robot config shipped inside the install: proof that it is package data.
    synthetic = install / "zk0" / "robot_configs" / "synthetic.yaml"
    agent = agent_config(
        hub,
        "arm-01",
        synthetic,
        agent_dir,
        policy="tiny-sim-base",
        control_socket=root / "agent.sock",
        train_wait_s=180.0,
    )
    agent_yaml = write_config(agent_dir / "agent.yaml", agent)
    assert agent.keys is not None and agent.keys.supernode_private_key is not None

    # The hub: keys, then the daemon.
    assert "server certificate for 127.0.0.1" in fleet.cli(
        "zk0-hub", "keys", "init", "--config", str(hub_yaml)
    )
    hub_daemon = fleet.start("hub", "zk0-hub", hub_yaml)
    fleet.wait(
        lambda: getattr(fleet.ask(root / "hub.sock", hc.Status()), "superlink", None),
        120,
        "the hub to answer",
    )
    fleet.wait(
        lambda: (s := fleet.ask(root / "hub.sock", hc.Status())) and s.superlink.up,
        60,
        "the hub's SuperLink",
    )

    # The agent: its keys, enrolled with the running hub (which registers its node at once).
    fleet.cli("zk0-agent", "keys", "init", "--config", str(agent_yaml))
    added = fleet.cli(
        "zk0-hub", "keys", "add", "arm-01", str(agent.keys.curve_public),
        "--supernode-key", str(agent.keys.supernode_private_key.with_suffix(".pub")),
        "--config", str(hub_yaml),
        timeout_s=180,
    )  # fmt: skip
    assert "registered with the hub's SuperLink (node " in added, added
    agent_daemon = fleet.start("agent", "zk0-agent", agent_yaml)
    fleet.wait(
        lambda: (s := fleet.ask(root / "agent.sock", ac.Status())) and s.supernode.running,
        180,
        "the agent and its SuperNode",
    )
    fleet.wait(
        lambda: (
            (s := fleet.ask(root / "hub.sock", hc.Status()))
            and any(a.agent_id == "arm-01" and a.online for a in s.agents)
        ),
        60,
        "the hub to see the agent online",
    )

    # Both answer their CLIs, in JSON, and are the processes started here.
    hub_status = _json(fleet.cli("zk0-hub", "status", "--config", str(hub_yaml), "--json"))
    agent_status = _json(fleet.cli("zk0-agent", "status", "--config", str(agent_yaml), "--json"))
    assert hub_status["hub"]["pid"] == hub_daemon.pid and hub_status["superlink"]["up"]
    assert isinstance(hub_status["enrolled"]["arm-01"], int), hub_status["enrolled"]
    assert hub_status["runs_completed"] == 0 and hub_status["current_version"] is None
    assert agent_status["pid"] == agent_daemon.pid and agent_status["agent_id"] == "arm-01"
    assert agent_status["in_use"] is None

    # Episodes through the daemon (the command waits for the job), then one federated round.
    recorded = fleet.cli(
        "zk0-agent", "start-recording", "--episodes", "3", "--config", str(agent_yaml)
    )
    assert "dataset: 3 episodes (3 new)" in recorded, recorded
    started = fleet.cli("zk0-hub", "start-run", "--rounds", "1", "--config", str(hub_yaml))
    assert started.startswith("run 1 started: 1 rounds"), started

    def run_ended() -> hc.HubStatus | None:
        status = fleet.ask(root / "hub.sock", hc.Status())
        if status is None or status.run is not None or status.last_run is None:
            return None
        return status

    ended = fleet.wait(run_ended, 240, "the federated run to end")
    assert ended.last_run is not None and ended.last_run.error is None, ended.last_run
    assert ended.runs_completed == 1 and ended.runs_failed == 0
    version = ended.current_version
    assert version is not None and version >= 1, ended
    fleet.wait(
        lambda: (s := fleet.ask(root / "agent.sock", ac.Status())) and s.in_use == version,
        120,
        f"the agent to hot-swap to v{version}",
    )
    fleet.wait(
        lambda: (s := fleet.ask(root / "hub.sock", hc.Status())) and s.converged,
        30,
        "the hub to see the fleet converged",
    )
    hub_status = _json(fleet.cli("zk0-hub", "status", "--config", str(hub_yaml), "--json"))
    agent_status = _json(fleet.cli("zk0-agent", "status", "--config", str(agent_yaml), "--json"))
    _dashboard_shows_the_run(hub_status["hub"]["dashboard"], version)
    (seen,) = hub_status["agents"]
    assert seen["agent_id"] == "arm-01" and seen["in_use"] == version, seen
    assert hub_status["runs_completed"] == 1 and hub_status["last_run"]["error"] is None
    assert hub_status["current_version"] == version
    assert agent_status["in_use"] == version, agent_status

    # systemctl stop: SIGTERM, exit 0, and nothing left behind (SuperLink, SuperNode, apps).
    assert fleet.stop("agent") == 0
    assert fleet.stop("hub") == 0
    for name in ("agent", "hub"):
        try:
            fleet.wait(lambda n=name: not fleet.leftovers(n), 15, "", running=False)
        except AssertionError:
            raise AssertionError(f"{name} exited, leaving {fleet.leftovers(name)}") from None

    # Every process that imported zk0 imported it from the install, Flower's included.
    processes = fleet.imported()
    outside_install = [
        (p["argv"][0], m["module"], m["from"])
        for p in processes
        for m in p["modules"]
        if not all(_under(where, install) for where in m["from"])
    ]
    assert not outside_install, outside_install
    by_program: dict[str, set[str]] = {}
    for process in processes:
        modules = {m["module"] for m in process["modules"]}
        by_program.setdefault(Path(process["argv"][0]).name, set()).update(modules)
    assert {"zk0-hub", "zk0-agent", "flwr-serverapp", "flwr-clientapp"} <= set(by_program), sorted(
        by_program
    )
    assert "zk0.hub.service" in by_program["zk0-hub"]
    assert "zk0.agent.service" in by_program["zk0-agent"]
    assert "zk0.hub.server_app" in by_program["flwr-serverapp"]
    assert "zk0.agent.client_app" in by_program["flwr-clientapp"]
    # The ClientApp only hands tasks over: the agent's warm round worker trained.
    worker_modules = {"zk0.agent.round_worker", "zk0.agent.round_tasks"}
    trained_in = {
        Path(p["argv"][0]).name
        for p in processes
        if worker_modules <= {m["module"] for m in p["modules"]}
    }
    assert trained_in and trained_in.isdisjoint({"flwr-clientapp", "zk0-agent"}), trained_in
    assert "zk0.agent.round_tasks" not in by_program["flwr-clientapp"]


def _dashboard_shows_the_run(dashboard: str, version: int) -> None:
    """The installed hub's dashboard (templates and script are package data) shows the real
    run: the agent on its version, the round on the Runs page, and the same in /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    fleet_page = httpx.get(dashboard, timeout=30).text
    assert 'data-agent="arm-01"' in fleet_page and f">v{version}<" in fleet_page, fleet_page
    assert "setTimeout(refresh" in httpx.get(dashboard + "static/dashboard.js", timeout=30).text
    runs_page = httpx.get(dashboard + "runs", timeout=30).text
    assert 'data-run="1"' in runs_page and 'class="point"' in runs_page, runs_page
    scraped = httpx.get(dashboard + "metrics", timeout=30).text
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
        if not s.labels
    }
    assert samples["zk0_round_duration_seconds_count"] == 1, scraped
    assert samples["zk0_versions"] == version + 1 and samples["zk0_agents_online"] == 1
