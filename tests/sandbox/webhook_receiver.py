"""A tiny real webhook receiver for the delivery tests: an http.server on a loopback port that
records every request, whatever its method (method, path, headers, raw body, arrival time),
and answers what it is told: a test of redirects must see a followed one (a GET after a 302, a
POST to the Location after a 307) arrive.

Not a mock: the sandbox's delivery threads reach it over real HTTP. It answers the statuses
queued with `answer(...)` in turn, then `default_status`; `verify_with` makes it answer 400 to
a delivery whose signature does not verify with that key (as closesync's receiver will);
`hold` makes every request wait until `release()` (or `hold_seconds`), to play a slow
receiver; `reset_reused` closes a kept-alive connection, unanswered and unrecorded, when a
second request arrives on it, as a receiver whose idle timeout just expired would.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Received:
    """One request the receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()


def verify(signature: str, key: str, body: bytes) -> bool:
    """Whether a Calendly-Webhook-Signature value is v1=HMAC-SHA256(key, "{t}." + body)."""
    parts = dict(part.split("=", 1) for part in signature.split(","))
    expected = hmac.new(key.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), parts["v1"])


class Receiver:
    """The receiver; use as a context manager."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.cond = threading.Condition()
        self.statuses: deque[int] = deque()
        self.default_status = 200
        self.verify_with: str | None = None
        self.hold = False
        self.hold_seconds = 10.0
        self.reset_reused = False
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            served = 0  # requests on this connection (one handler per connection)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                self.served += 1
                if receiver.reset_reused and self.served > 1:
                    self.close_connection = True
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                arrived = Received(self.command, self.path, headers, body, time.monotonic())
                with receiver.cond:
                    receiver.received.append(arrived)
                    receiver.cond.notify_all()
                    status = receiver.statuses.popleft() if receiver.statuses else None
                if receiver.hold:
                    receiver._released.wait(receiver.hold_seconds)
                if status is None:
                    status = receiver.default_status
                    key = receiver.verify_with
                    signature = headers.get("calendly-webhook-signature", "")
                    if key is not None and not (signature and verify(signature, key, body)):
                        status = 400
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,))
        self._thread.start()

    def url(self, path: str = "/webhooks/calendly/k1") -> str:
        """A callback URL on this receiver."""
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def answer(self, *statuses: int) -> None:
        """Answer the next requests with these statuses, in order."""
        with self.cond:
            self.statuses.extend(statuses)

    def release(self) -> None:
        """Let held requests (and every later one) answer."""
        self.hold = False
        self._released.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The first `count` requests, once they have arrived (AssertionError after timeout)."""
        with self.cond:
            arrived = self.cond.wait_for(lambda: len(self.received) >= count, timeout)
            assert arrived, f"{len(self.received)} of {count} deliveries arrived in {timeout} s"
            return list(self.received[:count])

    def close(self) -> None:
        """Stop serving."""
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
