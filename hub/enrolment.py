"""Enrolment of agents' Flower SuperNode keys with the hub's SuperLink.

An agent is enrolled by ``zk0-hub keys add AGENT CURVE_KEY --supernode-key NODE_KEY``: its
CURVE key goes into the allow-list folder (``<agent id>.key``, adapter distribution) and its
SuperNode public key (ECDSA, OpenSSH format, as ``zk0.shared.flower_keys.make_node_keypair``
writes it) into that folder's ``supernodes/`` subfolder (``<agent id>.pub``; the allow-list
reads only ``*.key`` files at its top level, so the subfolder never confuses it).

The SuperLink admits only registered node keys (``--enable-supernode-auth``). The hub daemon
keeps it in step with those files (:meth:`Enrolment.sync`): a node key whose agent is also
admitted in the CURVE allow-list is registered (``flwr supernode register``); one whose file
or CURVE key is gone, or was replaced, is unregistered (``flwr supernode unregister``, which
takes the node id, so the registry ``<state dir>/supernodes.json`` remembers the id each
registration returned). Removing an agent's CURVE key therefore also cuts its SuperNode off.
The registry lives beside the SuperLink's database: a database that is gone means a registry
that is void (:meth:`Enrolment.forget`).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from loguru import logger

from zk0.shared.config import AGENT_ID_PATTERN
from zk0.shared.distribution.keys import AllowList
from zk0.shared.fsutil import atomic_write_bytes
from zk0.shared.hub_control import KeySync

SUPERNODES_DIR = "supernodes"
NODE_KEY_SUFFIX = ".pub"
REGISTRY_FILE = "supernodes.json"
#: Curves Flower 1.42 accepts for SuperNode keys (``uses_nist_ec_curve``).
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
#: A registration that failed is tried again by the daemon's loop after this long.
RETRY_S = 30.0

#: Runs ``flwr ARGS...`` against the hub's SuperLink connection; returns the finished process.
FlwrCommand = Callable[..., subprocess.CompletedProcess[str]]


class NodeKeyError(ValueError):
    """A SuperNode key file is missing, malformed or taken; the message is one line."""


def node_keys_dir(allow_list_dir: Path) -> Path:
    return Path(allow_list_dir) / SUPERNODES_DIR


def node_key_path(allow_list_dir: Path, agent_id: str) -> Path:
    return node_keys_dir(allow_list_dir) / f"{agent_id}{NODE_KEY_SUFFIX}"


def read_node_key(path: Path) -> bytes:
    """The key line of an OpenSSH ECDSA public key file on a NIST curve (what Flower takes)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NodeKeyError(f"{path}: no such SuperNode key file") from None
    line = raw.strip().split(b"\n")[0].strip()
    try:
        key = serialization.load_ssh_public_key(line)
    except (ValueError, UnsupportedAlgorithm):
        raise NodeKeyError(
            f"{path}: not an OpenSSH public key (the SuperNode's .pub file, ECDSA P-384)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise NodeKeyError(f"{path}: Flower needs an ECDSA key on a NIST curve (P-256/384/521)")
    return line + b"\n"


def _key_fields(line: bytes) -> bytes:
    return b" ".join(line.split()[:2])  # type and key; the comment does not identify it


def check_node_key(
    allow_list_dir: Path, agent_id: str, source: Path, replace: bool = False
) -> bytes:
    """``source``'s key line, once it is known to be fit for ``agent_id``: a valid agent id,
    a key Flower takes, not another agent's, not replacing this agent's without ``replace``."""
    if re.match(AGENT_ID_PATTERN, agent_id) is None:
        raise NodeKeyError(f"{agent_id!r} is not a valid agent id ({AGENT_ID_PATTERN})")
    line = read_node_key(source)
    for other in sorted(node_keys_dir(allow_list_dir).glob(f"*{NODE_KEY_SUFFIX}")):
        other_id = other.name.removesuffix(NODE_KEY_SUFFIX)
        if other_id != agent_id and _key_fields(other.read_bytes()) == _key_fields(line):
            raise NodeKeyError(f"{source}: this SuperNode key is already enrolled as {other_id!r}")
    target = node_key_path(allow_list_dir, agent_id)
    if target.exists() and _key_fields(target.read_bytes()) != _key_fields(line) and not replace:
        raise NodeKeyError(
            f"{agent_id!r} already has another SuperNode key; use --replace to change it"
        )
    return line


def write_node_key(allow_list_dir: Path, agent_id: str, line: bytes) -> Path:
    """Store a key line :func:`check_node_key` returned as ``supernodes/<agent id>.pub``."""
    target = node_key_path(allow_list_dir, agent_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, line, 0o644)
    return target


def store_node_key(
    allow_list_dir: Path, agent_id: str, source: Path, replace: bool = False
) -> Path:
    """Check ``source`` and store it for ``agent_id``; returns the stored file."""
    line = check_node_key(allow_list_dir, agent_id, source, replace)
    return write_node_key(allow_list_dir, agent_id, line)


def remove_node_key(allow_list_dir: Path, agent_id: str) -> Path | None:
    """Delete ``agent_id``'s stored SuperNode key; returns its path, or None if it had none."""
    target = node_key_path(allow_list_dir, agent_id)
    if not target.is_file():
        return None
    target.unlink()
    return target


def _json_reply(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` printed (indented over several lines,
    possibly after other output)."""
    text = result.stdout
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"^\{", text, re.MULTILINE)):
        try:
            reply, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(reply, dict):
            return reply
    return {}


def _failure(result: subprocess.CompletedProcess[str]) -> str:
    reply = _json_reply(result)
    text = str(reply.get("error-message") or result.stderr or result.stdout or "no output")
    return " ".join(text.split())[-300:]


class Enrolment:
    """Keeps the SuperLink's registered node keys in step with the enrolled key files."""

    def __init__(self, allow_list_dir: Path, registry_path: Path, flwr: FlwrCommand) -> None:
        self.folder = node_keys_dir(allow_list_dir)
        self.allow_list = AllowList(allow_list_dir)
        self.registry_path = registry_path
        self.flwr = flwr
        self.lock = threading.Lock()
        self._failed_at: dict[str, float] = {}

    # -- the registry ----------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.registry_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as error:
            logger.warning(
                "{} unreadable ({}); registering every node key again", self.registry_path, error
            )
            return {}
        agents = raw.get("agents", {}) if isinstance(raw, dict) else {}
        return {str(k): dict(v) for k, v in agents.items() if isinstance(v, dict)}

    def _save(self, registry: dict[str, dict[str, Any]]) -> None:
        body = json.dumps({"agents": dict(sorted(registry.items()))}, indent=1) + "\n"
        self.registry_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.registry_path, body.encode())

    def forget(self) -> None:
        """The SuperLink's database is new: nothing is registered with it any more."""
        if self.registry_path.exists():
            logger.warning("no SuperLink database: every node key will be registered again")
            self.registry_path.unlink()

    def enrolled(self) -> dict[str, int | None]:
        """Agent id -> SuperLink node id (None: registered before the registry knew it)."""
        return {agent: entry.get("node_id") for agent, entry in sorted(self._load().items())}

    # -- what should be registered -----------------------------------------------------------

    def wanted(self) -> dict[str, tuple[Path, str]]:
        """Agent id -> (node key file, sha256 of its key) for agents also CURVE-admitted."""
        admitted = {entry.agent_id for entry in self.allow_list.entries()}
        wanted: dict[str, tuple[Path, str]] = {}
        for path in sorted(self.folder.glob(f"*{NODE_KEY_SUFFIX}")):
            agent_id = path.name.removesuffix(NODE_KEY_SUFFIX)
            if agent_id not in admitted:
                continue
            try:
                digest = hashlib.sha256(_key_fields(read_node_key(path))).hexdigest()
            except NodeKeyError as error:
                logger.warning("enrolment: skipping {}", error)
                continue
            wanted[agent_id] = (path, digest)
        return wanted

    def pending(self, now: float | None = None) -> bool:
        """Whether :meth:`sync` has work, leaving out registrations that failed lately."""
        now = time.monotonic() if now is None else now
        wanted = {a: digest for a, (_, digest) in self.wanted().items()}
        registry = {a: entry.get("sha256") for a, entry in self._load().items()}
        differing = {a for a in set(wanted) | set(registry) if wanted.get(a) != registry.get(a)}
        return any(now - self._failed_at.get(agent, -RETRY_S) >= RETRY_S for agent in differing)

    # -- talking to the SuperLink --------------------------------------------------------------

    def sync(self, connection: str) -> KeySync:
        """Register what is enrolled and not registered; unregister what is registered and no
        longer enrolled (or was replaced). Thread-safe; each ``flwr`` call is bounded."""
        registered: list[str] = []
        unregistered: list[str] = []
        failed: dict[str, str] = {}
        with self.lock:
            wanted = self.wanted()
            registry = self._load()
            for agent_id, entry in sorted(registry.items()):
                if agent_id in wanted and wanted[agent_id][1] == entry.get("sha256"):
                    continue
                error = self._unregister(agent_id, entry.get("node_id"), connection)
                if error is not None:
                    failed[agent_id] = error
                    self._failed_at[agent_id] = time.monotonic()
                    continue
                del registry[agent_id]
                unregistered.append(agent_id)
            for agent_id, (path, digest) in sorted(wanted.items()):
                if agent_id in registry or agent_id in failed:
                    continue
                node_id, error = self._register(agent_id, path, connection)
                if error is not None:
                    failed[agent_id] = error
                    self._failed_at[agent_id] = time.monotonic()
                    continue
                self._failed_at.pop(agent_id, None)
                registry[agent_id] = {
                    "node_id": node_id,
                    "sha256": digest,
                    "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
                registered.append(agent_id)
            self._save(registry)
        for agent_id, error in failed.items():
            logger.error(
                "enrolment of {} failed (retried in {:.0f} s): {}", agent_id, RETRY_S, error
            )
        return KeySync(
            registered=registered,
            unregistered=unregistered,
            failed=failed,
            enrolled={a: e.get("node_id") for a, e in sorted(registry.items())},
        )

    def _register(
        self, agent_id: str, path: Path, connection: str
    ) -> tuple[int | None, str | None]:
        result = self.flwr(
            "supernode", "register", str(path), connection, "--name", agent_id, "--format", "json"
        )
        reply = _json_reply(result)
        if result.returncode == 0 and reply.get("node-id") is not None:
            node_id = int(reply["node-id"])
            logger.info("registered the SuperNode key of {} (node {})", agent_id, node_id)
            return node_id, None
        failure = _failure(result)
        if "already in use" in failure:
            # Registered before the registry knew (e.g. a registry lost beside a kept
            # database): admitted all the same, though it cannot be unregistered by id.
            logger.warning("the SuperNode key of {} was already registered", agent_id)
            return None, None
        return None, f"flwr supernode register: {failure}"

    def _unregister(self, agent_id: str, node_id: Any, connection: str) -> str | None:
        if node_id is None:
            logger.warning(
                "the SuperNode of {} has no known node id; it stays registered", agent_id
            )
            return None
        result = self.flwr(
            "supernode", "unregister", str(int(node_id)), connection, "--format", "json"
        )
        failure = _failure(result) if result.returncode != 0 else ""
        if result.returncode != 0 and "not found" not in failure:
            return f"flwr supernode unregister {node_id}: {failure}"
        logger.info("unregistered the SuperNode of {} (node {})", agent_id, node_id)
        return None
