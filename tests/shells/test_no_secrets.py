"""No token in the clear anywhere: logs at DEBUG, Sentry events, CLI output, every Redis key."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from closesync.cli.main import main
from closesync.sandbox import Sandbox
from closesync.settings import Settings
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.wiring.observability import init_sentry
from tests._oauth import all_redis_text, follow, sandbox_env, services_for, web_process
from tests._sandbox import running_sandbox


class MemoryTransport(Transport):
    """Keeps every Sentry envelope, serialized, instead of sending it."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.sent: list[bytes] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.sent.append(envelope.serialize())


class Collect(logging.Handler):
    """Every record on the root logger: formatted, with its arguments and extra fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.closesync: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{self.format(record)} {record.args!r} {record.__dict__!r}"
        self.lines.append(line)
        if record.name.startswith("closesync"):
            self.closesync.append(line)


@pytest.fixture
def sentry() -> Iterator[MemoryTransport]:
    memory = MemoryTransport()
    dsn = "https://public@sentry.invalid/1"
    assert init_sentry(Settings(_env_file=None, sentry_dsn=dsn), transport=memory)  # type: ignore[call-arg]
    try:
        yield memory
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


@pytest.fixture
def collect() -> Iterator[Collect]:
    handler = Collect()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=2) as sandbox:
        yield sandbox


def issued(sb: Sandbox) -> tuple[list[str], list[str]]:
    """(every token value, every authorization code) the sandbox has issued."""
    with sb.world.lock:
        return list(sb.world.tokens.tokens), list(sb.world.tokens.codes)


def test_whole_sync_with_debug_logs_and_sentry_leaves_no_token_in_the_clear(
    sb: Sandbox,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    sentry: MemoryTransport,
    collect: Collect,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Connect, sync, refresh both grants, fail once, use the CLI: no token shows anywhere."""
    caplog.set_level(logging.DEBUG)
    secret_key = generate_key()
    services = services_for(sb, redis_client, redis_url, keys.prefix, secret_key)
    with web_process(services) as web, requests.Session() as browser:
        answer, _ = follow(browser, web.url + "/connect")
        assert answer is not None
        assert answer.status_code == 200
        # A replayed callback and a denial are logged and shown too.
        sb.world.set_oauth_next("close", deny=True)
        follow(browser, web.url + "/connect")
    [connection] = services.connections.list()
    engine = services.engine(wait_budget=5)
    assert engine.run(connection.id).outcome.value == "ok"
    # Every access token expires: both keepers refresh (rotating the refresh tokens) mid-run.
    sb.world.expire_token(all=True)
    sb.world.create_event_type(sb.users[0].calendly_user_uuid, name="After refresh")
    report = engine.run(connection.id)
    assert report.outcome.value == "ok"
    assert report.created == 1
    # A failure that reaches logs and Sentry: the Close API down for the whole run.
    sb.world.add_fault(api="close", kind="500", count=50)
    sb.world.create_event_type(sb.users[0].calendly_user_uuid, name="During outage")
    failed = engine.run(connection.id)
    assert failed.outcome.value == "failed"
    sb.world.clear_faults()
    logging.getLogger("closesync.test").error("sync failed: %s", failed.errors)
    for name, value in sandbox_env(sb, redis_url, keys.prefix, secret_key).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    # Adding the same user again, its tokens on standard input: nothing echoes them.
    current = services.connections.grants(connection.id)
    assert current.close.refresh_token is not None
    assert current.calendly.refresh_token is not None
    lines = {
        "CLOSESYNC_CLOSE_ACCESS_TOKEN": current.close.access_token,
        "CLOSESYNC_CLOSE_REFRESH_TOKEN": current.close.refresh_token,
        "CLOSESYNC_CALENDLY_TOKEN": current.calendly.access_token,
        "CLOSESYNC_CALENDLY_REFRESH_TOKEN": current.calendly.refresh_token,
    }
    stdin = "".join(f"{name}={value.get_secret_value()}\n" for name, value in lines.items())
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["connections", "add", "--tokens-from-stdin", "--json"]) == 0
    for argv in (
        ["connections", "list", "--json"],
        ["connections", "show", connection.id, "--json"],
        ["connections", "show", connection.id],
        ["status", "--json"],
        ["status"],
        ["sync", connection.id, "--json"],
    ):
        main(argv)
    sentry_sdk.flush()
    printed = capsys.readouterr()

    tokens, codes = issued(sb)
    grants = services.connections.grants(connection.id)
    assert grants.close.access_token.get_secret_value() in tokens  # the scan looks for real ones
    assert len(tokens) > 8
    everything = {
        "caplog": caplog.text + "\n".join(repr(r.__dict__) for r in caplog.records),
        "root handler": "\n".join(collect.lines),
        "sentry": b"\n".join(sentry.sent).decode("utf-8", "replace"),
        "stdout": printed.out,
        "stderr": printed.err,
        "redis": all_redis_text(redis_client),
    }
    assert sentry.sent, "Sentry captured nothing: the scan would prove nothing"
    for where, text in everything.items():
        leaked = [t[:12] for t in tokens if t in text]
        assert not leaked, f"{where} holds tokens starting {leaked}"
    # Authorization codes: never in Redis, Sentry or closesync's own logs (the test's browser
    # logs its own request lines, which carry them).
    for where in ("sentry", "redis", "stdout", "stderr"):
        assert not [c for c in codes if c in everything[where]], where
    assert not [c for c in codes if any(c in line for line in collect.closesync)]
