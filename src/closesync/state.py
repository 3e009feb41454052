"""Everything closesync keeps in Redis, and the only module that names a Redis key.

Every key starts with a prefix (`settings.redis_prefix`, default `closesync`, written `{p}`), so
one Redis can serve several deployments. `{id}` is a connection id (`conn_` + 12 hex).

    {p}:connections                 SET     ids of every stored connection               no TTL
    {p}:conn:{id}                   STRING  JSON Connection (public fields, no secret)   no TTL
    {p}:conn:{id}:grants            STRING  Grants JSON sealed by a SecretBox            no TTL
    {p}:close-user:{close_user_id}  STRING  -> connection id: adding the same Close user
                                            again updates its connection, no duplicate   no TTL
    {p}:conn:{id}:links             HASH    source_id -> JSON LinkRecord {fingerprint,
                                            event_type_uri, missing}: what Close accepted no TTL
    {p}:conn:{id}:rejected          HASH    source_id -> JSON {fingerprint, error}: a
                                            payload Close refused, not resent unchanged  no TTL
    {p}:conn:{id}:held              STRING  JSON {source_ids, reason, at}: deletions held
                                            by the mass-delete guard; absent = none      no TTL
    {p}:conn:{id}:reports           LIST    RunReport JSON, newest first, LTRIMmed to
                                            settings.reports_kept                        no TTL
    {p}:conn:{id}:lock              STRING  run lock: random token of the holder   PX run_lock_ttl
    {p}:conn:{id}:rerun             STRING  "1": a sync was asked for while one ran;
                                            the running one runs again once          EX 1 day
    {p}:conn:{id}:backfill          HASH    backfill progress: cursor, done, total,
                                            started_at                                   no TTL
    {p}:refresh-lock:{grant_key}    STRING  single-flight token refresh of one grant
                                            (grant_key: credentials.grant_lock_name,
                                            side + hash of the id): holder's token  PX ~30 s
    {p}:tick:{name}:{slot}          STRING  "1": this scheduled tick was enqueued once     EX ttl
    {p}:scheduler:leader            STRING  token of the scheduler allowed to enqueue      PX ttl
    {p}:oauth-state:{digest}        STRING  an OAuth flow under way, sealed JSON (provider,
                                            redirect URI, PKCE verifier, the Close grant
                                            awaiting its Calendly side); digest = sha256 of
                                            the `state` parameter; GETDEL = single use  EX 600 s
    {p}:calendly-orgs               SET     refs (organization uuids) of the shared Calendly
                                            organization credentials (organization mode) no TTL
    {p}:calendly-org:{ref}          STRING  JSON public facts of the organization and of
                                            the owner/admin who authorized it           no TTL
    {p}:calendly-org:{ref}:grant    STRING  the shared Calendly Grant JSON, sealed; read
                                            and refreshed by every connection whose
                                            calendly_grant_ref is {ref}, under ONE refresh
                                            lock (credentials.shared_lock_key)          no TTL
    {p}:calendly-org:{ref}:members  STRING  JSON [{uri, email, name}] of the members as
                                            last listed, for `closesync status`          no TTL
    {p}:waiting-close               HASH    close_user_id -> JSON {email, organization_id,
                                            at}: Close users who authorized in organization
                                            mode but match no Calendly member (yet)     no TTL
    {p}:waiting-close:{user}:grant  STRING  that Close user's Grant JSON, sealed         no TTL

A connection whose `calendly_grant_ref` is set stores only its Close grant in `:grants` (sealed
JSON `{"close": ..., "calendly_ref": ref}`); `grants()` and `update_grant()` read and write the
Calendly side at the shared `calendly-org:{ref}:grant`.

Writes that must not be seen half-done (saving a connection, replacing the records) are one
MULTI/EXEC; read-modify-writes of a connection or of its grants WATCH their key, so a concurrent
token refresh is never overwritten by a stale copy (a refresh token is single-use: losing the new
one means the user must authorize again). `SyncState` writes for one connection assume the caller
holds that connection's run lock (`closesync.locks`). Every Redis error leaves this module as
StoreUnavailable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

import redis

from closesync.connection import Connection, ConnectionState, Grant, Grants
from closesync.errors import ConnectionNotFound
from closesync.plan import LinkRecord
from closesync.redis_conn import guard
from closesync.report import RunReport
from closesync.secretbox import FernetBox, SecretBox

Side = Literal["close", "calendly"]

# Seconds a rerun flag lives: a flag left by a crashed run only causes one extra run, but none
# should linger for ever on a connection that is never run again.
RERUN_TTL_SECONDS = 24 * 3600


T = TypeVar("T")
# redis-py's stubs type hash mappings with invariant keys; our field maps are plain str -> str.
Fields = dict[Any, Any]


def _text(value: bytes | str) -> str:
    """A reply as text whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def _watched(client: redis.Redis, key: str, apply: Callable[[redis.client.Pipeline], T]) -> T:
    """Run `apply` (read, then `pipe.multi()`, then queue writes) until no one changed `key`."""
    while True:
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                result = apply(pipe)
                pipe.execute()
                return result
            except redis.WatchError:
                continue


class Keys:
    """Every key name closesync uses, under one prefix. Nothing else formats a key."""

    def __init__(self, prefix: str = "closesync") -> None:
        self.prefix = prefix

    def connections(self) -> str:
        return f"{self.prefix}:connections"

    def conn(self, conn_id: str) -> str:
        return f"{self.prefix}:conn:{conn_id}"

    def grants(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:grants"

    def close_user(self, close_user_id: str) -> str:
        return f"{self.prefix}:close-user:{close_user_id}"

    def links(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:links"

    def rejected(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:rejected"

    def held(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:held"

    def reports(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:reports"

    def run_lock(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:lock"

    def rerun(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:rerun"

    def backfill(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:backfill"

    def refresh_lock(self, grant_key: str) -> str:
        return f"{self.prefix}:refresh-lock:{grant_key}"

    def tick(self, name: str, slot: str) -> str:
        return f"{self.prefix}:tick:{name}:{slot}"

    def scheduler_leader(self) -> str:
        return f"{self.prefix}:scheduler:leader"

    def oauth_state(self, digest: str) -> str:
        return f"{self.prefix}:oauth-state:{digest}"

    def calendly_orgs(self) -> str:
        return f"{self.prefix}:calendly-orgs"

    def calendly_org(self, ref: str) -> str:
        return f"{self.prefix}:calendly-org:{ref}"

    def calendly_org_grant(self, ref: str) -> str:
        return f"{self.calendly_org(ref)}:grant"

    def calendly_org_members(self, ref: str) -> str:
        return f"{self.calendly_org(ref)}:members"

    def waiting_close(self) -> str:
        return f"{self.prefix}:waiting-close"

    def waiting_close_grant(self, close_user_id: str) -> str:
        return f"{self.waiting_close()}:{close_user_id}:grant"

    def of_connection(self, conn_id: str) -> list[str]:
        """Every key of one connection, but the Close user index and the refresh locks.

        A refresh lock is named by an opaque grant key and lives seconds; it is left to expire.
        """
        return [
            self.conn(conn_id),
            self.grants(conn_id),
            self.links(conn_id),
            self.rejected(conn_id),
            self.held(conn_id),
            self.reports(conn_id),
            self.run_lock(conn_id),
            self.rerun(conn_id),
            self.backfill(conn_id),
        ]


def _grant_dict(grant: Grant) -> dict[str, Any]:
    """One grant with its secrets revealed: only ever handed to a SecretBox."""
    return {
        "kind": grant.kind,
        "access_token": grant.access_token.get_secret_value(),
        "refresh_token": (grant.refresh_token.get_secret_value() if grant.refresh_token else None),
        "expires_at": grant.expires_at,
    }


def _grants_json(grants: Grants) -> bytes:
    """Grants with their secrets revealed: only ever handed to a SecretBox."""
    return json.dumps(
        {"close": _grant_dict(grants.close), "calendly": _grant_dict(grants.calendly)}
    ).encode()


def grant_json(grant: Grant) -> bytes:
    """One grant with its secrets revealed: only ever handed to a SecretBox."""
    return json.dumps(_grant_dict(grant)).encode()


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
        self._save(connection, self.box.seal(_grants_json(grants)))

    @guard("saving a connection")
    def save_shared(self, connection: Connection, close: Grant) -> None:
        """Store a connection whose Calendly grant is the shared one of `calendly_grant_ref`."""
        ref = connection.calendly_grant_ref
        if ref is None or not self.redis.exists(self.keys.calendly_org_grant(ref)):
            raise ValueError("save_shared needs a stored shared Calendly grant to refer to")
        own = json.dumps({"close": _grant_dict(close), "calendly_ref": ref}).encode()
        self._save(connection, self.box.seal(own))

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
        raw = self.redis.get(self.keys.conn(_text(conn_id)))
        return None if raw is None else Connection.model_validate_json(raw)

    @guard("reading a connection's grants")
    def grants(self, conn_id: str) -> Grants:
        sealed = self.redis.get(self.keys.grants(conn_id))
        if sealed is None:
            raise _not_found(conn_id)
        data = json.loads(self.box.open(_text(sealed)))
        ref = data.pop("calendly_ref", None)
        if ref is not None:
            data["calendly"] = self.shared_grant(ref)
        return Grants.model_validate(data)

    def _shared_ref(self, conn_id: str) -> str | None:
        """The shared Calendly grant a connection refers to, if any."""
        sealed = self.redis.get(self.keys.grants(conn_id))
        if sealed is None:
            raise _not_found(conn_id)
        ref = json.loads(self.box.open(_text(sealed))).get("calendly_ref")
        return None if ref is None else str(ref)

    @guard("reading a shared Calendly grant")
    def shared_grant(self, ref: str) -> Grant:
        sealed = self.redis.get(self.keys.calendly_org_grant(ref))
        if sealed is None:
            raise ConnectionNotFound(
                f"no shared Calendly credential {ref!r}: the organization was disconnected; "
                "an owner or admin must run `closesync connect --organization` again"
            )
        return Grant.model_validate_json(self.box.open(_text(sealed)))

    @guard("writing a shared Calendly grant")
    def set_shared_grant(self, ref: str, grant: Grant) -> None:
        self.redis.set(self.keys.calendly_org_grant(ref), self.box.seal(grant_json(grant)))

    @guard("writing a connection's grants")
    def set_grants(self, conn_id: str, grants: Grants) -> None:
        if not self.redis.exists(self.keys.conn(conn_id)):
            raise _not_found(conn_id)
        self.redis.set(self.keys.grants(conn_id), self.box.seal(_grants_json(grants)))

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
            current = Grants.model_validate_json(self.box.open(_text(sealed)))
            updated = current.model_copy(update={side: grant})
            pipe.multi()
            pipe.set(self.keys.grants(conn_id), self.box.seal(_grants_json(updated)))

        _watched(self.redis, self.keys.grants(conn_id), apply)

    @guard("listing connections")
    def list(self) -> list[Connection]:
        """Every connection, oldest first."""
        ids = sorted(_text(member) for member in self.redis.smembers(self.keys.connections()))
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

        return _watched(self.redis, key, apply)

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

    @guard("re-encrypting grants")
    def rotate_keys(self, box: FernetBox) -> int:
        """Re-seal every stored grant under `box`'s first key; how many were re-sealed.

        Connections' grants, the shared organization credentials and the grants of Close users
        waiting for a Calendly match; an OAuth flow under way lives minutes and is left to expire.
        """
        sealed_keys = [
            self.keys.grants(_text(m)) for m in self.redis.smembers(self.keys.connections())
        ]
        sealed_keys += [
            self.keys.calendly_org_grant(_text(m))
            for m in self.redis.smembers(self.keys.calendly_orgs())
        ]
        sealed_keys += [
            self.keys.waiting_close_grant(_text(f))
            for f in self.redis.hkeys(self.keys.waiting_close())
        ]
        count = 0
        for key in sorted(sealed_keys):

            def apply(pipe: redis.client.Pipeline, key: str = key) -> bool:
                sealed = pipe.get(key)
                if sealed is None:
                    return False
                pipe.multi()
                pipe.set(key, box.rotate(_text(sealed)))
                return True

            if _watched(self.redis, key, apply):
                count += 1
        return count


@dataclass(frozen=True)
class HeldDeletions:
    """Deletions the mass-delete guard held back, waiting for `--allow-mass-delete`."""

    source_ids: list[str]
    reason: str | None
    at: float


@dataclass(frozen=True)
class BackfillProgress:
    """How far a backfill got, so an interrupted one can resume from `cursor`."""

    started_at: float
    cursor: str | None = None
    done: int = 0
    total: int | None = None


class SyncState:
    """Per-connection sync bookkeeping: link records, rejections, holds, reports, flags."""

    def __init__(self, redis: redis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    # --- link records ---------------------------------------------------------------------------

    @guard("reading link records")
    def records(self, conn_id: str) -> dict[str, LinkRecord]:
        raw = self.redis.hgetall(self.keys.links(conn_id))
        return {_text(sid): LinkRecord(**json.loads(value)) for sid, value in raw.items()}

    @guard("recording a write")
    def record_write(self, conn_id: str, source_id: str, record: LinkRecord) -> None:
        """Close accepted `record`: remember it, and forget any earlier rejection of the link."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.links(conn_id), source_id, json.dumps(asdict(record)))
            pipe.hdel(self.keys.rejected(conn_id), source_id)
            pipe.execute()

    @guard("forgetting a link")
    def forget(self, conn_id: str, source_id: str) -> None:
        self.redis.hdel(self.keys.links(conn_id), source_id)

    @guard("recording missing counts")
    def set_missing(self, conn_id: str, counts: dict[str, int]) -> None:
        """Set `missing` of existing records; a source_id without a record is ignored."""
        if not counts:
            return
        key = self.keys.links(conn_id)
        ordered = sorted(counts)
        current = self.redis.hmget(key, ordered)
        updates: Fields = {
            source_id: json.dumps({**json.loads(raw), "missing": counts[source_id]})
            for source_id, raw in zip(ordered, current, strict=True)
            if raw is not None
        }
        if updates:
            self.redis.hset(key, mapping=updates)

    @guard("replacing link records")
    def replace_records(self, conn_id: str, records: dict[str, LinkRecord]) -> None:
        """Swap every record at once (backfill rebuilds them from what Close holds)."""
        key = self.keys.links(conn_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if records:
                encoded: Fields = {sid: json.dumps(asdict(rec)) for sid, rec in records.items()}
                pipe.hset(key, mapping=encoded)
            pipe.execute()

    # --- rejections -----------------------------------------------------------------------------

    def _rejections(self, conn_id: str) -> dict[str, dict[str, str]]:
        raw = self.redis.hgetall(self.keys.rejected(conn_id))
        return {_text(sid): json.loads(value) for sid, value in raw.items()}

    @guard("reading rejections")
    def rejected(self, conn_id: str) -> dict[str, str]:
        """source_id -> fingerprint of the payload Close refused."""
        return {sid: entry["fingerprint"] for sid, entry in self._rejections(conn_id).items()}

    @guard("reading rejections")
    def rejected_errors(self, conn_id: str) -> dict[str, str]:
        """source_id -> why Close refused it."""
        return {sid: entry["error"] for sid, entry in self._rejections(conn_id).items()}

    @guard("recording a rejection")
    def record_rejection(self, conn_id: str, source_id: str, fingerprint: str, error: str) -> None:
        entry = json.dumps({"fingerprint": fingerprint, "error": error})
        self.redis.hset(self.keys.rejected(conn_id), source_id, entry)

    # --- held deletions -------------------------------------------------------------------------

    @guard("recording held deletions")
    def set_held(self, conn_id: str, source_ids: list[str], reason: str | None, at: float) -> None:
        """Remember the held deletions; an empty list clears them."""
        if not source_ids:
            self.redis.delete(self.keys.held(conn_id))
            return
        held = {"source_ids": source_ids, "reason": reason, "at": at}
        self.redis.set(self.keys.held(conn_id), json.dumps(held))

    @guard("reading held deletions")
    def held(self, conn_id: str) -> HeldDeletions | None:
        raw = self.redis.get(self.keys.held(conn_id))
        if raw is None:
            return None
        data = json.loads(raw)
        return HeldDeletions(list(data["source_ids"]), data["reason"], float(data["at"]))

    # --- reports --------------------------------------------------------------------------------

    @guard("storing a run report")
    def push_report(self, conn_id: str, report: RunReport, keep: int) -> None:
        """Prepend the report and keep only the newest `keep`."""
        key = self.keys.reports(conn_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, report.model_dump_json())
            pipe.ltrim(key, 0, max(keep, 1) - 1)
            pipe.execute()

    @guard("reading run reports")
    def reports(self, conn_id: str, limit: int = 20) -> list[RunReport]:
        """Newest first."""
        if limit <= 0:
            return []
        raw = self.redis.lrange(self.keys.reports(conn_id), 0, limit - 1)
        return [RunReport.model_validate_json(item) for item in raw]

    @guard("reading the last run report")
    def last_report(self, conn_id: str) -> RunReport | None:
        raw = self.redis.lindex(self.keys.reports(conn_id), 0)
        return None if raw is None else RunReport.model_validate_json(raw)

    # --- rerun flag -----------------------------------------------------------------------------

    @guard("requesting a rerun")
    def request_rerun(self, conn_id: str) -> None:
        self.redis.set(self.keys.rerun(conn_id), "1", ex=RERUN_TTL_SECONDS)

    @guard("reading the rerun flag")
    def pop_rerun(self, conn_id: str) -> bool:
        """Whether a rerun was requested; the request is consumed."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.rerun(conn_id))
            pipe.delete(self.keys.rerun(conn_id))
            value, _ = pipe.execute()
        return value is not None

    # --- backfill progress ----------------------------------------------------------------------

    @guard("reading backfill progress")
    def backfill_progress(self, conn_id: str) -> BackfillProgress | None:
        raw = self.redis.hgetall(self.keys.backfill(conn_id))
        if not raw:
            return None
        return BackfillProgress(
            started_at=float(raw["started_at"]),
            cursor=_text(raw.get("cursor") or "") or None,
            done=int(raw.get("done", 0)),
            total=int(raw["total"]) if raw.get("total") else None,
        )

    @guard("recording backfill progress")
    def set_backfill_progress(self, conn_id: str, progress: BackfillProgress) -> None:
        fields: Fields = {
            "started_at": repr(progress.started_at),
            "cursor": progress.cursor or "",
            "done": str(progress.done),
            "total": "" if progress.total is None else str(progress.total),
        }
        self.redis.hset(self.keys.backfill(conn_id), mapping=fields)

    @guard("clearing backfill progress")
    def clear_backfill(self, conn_id: str) -> None:
        self.redis.delete(self.keys.backfill(conn_id))

    # --- scheduler ticks ------------------------------------------------------------------------

    @guard("claiming a scheduler tick")
    def claim_tick(self, name: str, slot: str, ttl_seconds: int) -> bool:
        """True for exactly one caller per (name, slot) within `ttl_seconds`."""
        return bool(self.redis.set(self.keys.tick(name, slot), "1", nx=True, ex=ttl_seconds))
