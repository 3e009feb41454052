"""Redis locks: exclusive, owner-only release and renewal, renewed while held, freed after crash."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis

from closesync.core.errors import RunLocked
from closesync.store.locks import RedisLock, hold

KEY = "test:lock"


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll `condition()` until true or `timeout` passes (no fixed sleep)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        if condition():
            return True
        pause.wait(0.01)
    return False


def test_lock_second_acquire_fails(redis_client: redis.Redis) -> None:
    """Only one holder at a time."""
    assert RedisLock(redis_client, KEY, 10).acquire() is True
    assert RedisLock(redis_client, KEY, 10).acquire() is False


def test_lock_release_by_non_owner_does_nothing(redis_client: redis.Redis) -> None:
    """Another process's release and renewal leave our lock untouched."""
    ours = RedisLock(redis_client, KEY, 10)
    ours.acquire()
    theirs = RedisLock(redis_client, KEY, 10)
    assert theirs.release() is False
    assert theirs.renew() is False
    assert redis_client.get(KEY) == ours.token
    assert ours.release() is True
    assert redis_client.get(KEY) is None


def test_lock_renew_resets_ttl(redis_client: redis.Redis) -> None:
    """renew() puts the full TTL back."""
    lock = RedisLock(redis_client, KEY, 10)
    lock.acquire()
    redis_client.pexpire(KEY, 500)
    assert lock.renew() is True
    assert redis_client.pttl(KEY) > 5_000


def test_lock_crashed_holder_frees_within_ttl(redis_client: redis.Redis) -> None:
    """A holder that never renews nor releases blocks others only until its TTL passes."""
    assert RedisLock(redis_client, KEY, 0.2).acquire() is True
    other = RedisLock(redis_client, KEY, 10)
    assert other.acquire() is False
    assert wait_until(other.acquire, timeout=2.0)


def test_hold_renews_beyond_ttl(redis_client: redis.Redis) -> None:
    """While held, the lock outlives several TTLs and is released on exit."""
    with hold(redis_client, KEY, ttl=0.3, renew_every=0.05) as lock:
        started = time.monotonic()
        assert wait_until(lambda: time.monotonic() - started > 0.9, timeout=2.0)
        assert redis_client.get(KEY) == lock.token
        assert not lock.lost.is_set()
    assert redis_client.get(KEY) is None


def test_hold_when_taken_raises_run_locked(redis_client: redis.Redis) -> None:
    """hold() refuses a lock someone else holds, naming the key."""
    RedisLock(redis_client, KEY, 10).acquire()
    with pytest.raises(RunLocked, match=KEY), hold(redis_client, KEY, ttl=10):
        pass


def test_hold_lock_taken_over_sets_lost(redis_client: redis.Redis) -> None:
    """If the lock is gone at renewal, `lost` is set and exit leaves the new holder's lock."""
    with hold(redis_client, KEY, ttl=5, renew_every=0.02) as lock:
        redis_client.set(KEY, "someone-else", px=5_000)
        assert lock.lost.wait(2.0)
    assert redis_client.get(KEY) == "someone-else"


def test_lock_acquire_wait_gets_lock_after_release(redis_client: redis.Redis) -> None:
    """acquire_wait returns once the holder releases, and gives up at its timeout."""
    holder = RedisLock(redis_client, KEY, 10)
    holder.acquire()
    waiter = RedisLock(redis_client, KEY, 10)
    assert waiter.acquire_wait(0.05) is False
    releaser = threading.Timer(0.1, holder.release)
    releaser.start()
    try:
        assert waiter.acquire_wait(3.0) is True
    finally:
        releaser.join()
    assert redis_client.get(KEY) == waiter.token


def test_lock_acquire_wait_cancelled_returns_false(redis_client: redis.Redis) -> None:
    """A set cancel event ends the wait at once."""
    RedisLock(redis_client, KEY, 10).acquire()
    cancel = threading.Event()
    cancel.set()
    started = time.monotonic()
    assert RedisLock(redis_client, KEY, 10).acquire_wait(5.0, cancel=cancel) is False
    assert time.monotonic() - started < 1.0


def test_lock_held_turns_false_once_ttl_passed_without_renewal(redis_client: redis.Redis) -> None:
    """held() is False once the TTL ran out, even before any renewer noticed."""
    lock = RedisLock(redis_client, "test:held", ttl_seconds=0.2)
    assert lock.acquire()
    assert lock.held() is True
    assert wait_until(lambda: not lock.held())
    assert lock.lost.is_set() is False


def test_lock_ttl_under_one_millisecond_raises_value_error(redis_client: redis.Redis) -> None:
    """A TTL that would reach Redis as 0 ms is refused before any command is sent."""
    with pytest.raises(ValueError, match="at least 1 ms"):
        RedisLock(redis_client, KEY, 0.0004)
    assert redis_client.get(KEY) is None


def test_lock_release_twice_second_returns_false(redis_client: redis.Redis) -> None:
    """A lock released once neither releases nor renews again, nor touches the next holder."""
    lock = RedisLock(redis_client, KEY, 10)
    assert lock.acquire()
    assert lock.release() is True
    successor = RedisLock(redis_client, KEY, 10)
    assert successor.acquire()
    assert lock.release() is False
    assert lock.renew() is False
    assert redis_client.get(KEY) == successor.token


def test_lock_on_bytes_client_token_round_trips(redis_url: str) -> None:
    """On a client without decode_responses the token is stored, renewed and released as bytes."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        client.delete(KEY)
        lock = RedisLock(client, KEY, 10)
        assert lock.acquire()
        assert client.get(KEY) == lock.token.encode()
        assert RedisLock(client, KEY, 10).release() is False
        client.pexpire(KEY, 500)
        assert lock.renew() is True
        assert client.pttl(KEY) > 5_000
        assert lock.release() is True
        assert client.get(KEY) is None
    finally:
        client.close()


def test_hold_lock_deleted_by_someone_else_sets_lost(redis_client: redis.Redis) -> None:
    """A lock deleted under its holder is reported lost, and exit creates or deletes nothing."""
    with hold(redis_client, KEY, ttl=5, renew_every=0.02) as lock:
        redis_client.delete(KEY)
        assert lock.lost.wait(2.0)
        assert lock.held() is False
    assert redis_client.exists(KEY) == 0
