"""The web app on werkzeug's threaded server, in this process: tests, `closesync web --dev`.

Production runs the same app under gunicorn (`web/production.py`); this one process is for a
developer's machine and for tests that drive the app over loopback HTTP. werkzeug's own request
log prints the request line, query string included (codes, `state`), so it is silenced here:
the app logs every request itself, path only. An idle connection is dropped after
`request_timeout` seconds so that a slow client cannot pin a thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flask import Flask
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from closesync.web.app import create_app
from closesync.web.webhooks import SyncAsker
from closesync.wiring.services import Services

log = logging.getLogger(__name__)

# Seconds a connection may sit idle (reading a request, writing an answer) before it is dropped.
REQUEST_TIMEOUT_SECONDS = 30.0


class _QuietHandler(WSGIRequestHandler):
    server: _Server

    def setup(self) -> None:
        # StreamRequestHandler applies `timeout` to the socket: reads and writes alike.
        self.request.settimeout(self.server.request_timeout)
        super().setup()

    def log(self, type: str, message: str, *args: Any) -> None:
        # Every werkzeug line (the request line, "Bad request syntax (...)") may hold a query
        # string; the app has logged the request already, so only the kind of trouble is told.
        if type == "error":
            log.warning("web server: a request could not be served")


class _Server(ThreadedWSGIServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, request_timeout: float) -> None:
        self.request_timeout = request_timeout
        super().__init__(host, port, _unset_app, handler=_QuietHandler)

    def log(self, type: str, message: str, *args: Any) -> None:
        if type == "error":
            log.warning("web server: a request failed outside the app")


def _unset_app(environ: Any, start_response: Any) -> Any:
    raise RuntimeError("the web app is set right after the server binds")


class WebServer:
    """The app bound to `address` (port 0: a free one), served on threads of this process."""

    def __init__(
        self,
        address: tuple[str, int],
        services: Services,
        base_url: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        ask: SyncAsker | None = None,
    ) -> None:
        """Bind `address`; callbacks go to `base_url` (default: the address bound).

        Routes may still be added to `app` (a blueprint) until the first request is served.
        """
        self._server = _Server(address[0], address[1], request_timeout)
        self.app: Flask = create_app(services, base_url or self.url, ask)
        self._server.app = self.app

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return (host.decode() if isinstance(host, bytes) else str(host), int(port))

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def start_background(self) -> threading.Thread:
        """Serve on a daemon thread (tests)."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        """Stop serving (from another thread) and wait until the loop has ended."""
        self._server.shutdown()

    def server_close(self) -> None:
        self._server.server_close()
