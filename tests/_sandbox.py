"""Test helpers for the HTTP clients: a running sandbox, ApiHttp wired to it, a fake clock.

The fake clock replaces both `sleep` and `clock` of ApiHttp: a "sleep" records the delay and
moves the fake time and the (frozen) sandbox clock forward by as much, so a rate-limit window
that the client waits out has really passed on the server, and no test sleeps for real. The
sandbox is moved 1 ms further than the sleep, standing for the time a real request takes: the
sandbox clock is in epoch seconds, where adding exactly `reset` can round to a hair before the
window boundary.

`ScriptedServer` is a loopback HTTP server that answers queued bodies, for the shapes no honest
emulator produces (a repeated page token, a page repeating the previous one, a wrong envelope),
and for a slow answer that trickles in (`Scripted.trickle_until`): a call that never trips a
per-read timeout yet lasts as long as the test wants.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from closesync.apis.http import ApiHttp
from closesync.core.retry import WaitBudget
from closesync.sandbox import Sandbox, SandboxConfig

# Short timeouts: every server here is on loopback; a hang test waits for the read timeout.
FAST_TIMEOUT = (2.0, 5.0)
# Time a request takes in the sandbox's eyes, added to each fake sleep (see the docstring).
TRANSIT_SECONDS = 0.001


@dataclass
class FakeClock:
    """Monotonic seconds that move only when someone sleeps; each sleep is recorded."""

    sandbox: Sandbox | None = None
    now: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.sandbox is not None:
            self.sandbox.world.advance_clock(seconds + TRANSIT_SECONDS)


@contextmanager
def running_sandbox(**config: Any) -> Iterator[Sandbox]:
    """A sandbox with a frozen clock (seed 1) for the length of a test."""
    options: dict[str, Any] = {"seed": 1, "users": 2, "event_types": 5, "freeze_clock": True}
    options.update(config)
    sandbox = Sandbox.start(SandboxConfig(**options))
    try:
        yield sandbox
    finally:
        sandbox.stop()


def api_http(
    api: str,
    base_url: str,
    fake: FakeClock,
    *,
    budget: float = 60.0,
    max_attempts: int = 5,
    timeout: tuple[float, float] = FAST_TIMEOUT,
) -> ApiHttp:
    """An ApiHttp on the fake clock with rand fixed at 0 (delays are exact)."""
    return ApiHttp(
        api=api,
        base_url=base_url,
        timeout=timeout,
        budget=WaitBudget(budget),
        max_attempts=max_attempts,
        sleep=fake.sleep,
        clock=fake.clock,
        rand=lambda: 0.0,
    )


# Seconds between two bytes of a trickled answer: well below any read timeout used in tests.
TRICKLE_EVERY = 0.2


@dataclass
class Scripted:
    """One queued answer of the scripted server.

    With `trickle_until`, the answer starts at once (`started` is set) but its body is preceded
    by one space (JSON allows it) every TRICKLE_EVERY seconds until that event is set.
    """

    body: Any
    status: int = 200
    trickle_until: threading.Event | None = None
    started: threading.Event = field(default_factory=threading.Event)
    # Extra response headers (a Set-Cookie, say).
    headers: dict[str, str] = field(default_factory=dict)


class ScriptedServer:
    """Answers each request with the next queued JSON body; records each request's method,
    path+query, body (and its Cookie header, None without one)."""

    def __init__(self) -> None:
        self.answers: list[Scripted] = []
        self.requests: list[str] = []
        self.methods: list[str] = []
        self.bodies: list[bytes] = []
        self.cookies: list[str | None] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                script.requests.append(self.path)
                script.methods.append(self.command)
                script.cookies.append(self.headers.get("Cookie"))
                length = int(self.headers.get("Content-Length") or 0)
                script.bodies.append(self.rfile.read(length))
                answer = script.answers.pop(0) if script.answers else Scripted({}, 500)
                data = b"" if answer.body is None else json.dumps(answer.body).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if answer.trickle_until is None:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                answer.started.set()
                if answer.trickle_until is not None:
                    # No Content-Length: HTTP/1.0 reads the body until the connection closes.
                    self.wfile.flush()
                    while not answer.trickle_until.wait(TRICKLE_EVERY):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    self.close_connection = True
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )
        self._thread.start()

    def queue(self, *bodies: Any) -> None:
        """Queue 200 answers with these JSON bodies."""
        self.answers.extend(Scripted(body) for body in bodies)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def scripted_server() -> Iterator[ScriptedServer]:
    """A ScriptedServer for the length of a test."""
    server = ScriptedServer()
    try:
        yield server
    finally:
        server.close()
