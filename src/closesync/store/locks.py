"""Redis locks that expire: the per-connection run lock, the token refresh lock, the leader lock.

A lock is a key holding the holder's random token, set with NX and a TTL in milliseconds. Renewal
and release are Lua scripts that act only while the key still holds our token, so a process whose
lock expired (a long GC pause, a partition) can never extend or delete the lock that someone else
took since. A holder that crashes stops renewing; the key expires and another process may take it
within the TTL (decisions.md: at most 60 s for the run lock).

What a lock cannot do: stop a holder that lost it from continuing its work. `hold()` sets `lost`
when a renewal finds the lock gone, and long work should check it between steps.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from closesync.core.errors import RunLocked
from closesync.store.client import guard

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Seconds between two attempts of `acquire_wait`: first short, doubling up to the cap. See there.
_POLL_FIRST = 0.01
_POLL_CAP = 0.1


class RedisLock:
    """One lock on `key`, held for `ttl_seconds` unless renewed. Not reentrant."""

    def __init__(self, redis: redis.Redis, key: str, ttl_seconds: float) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"a lock TTL must be positive, not {ttl_seconds}")
        self.redis = redis
        self.key = key
        self.ttl_seconds = ttl_seconds
        self.token = secrets.token_hex(16)
        # Set by `hold()`'s renewer when the lock was found taken or expired.
        self.lost = threading.Event()
        # Monotonic time until which the lock is surely still ours: the TTL counted from before
        # the last successful SET/renewal was sent, less a margin for clock drift.
        self.valid_until = 0.0
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl_seconds * 1000))

    @guard("taking a lock")
    def acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        sent = time.monotonic()
        taken = bool(self.redis.set(self.key, self.token, nx=True, px=self._ttl_ms))
        if taken:
            self._valid_from(sent)
        return taken

    def _valid_from(self, sent: float) -> None:
        margin = min(1.0, self.ttl_seconds / 10)
        self.valid_until = sent + self.ttl_seconds - margin

    def held(self) -> bool:
        """Whether the lock is surely still ours: not found lost, and within its TTL.

        Checked before every write, so that a process paused past its TTL (GC, swap, a stopped
        VM) stops writing even before its renewer wakes up to notice.
        """
        return not self.lost.is_set() and time.monotonic() < self.valid_until

    @guard("taking a lock")
    def acquire_wait(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """Take the lock, waiting up to `timeout` seconds for its holder to release it.

        Polls: Redis has no blocking "wait until this key is gone" short of keyspace
        notifications, which are off by default and often not configurable on managed Redis. The
        locks waited on (token refresh) are held for about one HTTP call, so a poll starting at
        10 ms and capped at 100 ms answers promptly for a few cheap commands. `cancel` ends the
        wait early (returns False).
        """
        deadline = time.monotonic() + timeout
        pause = _POLL_FIRST
        waiter = cancel if cancel is not None else threading.Event()
        while True:
            if self.acquire():
                return True
            left = deadline - time.monotonic()
            if left <= 0 or waiter.wait(min(pause, left)):
                return False
            pause = min(pause * 2, _POLL_CAP)

    @guard("renewing a lock")
    def renew(self) -> bool:
        """Reset the TTL if the lock is still ours; False if it expired or someone else holds it."""
        sent = time.monotonic()
        renewed = bool(self._renew(keys=[self.key], args=[self.token, self._ttl_ms]))
        if renewed:
            self._valid_from(sent)
        return renewed

    @guard("releasing a lock")
    def release(self) -> bool:
        """Delete the lock if it is still ours; False (and nothing deleted) otherwise."""
        return bool(self._release(keys=[self.key], args=[self.token]))


def _renew_until(lock: RedisLock, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            if lock.renew():
                continue
            log.warning("lock lost: it expired or another process took it", extra={"key": lock.key})
            lock.lost.set()
            return
        except Exception:
            # Redis may come back before the TTL runs out; once it has run out, the lock is gone.
            log.warning("could not renew lock", extra={"key": lock.key}, exc_info=True)
            if time.monotonic() >= lock.valid_until:
                lock.lost.set()
                return


@contextmanager
def hold(
    redis: redis.Redis, key: str, ttl: float, renew_every: float | None = None
) -> Iterator[RedisLock]:
    """Hold the lock on `key` for the block, renewing it every `renew_every` (default ttl/3).

    Raises RunLocked if another process holds it. Check `.lost` of the yielded lock between steps
    of long work. On exit the renewer stops and the lock is released if still ours; a failed
    release is only logged, since the TTL frees the lock anyway.
    """
    lock = RedisLock(redis, key, ttl)
    if not lock.acquire():
        raise RunLocked(
            f"another run holds the lock {key}; if that run crashed, the lock frees itself "
            f"within {ttl:g} s"
        )
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew_until,
        args=(lock, renew_every if renew_every is not None else ttl / 3, stop),
        name=f"renew {key}",
        daemon=True,
    )
    renewer.start()
    try:
        yield lock
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except Exception:
            log.warning("could not release lock", extra={"key": key}, exc_info=True)
