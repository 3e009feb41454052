"""Access tokens for one side of one connection, refreshed single-flight across every process.

Both providers rotate refresh tokens: a refresh returns a new refresh token and revokes the old
one. Two workers refreshing the same grant at once would lose it, so a refresh happens only under
a Redis lock per grant, re-reads the stored grant first (another process may have refreshed it
already), and stores the rotated grant before the new access token is used. A refresh answered
`invalid_grant` raises `GrantRevoked` (the caller marks the connection needs_reauth) unless
another process's rotation of the same grant is stored meanwhile: a lock lost mid-call (a
failover) lets two processes present one token, and the one refused must not give up a grant
the other just rotated (`_rotated_elsewhere`).

The lock is renewed for as long as the refresh holds it (`Lock.renewing`), not merely given a TTL
longer than the timeouts: connect and read timeouts bound each socket operation, not the call
(a server trickling its answer, a slow DNS lookup), and a lock that expired mid-call would let a
second process present the same single-use refresh token. A holder that dies stops renewing, so
its lock still frees itself within the TTL.

Each refresh sent is counted (`closesync_token_refreshes_total`, by API and result), so that
refresh failures show on a dashboard before the connections they cost do.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from pydantic import SecretStr

from closesync import meters
from closesync.core.connection import SIDE_LABEL, Grant, Grants, Side
from closesync.core.errors import AuthFailed, ConfigError, GrantRevoked, TransientError

# Refresh an access token that expires within this many seconds, rather than risk a 401 mid-run.
EXPIRY_MARGIN_SECONDS = 120.0
# Seconds to wait for another process's refresh of the same grant before giving up.
REFRESH_WAIT_SECONDS = 30.0
# Seconds a refused refresh keeps looking for another process's rotation of the same grant to be
# stored before it calls the grant revoked: a process whose refresh lock was lost mid-call (a
# failover dropped it) may have redeemed the single-use token first; it stores right after.
REVOKED_GRACE_SECONDS = 1.0
_GRACE_POLL_SECONDS = 0.05


class TokenAnswer(Protocol):
    @property
    def access_token(self) -> str: ...
    @property
    def refresh_token(self) -> str | None: ...
    @property
    def expires_in(self) -> int | None: ...


class Refresher(Protocol):
    def refresh(self, refresh_token: str) -> TokenAnswer: ...


class GrantStore(Protocol):
    def grants(self, connection_id: str) -> Grants: ...

    def update_grant(self, connection_id: str, side: Side, grant: Grant) -> None: ...


class Lock(Protocol):
    def acquire_wait(self, timeout: float) -> bool: ...

    def held(self) -> bool: ...

    def renewing(self) -> AbstractContextManager[object]: ...

    def release(self) -> bool: ...


_SHARED = "shared:"
# Times a refresh follows its grant to another lock (a reconnect moved it) before giving up.
_LOCK_MOVES = 3


def shared_lock_key(ref: str) -> str:
    """The `lock_key` of a shared (organization) grant: one refresh lock for all its users."""
    return f"{_SHARED}{ref}"


def shared_ref_of(lock_key: str) -> str | None:
    """The shared grant's ref a `lock_key` names; None for a connection's own grant."""
    return lock_key.removeprefix(_SHARED) if lock_key.startswith(_SHARED) else None


def grant_lock_name(side: Side, connection_id: str) -> str:
    """Name of the refresh lock of a grant: per connection and side (never the token itself)."""
    digest = hashlib.sha256(f"{side}:{connection_id}".encode()).hexdigest()[:16]
    return f"{side}:{digest}"


class TokenKeeper:
    """Hands out a valid access token for one side of one connection."""

    def __init__(
        self,
        *,
        connection_id: str,
        side: Side,
        store: GrantStore,
        refresher: Refresher | None,
        lock_factory: Callable[[str], Lock],
        clock: Callable[[], float] = time.time,
        lock_key: str | None = None,
        lock_key_of: Callable[[], str] | None = None,
    ) -> None:
        self.connection_id = connection_id
        # `lock_key_of`: what the grant's refresh lock is named after as stored NOW. A reconnect
        # can move a connection onto or off a shared grant while a run holds this keeper; the
        # refresh then follows the stored grant to its lock (see `refresh`).
        self._lock_key_of = lock_key_of
        # What the refresh lock is named after: the connection, or a grant it shares with others;
        # the one last confirmed under its lock (what a refused grant is reported against).
        self.lock_key = lock_key or (lock_key_of() if lock_key_of else connection_id)
        self.side = side
        self._store = store
        self._refresher = refresher
        self._lock_factory = lock_factory
        self._clock = clock
        self._grant = self._load()
        self.refreshes = 0

    def current(self) -> str:
        """The access token in hand, without refreshing it."""
        return self._grant.access_token.get_secret_value()

    def access_token(self) -> str:
        """The current access token, refreshed first when it is about to expire."""
        if self._grant.refresh_token is not None and self._grant.expires_within(
            self._clock(), EXPIRY_MARGIN_SECONDS
        ):
            self.refresh(self._grant.access_token.get_secret_value())
        return self._grant.access_token.get_secret_value()

    def refresh(self, failed_token: str) -> str:
        """Replace `failed_token` with a fresh access token, once across all processes."""
        label = self._label()
        if self._grant.refresh_token is None:
            raise GrantRevoked(
                f"{label} access token was refused and there is no refresh token",
                api=label,
                method="POST",
                endpoint="token refresh",
            )
        if self._refresher is None:
            # A deployment mistake, not the user's: the connection must not leave the schedule.
            side = label.upper()
            raise ConfigError(
                f"{label} access token expired and cannot be refreshed: "
                f"{side}_CLIENT_ID and {side}_CLIENT_SECRET are not set"
            )
        for _ in range(_LOCK_MOVES):
            key = self._lock_key_of() if self._lock_key_of else self.lock_key
            lock = self._lock_factory(grant_lock_name(self.side, key))
            if not lock.acquire_wait(REFRESH_WAIT_SECONDS):
                raise TransientError(
                    f"{label} token refresh is held by another process for too long",
                    api=label,
                    method="POST",
                    endpoint="token refresh",
                )
            try:
                # Read again under the lock: a reconnect changes which grant the connection uses
                # only under that grant's lock, so a match now holds until we release. Under a
                # stale name, two processes could present one single-use refresh token.
                if self._lock_key_of is not None and self._lock_key_of() != key:
                    continue
                self.lock_key = key
                with lock.renewing():
                    return self._refresh_held(label, failed_token, lock)
            finally:
                lock.release()
        raise TransientError(
            f"{label} grant moved to another refresh lock {_LOCK_MOVES} times during a refresh",
            api=label,
            method="POST",
            endpoint="token refresh",
        )

    def _refresh_held(self, label: str, failed_token: str, lock: Lock) -> str:
        """The refresh proper, with the grant's `lock` held (and renewed) by the caller."""
        assert self._refresher is not None  # noqa: S101 - checked by refresh() before locking
        stored = self._load()
        if stored.access_token.get_secret_value() != failed_token:
            # Another process refreshed while we waited: use its token.
            self._grant = stored
            return stored.access_token.get_secret_value()
        assert stored.refresh_token is not None  # noqa: S101 - checked above on our copy
        presented = stored.refresh_token.get_secret_value()
        try:
            answer = self._refresher.refresh(presented)
        except GrantRevoked:
            # Someone may have rotated the grant without our lock (e.g. its lock expired
            # during a slow refresh): if the stored refresh token changes, use that grant.
            current = self._rotated_elsewhere(presented, lock)
            if current is None:
                meters.count_token_refresh(label, "revoked")
                raise
            # Refused because another process redeemed it first: no person is needed.
            meters.count_token_refresh(label, "rotated_elsewhere")
            self._grant = current
            return current.access_token.get_secret_value()
        except AuthFailed as error:
            meters.count_token_refresh(label, "client_refused")
            # The token endpoint refused closesync itself (invalid_client): configuration.
            raise ConfigError(
                f"{label} refused closesync's OAuth client credentials: {error}"
            ) from None
        except Exception:
            # No answer, a 5xx, a rate limit: the run fails for a retry; the grant is intact.
            meters.count_token_refresh(label, "error")
            raise
        new = Grant(
            kind="oauth",
            access_token=SecretStr(answer.access_token),
            # Rotation: keep the new refresh token; a provider that does not rotate keeps ours.
            refresh_token=SecretStr(answer.refresh_token)
            if answer.refresh_token
            else stored.refresh_token,
            expires_at=self._clock() + answer.expires_in if answer.expires_in else None,
        )
        # Stored before use: if we crash now, the next process has the rotated grant.
        try:
            self._store.update_grant(self.connection_id, self.side, new)
        except BaseException:
            # The provider answered but the rotated grant is not kept: not a refresh that worked.
            meters.count_token_refresh(label, "error")
            raise
        # Counted only once stored: an "ok" whose grant was lost would hide the failure.
        meters.count_token_refresh(label, "ok")
        self._grant = new
        self.refreshes += 1
        return answer.access_token

    def _rotated_elsewhere(self, presented: str, lock: Lock) -> Grant | None:
        """The grant another process rotated `presented` into, once stored; None: none did.

        If our lock was lost mid-call, whoever took it may be refreshing this very grant and
        stores its result before releasing: wait for that lock first. If we held it, the one who
        lost it may have redeemed the token first: its result lands just after our refusal, so
        look for REVOKED_GRACE_SECONDS before calling the grant revoked (which needs a person).
        """

        def rotated() -> Grant | None:
            current = self._load()
            token = current.refresh_token
            return current if token is not None and token.get_secret_value() != presented else None

        found = rotated()
        if found is not None:
            return found
        if not lock.held():
            again = self._lock_factory(grant_lock_name(self.side, self.lock_key))
            if again.acquire_wait(REFRESH_WAIT_SECONDS):
                again.release()
        deadline = time.monotonic() + REVOKED_GRACE_SECONDS
        while (found := rotated()) is None and time.monotonic() < deadline:
            time.sleep(_GRACE_POLL_SECONDS)
        return found

    def _load(self) -> Grant:
        grants = self._store.grants(self.connection_id)
        return grants.close if self.side == "close" else grants.calendly

    def _label(self) -> str:
        return SIDE_LABEL[self.side]
