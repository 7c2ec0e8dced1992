"""What the ``zk0-hub`` command groups share: the config option, the hub's keys section and the
running hub's control socket."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zk0.shared.config import HubConfig, HubKeys
from zk0.shared.control import Command, ControlError, request
from zk0.shared.validation import WireModel

ConfigOption = Annotated[Path, typer.Option("--config", help="hub.yaml")]


def hub_keys(hub: HubConfig, config: Path) -> HubKeys:
    if hub.keys is None:
        raise ValueError(f"{config}: no keys: section (curve_secret, curve_public, allow_list_dir)")
    return hub.keys


def version_label(version: int | None) -> str:
    return "-" if version is None else str(version)


def ask_hub[R: WireModel](
    hub: HubConfig, command: Command[R], *, absent: str | None = None, timeout_s: float = 10.0
) -> R | None:
    """The running hub's answer; without a hub: None with a note when ``absent`` says what
    happens instead, else a one-line error (exit 1)."""
    socket_path = hub.control_socket_path
    if not socket_path.exists():
        if absent is not None:
            typer.echo(f"no hub running at {socket_path}: {absent}")
            return None
        typer.echo(f"error: no hub running at {socket_path}", err=True)
        raise typer.Exit(1)
    try:
        return request(socket_path, command, timeout_s=timeout_s)
    except ControlError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
