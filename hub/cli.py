"""``zk0-hub``: the server side of zk0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zk0.shared.cli import run_cli
from zk0.shared.config import load_hub_config
from zk0.shared.store import AdapterStore

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Hub configuration.", no_args_is_help=True)
adapters_app = typer.Typer(help="The hub's adapter store.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(adapters_app, name="adapters")
ConfigOption = Annotated[Path, typer.Option("--config", help="hub.yaml")]


@config_app.command("check")
def config_check(config: ConfigOption) -> None:
    """Validate a hub config; print where the hub will listen and keep adapters."""
    hub = load_hub_config(config)
    typer.echo(
        f"listen        {hub.bind_host}: flower {hub.flower_port}, publish {hub.publish_port}, "
        f"fetch {hub.fetch_port}"
    )
    typer.echo(f"store         {hub.store_root}")
    typer.echo(f"policy        {hub.policy}")


@adapters_app.command("list")
def adapters_list(config: ConfigOption) -> None:
    """Every stored version with its round, parent and metrics; * marks the current one."""
    store = AdapterStore(load_hub_config(config).store_root)
    pointer = store.current()
    for version in store.versions():
        manifest = store.manifest(version)
        mark = "*" if pointer and pointer.version == version else " "
        metrics = ", ".join(f"{k}={v}" for k, v in sorted(manifest.metrics.items()))
        typer.echo(
            f"{mark} v{version:<5} round {manifest.round!s:<5} "
            f"parent {manifest.parent_version!s:<5} "
            f"{manifest.artifact_id[:12]}  {metrics}"
        )


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
