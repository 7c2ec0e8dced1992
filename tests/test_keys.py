"""CURVE keys: private secret files, one-line refusals, enrolment commands, visible failures."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq
from zmq.auth.certs import load_certificate

from conftest import wait_until
from zk0.shared.distribution import keys
from zk0.shared.distribution.keys import AllowList, KeyFileError, create_keypair, load_keypair

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_pairs_are_private_pyzmq_certificates(tmp_path: Path) -> None:
    pair = create_keypair(tmp_path / "a.key_secret", tmp_path / "a.key", "arm-a")
    assert _mode(tmp_path / "a.key_secret") == 0o600
    assert load_certificate(tmp_path / "a.key_secret") == (pair.public, pair.secret)
    assert load_certificate(tmp_path / "a.key") == (pair.public, None)
    assert load_keypair(tmp_path / "a.key_secret") == pair
    with pytest.raises(KeyFileError, match="already exists"):
        create_keypair(tmp_path / "a.key_secret", tmp_path / "a.key", "arm-a")


def test_a_secret_key_others_can_read_is_refused_at_startup(rig: Any) -> None:
    rig.hub_keys.curve_secret.chmod(0o644)  # what zmq.auth.create_certificates leaves
    with pytest.raises(KeyFileError, match=r"readable by others \(mode 0644\); run: chmod 600"):
        rig.start_hub()
    rig.hub_keys.curve_secret.chmod(0o600)
    server = rig.start_hub()
    config = rig.agent_config("arm-a", server)
    config.keys.curve_secret.chmod(0o640)
    from zk0.agent.distribution.subscriber import AdapterSubscriber

    with pytest.raises(KeyFileError, match="mode 0640"):
        AdapterSubscriber.from_config(config).start()


def test_startup_fails_clearly_without_curve(rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # This libzmq has CURVE; a build without it is simulated by what zmq.has reports.
    monkeypatch.setattr(keys.zmq, "has", lambda capability: capability != "curve")
    with pytest.raises(KeyFileError, match="without CURVE; zk0 refuses to distribute"):
        rig.start_hub()


def test_a_wrong_hub_key_is_reported_instead_of_retrying_silently(rig: Any) -> None:
    server = rig.start_hub()
    server.publish(rig.new_version())
    config = rig.agent_config("arm-a", server)
    create_keypair(rig.root / "impostor.key_secret", rig.root / "impostor.key", "impostor")
    config = config.model_copy(
        update={
            "keys": config.keys.model_copy(update={"hub_curve_public": rig.root / "impostor.key"})
        }
    )
    from zk0.agent.distribution.subscriber import AdapterSubscriber

    agent = AdapterSubscriber.from_config(config).start()
    rig.subscribers.append(agent)
    wait_until(lambda: agent.status().sync == "handshake_failed", what="the handshake failure")
    assert agent.store.versions() == []


def test_allow_list_skips_bad_files_and_keeps_the_good(tmp_path: Path) -> None:
    create_keypair(tmp_path / "k" / "good.key_secret", tmp_path / "k" / "good.key", "good")
    allowed = AllowList(tmp_path / "allowed")
    entry = allowed.add("arm-good", tmp_path / "k" / "good.key")
    (tmp_path / "allowed" / "Bad Name.key").write_text("junk")
    (tmp_path / "allowed" / "arm-junk.key").write_text('curve\n    public-key = "short"\n')
    assert [(e.agent_id, e.key_id) for e in allowed.entries()] == [("arm-good", entry.key_id)]
    assert allowed.agent_for(entry.public) == "arm-good"


def test_a_key_file_rewritten_in_place_is_read_again(tmp_path: Path) -> None:
    """The hub parses a key file again only when it changed; a rewrite in place, which leaves
    the folder's own mtime alone, still changes who is admitted within the TTL."""
    for name in ("a", "b"):
        create_keypair(tmp_path / "k" / f"{name}.key_secret", tmp_path / "k" / f"{name}.key", name)
    allowed = AllowList(tmp_path / "allowed")
    first = allowed.add("arm-a", tmp_path / "k" / "a.key")
    second = load_keypair(tmp_path / "k" / "b.key_secret").public
    assert allowed.agent_for(first.public) == "arm-a"
    folder_mtime = (tmp_path / "allowed").stat().st_mtime_ns
    with (tmp_path / "allowed" / "arm-a.key").open("w") as handle:  # in place, not renamed
        handle.write((tmp_path / "k" / "b.key").read_text())
    assert (tmp_path / "allowed").stat().st_mtime_ns == folder_mtime
    wait_until(lambda: allowed.agent_for(second) == "arm-a", what="the rewritten key admitted")
    assert allowed.agent_for(first.public) is None


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, check=False
    )


def test_enrolment_commands(tmp_path: Path) -> None:
    hub_yaml = tmp_path / "hub.yaml"
    hub_yaml.write_text(
        yaml.safe_dump(
            {
                "store_root": "store",
                "keys": {
                    "curve_secret": "keys/hub.key_secret",
                    "curve_public": "keys/hub.key",
                    "allow_list_dir": "allowed",
                },
            }
        )
    )
    agent_yaml = tmp_path / "agent.yaml"
    agent_yaml.write_text(
        yaml.safe_dump({"agent_id": "arm-1", "robot_config": "robot.yaml", "data_root": "data"})
    )
    made = _run("zk0-agent", "keys", "init", "--config", str(agent_yaml))
    assert made.returncode == 0, made.stderr
    public = tmp_path / "data" / "keys" / "arm-1.key"
    assert _mode(tmp_path / "data" / "keys" / "arm-1.key_secret") == 0o600
    assert "zk0-hub keys add arm-1" in made.stdout
    # The second pair: Flower SuperNode authentication (ECDSA, OpenSSH format).
    assert _mode(tmp_path / "data" / "keys" / "arm-1.supernode") == 0o600
    node_public = (tmp_path / "data" / "keys" / "arm-1.supernode.pub").read_text()
    assert node_public.startswith("ecdsa-sha2-nistp384 ")
    assert "--supernode-key arm-1.supernode.pub" in made.stdout
    shown = _run("zk0-agent", "keys", "show", "--config", str(agent_yaml))
    assert shown.returncode == 0 and made.stdout.split()[3].rstrip(":") in shown.stdout
    again = _run("zk0-agent", "keys", "init", "--config", str(agent_yaml))
    assert again.returncode == 2 and "never overwritten" in again.stderr
    no_keys = subprocess.run(
        [sys.executable, "-m", "zk0.agent.distribution", "--config", str(agent_yaml)],
        capture_output=True,
        text=True,
        env={**os.environ, "ZK0_RUN_DIR": str(tmp_path / "run")},
        check=False,
    )
    assert no_keys.returncode == 2 and no_keys.stderr.strip().endswith("CURVE keys are required")
    assert _run("zk0-hub", "keys", "init", "--config", str(hub_yaml)).returncode == 0
    added = _run("zk0-hub", "keys", "add", "arm-1", str(public), "--config", str(hub_yaml))
    assert added.returncode == 0 and "admitted arm-1" in added.stdout, added.stderr
    listed = _run("zk0-hub", "keys", "list", "--config", str(hub_yaml))
    assert listed.stdout.split()[0] == "arm-1"
    secret = tmp_path / "data" / "keys" / "arm-1.key_secret"
    for args, message in [
        (("add", "arm-2", str(secret)), "holds a SECRET key"),
        (("add", "arm-2", str(public)), "already admitted as 'arm-1'"),
        (("add", "Arm 2", str(public)), "not a valid agent id"),
        (("remove", "arm-9"), "'arm-9' is not in the allow-list"),
    ]:
        refused = _run("zk0-hub", "keys", *args, "--config", str(hub_yaml))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    removed = _run("zk0-hub", "keys", "remove", "arm-1", "--config", str(hub_yaml))
    assert removed.returncode == 0 and not (tmp_path / "allowed" / "arm-1.key").exists()


def test_zmq_has_curve_here() -> None:
    assert zmq.has("curve")
