"""``zk0-hub``: the server side of zk0."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from zk0.shared.cli import run_cli
from zk0.shared.config import HubConfig, HubKeys, load_hub_config
from zk0.shared.control import ControlError
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
    typer.echo(f"state         {hub.hub_state_dir} (control socket {hub.control_socket_path})")
    typer.echo(f"policy        {hub.policy}")
    runs = hub.runs
    typer.echo(
        f"runs          trigger {runs.trigger}, {runs.rounds} rounds, min {runs.min_agents} agents"
    )


# -- keys ------------------------------------------------------------------------------------


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
    from zk0.shared.distribution.keys import (
        KeyFileError,
        create_keypair,
        key_id,
        load_keypair,
    )

    hub = load_hub_config(config)
    keys = _keys(hub, config)
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
    if hub.tls is None:
        typer.echo(
            f"no tls: section in {config}: zk0-hub run needs one (ca_cert, server_cert, ...)"
        )
        return
    _init_tls(hub, list(hosts or []))


def _init_tls(hub: HubConfig, extra_hosts: list[str]) -> None:
    import shutil
    import tempfile

    from zk0.hub.supervisor import WILDCARD_HOSTS
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
    keys = _keys(hub, config)
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
    result = _ask_hub(
        hub, "register_keys", absent="it is registered when the hub starts", timeout_s=120.0
    )
    if result is None:
        return
    if agent_id in result.get("failed", {}):
        typer.echo(f"error: registering it failed: {result['failed'][agent_id]}", err=True)
        raise typer.Exit(1)
    node = result.get("enrolled", {}).get(agent_id)
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
    keys = _keys(hub, config)
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
    result = _ask_hub(
        hub, "register_keys", absent="it is unregistered when the hub starts", timeout_s=120.0
    )
    if result is not None and agent_id in result.get("failed", {}):
        typer.echo(f"error: unregistering it failed: {result['failed'][agent_id]}", err=True)
        raise typer.Exit(1)
    if result is not None and agent_id in result.get("unregistered", []):
        typer.echo("unregistered from the hub's SuperLink")


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


# -- the daemon -------------------------------------------------------------------------------


def _ask_hub(
    hub: HubConfig,
    command: str,
    *,
    absent: str | None = None,
    timeout_s: float = 10.0,
    args: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The running hub's answer; without a hub: None with a note when ``absent`` says what
    happens instead, else a one-line error (exit 1)."""
    from zk0.shared.control import request

    socket_path = hub.control_socket_path
    if not socket_path.exists():
        if absent is not None:
            typer.echo(f"no hub running at {socket_path}: {absent}")
            return None
        typer.echo(f"error: no hub running at {socket_path}", err=True)
        raise typer.Exit(1)
    try:
        return request(socket_path, command, timeout_s=timeout_s, **(args or {}))
    except ControlError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


@app.command("run")
def run(config: ConfigOption) -> None:
    """The hub daemon: Flower SuperLink, adapter distribution and run scheduling, until
    SIGTERM (systemd's zk0-hub.service runs this)."""
    from zk0.hub.service import HubService

    hub = load_hub_config(config)
    try:
        HubService(hub, config).serve_forever()
    except (ControlError, RuntimeError, TimeoutError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command("status")
def status(config: ConfigOption, as_json: JsonFlag = False) -> None:
    """Ask the running hub: SuperLink, versions, the run in progress, the fleet."""
    result = _ask_hub(load_hub_config(config), "status")
    assert result is not None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print_status(result)


def _print_status(s: dict[str, Any]) -> None:
    link, hub = s["superlink"], s["hub"]
    state = "up" if link["up"] else link["state"]
    restarts = (
        f", {link['restarts']} restarts, last: {link['last_exit']}" if link["restarts"] else ""
    )
    typer.echo(f"hub        pid {hub['pid']} since {hub['started_at']}, trigger {hub['trigger']}")
    typer.echo(f"superlink  {link['address']} {state}{restarts}")
    versions = s["versions"]
    stored = f"{len(versions)} stored" + (f", v{versions[0]}..v{versions[-1]}" if versions else "")
    typer.echo(f"adapters   current v{_v(s['current_version'])} ({stored})")
    run_ = s["run"]
    if run_:
        typer.echo(
            f"run        {run_['index']}: round {run_['completed_rounds']}/{run_['rounds']}, "
            f"since {run_['started_at']}, {run_['run_dir']}"
        )
    else:
        typer.echo(f"run        none ({s['next_run']})")
    last = s["last_run"]
    if last:
        outcome = "ok" if last["error"] is None else f"FAILED: {last['error']}"
        typer.echo(
            f"last run   {last['index']} {outcome}, ended {last['ended_at']}, {last['run_dir']}"
        )
    typer.echo(f"runs       {s['runs_completed']} completed, {s['runs_failed']} failed")
    online = [a for a in s["agents"] if a["online"]]
    converged = "yes" if s["converged"] else "no"
    typer.echo(f"agents     {len(online)} online of {len(s['agents'])}, converged: {converged}")
    for a in s["agents"]:
        node = s["enrolled"].get(a["agent_id"], "-")
        typer.echo(
            f"  {a['agent_id']:<20} {'online' if a['online'] else 'offline':<8} "
            f"applied {_v(a['applied']):<5} in use {_v(a['in_use']):<5} {a['state']:<10} "
            f"episodes {a['episodes']:<6} node {node}" + ("" if a["converged"] else "  (behind)")
        )


@app.command("start-run")
def start_run(
    config: ConfigOption,
    rounds: Annotated[
        int | None,
        typer.Option("--rounds", min=1, help="Rounds of this run (default runs.rounds)."),
    ] = None,
) -> None:
    """Ask the running hub to start a federated run now (whatever its trigger)."""
    args = {"rounds": rounds} if rounds is not None else {}
    result = _ask_hub(load_hub_config(config), "start_run", args=args)
    assert result is not None
    typer.echo(
        f"run {result['index']} started: {result['rounds']} rounds, min-nodes "
        f"{result['min_nodes']}, folder {result['run_dir']}"
    )


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
