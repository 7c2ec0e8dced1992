"""The dashboard's HTTP side: four server-rendered pages, ``/metrics``, and the token gate.

::

    browser ── GET /, /versions, /runs, /attention ──▶ TokenGate ──▶ page ──▶ SnapshotSource
       ▲  every 2 s: GET <page>?part=main (dashboard.js)     │           │     (≤ 1 s old)
       └──────────── HTML (Jinja2, inline SVG charts) ◀───────┴── pages.py / attention.py
    Prometheus ── GET /metrics ──▶ TokenGate ──▶ metrics.FleetCollector ──▶ SnapshotSource

Read-only: no route changes anything in the fleet. On a loopback bind every request is let in;
on any other the server speaks HTTPS (the hub's TLS certificate) and each request must carry
the dashboard token, as ``Authorization: Bearer <token>`` (scripts, Prometheus) or as the
session cookie the login form sets (people). The cookie holds an HMAC of the token, never the
token, so rotating the token ends every session.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from jinja2 import Environment, PackageLoader, select_autoescape
from loguru import logger
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from zk0.hub.dashboard import metrics
from zk0.hub.dashboard import pages as views
from zk0.hub.dashboard.attention import attention
from zk0.hub.dashboard.snapshot import SnapshotSource
from zk0.hub.dashboard.token import TokenError, TokenFile, session_value
from zk0.hub.superlink import dial_host
from zk0.shared.dashboard_config import DashboardConfig
from zk0.shared.flower_keys import TlsFiles

#: path -> (template, title)
PAGES = {
    "/": ("fleet", "Fleet"),
    "/versions": ("versions", "Versions"),
    "/runs": ("runs", "Runs"),
    "/attention": ("attention", "Attention"),
}
SESSION_COOKIE = "zk0_dashboard"
#: On every response: nothing is loaded from anywhere but this dashboard, nor framed.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
#: The login form is one token and one path.
MAX_FORM_BYTES = 4096
STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
START_TIMEOUT_S = 10.0


class DashboardError(ValueError):
    """The dashboard cannot start (its reason names the setting or file)."""


class TokenGate(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: TokenFile | None) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await self._gate(request, call_next)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _gate(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        if self.token is None or path == "/login" or path.startswith("/static/"):
            return await call_next(request)
        try:
            token = self.token.current()
        except (OSError, TokenError) as error:  # closed, not open, while the file is broken
            logger.error("dashboard: {}", error)
            return Response("the dashboard token is unreadable\n", 503, media_type="text/plain")
        bearer = request.headers.get("authorization", "")
        if bearer.startswith("Bearer ") and _same(bearer[7:].strip(), token):
            return await call_next(request)
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if _same(cookie, session_value(token)):
            return await call_next(request)
        if path == "/metrics" or request.query_params.get("part"):
            return Response("the dashboard token is required\n", 401, media_type="text/plain")
        return _login_form(request, path, status=401)


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison; any text a client sends is compared, none raises."""
    return hmac.compare_digest(given.encode(errors="replace"), expected.encode())


def _login_form(request: Request, next_path: str, status: int, wrong: bool = False) -> Response:
    app: Dashboard = request.app.state.dashboard
    html = app.env.get_template("login.html").render(next_path=next_path, wrong=wrong)
    return HTMLResponse(html, status)


class Dashboard:
    """The pages, bound to one snapshot source; ``app`` is the ASGI application."""

    def __init__(
        self, source: SnapshotSource, config: DashboardConfig, token: TokenFile | None
    ) -> None:
        self.source, self.config = source, config
        self.env = Environment(
            loader=PackageLoader("zk0.hub.dashboard", "templates"),
            autoescape=select_autoescape(default=True),
        )
        self.registry = metrics.registry_for(source, config)
        routes = [Route(path, self.page) for path in PAGES]
        routes += [
            Route("/metrics", self.metrics),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/static/{name}", self.static),
        ]
        self.app = Starlette(routes=routes, middleware=[Middleware(TokenGate, token=token)])
        self.app.state.dashboard = self
        self.token = token

    def context(self, template: str) -> dict[str, Any]:
        snapshot = self.source.get()
        items = attention(snapshot, self.config)
        context: dict[str, Any] = {
            "updated": time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at)),
            "totals": views.fleet_totals(snapshot),
            "attention_count": len(items),
        }
        if template == "fleet":
            context["rows"] = views.fleet_rows(snapshot)
        elif template == "versions":
            context["rows"] = views.version_rows(snapshot)
        elif template == "runs":
            context["runs"] = views.run_views(snapshot)
        else:
            context["items"] = [asdict(item) for item in items]
            context["config"] = self.config
        return context

    def page(self, request: Request) -> Response:
        template, title = PAGES[request.url.path]
        context = self.context(template)
        if request.query_params.get("part") == "main":
            return HTMLResponse(self.env.get_template(f"{template}.html").render(context))
        html = self.env.get_template("base.html").render(
            context, page=template, title=title, pages=PAGES
        )
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    def metrics(self, request: Request) -> Response:
        return Response(metrics.exposition(self.registry), media_type=metrics.CONTENT_TYPE)

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return _login_form(request, request.query_params.get("next", "/"), 200)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return Response("form too large\n", 413, media_type="text/plain")
        form = parse_qs(body.decode(errors="replace"))
        next_path = form.get("next", ["/"])[0]
        if next_path not in PAGES:
            next_path = "/"  # only this dashboard's own pages, never another site
        if self.token is None:
            return RedirectResponse(next_path, 303)
        token = self.token.current()
        if not _same(form.get("token", [""])[0].strip(), token):
            logger.warning("dashboard: wrong token from {}", request.client)
            return _login_form(request, next_path, status=401, wrong=True)
        response = RedirectResponse(next_path, 303)
        response.set_cookie(
            SESSION_COOKIE, session_value(token), httponly=True, secure=True, samesite="strict"
        )
        return response

    def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found\n", 404, media_type="text/plain")
        body = files("zk0.hub.dashboard").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name])


class DashboardServer:
    """The dashboard served from a thread of the hub daemon (uvicorn on a socket bound at
    ``start``, so that a taken port fails the hub's start with one line)."""

    def __init__(
        self,
        config: DashboardConfig,
        source: SnapshotSource,
        token_path: Path | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.config = config
        self.token = None if config.loopback else _token(config, token_path)
        if not config.loopback and tls is None:
            raise DashboardError(
                f"dashboard.bind_host {config.bind_host}: a non-loopback dashboard serves HTTPS "
                "with the hub's certificate: hub.yaml needs a tls: section"
            )
        self.tls = None if config.loopback else tls
        self.dashboard = Dashboard(source, config, self.token)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        host = dial_host(self.config.bind_host)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> DashboardServer:
        host = self.config.bind_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, self.config.port), family=family)
        except OSError as error:
            raise DashboardError(
                f"dashboard: cannot listen on {host}:{self.config.port}: {error.strerror}"
            ) from error
        self.port = sock.getsockname()[1]
        tls = self.tls
        settings = uvicorn.Config(
            self.dashboard.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            ssl_certfile=str(tls.server_cert) if tls else None,
            ssl_keyfile=str(tls.server_key) if tls else None,
        )
        self._server = uvicorn.Server(settings)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="zk0-dashboard", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise DashboardError(f"dashboard: {self.url} did not start (see the hub's log)")
            time.sleep(0.02)
        logger.info("dashboard at {}", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5.0)


def _token(config: DashboardConfig, token_path: Path | None) -> TokenFile:
    if token_path is None or not token_path.is_file():
        raise DashboardError(
            f"dashboard.bind_host {config.bind_host}: a non-loopback dashboard needs its token "
            f"file {token_path} (zk0-hub keys init makes it)"
        )
    return TokenFile(token_path)
