"""``zk0-hub keys``: the hub's CURVE key pair and TLS files, and its allow-list of agents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from zk0.hub.cli.common import ConfigOption, ask_hub, hub_keys
from zk0.shared.cli import JsonFlag, new_app
from zk0.shared.config import HubConfig, load_hub_config
from zk0.shared.hub_control import RegisterKeys

keys_app = new_app("The hub's CURVE key pair and its allow-list of agent keys.")


@keys_app.command("init")
def keys_init(
    config: ConfigOption,
    hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A further name or address agents dial, for the TLS certificate (repeatable).",
        ),
    ] = None,
) -> None:
    """Make the hub's CURVE key pair (secret 0600) and, with a tls: section, the SuperLink's
    CA and server certificate; files that exist are kept, never overwritten."""
    from zk0.hub.dashboard.token import create_token
    from zk0.shared.distribution.keys import (
        KeyFileError,
        create_keypair,
        key_id,
        load_keypair,
    )

    hub = load_hub_config(config)
    keys = hub_keys(hub, config)
    existing = [p for p in (keys.curve_secret, keys.curve_public) if p.exists()]
    if len(existing) == 1:
        raise KeyFileError(f"{existing[0]}: exists without the other half of the pair")
    if existing:
        typer.echo(f"hub key {key_id(load_keypair(keys.curve_secret).public)}: exists, kept")
    else:
        pair = create_keypair(keys.curve_secret, keys.curve_public, "hub")
        typer.echo(f"hub key {key_id(pair.public)}: secret {keys.curve_secret} (0600)")
    keys.allow_list_dir.mkdir(parents=True, exist_ok=True)
    typer.echo(f"copy {keys.curve_public} to every agent (its keys.hub_curve_public)")
    token_path = hub.dashboard.token_path(keys.curve_secret.parent)
    _, made = create_token(token_path)
    typer.echo(f"dashboard token: {token_path} ({'made, 0600' if made else 'exists, kept'})")
    if hub.tls is None:
        typer.echo(
            f"no tls: section in {config}: zk0-hub run needs one (ca_cert, server_cert, ...)"
        )
        return
    _init_tls(hub, list(hosts or []))


def _init_tls(hub: HubConfig, extra_hosts: list[str]) -> None:
    import shutil
    import tempfile

    from zk0.hub.superlink import WILDCARD_HOSTS
    from zk0.shared.flower_keys import make_tls

    assert hub.tls is not None
    targets = [hub.tls.ca_cert, hub.tls.server_cert, hub.tls.server_key]
    existing = [p for p in targets if p.exists()]
    if existing and len(existing) < len(targets):
        missing = ", ".join(str(p) for p in targets if not p.exists())
        raise ValueError(
            f"{missing}: missing beside the other TLS files (remove them all to remake)"
        )
    if not existing:
        # The hub's own CLI dials the SuperLink on loopback when it binds a wildcard address.
        own = ["127.0.0.1"] if hub.bind_host in WILDCARD_HOSTS else [hub.bind_host]
        names = list(dict.fromkeys(own + extra_hosts))
        hub.tls.ca_cert.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=hub.tls.ca_cert.parent) as scratch:
            made = make_tls(Path(scratch), names)
            for source, target in zip(
                (made.ca_cert, made.server_cert, made.server_key), targets, strict=True
            ):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(source, target)
        typer.echo(f"TLS: CA {hub.tls.ca_cert}, server certificate for {', '.join(names)}")
        if hub.bind_host in WILDCARD_HOSTS and not extra_hosts:
            typer.echo("the hub binds every address: name the ones agents dial with --host")
    else:
        typer.echo(f"TLS: {hub.tls.ca_cert} exists, kept")
    typer.echo(f"copy {hub.tls.ca_cert} to every agent (its keys.hub_ca_cert)")


@keys_app.command("add")
def keys_add(
    agent_id: Annotated[str, typer.Argument(help="The agent's id (as in its agent.yaml).")],
    public_key: Annotated[Path, typer.Argument(help="The agent's public .key file.")],
    config: ConfigOption,
    supernode_key: Annotated[
        Path | None,
        typer.Option(
            "--supernode-key", help="The agent's Flower SuperNode public key (OpenSSH .pub)."
        ),
    ] = None,
    replace: Annotated[bool, typer.Option(help="Replace the agent's existing keys.")] = False,
) -> None:
    """Admit an agent's public key (a running hub accepts it within a second) and enrol its
    SuperNode key (a running hub registers it with the SuperLink now)."""
    from zk0.hub.enrolment import check_node_key, write_node_key
    from zk0.shared.distribution.keys import AllowList

    hub = load_hub_config(config)
    keys = hub_keys(hub, config)
    # Checked before anything is written: a bad node key leaves the allow-list untouched.
    node_key = (
        check_node_key(keys.allow_list_dir, agent_id, supernode_key, replace)
        if supernode_key
        else None
    )
    entry = AllowList(keys.allow_list_dir).add(agent_id, public_key, replace=replace)
    typer.echo(f"admitted {entry.agent_id} (key {entry.key_id})")
    if node_key is None:
        return
    stored = write_node_key(keys.allow_list_dir, agent_id, node_key)
    typer.echo(f"enrolled {agent_id}'s SuperNode key ({stored})")
    result = ask_hub(
        hub, RegisterKeys(), absent="it is registered when the hub starts", timeout_s=120.0
    )
    if result is None:
        return
    if agent_id in result.failed:
        typer.echo(f"error: registering it failed: {result.failed[agent_id]}", err=True)
        raise typer.Exit(1)
    node = result.enrolled.get(agent_id)
    typer.echo(f"registered with the hub's SuperLink (node {node if node is not None else '?'})")


@keys_app.command("remove")
def keys_remove(
    agent_id: Annotated[str, typer.Argument(help="The agent to cut off.")],
    config: ConfigOption,
) -> None:
    """Withdraw an agent's keys; a running hub cuts it off within a second, no restart, and
    unregisters its SuperNode."""
    from zk0.hub.enrolment import remove_node_key
    from zk0.shared.distribution.keys import AllowList, KeyFileError

    hub = load_hub_config(config)
    keys = hub_keys(hub, config)
    node_key = remove_node_key(keys.allow_list_dir, agent_id)
    try:
        entry = AllowList(keys.allow_list_dir).remove(agent_id)
        typer.echo(f"removed {entry.agent_id} (key {entry.key_id})")
    except KeyFileError:
        if node_key is None:
            raise
    if node_key is None:
        return
    typer.echo(f"removed {agent_id}'s SuperNode key ({node_key})")
    result = ask_hub(
        hub, RegisterKeys(), absent="it is unregistered when the hub starts", timeout_s=120.0
    )
    if result is not None and agent_id in result.failed:
        typer.echo(f"error: unregistering it failed: {result.failed[agent_id]}", err=True)
        raise typer.Exit(1)
    # The end state, not this call's own work: the hub's periodic sync may have unregistered it
    # a moment before this request reached the hub.
    if result is not None and agent_id not in result.enrolled:
        typer.echo("unregistered from the hub's SuperLink")


@keys_app.command("list")
def keys_list(config: ConfigOption, as_json: JsonFlag = False) -> None:
    """Admitted agents: agent id, key id, key file."""
    from zk0.shared.distribution.keys import AllowList

    keys = hub_keys(load_hub_config(config), config)
    entries = AllowList(keys.allow_list_dir).entries()
    if as_json:
        rows = [{"agent_id": e.agent_id, "key_id": e.key_id, "path": str(e.path)} for e in entries]
        typer.echo(json.dumps(rows, indent=2))
        return
    for entry in entries:
        typer.echo(f"{entry.agent_id:<24} {entry.key_id}  {entry.path}")
