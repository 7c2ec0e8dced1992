"""``zk0-hub dashboard``: the dashboard's token."""

from __future__ import annotations

from typing import Annotated

import typer

from zk0.hub.cli.common import ConfigOption, hub_keys
from zk0.shared.cli import new_app
from zk0.shared.config import load_hub_config

dashboard_app = new_app("The fleet dashboard that zk0-hub run serves.")


@dashboard_app.command("token")
def dashboard_token(
    config: ConfigOption,
    rotate: Annotated[
        bool, typer.Option(help="Replace the token: every session and script must use the new one.")
    ] = False,
) -> None:
    """Print the dashboard token (made when missing); with --rotate, a new one first."""
    from zk0.hub.dashboard.token import create_token

    hub = load_hub_config(config)
    path = hub.dashboard.token_path(hub_keys(hub, config).curve_secret.parent)
    token, made = create_token(path, replace=rotate)
    typer.echo(token)
    if made:
        typer.echo(f"written to {path} (0600)", err=True)
    if rotate:
        typer.echo("a hub started by systemd reads it after: systemctl restart zk0-hub", err=True)
