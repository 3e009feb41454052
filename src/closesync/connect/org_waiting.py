"""Calendly organization mode, the waiting room: Close users who authorized before their match.

A Close user whose email matches no member yet waits, their Close grant sealed, until a later
pairing pass (after an organization connects, or the daily drift check) finds one. A pairing
refused because another connection already has the matching Calendly user is remembered too,
without any secret, so that `closesync status` can list it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import redis
from redis import Redis

from closesync.core.close_payloads import Me
from closesync.core.connection import Grant
from closesync.core.errors import EncryptionError
from closesync.store.client import guard
from closesync.store.connections import grant_json
from closesync.store.keys import Keys, Owner, as_text, watched
from closesync.store.secretbox import SecretBox


@dataclass(frozen=True)
class Waiting:
    """A Close user who authorized but matches no Calendly member yet."""

    close_user_id: str
    email: str | None
    organization_id: str | None
    at: float


@dataclass(frozen=True)
class Refusal:
    """A Close user whose matching Calendly member another connection already has (no secret)."""

    close_user_id: str
    email: str | None
    organization_id: str | None
    calendly_user_uri: str
    calendly_email: str | None
    connection_id: str
    at: float


class WaitingRoom:
    """The Close users waiting for a Calendly member of their email."""

    def __init__(self, redis: Redis, keys: Keys, box: SecretBox) -> None:
        self.redis = redis
        self.keys = keys
        self.box = box

    @guard("remembering a Close user waiting for a Calendly match")
    def wait(self, me: Me, grant: Grant) -> Grant | None:
        """Remember `me` waiting with `grant`; the grant they waited with before, if readable
        (the caller revokes it: nothing else would ever use or revoke it)."""
        entry = {"email": me.email, "organization_id": me.organization_id, "at": time.time()}
        key = self.keys.waiting_close_grant(me.id)
        sealed = self.box.seal(grant_json(grant), owner=Owner.waiting_close_user(me.id))

        def apply(pipe: redis.client.Pipeline) -> str | None:
            old = pipe.get(key)
            pipe.multi()
            pipe.hset(self.keys.waiting_close(), me.id, json.dumps(entry))
            pipe.set(key, sealed)
            return None if old is None else as_text(old)

        return self._opened(me.id, watched(self.redis, key, apply))

    def _opened(self, close_user_id: str, sealed: str | None) -> Grant | None:
        """A replaced or forgotten waiting grant, to revoke; None when absent or unreadable."""
        if sealed is None:
            return None
        try:
            owner = Owner.waiting_close_user(close_user_id)
            return Grant.model_validate_json(self.box.open(sealed, owner=owner))
        except (EncryptionError, ValueError):
            return None  # not ours to revoke (copied here, or no key opens it)

    @guard("reading the Close users waiting for a match")
    def waiting(self) -> list[Waiting]:
        raw = self.redis.hgetall(self.keys.waiting_close())
        return sorted(
            (Waiting(close_user_id=str(uid), **json.loads(v)) for uid, v in raw.items()),
            key=lambda w: (w.at, w.close_user_id),
        )

    @guard("reading a waiting Close user's grant")
    def grant(self, close_user_id: str) -> Grant | None:
        sealed = self.redis.get(self.keys.waiting_close_grant(close_user_id))
        if sealed is None:
            return None
        owner = Owner.waiting_close_user(close_user_id)
        return Grant.model_validate_json(self.box.open(str(sealed), owner=owner))

    @guard("forgetting a waiting Close user")
    def unwait(self, close_user_id: str) -> Grant | None:
        """Forget a waiting Close user; the grant they waited with, if readable (for the caller
        to revoke unless that grant now serves their connection)."""
        key = self.keys.waiting_close_grant(close_user_id)

        def apply(pipe: redis.client.Pipeline) -> str | None:
            old = pipe.get(key)
            pipe.multi()
            pipe.hdel(self.keys.waiting_close(), close_user_id)
            pipe.delete(key)
            return None if old is None else as_text(old)

        return self._opened(close_user_id, watched(self.redis, key, apply))

    def waiting_in(self, close_organization_id: str | None) -> list[Waiting]:
        """The Close users of `close_organization_id` waiting: those a credential bound to it
        would pair, so it is still in use for them."""
        if close_organization_id is None:
            return []
        return [w for w in self.waiting() if w.organization_id == close_organization_id]

    @guard("remembering a refused pairing")
    def refuse(self, refusal: Refusal) -> None:
        fields = {k: v for k, v in asdict(refusal).items() if k != "close_user_id"}
        self.redis.hset(self.keys.refused_pairings(), refusal.close_user_id, json.dumps(fields))

    @guard("reading the refused pairings")
    def refused(self) -> list[Refusal]:
        raw = self.redis.hgetall(self.keys.refused_pairings())
        return sorted(
            (Refusal(close_user_id=str(uid), **json.loads(v)) for uid, v in raw.items()),
            key=lambda r: (r.at, r.close_user_id),
        )

    @guard("forgetting a refused pairing")
    def forget_refusal(self, close_user_id: str) -> None:
        self.redis.hdel(self.keys.refused_pairings(), close_user_id)
