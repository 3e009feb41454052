"""Redis locks that expire: the per-connection run lock, the token refresh lock, the leader lock.

Built on redis-py's own `redis.lock.Lock`, a maintained implementation of the usual recipe, rather
than on Lua scripts of closesync's own: a lock is a key holding the holder's random token, set with
NX and a TTL in milliseconds, and renewal and release are Lua scripts that act only while the key
still holds our token. So a process whose lock expired (a long GC pause, a partition) can never
extend or delete the lock that someone else took since. A holder that crashes stops renewing; the
key expires and another process may take it within the TTL (decisions.md: at most 60 s for the
run lock).

What `RedisLock` adds to redis-py's Lock: `held()`, which knows until when the lock is surely still
ours; `renew()` and `release()` answering False instead of raising LockError when the lock is not
ours; `acquire_wait()`, a wait that can be cancelled; `renewing()`, which renews a lock already
taken from a thread while a block runs; and `hold()`, which takes, renews and releases around a
block.

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
from redis.exceptions import LockError
from redis.lock import Lock

from closesync.core.errors import RunLocked
from closesync.store.client import guard

log = logging.getLogger(__name__)

# Seconds between two attempts of `acquire_wait`: first short, doubling up to the cap. See there.
_POLL_FIRST = 0.01
_POLL_CAP = 0.1


class RedisLock:
    """One lock on `key`, held for `ttl_seconds` unless renewed. Not reentrant."""

    def __init__(self, redis: redis.Redis, key: str, ttl_seconds: float) -> None:
        # redis-py sends the TTL as int(seconds * 1000) milliseconds; 0 ms would be refused by
        # SET (and delete the key in PEXPIRE), so a TTL under 1 ms is refused here.
        if int(ttl_seconds * 1000) < 1:
            raise ValueError(f"a lock TTL must be at least 1 ms, not {ttl_seconds} s")
        self.redis = redis
        self.key = key
        self.ttl_seconds = ttl_seconds
        # One token for the lifetime of this object, so the leader lock, released or lost and
        # taken again, always holds the same one; redis-py would otherwise draw a new UUID.
        self.token = secrets.token_hex(16)
        # Set by `hold()`'s renewer when the lock was found taken or expired.
        self.lost = threading.Event()
        # Monotonic time until which the lock is surely still ours: the TTL counted from before
        # the last successful SET/renewal was sent, less a margin for clock drift.
        self.valid_until = 0.0
        # thread_local=False: `hold()` acquires in one thread and renews in another, and the
        # scheduler creates its leader lock in one thread and uses it in another; with redis-py's
        # default each thread would see only the token it set itself, i.e. none.
        self._lock = Lock(redis, key, timeout=ttl_seconds, blocking=False, thread_local=False)

    @property
    def _ttl_sent(self) -> float:
        """The TTL in seconds as redis-py sends it: truncated to whole milliseconds."""
        return int(self.ttl_seconds * 1000) / 1000

    @guard("taking a lock")
    def acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        sent = time.monotonic()
        taken = bool(self._lock.acquire(blocking=False, token=self.token))
        if taken:
            self._valid_from(sent)
        return taken

    def _valid_from(self, sent: float) -> None:
        margin = min(1.0, self.ttl_seconds / 10)
        self.valid_until = sent + self._ttl_sent - margin

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
        locks waited on (token refresh; the run lock, by `connections remove`) are held for about
        one HTTP call, so a poll starting at 10 ms and capped at 100 ms answers promptly for a few
        cheap commands. `cancel` ends the
        wait early (returns False).

        Not redis-py's blocking acquire: it sleeps a fixed interval with `time.sleep`, which no
        event can interrupt, so a cancelled wait would still sleep out its interval.
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
        try:
            # reacquire() sets the TTL back to the full timeout, exactly what closesync's own
            # renewal script did; extend(replace_ttl=True) would too, but also refuses a key
            # left without a TTL.
            self._lock.reacquire()
        except LockError:
            # LockNotOwnedError: the key is gone or holds another token. LockError: never taken,
            # or released. Caught here, since LockError is a RedisError that `guard` would turn
            # into StoreUnavailable.
            return False
        self._valid_from(sent)
        return True

    @contextmanager
    def renewing(self, every: float | None = None) -> Iterator[RedisLock]:
        """Renew this lock (taken already) every `every` seconds (default TTL/3) for the block.

        For a holder whose work can outlast the TTL in ways no timeout bounds (a token call whose
        server trickles its answer): the lock then lives as long as the holder does, and a dead
        holder's lock still expires within the TTL. Sets `lost` if a renewal finds it gone.
        """
        stop = threading.Event()
        renewer = threading.Thread(
            target=_renew_until,
            args=(self, every if every is not None else self.ttl_seconds / 3, stop),
            name=f"renew {self.key}",
            daemon=True,
        )
        renewer.start()
        try:
            yield self
        finally:
            stop.set()
            renewer.join()

    @guard("releasing a lock")
    def release(self) -> bool:
        """Delete the lock if it is still ours; False (and nothing deleted) otherwise."""
        try:
            self._lock.release()
        except LockError:
            # As in renew(): not ours, or never taken / already released.
            return False
        return True


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
    redis: redis.Redis,
    key: str,
    ttl: float,
    renew_every: float | None = None,
    *,
    wait: float = 0.0,
) -> Iterator[RedisLock]:
    """Hold the lock on `key` for the block, renewing it every `renew_every` (default ttl/3).

    Raises RunLocked if another process holds it (still, after `wait` seconds when given). Check
    `.lost` of the yielded lock between steps of long work. On exit the renewer stops and the
    lock is released if still ours; a failed release is only logged, since the TTL frees the lock
    anyway.
    """
    lock = RedisLock(redis, key, ttl)
    if not (lock.acquire_wait(wait) if wait > 0 else lock.acquire()):
        waited = f" (waited {wait:g} s)" if wait > 0 else ""
        raise RunLocked(
            f"another run holds the lock {key}{waited}; if that run crashed, the lock frees "
            f"itself within {ttl:g} s"
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
