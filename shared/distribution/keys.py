"""CURVE keys: key pairs with private secret keys, and the hub's live allow-list of agent keys.

Key files use pyzmq's certificate format (``zmq.auth.load_certificate`` reads them): a public
file ``NAME.key`` and a secret file ``NAME.key_secret`` written 0600. A secret key file that
group or others can read is refused with one line: the key would no longer identify its owner.

The hub's allow-list is a folder of public key files named after the agent they belong to
(``<agent id>.key``). It is read live: adding or removing a file takes effect within a fraction
of a second, without restarting the hub.
"""

from __future__ import annotations

import hashlib
import re
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import zmq
from loguru import logger
from zmq.auth.certs import load_certificate
from zmq.utils import z85

from zk0.shared.config import AGENT_ID_PATTERN
from zk0.shared.fsutil import atomic_write_bytes

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: How long the hub trusts its last read of the allow-list folder (it also rereads on any change).
ALLOW_LIST_TTL_S = 0.25
_BANNER = "#   zk0 ZeroMQ CURVE {kind} key, made {when} for {name}\n#   {advice}\n\n"


class KeyFileError(ValueError):
    """A key file is missing, malformed or not private enough; the message is one line."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 characters
    secret: bytes


def require_curve() -> None:
    if not zmq.has("curve"):
        raise KeyFileError(
            f"libzmq {zmq.zmq_version()} was built without CURVE; zk0 refuses to distribute "
            "adapters unencrypted (install a pyzmq wheel with libsodium/CURVE)"
        )


def key_id(public: bytes) -> str:
    """A short fingerprint of a public key, shown in logs, ``keys list`` and the agents table."""
    return hashlib.sha256(z85.decode(public)).hexdigest()[:12]


def _check_key(value: bytes | None, path: Path, what: str) -> bytes:
    if value is None:
        raise KeyFileError(f"{path}: no {what} key in this file")
    try:
        valid = len(value) == 40 and len(z85.decode(value)) == 32
    except (ValueError, KeyError, IndexError):
        valid = False
    if not valid:
        raise KeyFileError(f"{path}: the {what} key is not a 40-character Z85 CURVE key")
    return value


def _read_certificate(path: Path) -> tuple[bytes | None, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{path}: no such key file")
    try:
        return load_certificate(path)
    except (OSError, ValueError) as error:
        raise KeyFileError(f"{path}: not a CURVE key file ({error})") from None


def check_secret_permissions(path: Path) -> None:
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: secret key is readable by others (mode {mode:04o}); run: chmod 600 {path}"
        )


def load_public_key(path: Path) -> bytes:
    """The public key in ``path`` (a ``.key`` file); refuses a file that holds a secret key."""
    public, secret = _read_certificate(path)
    if secret is not None:
        raise KeyFileError(f"{path}: holds a SECRET key; give the public .key file instead")
    return _check_key(public, Path(path), "public")


def load_keypair(secret_path: Path) -> KeyPair:
    """The key pair in a ``.key_secret`` file, after checking that only its owner can read it."""
    secret_path = Path(secret_path)
    if not secret_path.is_file():
        raise KeyFileError(f"{secret_path}: no such key file")
    check_secret_permissions(secret_path)
    public, secret = _read_certificate(secret_path)
    return KeyPair(
        _check_key(public, secret_path, "public"), _check_key(secret, secret_path, "secret")
    )


def _certificate(kind: str, name: str, public: bytes, secret: bytes | None) -> bytes:
    advice = (
        "Keep this file private (0600); never copy it to another machine."
        if secret
        else "Public: copy it to the peer that must trust this key."
    )
    text = _BANNER.format(
        kind=kind, when=datetime.now().isoformat(timespec="seconds"), name=name, advice=advice
    )
    text += f'metadata\n    name = "{name}"\ncurve\n    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text.encode()


def create_keypair(secret_path: Path, public_path: Path, name: str) -> KeyPair:
    """Make a new key pair: the secret file 0600, the public file 0644; never overwrites."""
    require_curve()
    for path in (secret_path, public_path):
        if Path(path).exists():
            raise KeyFileError(f"{path}: already exists; keys are never overwritten")
    public, secret = zmq.curve_keypair()
    for path in (secret_path, public_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(secret_path), _certificate("secret", name, public, secret), 0o600)
    atomic_write_bytes(Path(public_path), _certificate("public", name, public, None), 0o644)
    return KeyPair(public, secret)


@dataclass(frozen=True)
class AllowedKey:
    agent_id: str
    public: bytes
    path: Path

    @property
    def key_id(self) -> str:
        return key_id(self.public)


def _valid_agent_id(agent_id: str) -> bool:
    return re.match(AGENT_ID_PATTERN, agent_id) is not None


class AllowList:
    """The hub's folder of admitted agent keys (``<agent id>.key``), read live and thread-safe."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._by_key: dict[bytes, AllowedKey] = {}
        self._stamp: tuple[int, int] | None = None
        self._read_at = -1.0
        #: Per key file: its (mtime, size, inode) when parsed, and what it held (None: refused).
        self._parsed: dict[Path, tuple[tuple[int, int, int], bytes | None]] = {}

    def _scan(self) -> dict[bytes, AllowedKey]:
        # Every TTL the files are stat-ed, and only a changed one is parsed again: a thousand
        # keys parsed four times a second kept a hub's loop from serving its fleet.
        by_key: dict[bytes, AllowedKey] = {}
        parsed: dict[Path, tuple[tuple[int, int, int], bytes | None]] = {}
        for path in sorted(self.folder.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                info = path.stat()
            except FileNotFoundError:  # removed since the listing
                continue
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            before = self._parsed.get(path)
            public = before[1] if before is not None and before[0] == stamp else self._parse(path)
            parsed[path] = (stamp, public)
            if public is None:
                continue
            agent_id = path.name.removesuffix(PUBLIC_SUFFIX)
            if public in by_key:
                logger.warning(
                    "allow-list: {} repeats the key of {}; ignored", path, by_key[public].agent_id
                )
                continue
            by_key[public] = AllowedKey(agent_id, public, path)
        self._parsed = parsed
        return by_key

    @staticmethod
    def _parse(path: Path) -> bytes | None:
        """The public key in ``path``, or None (logged once per version of the file)."""
        agent_id = path.name.removesuffix(PUBLIC_SUFFIX)
        try:
            if not _valid_agent_id(agent_id):
                raise KeyFileError(f"{path}: {agent_id!r} is not a valid agent id")
            return load_public_key(path)
        except KeyFileError as error:
            logger.warning("allow-list: skipping {}", error)
            return None

    def refresh(self, force: bool = False) -> bool:
        """Reread the folder if it changed or the last read is older than the TTL; True if this
        call changed the set of admitted keys (another thread's call may have seen it first:
        compare ``admitted()`` snapshots to follow changes)."""
        now = time.monotonic()
        try:
            info = self.folder.stat()
            stamp = (info.st_mtime_ns, info.st_ino)
        except FileNotFoundError:
            stamp = (0, 0)
        with self._lock:
            if not force and stamp == self._stamp and now - self._read_at < ALLOW_LIST_TTL_S:
                return False
            by_key = self._scan() if stamp != (0, 0) else {}
            changed = set(by_key) != set(self._by_key) or any(
                by_key[k].agent_id != self._by_key[k].agent_id for k in by_key if k in self._by_key
            )
            self._by_key, self._stamp, self._read_at = by_key, stamp, now
        return changed

    def agent_for(self, public: bytes) -> str | None:
        """The agent id a public key (z85) is admitted as, or None; reads the folder if stale."""
        self.refresh()
        with self._lock:
            entry = self._by_key.get(public)
        return entry.agent_id if entry else None

    def admitted(self) -> dict[bytes, str]:
        """Public key (z85) -> agent id, as of the last read (reread if stale)."""
        self.refresh()
        with self._lock:
            return {public: entry.agent_id for public, entry in self._by_key.items()}

    def entries(self) -> list[AllowedKey]:
        self.refresh(force=True)
        with self._lock:
            return sorted(self._by_key.values(), key=lambda e: e.agent_id)

    def add(self, agent_id: str, public_key_file: Path, replace: bool = False) -> AllowedKey:
        """Admit the public key in ``public_key_file`` as ``agent_id``."""
        if not _valid_agent_id(agent_id):
            raise KeyFileError(f"{agent_id!r} is not a valid agent id ({AGENT_ID_PATTERN})")
        public = load_public_key(public_key_file)
        for entry in self.entries():
            if entry.public == public and entry.agent_id != agent_id:
                raise KeyFileError(
                    f"{public_key_file}: this key is already admitted as {entry.agent_id!r}"
                )
        target = self.folder / f"{agent_id}{PUBLIC_SUFFIX}"
        if target.exists() and not replace:
            if load_public_key(target) == public:
                return AllowedKey(agent_id, public, target)
            raise KeyFileError(f"{agent_id!r} already has another key; use --replace to change it")
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, _certificate("public", agent_id, public, None), 0o644)
        self.refresh(force=True)
        return AllowedKey(agent_id, public, target)

    def remove(self, agent_id: str) -> AllowedKey:
        """Withdraw ``agent_id``'s key: a running hub cuts the agent off within a second."""
        target = self.folder / f"{agent_id}{PUBLIC_SUFFIX}"
        if not target.is_file():
            raise KeyFileError(f"{agent_id!r} is not in the allow-list {self.folder}")
        public = load_public_key(target)
        target.unlink()
        self.refresh(force=True)
        return AllowedKey(agent_id, public, target)
