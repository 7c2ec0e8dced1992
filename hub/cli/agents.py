"""``zk0-hub agents``: the fleet as the hub last saw it (from its ``agents.json``)."""

from __future__ import annotations

import json
import time

import typer

from zk0.hub.cli.common import ConfigOption, version_label
from zk0.shared.cli import JsonFlag, new_app
from zk0.shared.config import load_hub_config

agents_app = new_app("The fleet as the hub last saw it.")


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
        agents = [r.model_dump(mode="json") for r in records]
        payload = {"hub": summary, "agents": agents, "never_seen": never}
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
            f"applied {version_label(r.applied):<5} in use {version_label(r.in_use):<5} "
            f"{r.report.state:<14} {status:<12} episodes {r.report.episodes_new} new of "
            f"{r.report.episodes_total} ({r.report.recorded_s / 3600:.2f} h)"
            + (f"  ! {r.error}" if r.error else "")
        )
    for agent_id in never:
        typer.echo(f"{agent_id:<20} never seen")
