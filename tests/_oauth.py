"""Helpers for the OAuth tests: Services on a sandbox and real Redis, a web process, redirects.

Every helper talks real loopback HTTP: the web process (or the terminal flow's callback server)
and the sandbox's authorize endpoints redirect to each other, and `follow` walks those redirects
one by one with `allow_redirects=False`, as a browser would, so a test can stop at any step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import requests

from closesync.sandbox import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    Sandbox,
)
from closesync.settings import Settings
from closesync.web.serving import WebServer
from closesync.wiring.services import Services


def sandbox_env(sb: Sandbox, redis_url: str, prefix: str, keys: str | None) -> dict[str, str]:
    """The environment that points every closesync command at `sb` and the test Redis."""
    env = {
        **sb.env(),
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "CLOSE_CLIENT_ID": CLOSE_CLIENT_ID,
        "CLOSE_CLIENT_SECRET": CLOSE_CLIENT_SECRET,
        "CALENDLY_CLIENT_ID": CALENDLY_CLIENT_ID,
        "CALENDLY_CLIENT_SECRET": CALENDLY_CLIENT_SECRET,
        "HTTP_CONNECT_TIMEOUT": "2",
        "HTTP_READ_TIMEOUT": "5",
        "INLINE_WAIT_BUDGET_SECONDS": "5",
    }
    if keys is not None:
        env["CLOSESYNC_ENCRYPTION_KEYS"] = keys
    return env


def sandbox_settings(sb: Sandbox, redis_url: str, prefix: str, keys: str | None) -> Settings:
    """Settings equal to what `sandbox_env` gives a command (no .env file read)."""
    env = sandbox_env(sb, redis_url, prefix, keys)
    return Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[call-arg]


def services_for(
    sb: Sandbox, client: redis.Redis, redis_url: str, prefix: str, keys: str | None
) -> Services:
    return Services.build(sandbox_settings(sb, redis_url, prefix, keys), redis_client=client)


@contextmanager
def web_process(services: Services) -> Iterator[WebServer]:
    """`closesync web` on a free loopback port; its own URL is its public base URL."""
    server = WebServer(("127.0.0.1", 0), services)
    server.start_background()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def follow(
    session: requests.Session, url: str, *, stop_before: str | None = None, limit: int = 10
) -> tuple[requests.Response | None, str]:
    """Follow redirects by hand from `url`.

    Returns (the first non-redirect answer, its URL), or (None, the next URL) as soon as the
    next URL contains `stop_before`, without requesting it.
    """
    for _ in range(limit):
        if stop_before is not None and stop_before in url:
            return None, url
        response = session.get(url, allow_redirects=False, timeout=10)
        if response.status_code not in (301, 302, 303, 307):
            return response, url
        url = response.headers["Location"]
    raise AssertionError(f"more than {limit} redirects")


def all_redis_text(client: redis.Redis) -> str:
    """Every key and value in the database as text (SCAN + TYPE-specific reads + DUMP)."""
    parts: list[str] = []
    raw = redis.Redis(connection_pool=client.connection_pool)
    for key in client.scan_iter("*"):
        parts.append(str(key))
        kind = client.type(key)
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        parts.append(repr(value))
        dumped = raw.execute_command("DUMP", key, NEVER_DECODE=True)
        parts.append(repr(dumped))
    return "\n".join(parts)
