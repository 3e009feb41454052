"""Fixtures every test may use: a real Redis, a clean client on it, a unique key prefix.

Redis comes from TEST_REDIS_URL when set (CI: redis://127.0.0.1:6379/15, a database reserved for
tests, flushed before each test), else from a redis-server started for the session. Without
either, Redis tests fail on CI (CI=true) and are skipped elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import settings

from closesync.store.keys import Keys

try:  # tests/ may or may not be a package (tests/__init__.py); resolve the helper either way.
    from tests.redis_server import RedisServer, RedisServerError, answers
except ImportError:
    from redis_server import RedisServer, RedisServerError, answers  # type: ignore[no-redef,import-not-found]

settings.register_profile("ci", deadline=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Redis is required on CI: {reason}")
    pytest.skip(f"no Redis for this test: {reason}")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis for the whole session."""
    configured = os.environ.get("TEST_REDIS_URL")
    if configured:
        if not answers(configured):
            _unavailable(f"TEST_REDIS_URL={configured} does not answer PING")
        yield configured
        return
    server = RedisServer()
    try:
        server.start()
    except RedisServerError as error:
        _unavailable(str(error))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A decoding client on an emptied database."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def keys() -> Keys:
    """Key names under a prefix no other test uses."""
    return Keys(f"test-{uuid.uuid4().hex[:8]}")
