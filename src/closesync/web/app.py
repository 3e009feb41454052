"""`closesync web`: the small web process through which users connect their own accounts.

GET /connect starts a personal flow (Close, then Calendly), GET /connect/organization lets a
Calendly owner or admin connect the shared organization credential, the two callbacks
(/oauth/close/callback, /oauth/calendly/callback) finish the steps through
`closesync.connect.connector`, and GET /healthz answers whether Redis does. Redirect URIs are built
from PUBLIC_BASE_URL, which must be where this process is reached.

/connect and /connect/organization set a fresh random cookie (`closesync_flow`: HttpOnly,
SameSite=Lax so the providers' top-level redirects back carry it, Secure when PUBLIC_BASE_URL is
https) whose digest the pending flow keeps; a callback arriving without that cookie (a flow
started by someone else and handed over: login CSRF) is refused and nothing is stored.

stdlib `http.server` is enough for a handful of redirects per user; `WebApp.handle` is plain
request -> response so tests can drive it over loopback. Pages never echo a query parameter
(a code or `state` could end up in a screenshot; an `error` is named only when it is one of
RFC 6749's codes); access logs show the path only. Only GET is served, HEAD on /healthz alone
(a HEAD must not consume a flow), and an idle connection is dropped after
`REQUEST_TIMEOUT_SECONDS` so slow clients cannot pin the server's threads.
"""

from __future__ import annotations

import html
import logging
import threading
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from closesync.connect.connector import Connector
from closesync.connect.oauth_flow import STATE_TTL_SECONDS, Purpose, new_binding
from closesync.connect.steps import FlowError, Step
from closesync.core.errors import CloseSyncError, ConfigError
from closesync.wiring.services import Services

log = logging.getLogger(__name__)

# The cookie binding a flow to the browser that started it.
FLOW_COOKIE = "closesync_flow"
# Seconds a connection may sit idle (reading a request, writing an answer) before it is dropped.
REQUEST_TIMEOUT_SECONDS = 30.0

_STATUS_OF = {
    "denied": 403,
    "state": 400,
    "browser": 403,
    "code": 400,
    "provider": 502,
    "not_admin": 403,
    "not_allowed": 403,
    "taken": 409,
}
_TITLES = {
    "denied": "Access declined",
    "state": "This link is no longer valid",
    "browser": "This link was started in another browser",
    "code": "The authorization expired",
    "provider": "The provider did not answer as expected",
    "not_admin": "An owner or admin is needed",
    "not_allowed": "This organization cannot be connected here",
    "taken": "This Calendly user is already connected",
}


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def page(status: int, title: str, message: str, link: tuple[str, str] | None = None) -> Response:
    """A small self-contained HTML page."""
    extra = f'<p><a href="{html.escape(link[0])}">{html.escape(link[1])}</a></p>' if link else ""
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)} - closesync</title></head>"
        "<body style='font-family:sans-serif;max-width:40em;margin:3em auto'>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>{extra}</body></html>"
    )
    return Response(
        status,
        body.encode(),
        {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"},
    )


def redirect(url: str) -> Response:
    return Response(302, b"", {"Location": url, "Cache-Control": "no-store"})


class WebApp:
    """Routes of the web process; holds no per-user state of its own (it is all in Redis)."""

    def __init__(self, services: Services, base_url: str | None = None) -> None:
        self.services = services
        base = base_url or services.settings.public_base_url
        self.connector = Connector(services, base)
        self.secure_cookie = urlsplit(base).scheme == "https"

    def handle(self, method: str, target: str, cookie_header: str | None = None) -> Response:
        """Answer one request; `cookie_header` is the request's Cookie header, if any."""
        split = urlsplit(target)
        path = split.path.rstrip("/") or "/"
        params = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        if method != "GET" and not (method == "HEAD" and path == "/healthz"):
            answer = page(405, "Method not allowed", "Only GET is served here.")
            answer.headers["Allow"] = "GET"
            return answer
        try:
            return self._route(path, params, _flow_cookie(cookie_header))
        except FlowError as error:
            again = "/connect/organization" if "organization" in path else "/connect"
            return page(
                _STATUS_OF[error.kind], _TITLES[error.kind], str(error), (again, "Start again")
            )
        except ConfigError as error:
            return page(503, "closesync is not configured", str(error))
        except CloseSyncError as error:
            log.warning("web request failed: %s", error)
            return page(503, "Temporarily unavailable", "Please try again in a moment.")

    def _route(self, path: str, params: dict[str, str], binding: str | None) -> Response:
        if path == "/healthz":
            self.services.redis.ping()
            return Response(200, b"ok\n", {"Content-Type": "text/plain"})
        if path in ("/", "/connect", "/connect/organization"):
            fresh = new_binding()
            purpose: Purpose = "organization" if path == "/connect/organization" else "personal"
            answer = redirect(self.connector.start(purpose, fresh))
            answer.headers["Set-Cookie"] = self._cookie(fresh, 2 * STATE_TTL_SECONDS)
            return answer
        if path == "/oauth/close/callback":
            return self._step(self.connector.callback("close", params, binding))
        if path == "/oauth/calendly/callback":
            return self._step(self.connector.callback("calendly", params, binding))
        return page(404, "Not found", "There is nothing here; start at /connect.")

    def _cookie(self, value: str, max_age: int) -> str:
        secure = "; Secure" if self.secure_cookie else ""
        return f"{FLOW_COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"

    def _step(self, step: Step) -> Response:
        if step.next_url is not None:
            return redirect(step.next_url)
        titles = {
            "connected": "Connected",
            "waiting": "Almost there",
            "organization": "Organization connected",
        }
        answer = page(200, titles[step.outcome], step.message)
        answer.headers["Set-Cookie"] = self._cookie("", 0)  # the flow is over
        return answer


def _flow_cookie(header: str | None) -> str | None:
    """The flow cookie's value in a Cookie header; None when absent or unparseable."""
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(FLOW_COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


class _Handler(BaseHTTPRequestHandler):
    server: WebServer

    def setup(self) -> None:
        # StreamRequestHandler applies `timeout` to the socket: reads and writes alike.
        self.timeout = self.server.request_timeout  # type: ignore[misc]
        super().setup()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        try:
            response = self.server.app.handle(method, self.path, self.headers.get("Cookie"))
        except Exception:  # a bug must not show a traceback (it may hold a code) to the user
            log.exception("web request crashed")
            response = page(500, "Something went wrong", "Please start again at /connect.")
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        # The request line carries the code and state: log the path alone.
        log.info("web %s %s", self.command, urlsplit(self.path).path)


class WebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        services: Services,
        base_url: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    ):
        """Bind `address`; callbacks go to `base_url` (default: the address bound)."""
        self.request_timeout = request_timeout
        super().__init__(address, _Handler)
        self.app = WebApp(services, base_url or self.url)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = host.decode() if isinstance(host, bytes) else host
        return f"http://{shown}:{port}"

    def start_background(self) -> threading.Thread:
        """Serve on a daemon thread (tests, `closesync connect`)."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread
