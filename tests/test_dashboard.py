"""The hub's dashboard: what an operator reads in a browser, who may read it, and what
Prometheus scrapes.

The daemon test starts the real ``zk0-hub run`` with a small synthetic fleet (real CURVE
subscribers on the distribution protocol) and reads every page in headless Chromium; set
``ZK0_DASHBOARD_SCREENSHOTS=<folder>`` to keep its screenshots (the README's come from there).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zk0.bench._chromium import Chromium
from zk0.bench._dashboard_fleet import (
    DROPPED_REASON,
    SKIPPED_REASON,
    DashboardHub,
    fleet_normalization,
    report,
    seed_store,
)
from zk0.hub.dashboard.attention import attention
from zk0.hub.dashboard.snapshot import FleetSources, RunInfo, Snapshot, SnapshotSource
from zk0.hub.dashboard.token import create_token
from zk0.hub.dashboard.web import DashboardError, DashboardServer
from zk0.hub.fleet import AgentRecord
from zk0.hub.history import EvalHistory
from zk0.shared.dashboard_config import DashboardConfig
from zk0.shared.flower_keys import make_tls
from zk0.shared.processes import free_port
from zk0.shared.store import AdapterStore

# -- Attention: pure rules ------------------------------------------------------------------------


def _run(missing: str) -> RunInfo:
    history = EvalHistory("fedavg")
    for number in range(4):
        history.add_round(
            number,
            {"arm-a": 0.2},
            {"arm-a": 100},
            dropped={missing: "update out of bounds"} if number == 1 else {},
            skipped={missing: "busy for 60 s"} if number == 3 else {},
        )
    return RunInfo(index=1, started_at="", trigger="manual", history=history)


def test_attention_names_each_arm_that_needs_a_person_and_why(tmp_path: Path) -> None:
    now = 10_000.0

    def agent(agent_id: str, silent_s: float = 0.5, applied: int = 2, drift: bool = False) -> Any:
        return AgentRecord(
            agent_id=agent_id, key_id="k", last_seen=now - silent_s, applied=applied,
            in_use=applied, report=report(0, drift=drift),
        )  # fmt: skip

    snapshot = Snapshot(
        taken_at=now,
        heartbeat_s=1.0,
        agents=[
            agent("arm-a"),
            agent("arm-b", silent_s=90),
            agent("arm-c", applied=1),
            agent("arm-d", drift=True),
            agent("arm-e"),
        ],
        bytes_by_agent={},
        current=2,
        current_since=now - 400,
        normalization=fleet_normalization(),
        runs=[_run("arm-e")],
    )
    found = {
        (item.kind, item.subject): item.detail for item in attention(snapshot, DashboardConfig())
    }
    assert set(found) == {
        ("offline", "arm-b"),
        ("behind", "arm-c"),
        ("missed_rounds", "arm-e"),
        ("drift", "arm-d"),
    }
    assert "silent for 90 s" in found["offline", "arm-b"]
    assert "applied v1 while v2" in found["behind", "arm-c"]
    assert "2 of the last 3 rounds" in found["missed_rounds", "arm-e"]
    assert "busy for 60 s" in found["missed_rounds", "arm-e"]
    assert found["drift", "arm-d"].startswith("state shoulder_lift mean")
    # The thresholds are the operator's: a looser hub.yaml lets these go.
    loose = DashboardConfig(offline_s=120, behind_s=600, missed_rounds=3, drift_sigma=20)
    assert attention(snapshot, loose) == []


# -- Beyond loopback: HTTPS and the token --------------------------------------------------------


@pytest.fixture
def tls_dashboard(tmp_path: Path, tiny_adapters: list[Path]) -> Iterator[tuple[Any, str, Path]]:
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    token_path = tmp_path / "keys" / "dashboard.token"
    token, made = create_token(token_path)
    assert made and token_path.stat().st_mode & 0o077 == 0
    store = AdapterStore(tmp_path / "store")
    seed_store(store, tiny_adapters[0])
    sources = FleetSources(
        store=store,
        agents=lambda: [],
        bytes_by_agent=lambda: {"arm-9": 1234},
        runs_root=tmp_path / "runs",
        heartbeat_s=1.0,
    )
    config = DashboardConfig(bind_host="0.0.0.0", port=free_port())
    with pytest.raises(DashboardError, match="needs a tls: section"):
        DashboardServer(config, SnapshotSource(sources), token_path, tls=None)
    server = DashboardServer(config, SnapshotSource(sources), token_path, tls).start()
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    client = httpx.Client(base_url=f"https://127.0.0.1:{server.port}", verify=context)
    try:
        yield client, token, token_path
    finally:
        client.close()
        server.stop()


def test_beyond_loopback_every_page_and_metrics_need_the_token(
    tls_dashboard: tuple[Any, str, Path],
) -> None:
    client, token, token_path = tls_dashboard
    for path in ("/", "/versions", "/runs", "/attention", "/metrics", "/?part=main"):
        refused = client.get(path)
        assert refused.status_code == 401, path
        assert "v2" not in refused.text  # nothing of the fleet leaks
    assert "token" in client.get("/").text  # a person gets the login form
    wrong = {"Authorization": "Bearer " + "x" * 43}
    assert client.get("/metrics", headers=wrong).status_code == 401
    assert (
        client.get("/", headers={"Authorization": "Bearer \u00e9t\u00e9".encode()}).status_code
        == 401
    )

    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert scraped.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
    }
    assert samples["zk0_versions", ()] == 4
    assert samples["zk0_current_version", ()] == 2
    assert samples["zk0_agents_online", ()] == 0
    assert samples["zk0_bytes_served_total", ()] == 1234
    assert samples["zk0_gate_decisions_total", (("decision", "rejected"),)] == 1
    assert samples["zk0_gate_decisions_total", (("decision", "promoted"),)] == 1
    assert samples["zk0_attention_items", (("kind", "rejected_version"),)] == 1
    assert ("zk0_round_duration_seconds_count", ()) in samples
    assert ("zk0_aggregation_seconds_count", ()) in samples
    assert ("zk0_dropped_replies_total", (("why", "skipped"),)) in samples

    # A person signs in once; the cookie holds no token, and a rotation ends the session.
    assert client.post("/login", data={"token": "nope", "next": "/"}).status_code == 401
    elsewhere = client.post("/login", data={"token": token, "next": "//evil.example/"})
    assert elsewhere.headers["location"] == "/"  # never sent to another site
    assert client.post("/login", content=b"token=" + b"x" * 10_000).status_code == 413
    assert "default-src 'self'" in refused.headers["content-security-policy"]
    client.cookies.clear()
    signed = client.post("/login", data={"token": token, "next": "/versions"})
    assert signed.status_code == 303 and signed.headers["location"] == "/versions"
    assert token not in signed.headers["set-cookie"]
    page = client.get("/versions")
    assert page.status_code == 200 and "rejected" in page.text and "v3" in page.text
    time.sleep(0.01)
    create_token(token_path, replace=True)
    assert client.get("/versions").status_code == 401


# -- The real daemon, in Chromium --------------------------------------------------------------


def _rows(version: str) -> str:
    """JS: how many Fleet rows show ``version`` applied."""
    return (
        "[...document.querySelectorAll('#fleet tr[data-agent]')]"
        f".filter(r => r.querySelectorAll('td.version')[0].textContent.trim() === '{version}')"
        ".length"
    )


def test_the_hub_daemon_serves_the_fleet_to_a_browser(
    short_dir: Path, tiny_adapters: list[Path], chromium_path: str
) -> None:
    names = ["arm-0", "arm-1", "arm-2", "arm-3"]
    dashboard = DashboardConfig(port=free_port(), offline_s=3)
    shots = Path(os.environ.get("ZK0_DASHBOARD_SCREENSHOTS", short_dir / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with DashboardHub(short_dir, tiny_adapters[0], names, dashboard=dashboard) as hub:
        assert "dashboard token" in hub.keys_init
        token = hub.cli("dashboard", "token")
        assert token.returncode == 0 and len(token.stdout.strip()) >= 32, token.stderr
        assert f"dashboard  {hub.url}" in hub.cli("status").stdout
        for index, name in enumerate(names[:3]):
            hub.fleet.start(name, report(index, drift=name == "arm-1"))
        current = f"v{hub.roles['current']}"

        with Chromium(executable=chromium_path) as browser:
            browser.open(hub.url)
            browser.wait_for(f"{_rows(current)} === 3", 60)
            text = browser.text()
            assert "3 of 3 agents online" in text and "fleet version " + current in text
            row = browser.evaluate("document.querySelector('tr[data-agent=\"arm-0\"]').innerText")
            assert "online" in row and current in row and "20" in row  # its 20 episodes
            browser.screenshot(shots / "fleet.png")

            # An event (a fourth arm comes online) shows without a reload.
            browser.evaluate("window.notReloaded = true")
            started = time.monotonic()
            hub.fleet.start("arm-3", report(3))
            browser.wait_for("document.querySelector('tr[data-agent=\"arm-3\"]') !== null", 10)
            assert time.monotonic() - started < 5.0
            assert browser.evaluate("window.notReloaded === true")

            browser.open(hub.url + "versions")
            rejected = browser.evaluate(
                f"document.querySelector('tr[data-version=\"v{hub.roles['rejected']}\"]').innerText"
            )
            assert "rejected" in rejected and "candidate MSE 0.455" in rejected
            live = browser.evaluate(
                f"document.querySelector('tr[data-version=\"{current}\"]').innerText"
            )
            assert "fleet" in live and "promoted" in live and "arm-0" in live
            browser.screenshot(shots / "versions.png")

            browser.open(hub.url + "runs")
            points = browser.evaluate("document.querySelectorAll('svg.chart circle.point').length")
            assert points >= 2 * (3 * 3 + 1)  # MSE and success: 3 agents + the fleet, by round
            text = browser.text()
            assert f"arm-2: {DROPPED_REASON}" in text and f"arm-2: {SKIPPED_REASON}" in text
            browser.screenshot(shots / "runs.png")

            browser.open(hub.url + "attention")
            items = browser.evaluate(
                "[...document.querySelectorAll('#attention tr[data-kind]')]"
                ".map(r => r.dataset.kind + ' ' + r.dataset.subject + ': ' + r.innerText)"
            )
            kinds = {item.split(":")[0] for item in items}
            assert kinds == {
                "drift arm-1",
                "missed_rounds arm-2",
                f"rejected_version v{hub.roles['rejected']}",
            }, items
            drift = next(item for item in items if item.startswith("drift"))
            assert "shoulder_lift" in drift and "8.0 sd" in drift
            browser.screenshot(shots / "attention.png")

            # An agent that goes silent turns up there by itself (offline_s: 3 here).
            hub.fleet.stop("arm-0")
            browser.wait_for("document.querySelector('tr[data-subject=\"arm-0\"]') !== null", 30)

        metrics = httpx.get(hub.url + "metrics", timeout=10).text
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        assert families["zk0_agents_online"].samples[0].value == 3
        assert families["zk0_bytes_served"].samples[0].value > 0
    assert hub.returncode == 0, hub.log_tail()
