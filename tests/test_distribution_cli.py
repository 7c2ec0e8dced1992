"""Operator commands on a live fleet: promote, rollback, list, agents, export --merged."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import predict, wait_until
from zk0.hub.adapters import content_id
from zk0.hub.cli import app
from zk0.shared.artifact import TENSORS_FILE, load_adapter
from zk0.shared.lora import apply_lora
from zk0.shared.policy_factory import LoadedPolicy

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


def _hub_yaml(rig: Any) -> Path:
    path = rig.root / "hub.yaml"
    keys = rig.hub_keys
    path.write_text(
        yaml.safe_dump(
            {
                "store_root": str(rig.store.root),
                "heartbeat_s": 0.2,
                "keys": {
                    "curve_secret": str(keys.curve_secret),
                    "curve_public": str(keys.curve_public),
                    "allow_list_dir": str(keys.allow_list_dir),
                },
            }
        )
    )
    return path


def _hub(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_rollback_and_promote_publish_new_versions_agents_take(rig: Any) -> None:
    config = str(_hub_yaml(rig))
    server = rig.start_hub()
    server.publish(rig.new_version())
    agent = rig.subscriber("arm-a", server)
    for version in (1, 2):  # two rounds, each taken by the agent
        server.publish(rig.new_version())
        wait_until(lambda v=version: agent.status().applied == v, what=f"version {version}")
    before = agent.status().bytes_rx

    assert "v3 = v1, now current" in _hub("adapters", "rollback", "--config", config)
    wait_until(lambda: agent.status().applied == 3, what="the rollback (v3)")
    stored = agent.store.manifest(3)
    assert content_id(stored) == content_id(rig.store.manifest(1))
    assert stored.parent_version == 1 and stored.version == 3
    tensors = rig.store.manifest(1).files[TENSORS_FILE].size
    assert agent.status().bytes_rx - before < tensors / 4, "v1's tensors are reused, not fetched"

    assert "v4 = v0, now current" in _hub("adapters", "rollback", "--config", config)
    assert "v5 = v2, now current" in _hub("adapters", "promote", "2", "--config", config)
    wait_until(lambda: agent.status().applied == 5, what="the promote (v5)")
    assert content_id(agent.store.manifest(5)) == content_id(rig.store.manifest(2))
    listing = _hub("adapters", "list", "--config", config).splitlines()
    assert [line.split()[0] for line in listing] == ["v0", "v1", "v2", "v3", "v4", "*"]  # * v5
    assert "= v1" in listing[3] and "= v0" in listing[4] and "= v2" in listing[5]

    wait_until(
        lambda: "applied 5" in _hub("agents", "list", "--config", config),
        what="the agents table to show v5",
    )
    table = _hub("agents", "list", "--config", config)
    assert "hub current v5; 1 of 1 agents applied it" in table
    assert "arm-a" in table and agent.store.root.exists()


def test_rollback_and_promote_refuse_with_one_line(rig: Any) -> None:
    config = str(_hub_yaml(rig))
    rig.store.set_current(rig.new_version())
    for args, message in [
        (("adapters", "rollback"), "no earlier, different version"),
        (("adapters", "promote", "7"), "no version 7"),
    ]:
        result = subprocess.run(
            [str(BIN / "zk0-hub"), *args, "--config", config],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert rig.store.versions() == [0]


def test_export_merged_loads_in_plain_lerobot_with_the_same_actions(
    rig: Any, make_tiny: Callable[[], LoadedPolicy], tmp_path: Path
) -> None:
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.processor import PolicyProcessorPipeline

    config = str(_hub_yaml(rig))
    version = rig.new_version(template=2)  # a trained adapter
    out = tmp_path / "merged"
    _hub("adapters", "export", str(version), "--merged", str(out), "--config", config)
    tiny = make_tiny()
    manifest = rig.store.manifest(version)
    unmerged = apply_lora(tiny.policy, manifest.lora)
    load_adapter(unmerged, rig.store.path(version), manifest.artifact_id, tiny.base)
    plain = SmolVLAPolicy.from_pretrained(str(out))
    torch.testing.assert_close(
        predict(plain, tiny.preprocessor), predict(unmerged, tiny.preprocessor), rtol=0, atol=1e-5
    )
    assert not torch.allclose(
        predict(plain, tiny.preprocessor), predict(make_tiny().policy, tiny.preprocessor)
    ), "the merged checkpoint must carry the adapter"
    PolicyProcessorPipeline.from_pretrained(str(out), "policy_preprocessor.json")
    again = CliRunner().invoke(
        app, ["adapters", "export", str(version), "--merged", str(out), "--config", config]
    )
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_hub_and_agent_run_as_commands_and_stop_cleanly_on_sigterm(rig: Any) -> None:
    ports = SimpleNamespace(publish_port=_free_port(), fetch_port=_free_port())
    hub_yaml = _hub_yaml(rig)
    raw = yaml.safe_load(hub_yaml.read_text())
    hub_yaml.write_text(yaml.safe_dump({**raw, **vars(ports), "flower_port": _free_port()}))
    rig.store.set_current(rig.new_version())
    env = {**os.environ, "ZK0_RUN_DIR": str(rig.root / "run")}
    hub = subprocess.Popen(
        [str(BIN / "zk0-hub"), "distribute", "--config", str(hub_yaml)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rig.procs.append(hub)
    rig.agent_config("arm-cli", ports)
    events = rig.root / "events.jsonl"
    agent = rig.spawn_agent("arm-cli", "--events", str(events))
    wait_until(lambda: events.exists() and '"version": 0' in events.read_text(), what="v0")
    for proc in (agent, hub):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "publishing version 0" in (rig.root / "run" / "hub" / "hub.log").read_text()
    agent_log = rig.root / "run" / "agents" / "arm-cli" / "agent.log"
    assert "version 0 is current" in agent_log.read_text()


def test_reversion_artifact_copies_content_under_a_new_version(
    tiny_adapters: list[Path], tmp_path: Path
) -> None:
    from zk0.shared.artifact import ArtifactError, reversion_artifact, verify_artifact

    source = tiny_adapters[1]
    original = verify_artifact(source)
    copy = reversion_artifact(source, tmp_path / "v9", version=9, parent_version=1)
    assert verify_artifact(tmp_path / "v9", copy.artifact_id) == copy
    assert (copy.version, copy.parent_version) == (9, 1)
    assert copy.artifact_id != original.artifact_id
    assert (copy.files, copy.tensors, copy.base, copy.lora, copy.metrics) == (
        original.files,
        original.tensors,
        original.base,
        original.lora,
        original.metrics,
    )
    with pytest.raises(ArtifactError, match="already exists"):
        reversion_artifact(source, tmp_path / "v9", version=10, parent_version=1)
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / TENSORS_FILE).write_bytes((broken / TENSORS_FILE).read_bytes()[:-1] + b"\x00")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        reversion_artifact(broken, tmp_path / "v11", version=11, parent_version=None)
    assert not (tmp_path / "v11").exists()
