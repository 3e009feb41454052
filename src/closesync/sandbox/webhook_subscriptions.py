"""The World's Calendly webhook subscriptions: create, list, get, delete, disable, and which of
them a change to an event type must be delivered to.

A mixin of World (which supplies the lock, clock, ids and the delivery queue), kept in its own
module so that each file stays one noun. Every method takes the World's lock.

Emulated as api-facts.md's Webhooks section has it: scopes `user` and `organization` (`group`
is not emulated: a 400 says so); state `active` or `disabled`; the callback URL never changes;
an owner or admin may create either scope, a plain member only `user` scope for itself.
Documented choices where the docs are silent:
- 409 "Already Exists" when a subscription of the same owner (that user, or that
  organization) or by the same creator already has that callback URL, whatever its state.
- A member may read and delete only subscriptions it created or that are for itself; owners
  and admins any of the organization's.
- The signing key: for one created with an OAuth access token, always the application's key
  (config `calendly_webhook_signing_key`, read at delivery time, so changing it re-keys every
  such subscription as Calendly's console would), and a `signing_key` passed with it is
  ignored: api-facts.md reads the docs as one key for all of an OAuth application's
  subscriptions, and the docs describe `signing_key` only for personal access tokens (the
  sandbox's reading; Calendly might instead refuse or honour it). With a personal access
  token, the `signing_key` given at creation; without one a random key the sandbox never
  shows, so such deliveries cannot be verified by anyone, as a PAT-made subscription without
  a key would be useless for verification at Calendly too.
- Who a change is delivered to: every active `organization`-scope subscription of the
  organization for every event type; `user`-scope subscriptions of the owner and of every
  host of a team type (for a membership change, of the hosts before and after it).
- The envelope's `created_at` is the sandbox clock's time of the change and `created_by` the
  URI of the user who created the receiving subscription, as Calendly sends it: one envelope
  per subscription, so an organization subscription made by an admin says that admin even
  for a member's event type.
- `retry_started_at` is set at the first failed delivery of a run of failures and cleared by a
  success; after `webhook_disable_after` consecutive failures the state becomes `disabled`
  and the subscription gets no more deliveries (Calendly: after 24 h of retries).
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from closesync.sandbox.config import SandboxConfig
from closesync.sandbox.deliveries import Deliverer, Outcome
from closesync.sandbox.records import JSON, CalendlyUser, EventType, iso

# Every event a subscription may ask for; only the event_type.* ones are ever delivered here.
KNOWN_EVENTS = (
    "invitee.created",
    "invitee.canceled",
    "invitee_no_show.created",
    "invitee_no_show.deleted",
    "routing_form_submission.created",
    "event_type.created",
    "event_type.updated",
    "event_type.deleted",
)


class SubscriptionConflict(Exception):
    """A subscription to that callback URL exists already for that owner (answered 409)."""


@dataclass
class WebhookSubscription:
    """One webhook subscription; `user_uuid` is None for organization scope."""

    uuid: str
    callback_url: str
    events: list[str]
    scope: str  # user | organization
    user_uuid: str | None
    creator_uuid: str
    created_at: float
    updated_at: float
    # Where the signing key comes from: given at creation, the OAuth application's, or random.
    key_source: Literal["given", "application", "random"]
    signing_key: str | None = field(default=None, repr=False)
    state: str = "active"  # active | disabled
    retry_started_at: float | None = None
    failures: int = 0


class WebhookBook:
    """Subscription operations; state lives on the World."""

    lock: threading.RLock
    config: SandboxConfig
    cal_users: dict[str, CalendlyUser]
    calendly_base: str

    def __init__(self) -> None:
        self.subscriptions: dict[str, WebhookSubscription] = {}
        self.deliverer = Deliverer(self, self.config.seed)

    def new_uuid(self) -> str:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def render_type(self, et: EventType) -> JSON:
        raise NotImplementedError

    @property
    def calendly_org_uri(self) -> str:
        raise NotImplementedError

    def render_subscription(self, sub: WebhookSubscription) -> JSON:
        """The `WebhookSubscription` resource as Calendly renders it (call with the lock held)."""
        base = self.calendly_base
        return {
            "uri": f"{base}/webhook_subscriptions/{sub.uuid}",
            "callback_url": sub.callback_url,
            "created_at": iso(sub.created_at),
            "updated_at": iso(sub.updated_at),
            "retry_started_at": None if sub.retry_started_at is None else iso(sub.retry_started_at),
            "state": sub.state,
            "events": list(sub.events),
            "scope": sub.scope,
            "organization": self.calendly_org_uri,
            "user": None if sub.user_uuid is None else f"{base}/users/{sub.user_uuid}",
            "group": None,
            "creator": f"{base}/users/{sub.creator_uuid}",
        }

    def create_subscription(
        self,
        creator_uuid: str,
        url: str,
        events: list[str],
        scope: str,
        user_uuid: str | None,
        signing_key: str | None,
        by_oauth: bool,
    ) -> JSON:
        """A new active subscription (arguments already validated by the endpoint)."""
        with self.lock:
            owner = ("user", user_uuid) if scope == "user" else ("organization", None)
            for sub in self.subscriptions.values():
                same_owner = (sub.scope, sub.user_uuid) == owner
                if sub.callback_url == url and (same_owner or sub.creator_uuid == creator_uuid):
                    raise SubscriptionConflict(url)
            source: Literal["given", "application", "random"]
            if by_oauth:
                source, signing_key = "application", None  # a passed key is ignored (above)
            elif signing_key is not None:
                source = "given"
            else:
                source, signing_key = "random", secrets.token_hex(32)
            now = self.now()
            sub = WebhookSubscription(
                uuid=self.new_uuid(),
                callback_url=url,
                events=list(dict.fromkeys(events)),
                scope=scope,
                user_uuid=user_uuid if scope == "user" else None,
                creator_uuid=creator_uuid,
                created_at=now,
                updated_at=now,
                key_source=source,
                signing_key=signing_key,
            )
            self.subscriptions[sub.uuid] = sub
            return self.render_subscription(sub)

    def list_subscriptions(self, scope: str | None, user_uuid: str | None) -> list[JSON]:
        """Subscriptions of one scope (and, for `user`, one user), oldest first; None: all."""
        with self.lock:
            found = [
                s
                for s in self.subscriptions.values()
                if scope is None
                or (s.scope == scope and (scope != "user" or s.user_uuid == user_uuid))
            ]
            found.sort(key=lambda s: s.created_at)  # stable: creation order breaks ties
            return [self.render_subscription(s) for s in found]

    def subscription_owner(self, uuid: str) -> tuple[str | None, str] | None:
        """(user uuid or None for organization scope, creator uuid), or None when unknown."""
        with self.lock:
            sub = self.subscriptions.get(uuid)
            return None if sub is None else (sub.user_uuid, sub.creator_uuid)

    def get_subscription(self, uuid: str) -> JSON | None:
        """One rendered subscription."""
        with self.lock:
            sub = self.subscriptions.get(uuid)
            return None if sub is None else self.render_subscription(sub)

    def delete_subscription(self, uuid: str) -> bool:
        """Delete a subscription; its queued deliveries are then never sent."""
        with self.lock:
            return self.subscriptions.pop(uuid, None) is not None

    def disable_subscription(self, uuid: str) -> JSON:
        """Make a subscription `disabled`, as 24 h of failed deliveries would (admin knob)."""
        with self.lock:
            sub = self.subscriptions.get(uuid)
            if sub is None:
                raise KeyError(f"no webhook subscription {uuid}")
            self._disable(sub)
            return self.render_subscription(sub)

    def _disable(self, sub: WebhookSubscription) -> None:
        now = self.now()
        sub.state = "disabled"
        sub.retry_started_at = sub.retry_started_at or now
        sub.updated_at = now

    # deliveries ---------------------------------------------------------------------------

    def announce(self, event: str, et: EventType, hosts: set[str]) -> None:
        """Queue `event` about `et` for every matching active subscription (lock held).

        `hosts` are the users whose user-scope subscriptions match (owner and team members).
        The payload is the event type as the API renders it now.
        """
        with self.lock:
            targets = [
                s
                for s in self.subscriptions.values()
                if s.state == "active"
                and event in s.events
                and (s.scope == "organization" or s.user_uuid in hosts)
            ]
            if not targets:
                return
            payload = self.render_type(et)
            created_at = iso(self.now())
            base = self.calendly_base
            self.deliverer.enqueue(
                [
                    (
                        s.uuid,
                        self.render_subscription(s)["uri"],
                        {
                            "event": event,
                            "created_at": created_at,
                            "created_by": f"{base}/users/{s.creator_uuid}",
                            "payload": payload,
                        },
                    )
                    for s in targets
                ],
                event,
                payload["uri"],
            )

    def delivery_target(self, uuid: str) -> tuple[str, str] | None:
        """(callback URL, signing key) of an active subscription; None when it is gone or
        disabled (its queued deliveries are then dropped)."""
        with self.lock:
            sub = self.subscriptions.get(uuid)
            if sub is None or sub.state != "active":
                return None
            key = sub.signing_key
            if sub.key_source == "application" or key is None:
                key = self.config.calendly_webhook_signing_key
            return sub.callback_url, key

    def delivery_result(self, uuid: str, outcome: Outcome) -> bool:
        """Record how a delivery attempt went; True when a failed one should be retried."""
        with self.lock:
            sub = self.subscriptions.get(uuid)
            if sub is None:
                return False
            if outcome == "gone":
                del self.subscriptions[uuid]
                return False
            if outcome == "delivered":
                sub.failures, sub.retry_started_at = 0, None
                return False
            sub.failures += 1
            sub.retry_started_at = sub.retry_started_at or self.now()
            if sub.failures >= self.config.webhook_disable_after:
                self._disable(sub)
                return False
            return sub.state == "active"

    def subscription_details(self) -> list[dict[str, Any]]:
        """Every subscription regardless of owner, with the sandbox's own bookkeeping (where
        its key comes from, the current run of failures); never the key itself."""
        with self.lock:
            return [
                {
                    **self.render_subscription(s),
                    "key_source": s.key_source,
                    "failures": s.failures,
                }
                for s in sorted(self.subscriptions.values(), key=lambda s: s.created_at)
            ]
