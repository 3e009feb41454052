"""Everything closesync keeps in Redis, and the only module that names a Redis key.

Every key starts with a prefix (`settings.redis_prefix`, default `closesync`, written `{p}`), so
one Redis can serve several deployments. `{id}` is a connection id (`conn_` + 12 hex).

    {p}:connections                 SET     ids of every stored connection               no TTL
    {p}:conn:{id}                   STRING  JSON Connection (public fields, no secret)   no TTL
    {p}:conn:{id}:grants            STRING  Grants JSON sealed by a SecretBox            no TTL
    {p}:close-user:{close_user_id}  STRING  -> connection id: adding the same Close user
                                            again updates its connection, no duplicate   no TTL
    {p}:calendly-user:{uuid}        STRING  -> connection id: the one connection of that
                                            Calendly user (source_ids embed its uuid, so a
                                            second connection is refused: PairingRefused) no TTL
    {p}:calendly-user-index         STRING  "1": every record was given its calendly-user
                                            entry (a one-time scan at the first save of a
                                            store from before that index); absent = saves
                                            scan the records for their Calendly user     no TTL
    {p}:conn:{id}:links             HASH    source_id -> JSON LinkRecord {fingerprint,
                                            event_type_uri, missing, missing_since}: what
                                            Close accepted; `missing` complete listings in
                                            a row missed its event type, the first at
                                            `missing_since`, epoch seconds by Redis's
                                            TIME, one clock for all workers (null: none) no TTL
    {p}:conn:{id}:rejected          HASH    source_id -> JSON {fingerprint, error}: a
                                            payload Close refused, not resent unchanged
                                            (fingerprint "delete": a refused deletion,
                                            asked again by a backfill; dropped once the
                                            link is desired again)                       no TTL
    {p}:conn:{id}:held              STRING  JSON {source_ids, reason, at}: deletions held
                                            by the mass-delete guard; absent = none      no TTL
    {p}:conn:{id}:reports           LIST    RunReport JSON, newest first, LTRIMmed to
                                            settings.reports_kept                        no TTL
    {p}:conn:{id}:lock              STRING  run lock: random token of the holder   PX run_lock_ttl
    {p}:conn:{id}:queued            STRING  the sync marker (closesync.core.queueing):
                                            who owes the connection its next sync.
                                            "queued:<task id>": that task is queued, not
                                            started (an ask is coalesced into it; SET NX
                                            by the ask, cleared by the task as it starts);
                                            "holder": the run holding the lock runs once
                                            more when it ends (stale without the lock).
                                            Absent: an ask publishes a task
                                                                EX broker_visibility_timeout
    {p}:conn:{id}:backfill          HASH    backfill progress: cursor, done, total,
                                            started_at                                   no TTL
    {p}:removed:{id}                STRING  JSON {at}: the removal mark (tombstone), set
                                            first by `connections remove`. While it exists
                                            a run stops before its next write, a queued or
                                            redelivered task does nothing and SyncState
                                            refuses every write of the connection, so no
                                            key of it comes back. Outside conn:{id}:* as
                                            it outlives them: no TTL while the removal is
                                            under way (one that stopped midway keeps the
                                            connection out of every run until `remove` is
                                            run again), then EX 7 days, set in the MULTI
                                            that erases the connection: longer than any
                                            task, retry or redelivery lasts   no TTL, then EX 7 d
    {p}:refresh-lock:{grant_key}    STRING  single-flight token refresh of one grant
                                            (grant_key: credentials.grant_lock_name,
                                            side + hash of the id): holder's token,
                                            renewed while the token call lasts      PX ~75 s
    {p}:rate:LIMITER/{scope}[/{group}]/{n}/1/{unit}
                                    LIST    a shared rate budget (closesync.store.rate_budget):
                                            the `limits` package's moving window, the taking
                                            times of the last n requests. scope close-org:{id}
                                            or close-user:{id}, per endpoint group ("POST
                                            /scheduling_link/integration/"); calendly-user:
                                            {uuid} or calendly-org:{ref}, no group; unit second
                                            or minute                        EX the window
    {p}:rate-blocked:{scope}:{group|*} STRING the reset (seconds) an API announced with a 429
                                            or remaining=0: no process takes a request of that
                                            budget until it expires; never shortened  PX reset
    {p}:rate-budgets-seen           ZSET    "{organization}\t{group}" -> epoch seconds a
                                            process last took from that Close budget
                                            (noted at most once a minute per process), read
                                            by the closesync_rate_budget_remaining gauge;
                                            entries quiet for 10 min are dropped, at most
                                            2000 kept                       EX 10 min, renewed
    {p}:tick:{name}:{slot}          STRING  "1": this scheduled tick was enqueued once     EX ttl
    {p}:schedule:{kind}             ZSET    connection id -> epoch seconds its run of the
                                            tick is due (kind: sync | drift): the fan-out
                                            spreads a tick here (ZADD LT), the drain task
                                            publishes what is due and removes it. Kind
                                            webhook: the syncs webhook deliveries asked
                                            for, due one debounce after the first of a
                                            burst (ZADD LT: one entry per connection)  no TTL
    {p}:schedule:{kind}:drain       STRING  id of the drain task that is to drain the
                                            schedule next: one chain of drains at a time
                                                                    PX next drain + 30 s
    {p}:scheduler:leader            STRING  token of the scheduler allowed to enqueue      PX ttl
    {p}:celery:{queue}              LIST    Celery's queue of ready messages (queue: sync,
                                            backfill, fanout), written by kombu under the
                                            global_keyprefix {p}:celery:; closesync only
                                            reads its LLEN (the queue-depth gauge and
                                            `health --worker`)                        no TTL
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
    {p}:calendly-org:{ref}:refused  STRING  JSON {reason, at}: Calendly refused the shared
                                            grant; every connection of {ref} is skipped
                                            until the organization reconnects; absent =
                                            usable. Set once (NX), by the first run hit  no TTL
    {p}:waiting-close               HASH    close_user_id -> JSON {email, organization_id,
                                            at}: Close users who authorized in organization
                                            mode but match no Calendly member (yet)     no TTL
    {p}:waiting-close:{user}:grant  STRING  that Close user's Grant JSON, sealed         no TTL
    {p}:refused-pairings            HASH    close_user_id -> JSON {email, organization_id,
                                            calendly_user_uri, calendly_email,
                                            connection_id, at}: organization pairings
                                            refused because another connection holds that
                                            Calendly user; no secret, for `status`       no TTL
    {p}:webhooks                    SET     callback keys of the Calendly webhook
                                            subscriptions closesync owns                 no TTL
    {p}:webhook:{key}               STRING  JSON Subscription (closesync.core.webhooks):
                                            scope, what it serves, Calendly's uri, state.
                                            Outlives a failed delete: a remove, pause or
                                            organization revoke whose Calendly delete
                                            failed for a passing reason keeps it (the
                                            remove stops RemovalIncomplete; its rerun, or
                                            the reconciliation for a pause, deletes it).
                                            Chosen over a tombstone holding a sealed
                                            credential: no credential outlives its
                                            connection; a 401/403 forgets it (nothing
                                            could ever delete it)                        no TTL
    {p}:webhook:{key}:signing-key   STRING  the signing key closesync generated for it
                                            (personal access token), sealed; absent: the
                                            OAuth application's key signs                no TTL
    {p}:webhook:{key}:last-delivery STRING  epoch seconds (Redis TIME) of the last
                                            delivery received with a valid signature     no TTL
    {p}:webhook-of:conn:{id}        STRING  -> callback key of connection {id}'s
                                            user-scope subscription                      no TTL
    {p}:webhook-of:org:{ref}        STRING  -> callback key of organization {ref}'s
                                            organization-scope subscription              no TTL
    {p}:webhook-lock:conn:{id}      STRING  per-owner lock of the webhook lifecycle: the
    {p}:webhook-lock:org:{ref}              token of the process ensuring, dropping or
                                            reconciling that owner's subscription (a
                                            connect, remove, pause, organization revoke
                                            or the reconciliation), which re-reads the
                                            owner's state inside it; renewed while held,
                                            a connection's taken before its organization's
                                                                        PX 30 s, renewed
    {p}:webhook-delivery:{digest}   STRING  a verified delivery the receiver took
                                            (digest: sha256 of callback key, signed t and
                                            body): "pending" (SET NX) while it enqueues,
                                            then "done". The same signed request again is
                                            answered 200 and does nothing once done, 503
                                            while pending (Calendly retries). Lives
                                            longer than any t the receiver accepts (twice
                                            WEBHOOK_TOLERANCE_SECONDS, + 60 s)     EX 2 x tol + 60
    {p}:event-type:{uuid}:holders   SET     ids of the connections holding a link of event
                                            type {uuid} (a link record in conn:{id}:links):
                                            the connected hosts of a team type, which a
                                            delivery's payload does not list. Written in
                                            the MULTI that writes or forgets the record;
                                            a connection's entries go with its removal or
                                            its reconnect to another Calendly user       no TTL
    {p}:calendly-org:{ref}:connections
                                    SET     ids of the connections whose
                                            calendly_grant_ref is {ref} (organization
                                            mode): whom an organization subscription
                                            serves. Written in the MULTI saving or
                                            removing the connection                      no TTL
    {p}:calendly-org-index          STRING  "1": every connection record was given its
                                            calendly-org:{ref}:connections entry (one
                                            scan, the first time the set is read, outside
                                            any request: closesync.store.index_backfill);
                                            absent = the sets may miss older connections no TTL
    {p}:event-type-holders-index    STRING  "1": every link record was given its
                                            event-type:{uuid}:holders entry (one scan by
                                            the first webhook fan-out task,
                                            closesync.store.index_backfill); absent = the
                                            sets may miss links written before them      no TTL
    {p}:webhook-fanout:{ref}:{uuid} STRING  "1": a fan-out of organization {ref}'s
                                            connections for team type {uuid} (no holder)
                                            was published; SET NX, so a burst of
                                            deliveries publishes one  EX WEBHOOK_FANOUT_WINDOW + 1

A connection whose `calendly_grant_ref` is set stores only its Close grant in `:grants` (sealed
JSON `{"close": ..., "calendly_ref": ref}`); `grants()` and `update_grant()` read and write the
Calendly side at the shared `calendly-org:{ref}:grant`. Either shape also seals
`calendly_user_uri`, the Calendly user the connection syncs, which a run checks against the
public record (`ConnectionStore.check_calendly_user`).

Every sealed value is bound to its owner (`Owner`, `closesync.store.secretbox`): the connection
`{id}` for `:grants`, the organization `{ref}` for `calendly-org:{ref}:grant`, the Close user for
`waiting-close:{user}:grant`, the `state` digest for `oauth-state:{digest}`. Copied under another
key it no longer opens, so a Redis writer without the key cannot swap grants between owners.

Writes that must not be seen half-done (saving a connection, replacing the records) are one
MULTI/EXEC; saving a connection WATCHes its Calendly user's index, so that of two saves racing
for one Calendly user exactly one succeeds; read-modify-writes of a connection or of its grants
WATCH their key, so a concurrent token refresh is never overwritten by a stale copy (a refresh
token is single-use: losing the new one means the user must authorize again). `SyncState` writes
for one connection assume the caller holds that connection's run lock (`closesync.store.locks`),
and each one is a MULTI/EXEC that WATCHes the connection's removal mark and is refused
(ConnectionRemoved) while it exists. Every Redis error leaves this module as StoreUnavailable.

The stores live beside this module: `closesync.store.connections` (connections and their sealed
grants), `closesync.store.sync_state` (link records, reports, sync markers, ticks) and
`closesync.store.schedule` (the spread of a tick).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import redis

T = TypeVar("T")
# redis-py's stubs type hash mappings with invariant keys; our field maps are plain str -> str.
Fields = dict[Any, Any]


def as_text(value: bytes | str) -> str:
    """A reply as text whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def watched(client: redis.Redis, key: str, apply: Callable[[redis.client.Pipeline], T]) -> T:
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

    def calendly_user(self, calendly_user_uuid: str) -> str:
        return f"{self.prefix}:calendly-user:{calendly_user_uuid}"

    def calendly_index_complete(self) -> str:
        return f"{self.prefix}:calendly-user-index"

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

    def queued(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:queued"

    def backfill(self, conn_id: str) -> str:
        return f"{self.conn(conn_id)}:backfill"

    def removed(self, conn_id: str) -> str:
        return f"{self.prefix}:removed:{conn_id}"

    def refresh_lock(self, grant_key: str) -> str:
        return f"{self.prefix}:refresh-lock:{grant_key}"

    def rate_budget(self) -> str:
        """The prefix of the `limits` package's keys (it appends the rest itself)."""
        return f"{self.prefix}:rate"

    def rate_blocked(self, scope: str, group: str | None) -> str:
        return f"{self.prefix}:rate-blocked:{scope}:{group or '*'}"

    def rate_budgets_seen(self) -> str:
        return f"{self.prefix}:rate-budgets-seen"

    def tick(self, name: str, slot: str) -> str:
        return f"{self.prefix}:tick:{name}:{slot}"

    def schedule(self, kind: str) -> str:
        return f"{self.prefix}:schedule:{kind}"

    def schedule_drain(self, kind: str) -> str:
        return f"{self.schedule(kind)}:drain"

    def scheduler_leader(self) -> str:
        return f"{self.prefix}:scheduler:leader"

    def celery_prefix(self) -> str:
        """kombu's global_keyprefix: every key of the Celery broker starts with it."""
        return f"{self.prefix}:celery:"

    def celery_queue(self, queue: str) -> str:
        """The list of ready messages of Celery queue `queue` (kombu's Redis transport)."""
        return f"{self.celery_prefix()}{queue}"

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

    def calendly_org_refused(self, ref: str) -> str:
        return f"{self.calendly_org(ref)}:refused"

    def waiting_close(self) -> str:
        return f"{self.prefix}:waiting-close"

    def waiting_close_grant(self, close_user_id: str) -> str:
        return f"{self.waiting_close()}:{close_user_id}:grant"

    def refused_pairings(self) -> str:
        return f"{self.prefix}:refused-pairings"

    def webhooks(self) -> str:
        return f"{self.prefix}:webhooks"

    def webhook(self, key: str) -> str:
        return f"{self.prefix}:webhook:{key}"

    def webhook_signing_key(self, key: str) -> str:
        return f"{self.webhook(key)}:signing-key"

    def webhook_last_delivery(self, key: str) -> str:
        return f"{self.webhook(key)}:last-delivery"

    def webhook_of_connection(self, conn_id: str) -> str:
        return f"{self.prefix}:webhook-of:conn:{conn_id}"

    def webhook_of_organization(self, grant_ref: str) -> str:
        return f"{self.prefix}:webhook-of:org:{grant_ref}"

    def webhook_lock_of_connection(self, conn_id: str) -> str:
        return f"{self.prefix}:webhook-lock:conn:{conn_id}"

    def webhook_lock_of_organization(self, grant_ref: str) -> str:
        return f"{self.prefix}:webhook-lock:org:{grant_ref}"

    def webhook_delivery(self, digest: str) -> str:
        return f"{self.prefix}:webhook-delivery:{digest}"

    def event_type_holders(self, event_type_uuid: str) -> str:
        return f"{self.prefix}:event-type:{event_type_uuid}:holders"

    def calendly_org_connections(self, ref: str) -> str:
        return f"{self.calendly_org(ref)}:connections"

    def calendly_org_index_complete(self) -> str:
        return f"{self.prefix}:calendly-org-index"

    def event_type_holders_index_complete(self) -> str:
        return f"{self.prefix}:event-type-holders-index"

    def webhook_fan_out(self, ref: str, event_type_uuid: str) -> str:
        return f"{self.prefix}:webhook-fanout:{ref}:{event_type_uuid}"

    def of_connection(self, conn_id: str) -> list[str]:
        """Every key of one connection, but the Close and Calendly user indexes, the refresh locks
        and the removal mark.

        A refresh lock is named by an opaque grant key and lives seconds; it is left to expire.
        The removal mark must outlive the others (see the layout above).
        """
        return [
            self.conn(conn_id),
            self.grants(conn_id),
            self.links(conn_id),
            self.rejected(conn_id),
            self.held(conn_id),
            self.reports(conn_id),
            self.run_lock(conn_id),
            self.queued(conn_id),
            self.backfill(conn_id),
        ]


class Owner:
    """What each sealed value is sealed for: its owner, without the key prefix (so that a change
    of REDIS_PREFIX keeps every value readable). Nothing else formats an owner."""

    @staticmethod
    def connection(conn_id: str) -> str:
        return f"connection:{conn_id}"

    @staticmethod
    def organization(ref: str) -> str:
        return f"calendly-organization:{ref}"

    @staticmethod
    def waiting_close_user(close_user_id: str) -> str:
        return f"waiting-close-user:{close_user_id}"

    @staticmethod
    def oauth_flow(digest: str) -> str:
        return f"oauth-flow:{digest}"

    @staticmethod
    def webhook(key: str) -> str:
        # A digest, not the callback key: an owner is named in EncryptionError messages, which
        # the receiver logs, and the key is half of what a delivery proves.
        return f"webhook-subscription:{hashlib.sha256(key.encode()).hexdigest()[:24]}"
