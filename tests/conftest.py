"""Shared fixtures. Everything runs offline; expensive artefacts are cached by recipe hash."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

REPO_ROOT = Path(__file__).resolve().parents[1]
# Set before lerobot/transformers are imported anywhere: nothing may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("ZK0_CACHE", str(REPO_ROOT / ".cache" / "zk0"))
os.environ.setdefault("HF_HOME", str(REPO_ROOT / ".cache" / "hf"))

import pytest  # noqa: E402
import torch  # noqa: E402

from zk0.bench._common import random_observation as observation  # noqa: E402
from zk0.shared.config import load_robot_config  # noqa: E402
from zk0.shared.features import PolicyFeatures  # noqa: E402
from zk0.shared.policy_factory import LoadedPolicy, build_policy  # noqa: E402

SIM_ROBOT = REPO_ROOT / "robot_configs" / "sim_so101.yaml"

torch.set_num_threads(1)


class _Grid:
    """Enough of a Flower Grid for a strategy's configure_*: two connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


GRID = cast(Any, _Grid())


def train_reply(arrays: dict[str, Any], examples: int, agent: str, packed: bool = True) -> Any:
    """A ClientApp's train reply as the strategy receives it: adapter, example count, agent id
    (``packed=False``: the adapter one Array per tensor, as Flower's own strategies take it)."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from zk0.hub.strategy import to_record
    from zk0.shared.adapter_wire import pack
    from zk0.shared.federation import AGENT_ID, ARRAYS_KEY, EXAMPLES, META_KEY, METRICS_KEY

    content = RecordDict(
        {
            ARRAYS_KEY: pack(arrays) if packed else to_record(arrays),
            METRICS_KEY: MetricRecord({EXAMPLES: examples}),
            META_KEY: ConfigRecord({AGENT_ID: agent}),
        }
    )
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's ServerApp runtime sets before a strategy builds messages (restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(scope="session")
def sim_features() -> PolicyFeatures:
    return PolicyFeatures.from_robot_config(load_robot_config(SIM_ROBOT))


@pytest.fixture(scope="session")
def make_tiny(sim_features: PolicyFeatures) -> Callable[[], LoadedPolicy]:
    """Build a fresh tiny policy (each call a new object: LoRA wraps policies in place)."""

    def make() -> LoadedPolicy:
        return build_policy("tiny", sim_features, device="cpu")

    return make


def chunk_noise(policy: Any, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = policy.config
    return torch.randn(1, config.chunk_size, config.max_action_dim, generator=generator)


def predict(model: Any, preprocessor: Any, seed: int = 0) -> torch.Tensor:
    """Normalized action chunk for a fixed observation and fixed flow-matching noise."""
    policy = model.base_model.model if hasattr(model, "base_model") else model
    batch = preprocessor(observation(policy, seed))
    model.eval()
    return model.predict_action_chunk(batch, noise=chunk_noise(policy))


def train_steps(
    peft_model: Any, preprocessor: Any, steps: int, seed: int = 0, lr: float = 1e-2
) -> None:
    """A few optimizer steps on synthetic batches, enough to move the adapter weights."""
    from zk0.bench._common import synthetic_batch

    policy = peft_model.base_model.model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    peft_model.train()
    for step in range(steps):
        batch = synthetic_batch(policy, preprocessor, batch_size=2, seed=seed * 1000 + step)
        loss, _ = peft_model.forward(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peft_model.eval()


# -- adapter distribution (hub <-> agents over ZeroMQ) ---------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import yaml  # noqa: E402


@pytest.fixture(scope="session")
def tiny_adapters(
    make_tiny: Callable[[], LoadedPolicy], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """24 different real adapters of the tiny policy: fresh, trained 1 and 2 steps, then the
    trained one nudged a little each time (so versions built from them never share content)."""
    from zk0.shared.artifact import save_adapter
    from zk0.shared.lora import LoraSpec, apply_lora

    tiny = make_tiny()
    peft_model = apply_lora(tiny.policy, LoraSpec(), tiny.base.name_or_path)
    root = tmp_path_factory.mktemp("tiny-adapters")
    folders = []
    generator = torch.Generator().manual_seed(0)
    for index in range(24):
        if index in (1, 2):
            train_steps(peft_model, tiny.preprocessor, steps=1, seed=index)
        elif index > 2:
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_" in name:
                        param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
        folder = root / f"a{index}"
        save_adapter(peft_model, folder, version=index, base=tiny.base, lora=LoraSpec())
        folders.append(folder)
    return folders


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail after a generous timeout (never flaky-tight)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.02)


class DistributionRig:
    """A hub store, CURVE keys, hub servers, in-process subscribers and agent processes, all on
    127.0.0.1; ``close`` stops everything it started."""

    def __init__(self, root: Path, templates: list[Path]) -> None:
        from zk0.shared.config import HubKeys
        from zk0.shared.distribution.keys import create_keypair
        from zk0.shared.store import AdapterStore

        self.root, self.templates = root, templates
        self.store = AdapterStore(root / "hub" / "adapters")
        keys = root / "hub" / "keys"
        create_keypair(keys / "hub.key_secret", keys / "hub.key", "hub")
        (root / "hub" / "allowed").mkdir(parents=True)
        self.hub_keys = HubKeys(
            curve_secret=keys / "hub.key_secret",
            curve_public=keys / "hub.key",
            allow_list_dir=root / "hub" / "allowed",
        )
        self.servers: list[Any] = []
        self.subscribers: list[Any] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def new_version(self, template: int | None = None) -> int:
        """Store the next version (its content: template ``version`` mod 24, or ``template``)."""
        from zk0.shared.artifact import reversion_artifact

        with self.store.allocate() as (version, path):
            index = version if template is None else template
            source = self.templates[index % len(self.templates)]
            parent = version - 1 if version else None
            reversion_artifact(source, path, version=version, parent_version=parent)
        return version

    def start_hub(
        self, publish_port: int = 0, fetch_port: int = 0, store: Any = None, **kwargs: Any
    ) -> Any:
        from zk0.hub.distribution import DistributionServer

        kwargs.setdefault("heartbeat_s", 0.2)
        server = DistributionServer(
            store or self.store,
            keys=self.hub_keys,
            publish_port=publish_port,
            fetch_port=fetch_port,
            **kwargs,
        ).start()
        self.servers.append(server)
        return server

    def agent_config(self, agent_id: str, server: Any, enroll: bool = True) -> Any:
        """Keys (admitted by the hub if ``enroll``) and a config file for ``agent_id``."""
        from zk0.shared.config import AgentConfig, AgentKeys, HubAddress
        from zk0.shared.distribution.keys import AllowList, create_keypair

        home = self.root / "agents" / agent_id
        secret, public = home / "keys" / f"{agent_id}.key_secret", home / "keys" / f"{agent_id}.key"
        if not secret.exists():
            create_keypair(secret, public, agent_id)
        if enroll:
            AllowList(self.hub_keys.allow_list_dir).add(agent_id, public)
        config = AgentConfig(
            agent_id=agent_id,
            robot_config=SIM_ROBOT,
            data_root=home / "data",
            hub=HubAddress(
                host="127.0.0.1", publish_port=server.publish_port, fetch_port=server.fetch_port
            ),
            keys=AgentKeys(
                curve_secret=secret,
                curve_public=public,
                hub_curve_public=self.hub_keys.curve_public,
            ),
        )
        (home / "agent.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
        return config

    def subscriber(self, agent_id: str, server: Any, enroll: bool = True, **kwargs: Any) -> Any:
        from zk0.agent.distribution.subscriber import AdapterSubscriber

        config = self.agent_config(agent_id, server, enroll)
        subscriber = AdapterSubscriber.from_config(config, **kwargs).start()
        self.subscribers.append(subscriber)
        return subscriber

    def spawn_agent(self, agent_id: str, *args: str) -> subprocess.Popen[bytes]:
        """``python -m zk0.agent.distribution`` for an agent whose config was written."""
        env = {**os.environ, "ZK0_RUN_DIR": str(self.root / "run")}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zk0.agent.distribution",
                "--config",
                str(self.root / "agents" / agent_id / "agent.yaml"),
                *args,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        for subscriber in self.subscribers:
            subscriber.stop()
        for server in self.servers:
            server.stop()


@pytest.fixture
def rig(tiny_adapters: list[Path], tmp_path: Path) -> Any:
    rig = DistributionRig(tmp_path, tiny_adapters)
    yield rig
    rig.close()


# -- recording (tests/test_recording*.py) -------------------------------------------------------
SYNTHETIC_ROBOT = REPO_ROOT / "robot_configs" / "synthetic.yaml"


def synthetic_robot_config(**changes: Any) -> Any:
    """``robot_configs/synthetic.yaml`` with top-level fields (and ``options``) replaced."""
    config = load_robot_config(SYNTHETIC_ROBOT)
    options = {**config.options, **changes.pop("options", {})}
    return config.model_copy(update={**changes, "options": options})


def check_recorded_dataset(root: Path) -> list[int]:
    """Open ``root`` with plain LeRobot and check every episode; returns the episode lengths.

    Episodes are numbered 0..n-1 without gaps, each one's rows are its frames 0..length-1 in
    order, and its videos decode up to its last frame. (LeRobot cannot open a dataset without
    episodes; for one, this checks ``meta/info.json`` says so and returns ``[]``.)
    """
    import json

    import numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if json.loads((root / "meta" / "info.json").read_text())["total_episodes"] == 0:
        assert not (root / "data").exists() or not any((root / "data").rglob("*.parquet"))
        return []

    dataset = LeRobotDataset("zk0/recorded", root=root, video_backend="pyav")
    episodes = dataset.meta.episodes
    count = dataset.num_episodes
    assert [int(i) for i in episodes["episode_index"]] == list(range(count))
    table = dataset.hf_dataset.with_format("numpy")
    episode_of = np.asarray(table["episode_index"])
    frame_of = np.asarray(table["frame_index"])
    lengths = []
    for episode in range(count):
        rows = np.flatnonzero(episode_of == episode)
        length = int(episodes[episode]["length"])
        assert len(rows) == length and frame_of[rows].tolist() == list(range(length))
        last = dataset[int(rows[-1])]
        for key in dataset.meta.video_keys:
            assert last[key].shape[0] == 3 and float(last[key].std()) > 0
        lengths.append(length)
    assert len(dataset) == sum(lengths)
    return lengths


# -- systemd (tests/test_sdnotify.py, the daemons' tests) ---------------------------------------
class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: every datagram, split into ``KEY=value`` lines."""

    def __init__(self, address: str) -> None:
        self.address = address
        bind_to = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)

    def receive(self, timeout_s: float) -> list[str]:
        """Lines of the next datagram, or [] if none came within ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            return self.sock.recv(4096).decode().splitlines()
        except TimeoutError:
            return []

    def until(self, line: str, timeout_s: float) -> list[str]:
        """Every line received until (and including) ``line``; fails after ``timeout_s``."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while line not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {line!r} within {timeout_s}s; got {seen}"
            seen += self.receive(left)
        return seen

    def during(self, seconds: float) -> list[str]:
        """Every line received in the next ``seconds``."""
        seen: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            seen += self.receive(left)
        return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="zk0-sd-", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
def systemd(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(short_dir / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield fake
    fake.close()


# -- headless Chromium (the dashboard's tests; zk0.bench._chromium) ------------------------------
@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The Chromium executable. Without one the test skips, or fails where CI (.ci/run) sets
    ZK0_REQUIRE_CHROMIUM=1, as for systemd-analyze."""
    from zk0.bench._chromium import find_chromium

    path = find_chromium()
    if path is None:
        message = "chromium not installed: apt-get install chromium"
        if os.environ.get("ZK0_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path
