"""The one way closesync opens Redis, and the one place Redis errors become StoreUnavailable.

Every process (CLI, Celery worker, scheduler) shares one Redis. A Redis that cannot be reached
must stop a command with one clear sentence naming where it looked (`StoreUnavailable`), never a
redis-py traceback, and never the password from the URL.

Starting a Redis server of our own, when there is none, is `closesync.store.embedded`.

This module must not know closesync's key layout (that is `closesync.store.keys`).
"""

from __future__ import annotations

import contextlib
import logging
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from closesync.core.errors import ConfigError, CorruptState, StoreUnavailable

log = logging.getLogger(__name__)

# Seconds to connect and to wait for an answer: a hung Redis must not hang a worker forever, and
# Redis answers closesync's small commands in milliseconds, so 5 s only trips on a real fault.
SOCKET_TIMEOUT_SECONDS = 5.0
# Seconds an idle pooled connection may sit before it is PINGed on reuse: catches connections a
# load balancer or a Redis restart silently dropped, at the cost of one PING per idle period.
HEALTH_CHECK_INTERVAL_SECONDS = 30
# The Sentinel master name when a sentinel:// URL names none (Redis's own example name).
DEFAULT_SENTINEL_MASTER = "mymaster"


def redacted_url(url: str) -> str:
    """The URL without its password (in the netloc or a `password=` query parameter).

    `redis://:s3cret@host:6379/0` -> `redis://host:6379/0`; a user name is kept. A Sentinel URL
    (`sentinel://…;sentinel://…`) is redacted part by part.
    """
    if ";" in url:
        return ";".join(redacted_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{hostport}" if user else hostport
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query) if "pass" not in k.lower()], safe="/"
    )
    # Not urlunsplit: it turns `unix:///path` into `unix:/path`.
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def _reason(error: BaseException) -> str:
    """The root cause in a few words, e.g. `Connection refused`, rather than redis-py's wording."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, redis.exceptions.TimeoutError):
        return f"no answer within {SOCKET_TIMEOUT_SECONDS:g} s"
    return str(error) or type(error).__name__


def connect(url: str) -> redis.Redis:
    """A client for `url` (decoded strings, bounded timeouts) that has answered one PING."""
    shown = redacted_url(url)
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": SOCKET_TIMEOUT_SECONDS,
        "health_check_interval": HEALTH_CHECK_INTERVAL_SECONDS,
        # No silent command retries: a SET NX retried after its reply was lost (lock, tick
        # claim) would report our own claim as someone else's. Callers retry whole steps.
        "retry": Retry(NoBackoff(), 0),
    }
    try:
        if url.startswith("sentinel://"):
            client = _sentinel_master(url, options)
        else:
            client = redis.Redis.from_url(url, **options)
    except ValueError as error:  # redis-py's own complaint about the URL's shape
        raise ConfigError(f"REDIS_URL {shown} is not a Redis URL: {error}") from None
    try:
        client.ping()
    except redis.exceptions.RedisError as error:
        client.close()
        raise StoreUnavailable(f"Redis at {shown} cannot be reached: {_reason(error)}") from error
    return client


def _sentinel_master(url: str, options: dict[str, Any]) -> redis.Redis:
    """The master behind `sentinel://host:26379;sentinel://host2:26379/0?master_name=name`.

    The same URL kombu takes for the Celery broker (closesync.worker.celery_app), so one
    REDIS_URL serves the queues and the state. A password in the URL is the master's.
    """
    hosts: list[tuple[str, int]] = []
    master, db, password = DEFAULT_SENTINEL_MASTER, 0, None
    for part in url.split(";"):
        pieces = urlsplit(part)
        if pieces.scheme != "sentinel" or not pieces.hostname:
            raise ValueError(f"every part must look like sentinel://host:port, not {pieces.scheme}")
        hosts.append((pieces.hostname, pieces.port or 26379))
        password = pieces.password or password
        path = pieces.path.strip("/")
        if path:
            db = int(path) if path.isdigit() else db
        for key, value in parse_qsl(pieces.query):
            if key == "master_name":
                master = value
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        hosts,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
    )
    # redis-py leaves master_for untyped; it returns a redis.Redis bound to the current master.
    master_client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master, db=db, password=password, **options
    )
    return master_client


class _Guard(contextlib.ContextDecorator):
    """See `guard`."""

    def __init__(self, action: str | None) -> None:
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            return
        while_ = f" while {self.action}" if self.action else ""
        if isinstance(error, ValueError | TypeError):
            # Inside a store method these come from parsing what Redis held (JSON, pydantic):
            # name the step, never the value (it may be a sealed or plain secret).
            raise CorruptState(
                f"Redis holds a value closesync cannot read{while_} ({type(error).__name__})"
            ) from None
        if not isinstance(error, redis.exceptions.RedisError):
            return
        if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            message = f"Redis cannot be reached{while_}: {_reason(error)}"
        else:
            message = f"Redis answered an error{while_}: {error}"
        raise StoreUnavailable(message) from error


def guard(action: str | None = None) -> _Guard:
    """Turn a RedisError raised inside into StoreUnavailable; a context manager or a decorator.

    `action` completes "... while <action>", e.g. `guard("saving connection conn_1")`.
    """
    return _Guard(action)
