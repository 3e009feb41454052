"""Connections and their grants in Redis; the grants sealed by a SecretBox, never in the clear.

The key layout is in `closesync.store.keys`. Nothing secret is ever written to a connection's public
record; the grants sit under their own key, sealed, and are opened only by `grants()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import redis

from closesync.core.connection import (
    Connection,
    ConnectionOptions,
    ConnectionState,
    Grant,
    Grants,
    Side,
)
from closesync.core.errors import ConnectionNotFound
from closesync.store.client import guard
from closesync.store.keys import Keys, Owner, as_text, watched
from closesync.store.secretbox import SecretBox


def _grants_json(grants: Grants) -> bytes:
    """Grants with their secrets revealed: only ever handed to a SecretBox."""
    return json.dumps(
        {"close": grants.close.revealed(), "calendly": grants.calendly.revealed()}
    ).encode()


def grant_json(grant: Grant) -> bytes:
    """One grant with its secrets revealed: only ever handed to a SecretBox."""
    return json.dumps(grant.revealed()).encode()


def _not_found(conn_id: str) -> ConnectionNotFound:
    return ConnectionNotFound(
        f"no connection {conn_id!r}; `closesync connections list` shows the stored ids"
    )


class ConnectionStore:
    """Connections and their sealed grants."""

    def __init__(self, redis: redis.Redis, keys: Keys, box: SecretBox) -> None:
        self.redis = redis
        self.keys = keys
        self.box = box

    @guard("saving a connection")
    def save(self, connection: Connection, grants: Grants) -> None:
        """Store the connection, its grants and its Close user index in one transaction."""
        self._save(
            connection, self.box.seal(_grants_json(grants), owner=Owner.connection(connection.id))
        )

    @guard("saving a connection")
    def save_shared(self, connection: Connection, close: Grant) -> None:
        """Store a connection whose Calendly grant is the shared one of `calendly_grant_ref`."""
        ref = connection.calendly_grant_ref
        if ref is None or not self.redis.exists(self.keys.calendly_org_grant(ref)):
            raise ValueError("save_shared needs a stored shared Calendly grant to refer to")
        own = json.dumps({"close": close.revealed(), "calendly_ref": ref}).encode()
        self._save(connection, self.box.seal(own, owner=Owner.connection(connection.id)))

    def _save(self, connection: Connection, sealed_grants: str) -> None:
        conn_id = connection.id
        previous = self.redis.get(self.keys.conn(conn_id))
        with self.redis.pipeline(transaction=True) as pipe:
            if previous is not None:
                old_user = Connection.model_validate_json(previous).close_user_id
                if old_user != connection.close_user_id and (
                    self.redis.get(self.keys.close_user(old_user)) == conn_id
                ):
                    pipe.delete(self.keys.close_user(old_user))
            pipe.set(self.keys.conn(conn_id), connection.model_dump_json())
            pipe.set(self.keys.grants(conn_id), sealed_grants)
            pipe.set(self.keys.close_user(connection.close_user_id), conn_id)
            pipe.sadd(self.keys.connections(), conn_id)
            pipe.execute()

    @guard("reading a connection")
    def get(self, conn_id: str) -> Connection:
        raw = self.redis.get(self.keys.conn(conn_id))
        if raw is None:
            raise _not_found(conn_id)
        return Connection.model_validate_json(raw)

    @guard("looking up a Close user")
    def find_by_close_user(self, close_user_id: str) -> Connection | None:
        conn_id = self.redis.get(self.keys.close_user(close_user_id))
        if conn_id is None:
            return None
        raw = self.redis.get(self.keys.conn(as_text(conn_id)))
        return None if raw is None else Connection.model_validate_json(raw)

    @guard("reading a connection's grants")
    def grants(self, conn_id: str) -> Grants:
        sealed = self.redis.get(self.keys.grants(conn_id))
        if sealed is None:
            raise _not_found(conn_id)
        data = json.loads(self.box.open(as_text(sealed), owner=Owner.connection(conn_id)))
        ref = data.pop("calendly_ref", None)
        if ref is not None:
            data["calendly"] = self.shared_grant(ref)
        return Grants.model_validate(data)

    def _shared_ref(self, conn_id: str) -> str | None:
        """The shared Calendly grant a connection refers to, if any."""
        sealed = self.redis.get(self.keys.grants(conn_id))
        if sealed is None:
            raise _not_found(conn_id)
        own = self.box.open(as_text(sealed), owner=Owner.connection(conn_id))
        ref = json.loads(own).get("calendly_ref")
        return None if ref is None else str(ref)

    @guard("reading a shared Calendly grant")
    def shared_grant(self, ref: str) -> Grant:
        sealed = self.redis.get(self.keys.calendly_org_grant(ref))
        if sealed is None:
            raise ConnectionNotFound(
                f"no shared Calendly credential {ref!r}: the organization was disconnected; "
                "an owner or admin must run `closesync connect --organization` again"
            )
        return Grant.model_validate_json(
            self.box.open(as_text(sealed), owner=Owner.organization(ref))
        )

    @guard("writing a shared Calendly grant")
    def set_shared_grant(self, ref: str, grant: Grant) -> None:
        sealed = self.box.seal(grant_json(grant), owner=Owner.organization(ref))
        self.redis.set(self.keys.calendly_org_grant(ref), sealed)

    @guard("writing a connection's grants")
    def set_grants(self, conn_id: str, grants: Grants) -> None:
        if not self.redis.exists(self.keys.conn(conn_id)):
            raise _not_found(conn_id)
        sealed = self.box.seal(_grants_json(grants), owner=Owner.connection(conn_id))
        self.redis.set(self.keys.grants(conn_id), sealed)

    @guard("writing a refreshed grant")
    def update_grant(self, conn_id: str, side: Side, grant: Grant) -> None:
        """Replace one side's grant; WATCH keeps a concurrent update of the other side.

        The Calendly side of a connection in organization mode is the shared grant: it is
        written there, where every connection of that organization reads it.
        """
        if side == "calendly":
            ref = self._shared_ref(conn_id)
            if ref is not None:
                self.set_shared_grant(ref, grant)
                return

        def apply(pipe: redis.client.Pipeline) -> None:
            sealed = pipe.get(self.keys.grants(conn_id))
            if sealed is None:
                raise _not_found(conn_id)
            owner = Owner.connection(conn_id)
            current = Grants.model_validate_json(self.box.open(as_text(sealed), owner=owner))
            updated = current.model_copy(update={side: grant})
            pipe.multi()
            pipe.set(self.keys.grants(conn_id), self.box.seal(_grants_json(updated), owner=owner))

        watched(self.redis, self.keys.grants(conn_id), apply)

    @guard("listing connections")
    def list(self) -> list[Connection]:
        """Every connection, oldest first."""
        ids = sorted(as_text(member) for member in self.redis.smembers(self.keys.connections()))
        if not ids:
            return []
        raws = self.redis.mget([self.keys.conn(conn_id) for conn_id in ids])
        found = [Connection.model_validate_json(raw) for raw in raws if raw is not None]
        return sorted(found, key=lambda c: (c.created_at, c.id))

    @guard("changing a connection's state")
    def set_state(
        self,
        conn_id: str,
        state: ConnectionState,
        reason: str | None = None,
        *,
        now: float | None = None,
    ) -> Connection:
        at = time.time() if now is None else now
        return self._modify(
            conn_id,
            lambda c: c.model_copy(
                update={"state": state, "state_reason": reason, "updated_at": at}
            ),
        )

    @guard("changing a connection's options")
    def set_options(self, conn_id: str, options: ConnectionOptions) -> Connection:
        """Replace the connection's own mapping options (None fields follow the global setting)."""
        at = time.time()
        return self._modify(
            conn_id, lambda c: c.model_copy(update={"options": options, "updated_at": at})
        )

    def _modify(self, conn_id: str, change: Callable[[Connection], Connection]) -> Connection:
        key = self.keys.conn(conn_id)

        def apply(pipe: redis.client.Pipeline) -> Connection:
            raw = pipe.get(key)
            if raw is None:
                raise _not_found(conn_id)
            updated = change(Connection.model_validate_json(raw))
            pipe.multi()
            pipe.set(key, updated.model_dump_json())
            return updated

        return watched(self.redis, key, apply)

    @guard("removing a connection")
    def remove(self, conn_id: str) -> None:
        """Erase every key of the connection; ConnectionNotFound if there was no record."""
        raw = self.redis.get(self.keys.conn(conn_id))
        close_user = None if raw is None else Connection.model_validate_json(raw).close_user_id
        with self.redis.pipeline(transaction=True) as pipe:
            if (
                close_user is not None
                and self.redis.get(self.keys.close_user(close_user)) == conn_id
            ):
                pipe.delete(self.keys.close_user(close_user))
            pipe.delete(*self.keys.of_connection(conn_id))
            pipe.srem(self.keys.connections(), conn_id)
            pipe.execute()
        if raw is None:
            raise _not_found(conn_id)
