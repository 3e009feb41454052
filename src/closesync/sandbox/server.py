"""HTTP plumbing and the `Sandbox` object: two stdlib servers sharing one World.

Each port runs a ThreadingHTTPServer (daemon threads, HTTP/1.1 keep-alive) whose handler
turns the socket request into a routing.Request and hands it to an ApiApp: `/_sandbox/`
paths go to the admin router; every other path is counted, delayed by the configured
latency, offered to the fault book, and only then routed to the vendor emulator.
Transport faults are carried out here: `hang` holds the request until the sandbox stops
(or `hang_seconds` pass) and then drops the connection; `reset` closes the socket with
SO_LINGER 0 so the client sees ECONNRESET. stop() releases hung requests and closes kept
-alive connections, so no test waits on a thread it cannot see.

Bad HTTP is answered, never left hanging or turned into a traceback, always in the vendor's
error shape (see `error_response`) and with the connection closed when its framing cannot be
trusted: a Content-Length that is not one non-negative integer is a 400, one above
MAX_BODY_BYTES a 413; a chunked body is read (malformed chunks are a 400); a body that does not
arrive within `body_read_timeout` seconds is a 408. HEAD and OPTIONS are routed like any method;
no emulated endpoint serves them, so they get a 405 with Allow. What http.server refuses itself
(a bad request line, an unknown method) gets its status in the vendor's shape, not HTML.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import struct
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from closesync.sandbox.admin_api import build_admin_router, handle_admin
from closesync.sandbox.calendly_api import build_calendly_router
from closesync.sandbox.close_api import build_close_router
from closesync.sandbox.config import SandboxConfig
from closesync.sandbox.faults import omit_listed
from closesync.sandbox.paging import page_number
from closesync.sandbox.records import SeededUser
from closesync.sandbox.routing import Request, Response, Router, json_response
from closesync.sandbox.seed import seed_world
from closesync.sandbox.world import World

# Bytes a request body may have; a larger one is refused (413) before it is read. Nothing
# closesync sends comes near it, and reading a claimed terabyte would exhaust memory.
MAX_BODY_BYTES = 10 * 1024 * 1024
# Digits of a length beyond which it is above MAX_BODY_BYTES anyway (and int() stays cheap).
_MAX_DIGITS = 15
# Bytes of a chunk-size or trailer line in a chunked body.
_MAX_LINE = 4096
_DECIMAL = re.compile(r"[0-9]+")
_HEX = re.compile(rb"[0-9A-Fa-f]+")


class BadBody(Exception):
    """A request body that cannot be read as framed; `status` is what it is answered."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(api: str, status: int, message: str) -> Response:
    """An error in the vendor's shape: Calendly {title, message}; Close {"error"}, or for a 400
    Close's {"errors", "field-errors"}."""
    if api == "calendly":
        title = "Invalid Argument" if status == 400 else _phrase(status)
        return json_response(status, {"title": title, "message": message})
    if status == 400:
        return json_response(400, {"errors": [message], "field-errors": {}})
    return json_response(status, {"error": message})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def body_framing(transfer_codings: list[str], lengths: list[str]) -> int | Literal["chunked"]:
    """How the request body is framed: its length, or "chunked"; BadBody when neither holds.

    Per RFC 9112 a Transfer-Encoding overrides any Content-Length; repeated or comma-joined
    Content-Length values must all agree.
    """
    codings = [c.strip().lower() for value in transfer_codings for c in value.split(",")]
    codings = [c for c in codings if c]
    if codings:
        if codings[-1] != "chunked":
            raise BadBody(400, "Transfer-Encoding must end in chunked")
        if codings != ["chunked"]:
            raise BadBody(501, f"Transfer-Encoding {', '.join(codings)} is not supported")
        return "chunked"
    values = {part.strip() for value in lengths for part in value.split(",")}
    if not values:
        return 0
    if len(values) > 1 or not all(_DECIMAL.fullmatch(v) for v in values):
        shown = ", ".join(sorted(values))
        raise BadBody(400, f"Content-Length must be one non-negative integer, not {shown!r}")
    (value,) = values
    if len(value) > _MAX_DIGITS or int(value) > MAX_BODY_BYTES:
        raise BadBody(413, f"the request body may have at most {MAX_BODY_BYTES} bytes")
    return int(value)


class PortInUseError(OSError):
    """The port a sandbox server should listen on is taken."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"port {port} on {host} is already in use")
        self.host = host
        self.port = port


class ApiApp:
    """One port's request pipeline: admin, or count -> latency -> fault -> emulator."""

    def __init__(self, api: str, world: World, router: Router, admin: Router) -> None:
        self.api = api
        self.world = world
        self.router = router
        self.admin = admin

    def handle(self, request: Request) -> Response:
        """Answer one request."""
        if request.path.startswith("/_sandbox/"):
            return handle_admin(self.admin, request)
        world = self.world
        match = self.router.match(request.method, request.path)
        template = match.template if match else request.path
        world.count(f"{self.api} {request.method} {template}")
        delay = world.latency_ms[self.api]
        if delay > 0:
            world.stop_event.wait(delay / 1000)
        browser = template.rstrip("/").endswith("/authorize")
        page = page_number(self.api, request.query)
        fault = world.draw_fault(self.api, request.method, request.path, page, not browser)
        if fault is not None and fault.action != "omit":
            return fault
        if match is None:
            return _not_found(self.api)
        if match.handler is None:
            response = error_response(self.api, 405, f"Method {request.method} not allowed")
            response.headers["Allow"] = ", ".join(match.allowed)
            return response
        request.params = match.params
        request.template = template
        response = match.handler(request)
        if response.status == 429:
            # A limit the emulator enforced, as opposed to an injected fault (returned above).
            world.count_rate_limited(f"{self.api} {request.method} {template}")
        return response if fault is None else omit_listed(response, fault.omit)


def _not_found(api: str) -> Response:
    return error_response(api, 404, "The requested resource was not found.")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # Listen backlog. socketserver's default of 5 overflows when more clients than that connect
    # at once (16 threads starting together); Linux then drops the handshake's last ACK and each
    # such client stalls ~1 s for a SYN-ACK retransmit. The kernel caps it at somaxconn.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: ApiApp | None = None) -> None:
        super().__init__(address, _Handler)
        self.app = app
        self.world: World | None = None
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, the body waits for the client's
    # delayed ACK (40 ms on Linux) on every keep-alive request. Real APIs do not add that.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.server.sockets_lock:
            self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        with self.server.sockets_lock:
            self.server.open_sockets.discard(self.connection)
        # The client or a reset fault may already have closed the socket.
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._serve()

    # HEAD and OPTIONS are routed too, so they get the vendor's 405 rather than a 501 page.
    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, unknown method, oversized headers) in
        the vendor's JSON shape instead of its HTML page; the connection is then closed."""
        app = self.server.app
        api = app.api if app is not None else "close"
        self._send(error_response(api, code, message or _phrase(code)), close=True)

    def _serve(self) -> None:
        app, world = self.server.app, self.server.world
        if app is None or world is None:
            raise RuntimeError("a sandbox server answered before Sandbox.start wired it")
        try:
            body = self._read_body(world.config.body_read_timeout)
        except BadBody as exc:
            # What follows the headers can no longer be told apart from the next request.
            self._send(error_response(app.api, exc.status, exc.message), close=True)
            return
        split = urlsplit(self.path)
        headers = {key.lower(): value for key, value in self.headers.items()}
        query = parse_qs(split.query, keep_blank_values=True)
        request = Request(self.command, split.path, query, headers, body)
        try:
            response = app.handle(request)
        except Exception:  # a sandbox bug must show, not kill the thread silently
            traceback.print_exc(file=sys.stderr)
            response = error_response(app.api, 500, "sandbox internal error")
        if response.action == "hang":
            world.stop_event.wait(world.config.hang_seconds)
            self.close_connection = True
            return
        if response.action == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()
            self.close_connection = True
            return
        self._send(response)

    def _send(self, response: Response, close: bool = False) -> None:
        """Write `response`; `close` ends the connection after it (Connection: close)."""
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
        except ConnectionError:  # the client left before its answer: nobody to tell
            self.close_connection = True

    def _read_body(self, timeout: float) -> bytes:
        """The request body, framed by Content-Length or chunked, within `timeout` seconds."""
        framing = body_framing(
            self.headers.get_all("Transfer-Encoding") or [],
            self.headers.get_all("Content-Length") or [],
        )
        if framing == 0:
            return b""
        deadline = time.monotonic() + timeout
        try:
            if framing == "chunked":
                return self._read_chunked(deadline)
            return self._read_exact(framing, deadline)
        except TimeoutError as exc:
            raise BadBody(408, f"the request body did not arrive within {timeout:g} s") from exc
        finally:
            with contextlib.suppress(OSError):  # the socket may be gone already
                self.connection.settimeout(None)

    def _arm(self, deadline: float) -> None:
        """Let the next socket read wait only until `deadline`."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.connection.settimeout(left)

    def _read_exact(self, size: int, deadline: float) -> bytes:
        parts: list[bytes] = []
        while size > 0:
            self._arm(deadline)
            part = self.rfile.read1(min(size, 65536))
            if not part:
                raise BadBody(400, f"the request body ended {size} bytes short of its length")
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    def _read_line(self, deadline: float) -> bytes:
        """One line of chunked framing, without its line end; byte-wise, so the deadline holds."""
        line = bytearray()
        while not line.endswith(b"\n"):
            if len(line) > _MAX_LINE:
                raise BadBody(400, "a chunk-size or trailer line is too long")
            line += self._read_exact(1, deadline)
        return bytes(line).rstrip(b"\r\n")

    def _read_chunked(self, deadline: float) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = self._read_line(deadline).split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                raise BadBody(400, f"{size_text!r} is not a chunk size in hexadecimal")
            if len(size_text) > _MAX_DIGITS:
                raise BadBody(413, f"the request body may have at most {MAX_BODY_BYTES} bytes")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > MAX_BODY_BYTES:
                raise BadBody(413, f"the request body may have at most {MAX_BODY_BYTES} bytes")
            parts.append(self._read_exact(size, deadline))
            if self._read_exact(2, deadline) != b"\r\n":
                raise BadBody(400, "a chunk is not followed by CRLF")
        while self._read_line(deadline):  # trailer fields, up to the empty line; ignored
            pass
        return b"".join(parts)

    def log_message(self, format: str, *args: Any) -> None:
        world = self.server.world
        if world is not None and world.config.log_requests:
            sys.stderr.write(f"sandbox {self.address_string()} {format % args}\n")


def _bind(host: str, port: int) -> _Server:
    try:
        return _Server((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port) from exc
        raise


class Sandbox:
    """Both emulators, started together; use as a context manager or call stop()."""

    def __init__(self, config: SandboxConfig, world: World, servers: list[_Server]) -> None:
        self.config = config
        self.world = world
        self._servers = servers
        self._threads: list[threading.Thread] = []

    @classmethod
    def start(cls, config: SandboxConfig | None = None) -> Sandbox:
        """Bind both ports (0 picks free ones), seed the world and start serving."""
        config = config or SandboxConfig()
        calendly = _bind(config.host, config.calendly_port)
        try:
            close = _bind(config.host, config.close_port)
        except OSError:
            calendly.server_close()
            raise
        url_host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
        calendly_base = f"http://{url_host}:{calendly.server_address[1]}"
        close_base = f"http://{url_host}:{close.server_address[1]}"
        world = World(config, calendly_base, close_base)
        seed_world(world, config)
        admin = build_admin_router(world)
        calendly.app = ApiApp("calendly", world, build_calendly_router(world), admin)
        close.app = ApiApp("close", world, build_close_router(world), admin)
        sandbox = cls(config, world, [calendly, close])
        world.deliverer.start(config.webhook_delivery_threads)
        for server in sandbox._servers:
            server.world = world
            # A short poll interval keeps stop() (which waits for the serve loop) fast.
            thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
            thread.start()
            sandbox._threads.append(thread)
        return sandbox

    @property
    def calendly_api_url(self) -> str:
        """CALENDLY_API_URL."""
        return self.world.calendly_base

    @property
    def calendly_auth_url(self) -> str:
        """CALENDLY_AUTH_URL (same server; the token endpoint is /oauth/token)."""
        return self.world.calendly_base

    @property
    def close_api_url(self) -> str:
        """CLOSE_API_URL."""
        return f"{self.world.close_base}/api/v1"

    @property
    def close_oauth_url(self) -> str:
        """CLOSE_OAUTH_URL."""
        return f"{self.world.close_base}/oauth2"

    @property
    def users(self) -> list[SeededUser]:
        """Every user pair, seeded ones first."""
        return self.world.users()

    def env(self) -> dict[str, str]:
        """The environment variables that point closesync at this sandbox."""
        return {
            "CALENDLY_API_URL": self.calendly_api_url,
            "CALENDLY_AUTH_URL": self.calendly_auth_url,
            "CLOSE_API_URL": self.close_api_url,
            "CLOSE_OAUTH_URL": self.close_oauth_url,
        }

    def stop(self) -> None:
        """Stop webhook deliveries, release hung requests, stop both servers and drop open
        connections."""
        self.world.stop_event.set()
        self.world.deliverer.stop()
        for server in self._servers:
            server.shutdown()
            server.server_close()
            with server.sockets_lock:
                for sock in list(server.open_sockets):
                    with contextlib.suppress(OSError):  # already gone
                        sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
