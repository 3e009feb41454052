"""The webhook subscriptions closesync owns (`closesync.core.webhooks`), and their signing keys.

A subscription's public record is plain JSON; the signing key closesync generated for a
subscription made with a personal access token is sealed (SecretBox), bound to the subscription's
key, and never leaves this module but as a SecretStr. Lookups the receiver makes on every
delivery (`find`, `signing_key`) are one GET each.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import redis
from pydantic import SecretStr, ValidationError

from closesync.core.errors import StoreUnavailable
from closesync.core.webhooks import Subscription
from closesync.store.keys import Keys, Owner, as_text
from closesync.store.locks import RedisLock, hold
from closesync.store.secretbox import SecretBox

# A delivery's replay mark (keys.py, webhook-delivery:{digest}): pending while the request that
# took it enqueues, done after. A duplicate of a pending one is answered 503, so that Calendly
# retries it, in case the first fails and gives the mark back.
PENDING = "pending"
DONE = "done"
Claim = Literal["taken", "pending", "done"]

# Seconds the per-owner lifecycle lock lives unless renewed (it is, while held): a holder that
# crashed frees its owner within this time.
OWNER_LOCK_TTL_SECONDS = 30.0


class WebhookStore:
    def __init__(self, redis_client: redis.Redis, keys: Keys, box: SecretBox) -> None:
        self.redis = redis_client
        self.keys = keys
        self.box = box

    def save(self, subscription: Subscription, signing_key: SecretStr | None = None) -> None:
        """Create or replace the record (and, when given, its sealed signing key) in one MULTI;
        index it under the connection or organization it serves."""
        key = subscription.key
        owner_index = self._owner_index(subscription)
        sealed = (
            self.box.seal(signing_key.get_secret_value().encode(), owner=Owner.webhook(key))
            if signing_key is not None
            else None
        )
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.sadd(self.keys.webhooks(), key)
                pipe.set(self.keys.webhook(key), subscription.model_dump_json())
                if sealed is not None:
                    pipe.set(self.keys.webhook_signing_key(key), sealed)
                pipe.set(owner_index, key)
                pipe.execute()
        except redis.RedisError as error:
            raise StoreUnavailable(f"Redis refused saving webhook subscription: {error}") from error

    def find(self, key: str) -> Subscription | None:
        """The record of callback key `key`; None when closesync owns no such subscription."""
        raw = self._get(self.keys.webhook(key))
        if raw is None:
            return None
        try:
            return Subscription.model_validate_json(raw)
        except ValidationError:
            return None

    def signing_key(self, key: str) -> SecretStr | None:
        """The key closesync generated for subscription `key`; None: signed with the OAuth
        application's key (settings.calendly_webhook_signing_key)."""
        sealed = self._get(self.keys.webhook_signing_key(key))
        if sealed is None:
            return None
        return SecretStr(self.box.open(sealed, owner=Owner.webhook(key)).decode())

    def note_delivery(self, key: str, at: float) -> None:
        """Remember when subscription `key` last brought a verified delivery."""
        try:
            self.redis.set(self.keys.webhook_last_delivery(key), repr(at))
        except redis.RedisError as error:
            raise StoreUnavailable(f"Redis refused noting a webhook delivery: {error}") from error

    def claim_delivery(self, digest: str, ttl_seconds: int) -> Claim:
        """Take the delivery named `digest`: "taken" (this call marked it pending, SET NX),
        "pending" (another request is still enqueueing it, or just gave it back) or "done"."""
        key = self.keys.webhook_delivery(digest)
        try:
            if self.redis.set(key, PENDING, nx=True, ex=ttl_seconds):
                return "taken"
            mark = self.redis.get(key)
        except redis.RedisError as error:
            raise StoreUnavailable(
                f"Redis refused recording a webhook delivery: {error}"
            ) from error
        return "pending" if mark is None or as_text(mark) == PENDING else "done"

    def delivery_done(self, digest: str) -> None:
        """The claimed delivery was enqueued: the same one again is a replay (its TTL kept)."""
        try:
            self.redis.set(self.keys.webhook_delivery(digest), DONE, xx=True, keepttl=True)
        except redis.RedisError as error:
            raise StoreUnavailable(
                f"Redis refused recording a webhook delivery: {error}"
            ) from error

    def release_delivery(self, digest: str) -> None:
        """Give a claimed delivery back (it could not be enqueued): Calendly's retry may take it."""
        try:
            self.redis.delete(self.keys.webhook_delivery(digest))
        except redis.RedisError as error:
            raise StoreUnavailable(
                f"Redis refused releasing a webhook delivery: {error}"
            ) from error

    def last_delivery(self, key: str) -> float | None:
        raw = self._get(self.keys.webhook_last_delivery(key))
        return float(raw) if raw is not None else None

    def last_deliveries(self, keys: list[str]) -> dict[str, float]:
        """When each of these subscriptions last brought a verified delivery, in one MGET (the
        ones that never did are left out): what `status` and `webhooks list` show."""
        if not keys:
            return {}
        try:
            raws = self.redis.mget([self.keys.webhook_last_delivery(k) for k in keys])
        except redis.RedisError as error:
            raise StoreUnavailable(f"Redis refused reading webhook deliveries: {error}") from error
        return {
            k: float(as_text(raw)) for k, raw in zip(keys, raws, strict=True) if raw is not None
        }

    def indexed(self, subscriptions: list[Subscription]) -> set[str]:
        """The keys of those subscriptions that their owner's index still names, in one MGET:
        a record another one of the same owner replaced is not among them."""
        if not subscriptions:
            return set()
        try:
            named = self.redis.mget([self._owner_index(s) for s in subscriptions])
        except redis.RedisError as error:
            raise StoreUnavailable(f"Redis refused reading webhook indexes: {error}") from error
        return {
            s.key
            for s, key in zip(subscriptions, named, strict=True)
            if key is not None and as_text(key) == s.key
        }

    def for_connection(self, conn_id: str) -> Subscription | None:
        key = self._get(self.keys.webhook_of_connection(conn_id))
        return self.find(key) if key is not None else None

    def for_organization(self, grant_ref: str) -> Subscription | None:
        key = self._get(self.keys.webhook_of_organization(grant_ref))
        return self.find(key) if key is not None else None

    def all(self) -> list[Subscription]:
        try:
            keys = sorted(as_text(k) for k in self.redis.smembers(self.keys.webhooks()))
            raws = self.redis.mget([self.keys.webhook(k) for k in keys]) if keys else []
        except redis.RedisError as error:
            raise StoreUnavailable(
                f"Redis refused listing webhook subscriptions: {error}"
            ) from error
        found = []
        for raw in raws:
            if raw is None:
                continue
            try:
                found.append(Subscription.model_validate_json(as_text(raw)))
            except ValidationError:
                continue
        return found

    def current(self) -> list[Subscription]:
        """The records their owner's index names (three round trips): what serves each
        connection. A leftover record (replaced by a newer one of the same owner, not yet swept
        by the reconciliation) is left out, so a stale ACTIVE one never shadows the real
        PENDING or REFUSED one."""
        records = self.all()
        named = self.indexed(records)
        return [s for s in records if s.key in named]

    def delete(self, subscription: Subscription) -> None:
        """Forget the record, its signing key and its index entry (only if it still points here)."""
        key = subscription.key
        owner_index = self._owner_index(subscription)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.srem(self.keys.webhooks(), key)
                pipe.delete(
                    self.keys.webhook(key),
                    self.keys.webhook_signing_key(key),
                    self.keys.webhook_last_delivery(key),
                )
                pipe.execute()
            # The index may already name a newer subscription of the same owner.
            if self._get(owner_index) == key:
                self.redis.delete(owner_index)
        except redis.RedisError as error:
            raise StoreUnavailable(
                f"Redis refused deleting webhook subscription: {error}"
            ) from error

    @contextmanager
    def owner_lock(self, scope: str, owner_id: str, wait: float) -> Iterator[RedisLock]:
        """Hold the lifecycle lock of one owner (scope "user": a connection id; "organization":
        a ref) for the block, waiting up to `wait` seconds; RunLocked when another process keeps
        it. Every ensure, drop and reconcile of that owner runs under it, so two of them never
        both drop and create."""
        key = (
            self.keys.webhook_lock_of_connection(owner_id)
            if scope == "user"
            else self.keys.webhook_lock_of_organization(owner_id)
        )
        with hold(self.redis, key, OWNER_LOCK_TTL_SECONDS, wait=wait) as lock:
            yield lock

    def _owner_index(self, subscription: Subscription) -> str:
        if subscription.scope == "user":
            if subscription.connection_id is None:
                raise ValueError("a user-scope subscription serves one connection")
            return self.keys.webhook_of_connection(subscription.connection_id)
        if subscription.grant_ref is None:
            raise ValueError("an organization-scope subscription serves one organization ref")
        return self.keys.webhook_of_organization(subscription.grant_ref)

    def _get(self, key: str) -> str | None:
        try:
            raw = self.redis.get(key)
        except redis.RedisError as error:
            # Not naming the key: it holds the callback key, half of what a delivery proves.
            raise StoreUnavailable(
                f"Redis refused reading webhook subscriptions: {error}"
            ) from error
        return as_text(raw) if raw is not None else None
