"""``zk0-hub``: the server side of zk0."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from zk0.shared.cli import run_cli
from zk0.shared.config import HubConfig, HubKeys, load_hub_config
from zk0.shared.store import AdapterStore

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Hub configuration.", no_args_is_help=True)
adapters_app = typer.Typer(help="The hub's adapter store.", no_args_is_help=True)
keys_app = typer.Typer(
    help="The hub's CURVE key pair and its allow-list of agent keys.", no_args_is_help=True
)
agents_app = typer.Typer(help="The fleet as the hub last saw it.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.add_typer(agents_app, name="agents")
ConfigOption = Annotated[Path, typer.Option("--config", help="hub.yaml")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _keys(hub: HubConfig, config: Path) -> HubKeys:
    if hub.keys is None:
        raise ValueError(f"{config}: no keys: section (curve_secret, curve_public, allow_list_dir)")
    return hub.keys


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


# -- keys ------------------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(config: ConfigOption) -> None:
    """Make the hub's CURVE key pair (secret 0600); agents need the public file."""
    from zk0.shared.distribution.keys import create_keypair, key_id

    keys = _keys(load_hub_config(config), config)
    pair = create_keypair(keys.curve_secret, keys.curve_public, "hub")
    keys.allow_list_dir.mkdir(parents=True, exist_ok=True)
    typer.echo(f"hub key {key_id(pair.public)}: secret {keys.curve_secret} (0600)")
    typer.echo(f"copy {keys.curve_public} to every agent (its keys.hub_curve_public)")


@keys_app.command("add")
def keys_add(
    agent_id: Annotated[str, typer.Argument(help="The agent's id (as in its agent.yaml).")],
    public_key: Annotated[Path, typer.Argument(help="The agent's public .key file.")],
    config: ConfigOption,
    replace: Annotated[bool, typer.Option(help="Replace the agent's existing key.")] = False,
) -> None:
    """Admit an agent's public key; a running hub accepts it within a second."""
    from zk0.shared.distribution.keys import AllowList

    keys = _keys(load_hub_config(config), config)
    entry = AllowList(keys.allow_list_dir).add(agent_id, public_key, replace=replace)
    typer.echo(f"admitted {entry.agent_id} (key {entry.key_id})")


@keys_app.command("remove")
def keys_remove(
    agent_id: Annotated[str, typer.Argument(help="The agent to cut off.")],
    config: ConfigOption,
) -> None:
    """Withdraw an agent's key; a running hub cuts it off within a second, no restart."""
    from zk0.shared.distribution.keys import AllowList

    keys = _keys(load_hub_config(config), config)
    entry = AllowList(keys.allow_list_dir).remove(agent_id)
    typer.echo(f"removed {entry.agent_id} (key {entry.key_id})")


@keys_app.command("list")
def keys_list(config: ConfigOption, as_json: JsonFlag = False) -> None:
    """Admitted agents: agent id, key id, key file."""
    from zk0.shared.distribution.keys import AllowList

    keys = _keys(load_hub_config(config), config)
    entries = AllowList(keys.allow_list_dir).entries()
    if as_json:
        rows = [{"agent_id": e.agent_id, "key_id": e.key_id, "path": str(e.path)} for e in entries]
        typer.echo(json.dumps(rows, indent=2))
        return
    for entry in entries:
        typer.echo(f"{entry.agent_id:<24} {entry.key_id}  {entry.path}")


# -- adapters --------------------------------------------------------------------------------


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


# -- the fleet and the server ----------------------------------------------------------------


def _v(version: int | None) -> str:
    return "-" if version is None else str(version)


@agents_app.command("list")
def agents_list(config: ConfigOption, as_json: JsonFlag = False) -> None:
    """Per agent: key id, last seen, applied and in-use versions, state, episodes."""
    from zk0.hub.fleet import load_fleet
    from zk0.shared.distribution.keys import AllowList

    hub = load_hub_config(config)
    summary, records = load_fleet(hub.store_root)
    seen = {record.agent_id for record in records}
    never = []
    if hub.keys is not None:
        never = [
            e.agent_id
            for e in AllowList(hub.keys.allow_list_dir).entries()
            if e.agent_id not in seen
        ]
    if as_json:
        from dataclasses import asdict

        payload = {"hub": summary, "agents": [asdict(r) for r in records], "never_seen": never}
        typer.echo(json.dumps(payload, indent=2))
        return
    current = summary.get("current")
    now = time.time()
    on_current = sum(1 for r in records if r.applied == current and not r.revoked)
    typer.echo(
        f"hub current v{current}; {on_current} of {len(records) + len(never)} agents applied it "
        f"(as of {summary.get('updated_at', 'never')})"
    )
    for r in records:
        status = "revoked" if r.revoked else r.sync
        typer.echo(
            f"{r.agent_id:<20} key {r.key_id:<12} seen {now - r.last_seen:6.0f}s ago  "
            f"applied {_v(r.applied):<5} in use {_v(r.in_use):<5} {r.state:<10} {status:<12} "
            f"episodes {r.episodes}" + (f"  ! {r.error}" if r.error else "")
        )
    for agent_id in never:
        typer.echo(f"{agent_id:<20} never seen")


@app.command("distribute")
def distribute(config: ConfigOption) -> None:
    """Serve adapter versions to the fleet in the foreground (Ctrl-C or SIGTERM stops)."""
    import signal
    import threading

    from zk0.hub.distribution import DistributionServer
    from zk0.shared.logs import new_run_dir, setup_logging

    hub = load_hub_config(config)
    setup_logging(new_run_dir(), "hub")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = DistributionServer.from_config(hub).start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
