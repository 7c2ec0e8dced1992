"""``zk0-hub``: the server side of zk0."""

from __future__ import annotations

from zk0.hub.cli.adapters import adapters_app
from zk0.hub.cli.agents import agents_app
from zk0.hub.cli.daemon import config_app, register_daemon_commands
from zk0.hub.cli.dashboard import dashboard_app
from zk0.hub.cli.keys import keys_app
from zk0.shared.cli import new_app, run_cli

app = new_app(__doc__)
app.add_typer(config_app, name="config")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.add_typer(agents_app, name="agents")
app.add_typer(dashboard_app, name="dashboard")
register_daemon_commands(app)


def main() -> None:
    run_cli(app)
