"""A small headless-Chromium client over the Chrome DevTools Protocol (CDP), for the dashboard
tests and bench: open a page and time it, evaluate JavaScript, wait for live updates, screenshot.

One page, one websocket (``websockets.sync``), no threads: every command carries an id and
:meth:`Chromium._send` reads until its reply, buffering the events that arrive meanwhile for
:meth:`Chromium._wait_event`. The browser runs offline-quiet (no first-run, sync, component
updates, proxy) in a temporary profile that is removed, with its process group, on exit.

    with Chromium(headers={"Authorization": "Bearer ..."}) as browser:
        ms = browser.open("http://127.0.0.1:8080/")  # request -> DOMContentLoaded
        assert browser.status == 200
        browser.wait_for("document.querySelector('#round').textContent === '3'", timeout_s=10)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from websockets.sync.client import ClientConnection, connect

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-breakpad", "--no-proxy-server", "--mute-audio",
    "--password-store=basic", "--use-mock-keychain", "--hide-scrollbars",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
)  # fmt: skip
_NAV_TIMING = (
    "(() => { const n = performance.getEntriesByType('navigation')[0];"
    " return n ? n.domContentLoadedEventStart - n.startTime : null; })()"
)


def find_chromium() -> str | None:
    """The first Chromium/Chrome executable on PATH, or None."""
    return next((path for name in NAMES if (path := shutil.which(name))), None)


class CDPError(RuntimeError):
    """A CDP command failed, a navigation failed, or a page's JavaScript threw."""


class Chromium:
    """A headless Chromium with one page, as a context manager.

    ``status`` is the HTTP status of the main document of the last :meth:`open` (None if it had
    no HTTP response); ``wall_ms`` that open's wall clock, from sending the navigation to the
    DOMContentLoaded event reaching us (so it includes the CDP round trips).
    """

    def __init__(
        self,
        width: int = 1280,
        height: int = 900,
        *,
        executable: str | None = None,
        ignore_certificate_errors: bool = False,
        headers: dict[str, str] | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.executable = executable or find_chromium()
        self.size, self.insecure, self.headers = (width, height), ignore_certificate_errors, headers
        self.start_timeout_s = start_timeout_s
        self.status: int | None = None
        self.wall_ms = 0.0
        self._events: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._next_id = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._profile = ""

    def __enter__(self) -> Self:
        if self.executable is None:
            raise CDPError("chromium not installed: apt-get install chromium")
        self._profile = tempfile.mkdtemp(prefix="zk0-chromium-")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self) -> None:
        assert self.executable is not None
        profile, (width, height) = Path(self._profile), self.size
        flags = [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        flags += ["--ignore-certificate-errors"] if self.insecure else []
        with (profile / "chromium.log").open("wb") as log:  # the child keeps its own handle
            self._proc = subprocess.Popen(
                [self.executable, *flags, "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        while len(lines := _read_lines(profile / "DevToolsActivePort")) < 2:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = (profile / "chromium.log").read_text(errors="replace").strip()[-500:]
                raise CDPError(f"chromium did not start (exit {self._proc.poll()}): {tail}")
            time.sleep(0.02)
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(f"http://127.0.0.1:{lines[0]}/json/list", timeout=10) as reply:
            targets = json.load(reply)
        page = next(t for t in targets if t.get("type") == "page")
        # Full-page screenshots come back as one base64 message: no 1 MiB frame limit.
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, proxy=None)
        for domain in ("Page", "Runtime", "Network"):
            self._send(f"{domain}.enable")
        self._send("Page.setLifecycleEventsEnabled", {"enabled": True})  # they name the loader
        # Headless windows lose ~140 px to invisible browser UI: make the viewport W x H itself.
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self._send("Emulation.setDeviceMetricsOverride", metrics)
        if self.headers:
            self._send("Network.setExtraHTTPHeaders", {"headers": self.headers})

    def close(self) -> None:
        """Close the browser, kill its process group, remove the profile (idempotent)."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._send("Browser.close", timeout_s=5)
            self._ws.close()
            self._ws = None
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):  # renderers, zygotes left behind
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=5)
            self._proc = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = ""

    def _send(
        self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Send one command and return its result; events read meanwhile are buffered."""
        assert self._ws is not None, "Chromium is not started (use it as a context manager)"
        self._next_id += 1
        self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._recv(deadline, method)
            if "method" in message:
                self._events.append(message)
            elif message.get("id") == self._next_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error'].get('message')}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def _recv(self, deadline: float, what: str) -> dict[str, Any]:
        assert self._ws is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no reply to {what} in time")
        try:
            message: dict[str, Any] = json.loads(self._ws.recv(timeout=left))
        except TimeoutError:
            raise TimeoutError(f"no reply to {what} in time") from None
        return message

    def _wait_event(self, match: Callable[[dict[str, Any]], bool], deadline: float) -> None:
        """Wait for (and consume) the first event, buffered or new, that ``match``es."""
        for event in list(self._events):
            if match(event):
                self._events.remove(event)
                return
        while not match(event := self._recv(deadline, "the event")):
            if "method" in event:
                self._events.append(event)

    def set_headers(self, headers: dict[str, str]) -> None:
        """Extra HTTP headers for every later request (e.g. ``Authorization: Bearer ...``)."""
        self.headers = headers
        self._send("Network.setExtraHTTPHeaders", {"headers": headers})

    def open(self, url: str, timeout_s: float = 30) -> float:
        """Navigate to ``url`` and wait for DOMContentLoaded; return the page's own measure of
        milliseconds from the navigation's start (request) to ``domContentLoadedEventStart``,
        from the Navigation Timing entry (``wall_ms`` if the page has none, e.g. an error page).
        Sets ``status``; raises :class:`CDPError` if the navigation fails (HTTP errors with a
        body load as pages: check ``status``), TimeoutError after ``timeout_s``."""
        deadline, start = time.monotonic() + timeout_s, time.perf_counter()
        self._events.clear()
        try:
            nav = self._send("Page.navigate", {"url": url}, timeout_s)
            self.status = self._status(nav.get("loaderId"))
            error = nav.get("errorText")
            if error and not (error == "net::ERR_HTTP_RESPONSE_CODE_FAILURE" and self.status):
                raise CDPError(f"cannot open {url}: {error}")
            # Page.domContentEventFired cannot tell this load from an earlier one still arriving.
            self._wait_event(lambda e: _is_dcl(e, nav.get("loaderId")), deadline)
        except TimeoutError:
            raise TimeoutError(f"{url}: no DOMContentLoaded within {timeout_s:g}s") from None
        self.wall_ms = (time.perf_counter() - start) * 1000
        self.status = self.status or self._status(nav.get("loaderId"))
        page_ms = self.evaluate(_NAV_TIMING)
        return float(page_ms) if page_ms else self.wall_ms

    def _status(self, loader: str | None) -> int | None:
        """The HTTP status of the first document response (so not of a Chrome error page)."""
        for event in self._events:  # (the favicon's responses share the loader: type "Other")
            params = event["params"]
            if event["method"] == "Network.responseReceived" and (
                params.get("type") == "Document" and params["loaderId"] == loader
            ):
                return int(params["response"]["status"])
        return None

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited, result JSON-serialised)."""
        reply = self._send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if details := reply.get("exceptionDetails"):
            thrown = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"{expression!r} threw: {str(thrown).splitlines()[0]}")
        return reply["result"].get("value")

    def text(self) -> str:
        """The page's visible text (``document.body.innerText``)."""
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def wait_for(self, expression: str, timeout_s: float = 10.0) -> float:
        """Poll ``expression`` every 50 ms until truthy; return the seconds it took. A throw
        counts as not yet (an element not there yet); TimeoutError names the expression."""
        start, last = time.monotonic(), ""
        while True:
            try:
                if self.evaluate(f"!!({expression})"):
                    return time.monotonic() - start
            except CDPError as error:
                last = f" (last error: {error})"
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{expression!r} not true within {timeout_s:g}s{last}")
            time.sleep(0.05)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """Save a PNG of the viewport, or of the whole page (its full scroll size)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self._send("Page.getLayoutMetrics")["cssContentSize"]
            width, height = max(1, int(size["width"])), max(1, int(size["height"]))
            clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
            params |= {"captureBeyondViewport": True, "clip": clip}
        path.write_bytes(base64.b64decode(self._send("Page.captureScreenshot", params)["data"]))
        return path


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def _is_dcl(event: dict[str, Any], loader: str | None) -> bool:
    params = event.get("params", {})
    return (
        event.get("method") == "Page.lifecycleEvent"
        and params.get("name") == "DOMContentLoaded"
        and params.get("loaderId") == loader
    )
