"""The Calendly webhook receiver: `POST /webhooks/calendly/<key>`, framework-free.

`WebhookReceiver.receive(key, headers, body)` turns one delivery into a `Reply` (status, JSON
body, headers), so any WSGI framework (or the tests' loopback server) can mount it. It answers
within a few Redis round trips and one publish, never an API call: a delivery is a hint
(decisions.md), and the sync it asks for reads Calendly's current state. In order:

    body over WEBHOOK_MAX_BODY_BYTES                    413
    no subscription with that callback key               404
    signature header missing or unreadable               400
    signing key missing (CALENDLY_WEBHOOK_SIGNING_KEY)   500, the setting named in the log
    signature wrong, or `t` outside the tolerance        401
    the same signed delivery again, once taken (replay)  200, nothing done
    ... while the first is still being enqueued          503 (Calendly retries)
    signed, but not a readable delivery                  200, warned (the poll heals it)
    an event other than event_type.*                     200, noted, nothing asked
    Redis or the broker down                             503 (Calendly retries)
    otherwise: noted, the syncs asked for                200

Nothing is changed or enqueued on any refusal. It NEVER answers 410: Calendly deletes a
subscription on a 410, without retry, and a bug or a misconfiguration must not cost every
connection its webhooks; an unexpected error is a 500, which Calendly retries.

A signed body that does not parse is answered 2xx all the same: a 4xx would make Calendly retry
it for 24 h and then disable the subscription, for every connection it serves. It is logged (no
body, no key), and a user-scope subscription asks its own connection; the poll heals the rest.

Whom a delivery asks to sync is `closesync.core.webhook_delivery.targets`, from what Redis holds:
the owner's connection (`calendly-user:{uuid}`) and the connections holding a link of the event
type (`event-type:{uuid}:holders`), of those the subscription serves. The request reads a few keys
whatever the organization's size: a team type that no served connection holds yet is handed to
one fan-out task (`SyncAsker.organization`), which reads the organization and spreads its syncs.
The asks go through the connections' sync markers with a debounce in the Redis schedule
(`closesync.worker.webhook_asks`, passed in as `ask`, since the web process sits beside the
worker, not above it).

An `event_type.deleted` asks the same sync as the others and carries no more weight: the run
lists Calendly, and a linked type missing from a complete listing gets a direct fetch, whose 404
or `deleted_at` deletes the link in that run (`closesync.core.plan`: only a type that is alive
elsewhere waits out DELETE_CONFIRM_SECONDS), under the mass-delete guard as ever. So a deletion
reaches Close one debounce after its delivery, and no hint of it needs to be kept.

Logs name a subscription by a digest of its key (the key is half of what a delivery proves) and
never show a signing key, a header or a body.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import SecretStr

from closesync.core.errors import CloseSyncError, EncryptionError, StoreUnavailable
from closesync.core.webhook_delivery import (
    EventTypeChange,
    MalformedDelivery,
    needs_fan_out,
    parse_delivery,
    targets,
)
from closesync.core.webhook_signature import (
    HEADER,
    MalformedSignature,
    SignatureRejected,
    delivery_digest,
    parse_signature,
    verify,
)
from closesync.core.webhooks import Subscription
from closesync.wiring.services import Services

log = logging.getLogger(__name__)


class SyncAsker(Protocol):
    """How deliveries ask for syncs; both raise StoreUnavailable when Redis or the broker
    cannot take the ask."""

    def __call__(self, ids: list[str], /) -> list[str]:
        """Ask for a sync of each connection id (debounced); the ids asked."""

    def organization(self, grant_ref: str, event_type_uuid: str, /) -> bool:
        """Ask a task to sync the organization's connections that may host a team type none of
        them holds yet; whether this call published it (False: a delivery just did)."""


# A callback key as `closesync.core.webhooks.new_key` makes them (URL-safe base64), with room.
_KEY_SHAPE = re.compile(r"[A-Za-z0-9_-]{8,128}")
# Seconds a replay mark outlives the tolerance window on both sides of a delivery's `t`.
REPLAY_MARGIN_SECONDS = 60
_SIGNING_SETTING = "CALENDLY_WEBHOOK_SIGNING_KEY"


@dataclass(frozen=True)
class Reply:
    """What the web framework sends back."""

    status: int
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


def _reply(code: int, /, **body: object) -> Reply:
    # The one answer that deletes the subscription at Calendly: never built.
    return Reply(500 if code == 410 else code, dict(body))


def key_digest(key: str) -> str:
    """How logs name a subscription: not its key, which a forger would need."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class WebhookReceiver:
    """Verifies, records and enqueues Calendly deliveries (see the module docstring)."""

    def __init__(self, services: Services, ask: SyncAsker) -> None:
        self.services = services
        self.ask = ask
        settings = services.settings
        self.max_body_bytes = settings.webhook_max_body_bytes
        self.tolerance = settings.webhook_tolerance_seconds
        self.replay_ttl = 2 * self.tolerance + REPLAY_MARGIN_SECONDS

    def too_large(self, content_length: int | None) -> Reply | None:
        """For a framework to call before reading the body: the 413, when the length is over."""
        if content_length is not None and content_length > self.max_body_bytes:
            return _reply(413, error=f"the body is larger than {self.max_body_bytes} bytes")
        return None

    def receive(self, key: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """The answer to one POST of `body` to the callback of subscription `key`."""
        too_large = self.too_large(len(body))
        if too_large is not None:
            return too_large
        try:
            return self._receive(key, headers, body)
        except StoreUnavailable as error:
            log.warning(
                "webhook delivery not taken, Redis or the broker is unavailable: %s",
                error,
                extra={"webhook": key_digest(key)},
            )
            return _reply(503, error="temporarily unavailable; retry later")
        except Exception:
            # Retried by Calendly; a 410 here would delete the subscription.
            log.exception("webhook delivery failed", extra={"webhook": key_digest(key)})
            return _reply(500, error="internal error; retry later")

    def _receive(self, key: str, headers: Mapping[str, str], body: bytes) -> Reply:
        webhooks = self.services.webhooks
        subscription = webhooks.find(key) if _KEY_SHAPE.fullmatch(key) else None
        if subscription is None:
            return _reply(404, error="no such webhook subscription")
        try:
            header = parse_signature(_header(headers, HEADER))
        except MalformedSignature as error:
            return _reply(400, error=str(error))
        signing_key = self._signing_key(subscription)
        if signing_key is None:
            return _reply(500, error="the receiver cannot verify this subscription's deliveries")
        now = self.services.state.now()
        try:
            verify(
                header,
                body,
                signing_key.get_secret_value().encode(),
                now=now,
                tolerance=self.tolerance,
            )
        except SignatureRejected as error:
            log.info("webhook delivery refused: %s", error, extra={"webhook": key_digest(key)})
            return _reply(401, error=str(error))
        digest = delivery_digest(key, header, body)
        claim = webhooks.claim_delivery(digest, self.replay_ttl)
        if claim == "done":
            return _reply(200, status="duplicate")
        if claim == "pending":
            return _reply(503, error="the same delivery is being taken; retry later")
        try:
            webhooks.note_delivery(key, now)
            reply = self._take(key, subscription, body)
            webhooks.delivery_done(digest)
        except BaseException:
            # Not taken after all: Calendly's retry must not be answered as a replay.
            try:
                webhooks.release_delivery(digest)
            except CloseSyncError:
                log.warning("a delivery's replay mark could not be released; it expires")
            raise
        return reply

    def _take(self, key: str, subscription: Subscription, body: bytes) -> Reply:
        """Ask for what a verified, claimed delivery asks."""
        try:
            delivery = parse_delivery(body)
        except MalformedDelivery as error:
            # 2xx: a 4xx is retried for 24 h, then Calendly disables the subscription.
            own = [subscription.connection_id] if subscription.connection_id else []
            log.warning(
                "webhook delivery signed but unreadable, left to the poll%s: %s",
                " (its connection asked)" if own else "",
                error,
                extra={"webhook": key_digest(key)},
            )
            if own:
                self.ask(own)
            return _reply(200, status="unreadable", asked=len(own))
        if delivery is None:
            return _reply(200, status="ignored")
        ids, fanned_out = self._targets(subscription, delivery.change)
        asked = self.ask(ids) if ids else []
        log.info(
            "webhook delivery %s: %d connection(s) asked%s",
            delivery.event,
            len(asked),
            ", the organization's fanned out" if fanned_out else "",
            extra={"webhook": key_digest(key)},
        )
        return _reply(200, status="accepted", asked=len(ids))

    def _signing_key(self, subscription: Subscription) -> SecretStr | None:
        """The key the subscription's deliveries are signed with; None (logged) when missing."""
        try:
            own = self.services.webhooks.signing_key(subscription.key)
        except EncryptionError as error:
            log.error(
                "a webhook subscription's signing key cannot be opened: %s",
                error,
                extra={"webhook": key_digest(subscription.key)},
            )
            return None
        if own is not None:
            return own
        if subscription.own_signing_key:
            log.error(
                "a webhook subscription made with its own signing key has none stored; "
                "`closesync webhooks ensure` re-creates it",
                extra={"webhook": key_digest(subscription.key)},
            )
            return None
        app_key = self.services.settings.calendly_webhook_signing_key
        if app_key is None or not app_key.get_secret_value():
            log.error(
                "%s is not set: deliveries to subscriptions of the OAuth application cannot be "
                "verified (copy the key from Calendly's developer console)",
                _SIGNING_SETTING,
                extra={"webhook": key_digest(subscription.key)},
            )
            return None
        return app_key

    def _targets(
        self, subscription: Subscription, change: EventTypeChange
    ) -> tuple[list[str], bool]:
        """The connections this delivery asks to sync, and whether it fanned the organization out
        to a task: a few Redis reads whatever the organization's size, never a scan."""
        connections = self.services.connections
        owner_uuid = change.owner_uuid
        owner = connections.id_of_calendly_user(owner_uuid) if owner_uuid else None
        hosts = self.services.state.holders(change.uuid) if change.is_team else set()
        candidates = {c for c in (owner, *hosts) if c is not None}
        served: set[str]
        if subscription.scope == "user":
            served = {subscription.connection_id} if subscription.connection_id else set()
        else:
            # Read from the candidates' records: a handful of keys in one MGET.
            refs = connections.organization_refs(candidates)
            served = {
                c for c, ref in refs.items() if ref is not None and ref == subscription.grant_ref
            }
        all_served: set[str] | None = None
        fanned_out = False
        if needs_fan_out(change, hosts & served):
            if subscription.scope == "user":
                all_served = served
            elif subscription.grant_ref is not None:
                fanned_out = self.ask.organization(subscription.grant_ref, change.uuid)
        ids = targets(change, owner=owner, hosts=hosts, served=served, all_served=all_served)
        return ids, fanned_out


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by name, case-insensitively (frameworks differ in how they hand them over)."""
    wanted = name.casefold()
    return next((value for key, value in headers.items() if key.casefold() == wanted), None)
