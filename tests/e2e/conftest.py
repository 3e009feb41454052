"""End-to-end fixtures: a Redis server of their own, the sandbox, and real closesync processes.

Processes run the installed `closesync` command with an environment pointing at the sandbox
(with an encryption key of the deployment's own) and at a Redis database no other test uses. Each is
started in its own session so that a test can kill it and its pool children at once, as a host
failure would. Nothing sleeps for a fixed time: `wait_for` polls a condition until a deadline.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from closesync.core.mapping import clean_name, source_id_for
from closesync.sandbox import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    Sandbox,
    SandboxConfig,
    SeededUser,
)
from closesync.sandbox.connections import sandbox_connection
from closesync.settings import Settings
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from tests.redis_server import RedisServer

CLOSESYNC = str(Path(sys.executable).with_name("closesync"))
T = TypeVar("T")
_databases = itertools.count(1)


def wait_for(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="session")
def e2e_redis() -> Iterator[RedisServer]:
    """A redis-server for the e2e tests alone (databases 1-15, one per test)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A sandbox on wall-clock time with three users of four event types each."""
    sb = Sandbox.start(SandboxConfig(seed=7, users=3, event_types=4))
    try:
        yield sb
    finally:
        sb.stop()


@dataclass
class Proc:
    """A closesync process in its own session, its output in a file."""

    popen: subprocess.Popen[bytes]
    log: Path

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            return

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.kill_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill_group(signal.SIGKILL)
                self.popen.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Deployment:
    """One closesync deployment under test: its env, services, and the processes it started."""

    env: dict[str, str]
    settings: Settings
    services: Services
    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, *args: str, extra_env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{args[0]}-{len(self.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [CLOSESYNC, *args],
                env={**self.env, **(extra_env or {})},
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(popen, log)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLOSESYNC, *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def add_connection(self, user: SeededUser) -> str:
        """Store a connection for a seeded sandbox user pair, as `connections add` would."""
        connection, grants = sandbox_connection(user, time.time())
        self.services.connections.save(connection, grants)
        return connection.id


@pytest.fixture
def deploy(e2e_redis: RedisServer, sandbox: Sandbox, tmp_path: Path) -> Callable[..., Deployment]:
    """Builds a Deployment with settings overrides (env names); stops its processes at the end."""
    made: list[Deployment] = []

    def build(**overrides: str) -> Deployment:
        db = next(_databases) % 16 or 1
        url = e2e_redis.url.rsplit("/", 1)[0] + f"/{db}"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "REDIS_URL": url,
            "REDIS_PREFIX": f"e2e-{uuid.uuid4().hex[:6]}",
            **sandbox.env(),
            "CLOSE_CLIENT_ID": CLOSE_CLIENT_ID,
            "CLOSE_CLIENT_SECRET": CLOSE_CLIENT_SECRET,
            "CALENDLY_CLIENT_ID": CALENDLY_CLIENT_ID,
            "CALENDLY_CLIENT_SECRET": CALENDLY_CLIENT_SECRET,
            "CLOSESYNC_ENCRYPTION_KEYS": generate_key(),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            # Every second: a test drives ticks itself and cannot wait a minute for each.
            "SYNC_CRON": "* * * * * *",
            "DRIFT_CRON": "0 0 1 1 *",
            "DATA_DIR": str(tmp_path / "var"),
            **overrides,
        }
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, **{k.lower(): v for k, v in env.items() if k not in ("PATH", "HOME")}
        )
        services = Services.build(settings)
        services.redis.flushdb()
        deployment = Deployment(env, settings, services, tmp_path)
        made.append(deployment)
        return deployment

    yield build  # type: ignore[misc]
    for deployment in made:
        for proc in deployment.procs:
            proc.stop()
        deployment.services.redis.close()


def expected_links(sb: Sandbox, user: SeededUser) -> dict[str, str]:
    """source_id -> name of the links the user should have: live, active, standard types."""
    world = sb.world
    with world.lock:
        return {
            source_id_for(user.calendly_user_uuid, et.uuid): clean_name(et.name)
            or clean_name(et.slug)
            for et in world.event_types.values()
            if user.calendly_user_uuid in et.members
            and et.deleted_at is None
            and et.active
            and et.type == "StandardEventType"
        }


def our_links(sb: Sandbox, user: SeededUser) -> list[dict[str, Any]]:
    """The user's Close links made by closesync's OAuth app."""
    return [
        link
        for link in sb.world.close_links(user.close_user_id)
        if link["oauth_client_id"] == CLOSE_CLIENT_ID
    ]


def converged(sb: Sandbox, user: SeededUser) -> bool:
    """Close holds exactly the expected links of the user, each once, with the current names."""
    links = our_links(sb, user)
    actual = {link["source_id"]: link["name"] for link in links}
    return len(actual) == len(links) and actual == expected_links(sb, user)
