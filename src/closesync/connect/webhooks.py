"""The Calendly webhook subscriptions closesync owns: made as a connection (or an organization)
connects, deleted as it leaves or pauses.

A connection with its own Calendly credential gets one `user`-scope subscription, made with that
credential; a connected Calendly organization gets one `organization`-scope subscription, made
with its shared credential, serving every member connection. Each has a callback URL of its own
(`core.webhooks.callback_url`, a fresh key), since Calendly refuses two subscriptions of one user
on one URL and never lets a URL change.

Signing. A subscription made with a personal access token is given a key closesync generates
(`secrets`), stored sealed beside the record; one made with an OAuth token is signed by Calendly
with the application's key, CALENDLY_WEBHOOK_SIGNING_KEY. Without that setting an OAuth-made
subscription is not created at all: no delivery of it could be verified, so the receiver would
refuse every one until Calendly disabled it. It is recorded REFUSED with that reason instead, and
`closesync webhooks ensure` makes it once the key is set.

The record is saved PENDING, with its signing key, before the POST: a delivery that arrives
before the POST returns finds its key, and a POST whose answer was lost (then retried into a 409)
is adopted by its URL with the key it was made with. Calendly's answer then makes it ACTIVE; a
403 or 400 (missing `webhooks:write`, a plan or role that may not) REFUSED with the reason; any
other failure leaves it PENDING for the daily reconciliation.

Every ensure, drop and reconcile of one owner (a connection, an organization) runs under that
owner's lifecycle lock (`WebhookStore.owner_lock`) and reads the owner's state again inside it:
a remove, pause or revoke racing a reconcile or a connect never has its subscription made again
after it, and two reconciles never both drop and create.

Nothing here may fail or undo the connect, remove or pause that called it: `after_*` catch every
closesync error, record and log it (never a key or token), and the connection keeps syncing by
polling. WEBHOOKS_ENABLED=false makes nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from pydantic import SecretStr

from closesync.apis.calendly.client import CalendlyClient
from closesync.connect.deps import ConnectServices
from closesync.connect.org_credentials import OrgCredentials
from closesync.core.calendly_payloads import WebhookSubscription, uuid_of
from closesync.core.connection import Connection, ConnectionState
from closesync.core.errors import (
    AuthFailed,
    CloseSyncError,
    Conflict,
    ConnectionNotFound,
    Forbidden,
)
from closesync.core.retry import WaitBudget
from closesync.core.webhooks import (
    EVENT_TYPE_EVENTS,
    Subscription,
    WebhookState,
    callback_url,
    new_key,
    state_after_failure,
    state_at_calendly,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bytes of randomness in a signing key closesync generates (URL-safe base64 of 32 bytes, as
# Calendly's own example key).
SIGNING_KEY_BYTES = 32
# Seconds a hook (connect, remove, pause) or the reconciliation waits for an owner's lifecycle
# lock held by another one: longer than one owner's listing, delete and create take within their
# call budgets, short enough for a connect request.
OWNER_LOCK_WAIT_SECONDS = 15.0
NO_APP_KEY = (
    "CALENDLY_WEBHOOK_SIGNING_KEY is not set: a subscription made with an OAuth token is signed "
    "with the application's key, so its deliveries could not be verified; set it (Calendly's "
    "developer console) and run `closesync webhooks ensure`"
)


@dataclass(frozen=True)
class Owner:
    """Who a subscription is made for and with: a connection (user scope) or an organization."""

    scope: Literal["user", "organization"]
    organization_uri: str
    client: CalendlyClient
    pat: bool  # made with a personal access token: closesync signs it with a key of its own
    user_uri: str | None = None
    connection_id: str | None = None
    grant_ref: str | None = None

    def label(self) -> str:
        return self.connection_id or f"organization {self.grant_ref}"


class Subscriptions:
    """Makes, adopts and deletes the subscriptions of connections and organizations."""

    def __init__(self, services: ConnectServices, clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.settings = services.settings
        self.store = services.webhooks
        self.clock = clock

    # -- hooks of the connect, remove and pause paths: never raise --------------------------------

    def after_connect(self, connection: Connection, replaced: Connection | None) -> None:
        """A connection was stored (made or reconnected): subscribe what serves it."""
        if not self.settings.webhooks_enabled:
            return
        self._quietly(
            f"subscribing {connection.id}",
            lambda: self._locked_connection(
                connection.id, lambda current: self._after_connect(current, replaced)
            ),
        )

    def after_organization(self, ref: str) -> None:
        """An organization credential was (re)connected: subscribe the organization."""
        if not self.settings.webhooks_enabled:
            return
        self._quietly(
            f"subscribing organization {ref}",
            lambda: self.locked_organization(
                ref, lambda: self.ensure_organization(ref, renew=True)
            ),
        )

    def after_leaving(self, connection: Connection) -> None:
        """A connection is being removed or was paused: delete its own subscription."""
        self._quietly(
            f"unsubscribing {connection.id}",
            lambda: self.locked(
                connection.id, lambda: self.drop_connection(connection, keep_on_failure=True)
            ),
        )

    def after_state_change(self, connection: Connection) -> None:
        """Paused: its own subscription goes; active again: it gets one."""
        if connection.state is ConnectionState.PAUSED:
            self.after_leaving(connection)
        elif connection.state is ConnectionState.ACTIVE:
            self.after_connect(connection, None)

    # -- the per-owner lock: every ensure, drop and reconcile of one owner runs under it -------

    def locked(self, conn_id: str, step: Callable[[], T]) -> T:
        """`step` under connection `conn_id`'s lifecycle lock (RunLocked past OWNER_LOCK_WAIT)."""
        with self.store.owner_lock("user", conn_id, OWNER_LOCK_WAIT_SECONDS):
            return step()

    def locked_organization(self, ref: str, step: Callable[[], T]) -> T:
        """`step` under organization `ref`'s lifecycle lock."""
        with self.store.owner_lock("organization", ref, OWNER_LOCK_WAIT_SECONDS):
            return step()

    def _locked_connection(self, conn_id: str, step: Callable[[Connection], object]) -> None:
        """`step` of the connection as stored now, under its lock; nothing when it is being
        removed, is gone or is not active any more (a remove or pause won the race: its own
        hook, waiting for this lock, drops whatever is there)."""

        def fresh() -> None:
            if self.services.connections.is_removing(conn_id):
                return
            try:
                current = self.services.connections.get(conn_id)
            except ConnectionNotFound:
                return
            if current.state is ConnectionState.ACTIVE:
                step(current)

        self.locked(conn_id, fresh)

    def _quietly(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        # Whatever went wrong (a closesync error names its cause; anything else is a bug here),
        # the connect, remove or pause that called this has happened and must stand.
        except Exception as error:
            log.warning(
                "webhooks: %s failed; polling goes on: %s: %s",
                what,
                type(error).__name__,
                error,
            )

    def before_replacing(self, existing: Connection, connection: Connection) -> None:
        """`existing` is about to be replaced by `connection` of ANOTHER Calendly user (or in
        organization mode): delete its own subscription now, while the stored grants are still
        the old user's. After the save they are the new user's (Calendly answers their delete of
        the old user's subscription 403) and the old Calendly grant is revoked."""
        if not self._leaves_its_user(existing, connection):
            return
        self._quietly(
            f"unsubscribing {existing.id}",
            lambda: self.locked(existing.id, lambda: self.drop_connection(existing)),
        )

    @staticmethod
    def _leaves_its_user(existing: Connection, connection: Connection) -> bool:
        return existing.calendly_grant_ref is None and (
            connection.calendly_grant_ref is not None
            or existing.calendly_user_uri != connection.calendly_user_uri
        )

    def _after_connect(self, connection: Connection, replaced: Connection | None) -> None:
        mine = self.store.for_connection(connection.id)
        leaves = replaced is not None and (
            self._leaves_its_user(replaced, connection) or replaced.calendly_grant_ref is not None
        )
        if mine is not None and leaves:
            # `before_replacing` could not delete it; the stored credential is the new one now
            # and cannot, so only the record goes (the reconciliation lists no orphan of it).
            self.drop(mine, None)
        ref = connection.calendly_grant_ref
        if ref is not None:
            # Lock order: a connection's, then its organization's (nothing takes them reversed).
            self.locked_organization(ref, lambda: self.ensure_organization(ref))
            return
        self.ensure_connection(connection, renew=True)

    # -- ensuring -----------------------------------------------------------------------------

    def ensure_connection(
        self, connection: Connection, *, renew: bool = False, retry_refused: bool = True
    ) -> Subscription | None:
        """The connection's own subscription, made unless an ACTIVE one (made with the same
        kind of credential, when `renew`) exists. None: organization mode, or webhooks off."""
        if not self.settings.webhooks_enabled or connection.calendly_grant_ref is not None:
            return None
        owner = self.user_owner(connection)
        return self._ensure(owner, self.store.for_connection(connection.id), renew, retry_refused)

    def ensure_organization(
        self, ref: str, *, renew: bool = False, retry_refused: bool = True
    ) -> Subscription | None:
        """The organization's subscription, made unless an ACTIVE one exists."""
        if not self.settings.webhooks_enabled:
            return None
        owner = self.organization_owner(ref)
        if owner is None:
            return None
        return self._ensure(owner, self.store.for_organization(ref), renew, retry_refused)

    def _ensure(
        self, owner: Owner, current: Subscription | None, renew: bool, retry_refused: bool
    ) -> Subscription:
        if current is None:
            return self.create(owner)
        same_signing = current.own_signing_key == owner.pat
        if current.state is WebhookState.ACTIVE and (same_signing or not renew):
            return current
        if current.state is WebhookState.REFUSED and not retry_refused:
            return current
        if current.state is WebhookState.PENDING and current.uri is None and same_signing:
            return self.create(owner, current)  # the same key and URL: a lost answer is adopted
        # Disabled (Calendly never re-enables one), refused, or signed the other way: replaced.
        self.drop(current, owner)
        return self.create(owner)

    def create(self, owner: Owner, pending: Subscription | None = None) -> Subscription:
        """Subscribe at Calendly and record the outcome (`pending`: retry that record, with its
        key and signing key, so that a create whose answer was lost is adopted by its URL)."""
        now = self.clock()
        if not owner.pat and self.settings.calendly_webhook_signing_key is None:
            return self._record(owner, pending, WebhookState.REFUSED, NO_APP_KEY, now)
        key = pending.key if pending is not None else new_key()
        signing_key = None
        if owner.pat:
            signing_key = (
                self.store.signing_key(key) if pending is not None else None
            ) or SecretStr(secrets.token_urlsafe(SIGNING_KEY_BYTES))
        sub = _record_of(owner, key, pending, now)
        self.store.save(sub, signing_key)
        url = callback_url(self.settings.public_base_url, key)
        try:
            made = self._post(owner, url, signing_key)
        except CloseSyncError as error:
            state, reason = state_after_failure(error)
            log.warning(
                "webhooks: Calendly did not subscribe %s (%s): %s",
                owner.label(),
                state.value,
                reason,
                extra={"connection_id": owner.connection_id},
            )
            sub = sub.model_copy(update={"state": state, "reason": reason})
        else:
            sub = sub.model_copy(
                update={"uri": made.uri, "state": state_at_calendly(made.state), "reason": None}
            )
            log.info(
                "webhooks: subscribed %s (%s scope)",
                owner.label(),
                owner.scope,
                extra={"connection_id": owner.connection_id},
            )
        self.store.save(sub)
        return sub

    def _post(self, owner: Owner, url: str, signing_key: SecretStr | None) -> WebhookSubscription:
        scope = owner.scope
        try:
            return owner.client.create_webhook_subscription(
                url=url,
                events=list(EVENT_TYPE_EVENTS),
                organization=owner.organization_uri,
                scope=scope,
                user=owner.user_uri,
                signing_key=signing_key,
            )
        except Conflict:
            # Our URL is new for every subscription: only our own earlier try can hold it.
            listed = owner.client.list_webhook_subscriptions(
                organization=owner.organization_uri, scope=scope, user=owner.user_uri
            )
            for found in listed:
                if found.callback_url == url:
                    return found
            raise

    def _record(
        self,
        owner: Owner,
        pending: Subscription | None,
        state: WebhookState,
        reason: str,
        now: float,
    ) -> Subscription:
        key = pending.key if pending is not None else new_key()
        sub = _record_of(owner, key, pending, now).model_copy(
            update={"state": state, "reason": reason}
        )
        self.store.save(sub)
        log.warning("webhooks: %s not subscribed: %s", owner.label(), reason)
        return sub

    # -- dropping -----------------------------------------------------------------------------

    def drop_connection(self, connection: Connection, *, keep_on_failure: bool = False) -> bool:
        """Delete the connection's own subscription at Calendly, then its record."""
        current = self.store.for_connection(connection.id)
        if current is None:
            return False
        owner = self._owner_or_none(lambda: self.user_owner(connection))
        self.drop(current, owner, keep_on_failure=keep_on_failure)
        return True

    def drop_organization(self, ref: str, *, keep_on_failure: bool = False) -> bool:
        """Delete the organization's subscription at Calendly, then its record."""
        current = self.store.for_organization(ref)
        if current is None:
            return False
        owner = self._owner_or_none(lambda: self.organization_owner(ref))
        self.drop(current, owner, keep_on_failure=keep_on_failure)
        return True

    def drop_before_removal(self, connection: Connection) -> None:
        """A `connections remove`: delete its own subscription under its lock, raising (record
        kept, so the removal stops as RemovalIncomplete and its rerun deletes it) when Calendly
        failed for a reason a retry may get past."""
        self.locked(connection.id, lambda: self.drop_connection(connection, keep_on_failure=True))

    def drop_before_organization_goes(self, ref: str) -> None:
        """The organization credential is about to be revoked: as `drop_before_removal`."""
        self.locked_organization(ref, lambda: self.drop_organization(ref, keep_on_failure=True))

    def _owner_or_none(self, owner: Callable[[], Owner | None]) -> Owner | None:
        """The owner whose credential deletes a subscription; None (the record is forgotten
        all the same) when that credential cannot be read: a leaving connection's record must
        not outlive it."""
        try:
            return owner()
        except CloseSyncError as error:
            log.warning("webhooks: no credential to delete a subscription with: %s", error)
            return None

    def drop(
        self, sub: Subscription, owner: Owner | None, *, keep_on_failure: bool = False
    ) -> None:
        """Delete at Calendly (gone already counts as deleted), then forget the record.

        A delete that failed for a reason a retry may get past (a 5xx, a timeout, a rate limit,
        Redis), with `keep_on_failure`: raised, the record kept, so that whoever asked (a
        removal, which then stops as RemovalIncomplete; a pause, which the reconciliation's
        paused branch retries) deletes it on the next try. Without it (a replacement of an owner
        that stays): logged and forgotten, the subscription then an orphan of our URL that the
        owner's next listing deletes. A lasting refusal (401/403: this credential can never
        delete it) is logged and forgotten either way: keeping a credential-bound tombstone
        nothing can act on would only keep a sealed credential alive.
        """
        if sub.uri is not None and owner is not None:
            try:
                owner.client.delete_webhook_subscription(uuid_of(sub.uri))
            except CloseSyncError as error:
                if keep_on_failure and not isinstance(error, AuthFailed | Forbidden):
                    raise
                log.warning(
                    "webhooks: Calendly did not delete the subscription of %s: %s",
                    owner.label(),
                    error,
                    extra={"connection_id": sub.connection_id},
                )
        self.store.delete(sub)

    # -- owners -------------------------------------------------------------------------------

    def _budget(self) -> WaitBudget:
        # Short (WEBHOOK_CALL_BUDGET_SECONDS), not the inline sync's 60 s: these calls run inside
        # a connect request (an OAuth callback must never time out on them); a create that runs
        # out of it stays PENDING and the reconciliation makes it.
        return WaitBudget(self.settings.webhook_call_budget_seconds)

    def user_owner(self, connection: Connection) -> Owner:
        grants = self.services.connections.grants(connection.id)
        client = self.services.clients_for(connection, self._budget()).calendly
        organization = connection.calendly_organization_uri
        if organization is None:
            organization = client.get_current_user().current_organization
        if organization is None:
            raise CloseSyncError(f"Calendly names no organization of {connection.id}'s user")
        return Owner(
            scope="user",
            organization_uri=organization,
            client=client,
            pat=grants.calendly.kind == "pat",
            user_uri=connection.calendly_user_uri,
            connection_id=connection.id,
        )

    def organization_owner(self, ref: str) -> Owner | None:
        credentials = OrgCredentials(self.services)
        info = credentials.info(ref)
        if info is None or not info.get("organization_uri"):
            return None
        grant = self.services.connections.shared_grant(ref)
        return Owner(
            scope="organization",
            organization_uri=str(info["organization_uri"]),
            client=credentials.client(ref),
            pat=grant.kind == "pat",
            grant_ref=ref,
        )


def _record_of(owner: Owner, key: str, pending: Subscription | None, now: float) -> Subscription:
    """The record of `owner`'s subscription under callback `key` (pending, no reason yet),
    keeping the creation time of the record it replaces."""
    return Subscription(
        key=key,
        scope=owner.scope,
        organization_uri=owner.organization_uri,
        user_uri=owner.user_uri,
        connection_id=owner.connection_id,
        grant_ref=owner.grant_ref,
        own_signing_key=owner.pat,
        created_at=pending.created_at if pending is not None else now,
        updated_at=now,
    )
