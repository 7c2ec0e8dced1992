"""The hub's dashboard (``dashboard:`` in hub.yaml): where it listens and when an arm needs
attention.

On loopback (the default) the dashboard serves plain HTTP to whoever can reach the host's
loopback. Any other address serves HTTPS with the hub's TLS certificate and asks every request
for the dashboard token (``zk0-hub keys init`` makes it; ``zk0-hub dashboard token --rotate``
replaces it).

This module imports nothing from zk0: ``zk0.shared.config`` imports it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The token's file name beside the hub's CURVE secret, unless ``token_file`` names another.
TOKEN_FILE = "dashboard.token"


class DashboardConfig(BaseModel):
    """The dashboard's address and its Attention thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Serve the dashboard from zk0-hub run.")
    bind_host: str = Field(
        default="127.0.0.1",
        description="Address to listen on. Loopback: plain HTTP, no token. Any other: HTTPS "
        "with the hub's TLS certificate, and the dashboard token on every request.",
    )
    port: int = Field(default=8480, gt=0, lt=65536, description="TCP port.")
    token_file: Path | None = Field(
        default=None,
        description="The dashboard token (0600). Default: dashboard.token beside the hub's "
        "CURVE secret (keys.curve_secret), so systemd hands it over with the other keys.",
    )
    offline_s: float = Field(
        default=60.0, gt=0, le=86_400,
        description="Attention: an agent silent for longer than this.",
    )  # fmt: skip
    behind_s: float = Field(
        default=300.0, gt=0, le=7 * 86_400,
        description="Attention: an agent whose applied version is older than the newest "
        "promoted one for longer than this after its promotion.",
    )  # fmt: skip
    recent_rounds: int = Field(
        default=3, ge=1, le=100,
        description="Attention: how many of the fleet's latest rounds `missed_rounds` counts in.",
    )  # fmt: skip
    missed_rounds: int = Field(
        default=2, ge=1, le=100,
        description="Attention: an agent dropped or skipped in at least this many of the "
        "`recent_rounds` latest rounds.",
    )  # fmt: skip
    drift_sigma: float = Field(
        default=3.0, gt=0, le=1_000,
        description="Attention: an agent whose recorded state or action mean lies more than this "
        "many shared standard deviations from the shared normalization, on any joint.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _missed_within_recent(self) -> Self:
        if self.missed_rounds > self.recent_rounds:
            raise ValueError(
                f"missed_rounds {self.missed_rounds} exceeds recent_rounds {self.recent_rounds}"
            )
        return self

    @property
    def loopback(self) -> bool:
        """Whether only this host can reach the dashboard (then: plain HTTP, no token)."""
        if self.bind_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.bind_host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    def token_path(self, keys_dir: Path) -> Path:
        """Where the token lives, given the folder of the hub's CURVE secret."""
        return self.token_file or keys_dir / TOKEN_FILE
