"""Reconciling the webhook subscriptions closesync should own with what Calendly has.

Run daily with the drift check (`worker.tasks.reconcile_webhooks`) and on demand by `closesync
webhooks ensure [ID ...|--all]`. For every owner in scope (an active connection with its own
Calendly credential: `user` scope; a connected organization: `organization` scope) it makes ONE
listing at Calendly, with the credential that owns the subscriptions, and then:

- keeps an ACTIVE record that Calendly lists `active`;
- re-creates one that Calendly lists `disabled` (deleted first: Calendly never re-enables one),
  no longer lists at all, or lists with a callback URL other than `callback_url(PUBLIC_BASE_URL,
  key)` (the base URL changed: deliveries go to the old host), and asks a sync of the
  connections it serves, since deliveries were lost meanwhile (`ask_sync`, the coalescing
  sync marker of `worker.enqueue.ask_for_syncs`);
- retries a PENDING record (with its own key: a create whose answer was lost is adopted), and a
  REFUSED one when asked (`retry_refused`: `webhooks ensure`, run after a scope or setting was
  fixed; the daily pass leaves Calendly's refusals alone);
- makes one where none is recorded;
- deletes every listed subscription whose callback URL is ours (PUBLIC_BASE_URL +
  CALLBACK_PATH) but whose key no record holds: left behind by a delete that failed. A
  subscription to any other URL is never touched.

Each owner is reconciled under its lifecycle lock (`Subscriptions.locked`), the same one the
connect, remove and pause hooks take, and from its state read again inside it: a connection
removed, paused or reconnected since the pass read its list, or an organization whose credential
went, is never given its subscription back. A paused connection's leftover subscription is
dropped; a removed one is skipped (its removal drops it). A connection needing re-authorization is
skipped (its credential is refused). Owners run `concurrency` at a time; one owner's failure is
reported in its outcome and never stops the others. Nothing here imports the worker: `ask_sync`
is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from closesync.connect.deps import ConnectServices
from closesync.connect.org_credentials import OrgCredentials
from closesync.connect.webhooks import Owner, Subscriptions
from closesync.core.calendly_payloads import WebhookSubscription, uuid_of
from closesync.core.connection import Connection, ConnectionState
from closesync.core.errors import CloseSyncError, ConnectionNotFound
from closesync.core.webhooks import (
    CALLBACK_PATH,
    Subscription,
    WebhookState,
    callback_url,
    is_ours,
    state_at_calendly,
)

log = logging.getLogger(__name__)

# Owners reconciled at once by default: each is one listing and at most a delete and a create.
DEFAULT_CONCURRENCY = 8


# Why a skipped (or dropped) owner is due no subscription at all.
NOTHING_DUE = frozenset({"organization mode", "paused", "removed"})


@dataclass
class Outcome:
    """What the reconciliation did for one owner (a connection, or an organization's ref)."""

    owner: str
    scope: str
    action: str  # kept | created | recreated | retried | dropped | skipped | failed
    state: str | None = None
    reason: str | None = None
    orphans_deleted: int = 0
    resynced: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.action == "failed"

    @property
    def settled(self) -> bool:
        """Done for this owner: its subscription is active, or none is due (a member of a
        connected organization, a paused connection). A skip for any other cause (needs_reauth,
        an organization no longer connected) leaves deliveries unserved: not settled."""
        if self.failed:
            return False
        if self.action in ("skipped", "dropped"):
            return self.reason in NOTHING_DUE
        return self.state == WebhookState.ACTIVE.value


class Reconciler:
    """One reconciliation pass; `ask_sync(ids)` asks a sync of those connections."""

    def __init__(
        self,
        services: ConnectServices,
        ask_sync: Callable[[list[str]], object],
        *,
        retry_refused: bool = False,
    ) -> None:
        self.services = services
        self.subs = Subscriptions(services)
        self.credentials = OrgCredentials(services)
        self.ask_sync = ask_sync
        self.retry_refused = retry_refused
        self.base_url = services.settings.public_base_url

    def run(
        self,
        connections: Sequence[Connection],
        refs: Sequence[str],
        concurrency: int = DEFAULT_CONCURRENCY,
        *,
        sweep: bool = True,
    ) -> list[Outcome]:
        """Reconcile these connections' own subscriptions and these organizations' (`sweep`:
        first forget the records nothing owns; a batch after the first of a pass skips it)."""
        # Records first: a connect saves its connection (or credential) before its record, so
        # every record read here has its owner in the listings read after it.
        records = self.services.webhooks.all()
        every = self.services.connections.list()
        if sweep:
            self._sweep(records, {c.id for c in every}, set(self.credentials.refs()))
        members: dict[str, list[str]] = {}
        for c in every:
            if c.calendly_grant_ref is not None and c.state is ConnectionState.ACTIVE:
                members.setdefault(c.calendly_grant_ref, []).append(c.id)
        known = {sub.key for sub in self.services.webhooks.all()}
        jobs: list[Callable[[], Outcome]] = [
            partial(self.connection, c, known) for c in connections
        ]
        jobs += [partial(self.organization, r, members.get(r, []), known) for r in refs]
        if not jobs:
            return []
        with ThreadPoolExecutor(max(1, min(concurrency, len(jobs)))) as pool:
            return list(pool.map(lambda job: job(), jobs))

    def _sweep(self, records: list[Subscription], connection_ids: set[str], refs: set[str]) -> None:
        """Forget the records nothing owns any more: of a connection or organization that is
        gone (its leaving could not delete them), or replaced by a newer record of the same
        owner. Their subscriptions at Calendly, now of our URL but unknown, are then deleted by
        the owner's listing below, when the owner still exists."""
        store = self.services.webhooks
        indexed = store.indexed(records)
        for sub in records:
            owner_gone = (
                sub.connection_id not in connection_ids
                if sub.scope == "user"
                else sub.grant_ref not in refs
            )
            if owner_gone or sub.key not in indexed:
                log.info("webhooks: forgot a subscription record nothing owns")
                store.delete(sub)

    def connection(self, connection: Connection, known: set[str]) -> Outcome:
        """One connection's own subscription, under its lifecycle lock, from what is stored
        now: the listing this pass started from may be stale (a remove, pause or reconnect
        since must win, never be undone here)."""
        label = connection.id
        try:
            return self.subs.locked(connection.id, lambda: self._connection(connection.id, known))
        except CloseSyncError as error:
            return self._failed(label, "user", error)

    def _connection(self, conn_id: str, known: set[str]) -> Outcome:
        if self.services.connections.is_removing(conn_id):
            return Outcome(conn_id, "user", "skipped", reason="removed")
        try:
            connection = self.services.connections.get(conn_id)
        except ConnectionNotFound:
            return Outcome(conn_id, "user", "skipped", reason="removed")
        if connection.calendly_grant_ref is not None:
            return Outcome(conn_id, "user", "skipped", reason="organization mode")
        if connection.state is ConnectionState.PAUSED:
            dropped = self.subs.drop_connection(connection, keep_on_failure=True)
            return Outcome(conn_id, "user", "dropped" if dropped else "skipped", reason="paused")
        if connection.state is not ConnectionState.ACTIVE:
            return Outcome(conn_id, "user", "skipped", reason=connection.state.value)
        owner = self.subs.user_owner(connection)
        current = self.services.webhooks.for_connection(conn_id)
        return self._reconcile(owner, current, [conn_id], known)

    def organization(self, ref: str, members: list[str], known: set[str]) -> Outcome:
        """One organization's subscription, under its lifecycle lock; a credential revoked
        since the pass started is seen gone here (organization_owner reads it again)."""
        label = f"organization {ref}"
        try:
            return self.subs.locked_organization(
                ref, lambda: self._organization(ref, members, known)
            )
        except CloseSyncError as error:
            return self._failed(label, "organization", error)

    def _organization(self, ref: str, members: list[str], known: set[str]) -> Outcome:
        owner = self.subs.organization_owner(ref)
        if owner is None:
            return Outcome(f"organization {ref}", "organization", "skipped", reason="not connected")
        current = self.services.webhooks.for_organization(ref)
        return self._reconcile(owner, current, members, known)

    def _failed(self, label: str, scope: str, error: CloseSyncError) -> Outcome:
        log.warning("webhooks: reconciling %s failed: %s", label, error)
        return Outcome(label, scope, "failed", reason=str(error))

    def _reconcile(
        self, owner: Owner, current: Subscription | None, served: list[str], known: set[str]
    ) -> Outcome:
        listed = owner.client.list_webhook_subscriptions(
            organization=owner.organization_uri, scope=owner.scope, user=owner.user_uri
        )
        orphans = self._delete_orphans(owner, listed, known, current)
        outcome = Outcome(owner.label(), owner.scope, "kept", orphans_deleted=orphans)
        there = next((s for s in listed if current and s.uri == current.uri), None)
        if current is None:
            made = self.subs.create(owner)
            outcome.action = "created"
        elif (
            current.state is WebhookState.ACTIVE
            and there is not None
            and there.state == "active"
            and there.callback_url == callback_url(self.base_url, current.key)
        ):
            made = current
        elif current.uri is not None and current.state in (
            WebhookState.ACTIVE,
            WebhookState.DISABLED,
        ):
            # Disabled at Calendly, gone from it, or posting to a URL that is no longer ours (a
            # PUBLIC_BASE_URL change; Calendly never changes a URL): deliveries were lost, so it
            # is made again with a new key and a sync follows.
            self.subs.drop(current, owner)
            made = self.subs.create(owner)
            outcome.action = "recreated"
            if made.state is WebhookState.ACTIVE and served:
                self.ask_sync(served)
                outcome.resynced = list(served)
        elif current.state is WebhookState.REFUSED and not self.retry_refused:
            made = current
        else:
            made = self._retry(owner, current, listed)
            outcome.action = "retried"
        outcome.state = made.state.value
        outcome.reason = made.reason
        return outcome

    def _retry(
        self, owner: Owner, current: Subscription, listed: list[WebhookSubscription]
    ) -> Subscription:
        """A PENDING (or, when asked, REFUSED) record tried again; one whose create did reach
        Calendly (its URL is listed) is adopted as listed."""
        url_key = {s.callback_url.rsplit(CALLBACK_PATH, 1)[-1]: s for s in listed}
        found = url_key.get(current.key)
        if found is not None and current.own_signing_key == owner.pat:
            adopted = current.model_copy(
                update={"uri": found.uri, "state": state_at_calendly(found.state), "reason": None}
            )
            self.services.webhooks.save(adopted)
            return adopted
        if current.state is WebhookState.PENDING and current.own_signing_key == owner.pat:
            return self.subs.create(owner, current)
        self.subs.drop(current, owner)
        return self.subs.create(owner)

    def _delete_orphans(
        self,
        owner: Owner,
        listed: list[WebhookSubscription],
        known: set[str],
        current: Subscription | None,
    ) -> int:
        """Delete listed subscriptions of our URL that no record holds; how many."""
        deleted = 0
        for sub in listed:
            if not is_ours(sub.callback_url, self.base_url):
                continue
            key = sub.callback_url.rsplit(CALLBACK_PATH, 1)[-1]
            if key in known or (current is not None and key == current.key):
                continue
            # Read again: a connect running meanwhile saves its record before it subscribes.
            if self.services.webhooks.find(key) is not None:
                continue
            if owner.client.delete_webhook_subscription(uuid_of(sub.uri)):
                deleted += 1
                log.info("webhooks: deleted an orphaned subscription of %s", owner.label())
        return deleted


def targets(
    services: ConnectServices, ids: Sequence[str] | None
) -> tuple[list[Connection], list[str]]:
    """The connections and organization refs a pass covers: `ids` (connections; a connection
    in organization mode brings its organization), or every connection and organization."""
    credentials = OrgCredentials(services)
    if ids is None:
        return services.connections.list(), credentials.refs()
    connections = [services.connections.get(conn_id) for conn_id in dict.fromkeys(ids)]
    refs = sorted({c.calendly_grant_ref for c in connections if c.calendly_grant_ref is not None})
    return connections, refs


def owner_cursor(connection_id: str | None = None, ref: str | None = None) -> str:
    """An owner's place in a pass that runs in batches: connections, then organizations."""
    return f"conn:{connection_id}" if connection_id is not None else f"org:{ref}"


def next_batch(
    connections: Sequence[Connection], refs: Sequence[str], after: str | None, size: int
) -> tuple[list[Connection], list[str], str | None]:
    """The next `size` owners after cursor `after` (None: from the start), and the cursor to
    resume from (None: this batch ends the pass). A cursor names an owner, not a position, so
    owners added or removed meanwhile shift nothing: a pass never runs one owner twice."""
    owners: list[tuple[str, Connection | str]] = sorted(
        [(owner_cursor(connection_id=c.id), c) for c in connections]
        + [(owner_cursor(ref=r), r) for r in refs],
        key=lambda owner: owner[0],
    )
    pending = [o for o in owners if after is None or o[0] > after]
    batch, rest = pending[:size], pending[size:]
    batch_connections = [o for _, o in batch if isinstance(o, Connection)]
    batch_refs = [o for _, o in batch if isinstance(o, str)]
    return batch_connections, batch_refs, (batch[-1][0] if rest else None)
