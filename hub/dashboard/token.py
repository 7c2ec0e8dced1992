"""The dashboard token: the one secret that guards a dashboard bound beyond loopback.

``zk0-hub keys init`` writes it beside the hub's CURVE secret when missing; ``zk0-hub dashboard
token --rotate`` replaces it. The daemon reads the file again whenever it changes, so a rotation
ends every session at once (under systemd, which copies the keys at start, once the hub is
restarted).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from zk0.shared.fsutil import atomic_write_bytes

#: Shorter tokens are refused at start.
MIN_TOKEN_CHARS = 32


class TokenError(ValueError):
    """The token file is missing, unreadable or too short (the reason names it)."""


def create_token(path: Path, *, replace: bool = False) -> tuple[str, bool]:
    """(token, made): a fresh token written 0600 to ``path`` unless one exists and ``replace``
    is False."""
    if path.exists() and not replace:
        return read_token(path), False
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, token.encode() + b"\n", mode=0o600)
    return token, True


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise TokenError(f"{path}: cannot read the dashboard token: {error.strerror}") from error
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"{path}: the dashboard token is shorter than {MIN_TOKEN_CHARS} characters "
            "(zk0-hub dashboard token --rotate)"
        )
    return token


class TokenFile:
    """The current token, read again whenever its file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._token = read_token(path)  # a bad token fails the start, not the first request

    def current(self) -> str:
        stat = self.path.stat()
        stamp = (stat.st_mtime, stat.st_ino)  # a rotation replaces the file (new inode)
        if stamp != self._stamp:
            self._token, self._stamp = read_token(self.path), stamp
        return self._token


def session_value(token: str) -> str:
    """What the session cookie holds: an HMAC of the token, never the token itself."""
    return hmac.new(token.encode(), b"zk0 dashboard session", hashlib.sha256).hexdigest()
