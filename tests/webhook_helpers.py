"""Serving the webhook receiver over loopback HTTP, and deliveries signed as Calendly signs them.

The receiver is framework-free (`closesync.web.webhooks`); here a stdlib threading server mounts
it at `POST /webhooks/calendly/<key>` as the web app will, reading the body only after the
receiver has accepted its Content-Length. Its listen backlog is large enough for a burst of a few
hundred connections at once, as a production server's is.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from closesync.core.webhook_signature import signature_header
from closesync.core.webhooks import CALLBACK_PATH
from closesync.web.webhooks import WebhookReceiver

API = "https://api.calendly.com"


# Requests handled at once, as a production server bounds its threads (gunicorn's workers x
# threads); the others wait in the listen backlog. Unbounded, 200 threads at once would exceed
# redis-py's pool of 100 connections per client.
HANDLER_THREADS = 32


class _Server(ThreadingHTTPServer):
    request_queue_size = 512
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.pool = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="receiver")

    def process_request(self, request: Any, client_address: Any) -> None:
        self.pool.submit(self.process_request_thread, request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class ReceiverServer:
    url: str
    server: ThreadingHTTPServer

    def post(
        self,
        key: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        session: requests.Session | None = None,
    ) -> requests.Response:
        return (session or requests).post(
            f"{self.url}{CALLBACK_PATH}{key}", data=body, headers=headers or {}, timeout=15
        )


@contextmanager
def serving(receiver: WebhookReceiver) -> Iterator[ReceiverServer]:
    """The receiver on a loopback port for the length of a test."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in one write: written apart, Nagle and the peer's delayed ACK
        # hold the body back 40 ms on every keep-alive answer.
        wbufsize = -1

        def do_POST(self) -> None:
            if not self.path.startswith(CALLBACK_PATH):
                self._send(404, {"error": "not found"}, {})
                return
            length = int(self.headers.get("Content-Length") or 0)
            refused = receiver.too_large(length)
            if refused is not None:
                self.close_connection = True
                self._send(refused.status, refused.body, refused.headers)
                return
            body = self.rfile.read(length)
            reply = receiver.receive(
                self.path[len(CALLBACK_PATH) :], dict(self.headers.items()), body
            )
            self._send(reply.status, reply.body, reply.headers)

        def _send(self, status: int, body: dict[str, object], headers: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield ReceiverServer(f"http://127.0.0.1:{server.server_address[1]}", server)
    finally:
        server.shutdown()
        server.server_close()


def event_body(
    event: str,
    event_type_uuid: str,
    owner_uuid: str,
    *,
    team: bool = False,
    deleted: bool = False,
    api: str = API,
    **extra: Any,
) -> bytes:
    """A delivery body of the shape Calendly documents (the full event type as payload)."""
    payload: dict[str, Any] = {
        "uri": f"{api}/event_types/{event_type_uuid}",
        "name": "Intro call",
        "active": True,
        "profile": {
            "type": "Team" if team else "User",
            "name": "Sales team" if team else "Ann",
            "owner": f"{api}/users/{owner_uuid}",
        },
        "deleted_at": "2026-12-02T05:00:00.000000Z" if deleted else None,
        **extra,
    }
    return json.dumps(
        {
            "event": event,
            "created_at": "2026-12-02T05:00:00.000000Z",
            "created_by": f"{api}/users/{owner_uuid}",
            "payload": payload,
        }
    ).encode()


def signed(key: str, body: bytes, t: float | None = None) -> dict[str, str]:
    """The headers of a delivery of `body` signed with `key` at `t` (default: now)."""
    stamp = int(time.time() if t is None else t)
    return {
        "Content-Type": "application/json",
        "Calendly-Webhook-Signature": signature_header(key.encode(), stamp, body),
    }
