"""Connections and their grants in Redis; the grants sealed by a SecretBox, never in the clear.

The key layout is in `closesync.store.keys`. Nothing secret is ever written to a connection's public
record; the grants sit under their own key, sealed, and are opened only by `grants()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

import redis

from closesync.core.connection import (
    Connection,
    ConnectionOptions,
    ConnectionState,
    Grant,
    Grants,
    Side,
)
from closesync.core.errors import (
    ConnectionNotFound,
    ConnectionRemoved,
    EncryptionError,
    PairingRefused,
)
from closesync.core.mapping import parse_source_id
from closesync.store.client import guard
from closesync.store.index_backfill import IndexBackfill
from closesync.store.keys import Keys, Owner, as_text, watched
from closesync.store.secretbox import SecretBox

# Seconds the removal mark outlives a removed connection: far longer than a task can run, be
# retried (rate limits, a busy connection) or wait for redelivery (BROKER_VISIBILITY_TIMEOUT), so
# every late write of a run that read the connection before it went finds the mark. A run paused
# for longer (a stopped VM) could write again after it expires; the mark cannot stay for ever.
REMOVED_TTL_SECONDS = 7 * 24 * 3600
# Records one MGET of `list()` reads: a fleet of 10,000 in 10 round trips, each reply a few
# hundred kilobytes, rather than one reply as large as the whole fleet.
LIST_BATCH = 1000


# Sealed beside the grants: the Calendly user the connection syncs. The public record names it
# too, but only the sealed copy is beyond a Redis writer without the key (`check_calendly_user`).
_CALENDLY_USER = "calendly_user_uri"


def _grants_json(grants: Grants, calendly_user_uri: str | None = None) -> bytes:
    """Grants with their secrets revealed: only ever handed to a SecretBox."""
    own: dict[str, object] = {
        "close": grants.close.revealed(),
        "calendly": grants.calendly.revealed(),
    }
    if calendly_user_uri is not None:
        own[_CALENDLY_USER] = calendly_user_uri
    return json.dumps(own).encode()


def grant_json(grant: Grant) -> bytes:
    """One grant with its secrets revealed: only ever handed to a SecretBox."""
    return json.dumps(grant.revealed()).encode()


def _text(value: bytes | str | None) -> str | None:
    return None if value is None else as_text(value)


def _taken(wanted: Connection, holder: Connection) -> str:
    """Why `wanted` cannot be stored: `holder` already has its Calendly user."""
    calendly = wanted.calendly_email or wanted.calendly_user_uri
    close = holder.close_email or holder.close_user_id
    return (
        f"Calendly user {calendly} is already connected to Close user {close} by connection "
        f"{holder.id}; a Calendly user can have only one connection (both would write the same "
        f"source_ids in Close). Nothing was stored; remove {holder.id} first "
        f"(`closesync connections remove {holder.id}`)"
    )


def _being_removed(conn_id: str) -> ConnectionRemoved:
    return ConnectionRemoved(
        f"connection {conn_id} is being removed, or was removed moments ago, so it was not "
        f"stored again. If a `closesync connections remove {conn_id}` stopped midway, run it "
        "again to finish it; then connect again (as a new connection)"
    )


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
        """Store the connection, its grants and its user indexes in one transaction.

        PairingRefused, and nothing written, when another connection has its Calendly user.
        """
        own = _grants_json(grants, connection.calendly_user_uri)
        self._save(connection, self.box.seal(own, owner=Owner.connection(connection.id)))

    @guard("saving a connection")
    def save_shared(self, connection: Connection, close: Grant) -> None:
        """Store a connection whose Calendly grant is the shared one of `calendly_grant_ref`."""
        ref = connection.calendly_grant_ref
        if ref is None or not self.redis.exists(self.keys.calendly_org_grant(ref)):
            raise ValueError("save_shared needs a stored shared Calendly grant to refer to")
        own = json.dumps(
            {
                "close": close.revealed(),
                "calendly_ref": ref,
                _CALENDLY_USER: connection.calendly_user_uri,
            }
        ).encode()
        self._save(connection, self.box.seal(own, owner=Owner.connection(connection.id)))

    def _save(self, connection: Connection, sealed_grants: str) -> None:
        """Write the connection and both indexes, or refuse a Calendly user another one holds.

        The Calendly user's index is WATCHed from the check to the write: of two saves racing
        for one Calendly user, the second's transaction fails, re-reads, and is refused.

        A reconnect to another Calendly user drops, in the same transaction, what the connection
        knew of the previous one's links (records, rejections, held deletions, backfill
        progress): those source_ids name the previous Calendly user, whose links may now be
        another connection's, so no run of this one may plan from them, let alone delete them.
        The links themselves stay in Close.

        ConnectionRemoved, and nothing written, while the connection carries its removal mark
        (WATCHed too): a save that read the connection before a `remove` (an OAuth callback,
        `connections add`) would bring back a connection no run syncs while the mark lasts, and
        one whose unfinished removal, run again, would remove the fresh reconnect. A removed
        connection's user connects again as a new connection.
        """
        conn_id = connection.id
        calendly_key = self.keys.calendly_user(connection.calendly_user_uuid)

        def apply(pipe: redis.client.Pipeline) -> None:
            mark = self.keys.removed(conn_id)
            pipe.watch(self.keys.conn(conn_id), mark)  # type: ignore[no-untyped-call]
            if pipe.exists(mark):
                raise _being_removed(conn_id)
            holder = self._calendly_holder(pipe, connection)
            if holder is not None:
                raise PairingRefused(_taken(connection, holder), connection_id=holder.id)
            previous = pipe.get(self.keys.conn(conn_id))
            # Index entries of the previous record that this save makes wrong, if still ours.
            moved: list[str] = []
            forgotten: list[str] = []
            old_ref: str | None = None
            if previous is not None:
                old = Connection.model_validate_json(previous)
                old_ref = old.calendly_grant_ref
                if old.close_user_id != connection.close_user_id:
                    moved.append(self.keys.close_user(old.close_user_id))
                if old.calendly_user_uuid != connection.calendly_user_uuid:
                    moved.append(self.keys.calendly_user(old.calendly_user_uuid))
                    forgotten = [
                        self.keys.links(conn_id),
                        self.keys.rejected(conn_id),
                        self.keys.held(conn_id),
                        self.keys.backfill(conn_id),
                    ]
            stale = [key for key in moved if _text(pipe.get(key)) == conn_id]
            # The holders entries of the links forgotten with the previous Calendly user, read
            # under WATCH: a link recorded meanwhile (a run still going) aborts and re-reads,
            # rather than leave a holders entry that nothing would remove.
            unheld: list[str] = []
            if forgotten:
                pipe.watch(self.keys.links(conn_id))  # type: ignore[no-untyped-call]
                unheld = self._holder_sets(pipe.hkeys(self.keys.links(conn_id)))
            new_ref = connection.calendly_grant_ref
            pipe.multi()
            if stale or forgotten:
                pipe.delete(*stale, *forgotten)
            for holders in unheld:
                pipe.srem(holders, conn_id)
            if old_ref is not None and old_ref != new_ref:
                pipe.srem(self.keys.calendly_org_connections(old_ref), conn_id)
            if new_ref is not None:
                pipe.sadd(self.keys.calendly_org_connections(new_ref), conn_id)
            pipe.set(self.keys.conn(conn_id), connection.model_dump_json())
            pipe.set(self.keys.grants(conn_id), sealed_grants)
            pipe.set(self.keys.close_user(connection.close_user_id), conn_id)
            pipe.set(calendly_key, conn_id)
            pipe.sadd(self.keys.connections(), conn_id)

        watched(self.redis, calendly_key, apply)

    def _holder_sets(self, source_ids: Iterable[bytes | str]) -> list[str]:
        """The `event-type:{uuid}:holders` sets of the event types these source_ids name."""
        found = {parse_source_id(as_text(sid)) for sid in source_ids}
        return sorted(self.keys.event_type_holders(p[1]) for p in found if p is not None)

    def _calendly_holder(
        self, pipe: redis.client.Pipeline, connection: Connection
    ) -> Connection | None:
        """The other stored connection of `connection`'s Calendly user, if there is one."""
        holder_id = _text(pipe.get(self.keys.calendly_user(connection.calendly_user_uuid)))
        if holder_id is not None:
            raw = pipe.get(self.keys.conn(holder_id))
            # An index entry whose connection is gone holds nothing.
            holder = None if raw is None else Connection.model_validate_json(raw)
            return holder if holder is not None and holder.id != connection.id else None
        # No index entry: records saved before the index existed are found by their user, until
        # one such scan has indexed them all. Scanning at every save made adding N connections
        # cost N^2 record reads (hours for a sales floor of 10,000); after the first, a missing
        # entry means no holder, as every save since writes its entry.
        if pipe.exists(self.keys.calendly_index_complete()):
            return None
        ids = sorted(as_text(m) for m in pipe.smembers(self.keys.connections()))
        records = [
            Connection.model_validate_json(raw)
            for start in range(0, len(ids), LIST_BATCH)
            for raw in pipe.mget([self.keys.conn(i) for i in ids[start : start + LIST_BATCH]])
            if raw is not None
        ]
        # Writing the entry of the watched Calendly user (a holder found here) aborts this
        # transaction: the retry finds the holder in the index and refuses as before.
        for found in records:
            pipe.set(self.keys.calendly_user(found.calendly_user_uuid), found.id, nx=True)
        pipe.set(self.keys.calendly_index_complete(), "1")
        return next(
            (
                found
                for found in records
                if found.id != connection.id
                and found.calendly_user_uuid == connection.calendly_user_uuid
            ),
            None,
        )

    @guard("reading a connection")
    def get(self, conn_id: str) -> Connection:
        raw = self.redis.get(self.keys.conn(conn_id))
        if raw is None:
            raise _not_found(conn_id)
        return Connection.model_validate_json(raw)

    @guard("reading a removal mark")
    def is_removing(self, conn_id: str) -> bool:
        """Whether the connection carries its removal mark (a `remove` under way or just done)."""
        return bool(self.redis.exists(self.keys.removed(conn_id)))

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

    @guard("reading a connection's grants")
    def shared_ref(self, conn_id: str) -> str | None:
        """The shared Calendly grant a connection refers to, as sealed now; None: its own grant.

        The sealed value, not the public record: it is what a refresh reads and writes.
        """
        sealed = self.redis.get(self.keys.grants(conn_id))
        if sealed is None:
            raise _not_found(conn_id)
        own = self.box.open(as_text(sealed), owner=Owner.connection(conn_id))
        ref = json.loads(own).get("calendly_ref")
        return None if ref is None else str(ref)

    @guard("reading a connection's grants")
    def check_calendly_user(self, connection: Connection) -> None:
        """EncryptionError unless the Calendly user sealed with the grants is the record's.

        A run reads the Calendly user its public record names; with an organization's admin
        grant (which reads every member) a Redis writer could point the record at another member
        and have their event types written to this Close user. A value sealed before the user
        was sealed with it names none, and passes.
        """
        sealed = self.redis.get(self.keys.grants(connection.id))
        if sealed is None:
            raise _not_found(connection.id)
        own = json.loads(self.box.open(as_text(sealed), owner=Owner.connection(connection.id)))
        user = own.get(_CALENDLY_USER)
        if user is not None and user != connection.calendly_user_uri:
            raise EncryptionError(
                f"connection {connection.id}'s record names another Calendly user than the one "
                "its grants were sealed for: the record was changed in Redis, so it is not "
                "synced; connect again to repair it"
            )

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

    @guard("marking a shared Calendly credential refused")
    def mark_shared_refused(self, ref: str, reason: str, *, now: float | None = None) -> bool:
        """Record that Calendly refused the shared grant `ref`; False if already recorded.

        Set once (NX): the first run that met the refusal says why; the others, and every
        later run of the organization's connections, are skipped until it reconnects.
        """
        at = time.time() if now is None else now
        entry = json.dumps({"reason": reason, "at": at})
        return bool(self.redis.set(self.keys.calendly_org_refused(ref), entry, nx=True))

    @guard("reading a shared Calendly credential's state")
    def shared_refused(self, ref: str) -> str | None:
        """Why the shared grant `ref` needs re-authorization; None while it is usable."""
        raw = self.redis.get(self.keys.calendly_org_refused(ref))
        return None if raw is None else str(json.loads(raw)["reason"])

    @guard("reading shared Calendly credentials' state")
    def shared_refused_of(self, refs: Iterable[str]) -> dict[str, str | None]:
        """`shared_refused` of each ref, in one MGET (a fleet has few organizations)."""
        ordered = sorted(set(refs))
        if not ordered:
            return {}
        raws = self.redis.mget([self.keys.calendly_org_refused(ref) for ref in ordered])
        return {
            ref: None if raw is None else str(json.loads(raw)["reason"])
            for ref, raw in zip(ordered, raws, strict=True)
        }

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

        def apply(pipe: redis.client.Pipeline) -> str | None:
            sealed = pipe.get(self.keys.grants(conn_id))
            if sealed is None:
                raise _not_found(conn_id)
            owner = Owner.connection(conn_id)
            own = json.loads(self.box.open(as_text(sealed), owner=owner))
            ref = own.get("calendly_ref")
            user = own.get(_CALENDLY_USER)
            if ref is None:
                current = Grants.model_validate(own)
                updated = _grants_json(current.model_copy(update={side: grant}), user)
            elif side == "calendly":
                return str(ref)  # the shared grant: written below, where all its users read it
            else:
                # Organization mode: the own value holds the Close grant and the shared grant's
                # ref, no Calendly grant. It must be rewritten in that shape: the refresh that
                # called us already spent the old refresh token, so failing here loses the grant.
                updated = json.dumps(
                    {"close": grant.revealed(), "calendly_ref": ref, _CALENDLY_USER: user}
                ).encode()
            pipe.multi()
            pipe.set(self.keys.grants(conn_id), self.box.seal(updated, owner=owner))
            return None

        shared = watched(self.redis, self.keys.grants(conn_id), apply)
        if shared is not None:
            self.set_shared_grant(shared, grant)

    @guard("reading an organization's connections")
    def of_organization(self, ref: str) -> set[str]:
        """Ids of the connections whose calendly_grant_ref is `ref` now: whom its subscription
        serves. Reads every member's record (one MGET per LIST_BATCH): for worker tasks only.

        Saves and removals keep the set; connections saved before it existed are added by a
        one-time backfill (`closesync.store.index_backfill`). A member whose record no longer
        names `ref` (removed, or moved by a save that raced an older index write) is not
        returned, and is dropped from the set.
        """
        IndexBackfill(self.redis, self.keys).organizations()
        key = self.keys.calendly_org_connections(ref)
        members = {as_text(m) for m in self.redis.smembers(key)}
        refs: dict[str, str | None] = {}
        ordered = sorted(members)
        for start in range(0, len(ordered), LIST_BATCH):
            refs.update(self.organization_refs(ordered[start : start + LIST_BATCH]))
        served = {conn_id for conn_id in members if refs.get(conn_id) == ref}
        stale = members - served
        if stale:
            self._drop_stale(ref, stale)
        return served

    def _drop_stale(self, ref: str, candidates: set[str]) -> None:
        """SREM the members that still do not name `ref`, under WATCH of their records (a save
        adding one back between the read and the SREM aborts, and the entry stays)."""
        key = self.keys.calendly_org_connections(ref)
        ordered = sorted(candidates)
        records = [self.keys.conn(conn_id) for conn_id in ordered]

        def apply(pipe: redis.client.Pipeline) -> None:
            pipe.watch(*records)  # type: ignore[no-untyped-call]
            raws = pipe.mget(records)
            gone = [
                conn_id
                for conn_id, raw in zip(ordered, raws, strict=True)
                if raw is None or Connection.model_validate_json(raw).calendly_grant_ref != ref
            ]
            pipe.multi()
            if gone:
                pipe.srem(key, *gone)

        watched(self.redis, key, apply)

    @guard("reading connections")
    def organization_refs(self, conn_ids: Iterable[str]) -> dict[str, str | None]:
        """Each stored connection's calendly_grant_ref (None: its own grant), in one MGET."""
        ordered = sorted(set(conn_ids))
        if not ordered:
            return {}
        raws = self.redis.mget([self.keys.conn(conn_id) for conn_id in ordered])
        return {
            conn_id: Connection.model_validate_json(raw).calendly_grant_ref
            for conn_id, raw in zip(ordered, raws, strict=True)
            if raw is not None
        }

    @guard("looking up a Calendly user")
    def id_of_calendly_user(self, calendly_user_uuid: str) -> str | None:
        """The id of the connection of that Calendly user, from its index; None: none."""
        return _text(self.redis.get(self.keys.calendly_user(calendly_user_uuid)))

    @guard("listing connections")
    def list(self) -> list[Connection]:
        """Every connection, oldest first."""
        ids = sorted(as_text(member) for member in self.redis.smembers(self.keys.connections()))
        found: list[Connection] = []
        for start in range(0, len(ids), LIST_BATCH):
            batch = ids[start : start + LIST_BATCH]
            raws = self.redis.mget([self.keys.conn(conn_id) for conn_id in batch])
            found.extend(Connection.model_validate_json(raw) for raw in raws if raw is not None)
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

    @guard("marking a connection removed")
    def mark_removing(self, conn_id: str, *, now: float | None = None) -> bool:
        """Set the removal mark, without TTL: from now on no run of the connection writes.

        NX: a mark already there stays as it is, the one of a removal that stopped midway (run
        again) or, with its TTL, the one of a removal that just finished (never made lasting).
        Whether this call set it.
        """
        at = time.time() if now is None else now
        return bool(self.redis.set(self.keys.removed(conn_id), json.dumps({"at": at}), nx=True))

    @guard("clearing a removal mark")
    def unmark_removing(self, conn_id: str) -> None:
        """Drop the mark of a removal that changed nothing (it could not take the run lock).

        Only for a mark that removal set itself: one left by a removal that stopped midway must
        stay until the removal is finished.
        """
        self.redis.delete(self.keys.removed(conn_id))

    @guard("removing a connection")
    def remove(self, conn_id: str, *, lock_held: bool = False) -> None:
        """Erase every key of the connection; ConnectionNotFound if there was no record.

        The removal mark is (re)set in the same transaction, now with its TTL, so that a late
        write of a run that read the connection before finds it and is refused. `lock_held`: the
        caller holds the run lock and releases it itself, so its key is left to that release (an
        erased lock would make the holder's renewer report it lost).
        """
        raw = self.redis.get(self.keys.conn(conn_id))
        record = None if raw is None else Connection.model_validate_json(raw)
        indexes = (
            []
            if record is None
            else [
                self.keys.close_user(record.close_user_id),
                self.keys.calendly_user(record.calendly_user_uuid),
            ]
        )
        erased = [
            key
            for key in self.keys.of_connection(conn_id)
            if not (lock_held and key == self.keys.run_lock(conn_id))
        ]
        unheld = self._holder_sets(self.redis.hkeys(self.keys.links(conn_id)))
        with self.redis.pipeline(transaction=True) as pipe:
            for index in indexes:
                if _text(self.redis.get(index)) == conn_id:
                    pipe.delete(index)
            for holders in unheld:
                pipe.srem(holders, conn_id)
            if record is not None and record.calendly_grant_ref is not None:
                pipe.srem(self.keys.calendly_org_connections(record.calendly_grant_ref), conn_id)
            pipe.delete(*erased)
            pipe.srem(self.keys.connections(), conn_id)
            if raw is not None:
                mark = json.dumps({"at": time.time()})
                pipe.set(self.keys.removed(conn_id), mark, ex=REMOVED_TTL_SECONDS)
            pipe.execute()
        if raw is None:
            raise _not_found(conn_id)
