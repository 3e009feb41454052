"""HTTP plumbing and the `Sandbox` object: two stdlib servers sharing one World.

Each port runs a ThreadingHTTPServer (daemon threads, HTTP/1.1 keep-alive) whose handler
turns the socket request into a routing.Request and hands it to an ApiApp: `/_sandbox/`
paths go to the admin router; every other path is counted, delayed by the configured
latency, offered to the fault book, and only then routed to the vendor emulator.
Transport faults are carried out here: `hang` holds the request until the sandbox stops
(or `hang_seconds` pass) and then drops the connection; `reset` closes the socket with
SO_LINGER 0 so the client sees ECONNRESET. stop() releases hung requests and closes kept
-alive connections, so no test waits on a thread it cannot see.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from closesync.sandbox.admin_api import build_admin_router, handle_admin
from closesync.sandbox.calendly_api import build_calendly_router
from closesync.sandbox.close_api import build_close_router
from closesync.sandbox.config import SandboxConfig
from closesync.sandbox.paging import page_number
from closesync.sandbox.records import SeededUser
from closesync.sandbox.routing import Request, Response, Router, json_response
from closesync.sandbox.seed import seed_world
from closesync.sandbox.world import World


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
        if fault is not None:
            return fault
        if match is None:
            return _not_found(self.api)
        if match.handler is None:
            return json_response(405, _error(self.api, "Method not allowed"))
        request.params = match.params
        request.template = template
        return match.handler(request)


def _error(api: str, message: str) -> dict[str, Any]:
    return {"error": message} if api == "close" else {"title": "Not Found", "message": message}


def _not_found(api: str) -> Response:
    return json_response(404, _error(api, "The requested resource was not found."))


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

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _serve(self) -> None:
        app, world = self.server.app, self.server.world
        if app is None or world is None:
            raise RuntimeError("a sandbox server answered before Sandbox.start wired it")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        headers = {key.lower(): value for key, value in self.headers.items()}
        query = parse_qs(split.query, keep_blank_values=True)
        request = Request(self.command, split.path, query, headers, body)
        try:
            response = app.handle(request)
        except Exception:  # a sandbox bug must show, not kill the thread silently
            traceback.print_exc(file=sys.stderr)
            response = json_response(500, {"error": "sandbox internal error"})
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
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

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
        """Release hung requests, stop both servers and drop open connections."""
        self.world.stop_event.set()
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
