"""``zk0-hub adapters``: the hub's adapter store (list, promote, rollback, export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zk0.hub.cli.common import ConfigOption
from zk0.shared.cli import new_app
from zk0.shared.config import load_hub_config
from zk0.shared.store import AdapterStore

adapters_app = new_app("The hub's adapter store.")


@adapters_app.command("list")
def adapters_list(config: ConfigOption) -> None:
    """Every stored version with its round, parent and metrics; * marks the current one,
    "= vN" a version whose adapter is the same as vN's (a promote or rollback)."""
    from zk0.hub.adapters import content_id

    store = AdapterStore(load_hub_config(config).store_root)
    pointer = store.current()
    first_with: dict[str, int] = {}
    for version in store.versions():
        manifest = store.manifest(version)
        mark = "*" if pointer and pointer.version == version else " "
        same = first_with.setdefault(content_id(manifest), version)
        copy = f"= v{same}" if same != version else ""
        metrics = ", ".join(f"{k}={v}" for k, v in sorted(manifest.metrics.items()))
        typer.echo(
            f"{mark} v{version:<5} round {manifest.round!s:<5} "
            f"parent {manifest.parent_version!s:<5} "
            f"{manifest.artifact_id[:12]}  {copy:<7} {metrics}".rstrip()
        )


@adapters_app.command("promote")
def adapters_promote(
    version: Annotated[int, typer.Argument(help="The stored version to run everywhere.")],
    config: ConfigOption,
) -> None:
    """Publish VERSION's adapter again as a new, higher version (agents take it as an update)."""
    from zk0.hub.adapters import promote

    manifest = promote(AdapterStore(load_hub_config(config).store_root), version)
    typer.echo(f"v{manifest.version} = v{version}, now current  id {manifest.artifact_id}")


@adapters_app.command("rollback")
def adapters_rollback(config: ConfigOption) -> None:
    """Publish the previous distinct adapter (the current one's parent) as a new version."""
    from zk0.hub.adapters import rollback

    target, manifest = rollback(AdapterStore(load_hub_config(config).store_root))
    typer.echo(f"v{manifest.version} = v{target}, now current  id {manifest.artifact_id}")


@adapters_app.command("export")
def adapters_export(
    version: Annotated[int, typer.Argument(help="The stored version to export.")],
    merged: Annotated[Path, typer.Option("--merged", help="Folder to write (must not exist).")],
    config: ConfigOption,
) -> None:
    """Write VERSION merged into its base: a plain SmolVLA checkpoint for LeRobot tools
    (``SmolVLAPolicy.from_pretrained(DIR)``, ``lerobot-eval``, the async policy server)."""
    from zk0.hub.adapters import export_merged

    manifest = export_merged(AdapterStore(load_hub_config(config).store_root), version, merged)
    typer.echo(f"{merged}  v{version} merged into {manifest.base.spec} ({manifest.base.id})")
