"""`closesync web` as a real process: started, its stderr read as it comes, stopped.

gunicorn's master and workers all write to the one stderr; a reader thread collects the lines
so a test can wait for the one it needs (with a deadline) instead of reading blindly.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_STARTED = re.compile(r"^closesync web on [^:]+:(\d+);")


@dataclass
class WebProcess:
    """A running `closesync web`; `lines` is everything it wrote to stderr so far."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _incoming: queue.Queue[str | None] = field(default_factory=queue.Queue)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first line, read already or yet to come, matching `pattern` (fails at a deadline)."""
        wanted = re.compile(pattern)
        for line in self.lines:
            if found := wanted.search(line):
                return found
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._incoming.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"closesync web exited before {pattern!r}:\n{self.text()}")
            self.lines.append(line)
            if found := wanted.search(line):
                return found
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.text()}")

    def wait_for_all(self, pattern: str, count: int, timeout: float = 30.0) -> set[str]:
        """The distinct first groups of lines matching `pattern`, once there are `count`."""
        wanted = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            seen = {m[1] for line in self.lines if (m := wanted.search(line))}
            if len(seen) >= count:
                return seen
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(seen)} of {count} {pattern!r}:\n{self.text()}")
            try:
                line = self._incoming.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"closesync web exited before {pattern!r}:\n{self.text()}")
            self.lines.append(line)

    def drain(self, settle: float = 0.5) -> None:
        """Take every line written so far (waiting `settle` s for a line still in flight)."""
        while True:
            try:
                line = self._incoming.get(timeout=settle)
            except queue.Empty:
                return
            if line is None:
                return
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


@contextmanager
def web_command(args: Sequence[str], env: dict[str, str], cwd: Path) -> Iterator[WebProcess]:
    """`closesync web ARGS` in `cwd`; yields once it printed its address; stopped by SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "closesync", "web", *args],
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    web = WebProcess(process)

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            web._incoming.put(line)
        web._incoming.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        web.port = int(web.wait_for(_STARTED.pattern)[1])
        yield web
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        web.drain(settle=0)
        if process.stderr is not None:
            process.stderr.close()
