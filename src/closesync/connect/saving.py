"""Storing a connection someone (re)connected: under its refresh locks, then revoking what it
replaced.

A reconnect replaces grants that a worker may be refreshing at that very moment. Such a refresh
stores the rotated OLD grant when its token call returns (`apis.credentials.TokenKeeper`), so a
reconnect stored meanwhile would be overwritten and lost. Worse, a refresh routes its write by
what the connection stores now: a personal Calendly grant refreshed while the connection became
organization-mode would be written over the organization's shared grant, and a shared one
refreshed while it became personal would land in the connection (the organization keeping a
spent refresh token). So replacing an existing connection's grants first takes every refresh
lock the old grants are refreshed under (both sides of the connection, and the old shared
grant's when the connection leaves it), in name order so that two reconnects cannot deadlock;
reads the old grants; writes the new; releases; and only then revokes the old grants at the
providers, best effort (never a shared grant, which others still use; never a grant the new one
still contains, e.g. `connections add` run again with the same tokens).

A new connection has no old grants and no refresh in flight: it is stored at once.

A connection that a `connections remove` marked meanwhile is not stored (ConnectionLeaving, a
ConnectionBusy: both ask the user to try again, which then makes a new connection).

A reconnect to another Calendly user (or into organization mode) first deletes the old user's
webhook subscription with the old grants, still stored then (`Subscriptions.before_replacing`);
should the save then fail, the connection has none until the reconciliation makes it again.
Once stored, the connection's webhook subscription is made (`closesync.connect.webhooks`: its
own, or its organization's in organization mode); a webhook failure is recorded there and never
fails the save.
"""

from __future__ import annotations

from collections.abc import Callable

from closesync.apis.credentials import REFRESH_WAIT_SECONDS, grant_lock_name, shared_lock_key
from closesync.connect.deps import ConnectServices
from closesync.connect.revoke import revoke_grant
from closesync.connect.webhooks import Subscriptions
from closesync.core.connection import Connection, Grant, Grants
from closesync.core.errors import (
    CloseSyncError,
    ConnectionNotFound,
    ConnectionRemoved,
    EncryptionError,
)
from closesync.store.locks import RedisLock


class ConnectionBusy(CloseSyncError):
    """A refresh of the connection's grants stayed in flight: the new grants were not stored."""


class ConnectionLeaving(ConnectionBusy):
    """The connection being replaced is being (or was just) removed: nothing was stored."""


def save_connection(
    services: ConnectServices,
    existing: Connection | None,
    connection: Connection,
    grants: Grants,
    *,
    wait_seconds: float = REFRESH_WAIT_SECONDS,
) -> None:
    """Store a connection with its own grants (`existing`: the one it replaces, if any)."""
    _replacing(
        services,
        existing,
        connection,
        lambda: services.connections.save(connection, grants),
        grants.close,
        grants.calendly,
        wait_seconds,
    )
    Subscriptions(services).after_connect(connection, existing)


def save_shared_connection(
    services: ConnectServices,
    existing: Connection | None,
    connection: Connection,
    close: Grant,
    *,
    wait_seconds: float = REFRESH_WAIT_SECONDS,
) -> None:
    """Store an organization-mode connection: its Close grant, the shared Calendly one by ref."""
    _replacing(
        services,
        existing,
        connection,
        lambda: services.connections.save_shared(connection, close),
        close,
        None,
        wait_seconds,
    )
    Subscriptions(services).after_connect(connection, existing)


def _lock_names(existing: Connection, connection: Connection) -> list[str]:
    names = {grant_lock_name("close", existing.id), grant_lock_name("calendly", existing.id)}
    old_ref = existing.calendly_grant_ref
    if old_ref is not None and old_ref != connection.calendly_grant_ref:
        names.add(grant_lock_name("calendly", shared_lock_key(old_ref)))
    return sorted(names)


def _replacing(
    services: ConnectServices,
    existing: Connection | None,
    connection: Connection,
    write: Callable[[], None],
    new_close: Grant,
    new_calendly: Grant | None,
    wait_seconds: float,
) -> None:
    if existing is None:
        _store(write)
        return
    # Before the locks (deleting may refresh the old grant under them) and before the write:
    # only the old grants can delete the old Calendly user's subscription.
    Subscriptions(services).before_replacing(existing, connection)
    held: list[RedisLock] = []
    try:
        for name in _lock_names(existing, connection):
            lock = services.refresh_lock(name)
            if not lock.acquire_wait(wait_seconds):
                raise ConnectionBusy(
                    f"the tokens of connection {existing.id} are being refreshed right now, so "
                    "the new ones were not stored; please try again"
                )
            held.append(lock)
        old = _stored_grants(services, existing.id)
        _store(write)
    finally:
        for lock in reversed(held):
            lock.release()
    if old is None:
        return
    if old.close.replaced_by(new_close):
        revoke_grant(services, "close", old.close)
    # A shared Calendly grant is the organization's: leaving it revokes nothing.
    if existing.calendly_grant_ref is None and old.calendly.replaced_by(new_calendly):
        revoke_grant(services, "calendly", old.calendly)


def _store(write: Callable[[], None]) -> None:
    """`write`, a removal marked meanwhile becoming what the connect flows tell the user."""
    try:
        write()
    except ConnectionRemoved as error:
        raise ConnectionLeaving(str(error)) from None


def _stored_grants(services: ConnectServices, conn_id: str) -> Grants | None:
    """The grants being replaced, if readable: a reconnect is how unreadable ones get repaired."""
    try:
        grants: Grants = services.connections.grants(conn_id)
    except (ConnectionNotFound, EncryptionError, ValueError):
        return None
    return grants
