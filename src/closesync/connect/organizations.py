"""Calendly organization mode: one owner or admin credential serves every member of the org.

An owner or admin authorizes once (`closesync connect --organization`, or /connect/organization
on the web process); the grant is stored once, sealed, under the organization's ref (its uuid).
Each Close user who authorizes Close is then paired with the Calendly member of the same email,
compared ignoring ASCII case only (`same_email`); the resulting connections keep no Calendly
grant of their own but `calendly_grant_ref`, so they all read, refresh and rotate the ONE shared
grant under ONE refresh lock (`credentials.shared_lock_key`). Reconnecting replaces the grant
under that lock, so a refresh in flight cannot write the old grant back, and revokes the old
grant only once the new one is stored. Which organizations may connect at all is
CALENDLY_ORGANIZATION_URIS (checked by `closesync.connect.connector`). A Close user with no matching
member waits (their Close grant sealed) until a later pairing pass finds one; `closesync status`
lists who is unmatched on either side from the member list as last fetched, without calling
Calendly.

Pairing decides nothing about the sync; it must never print or log a token.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from closesync.apis.calendly.client import CalendlyClient
from closesync.apis.credentials import (
    REFRESH_WAIT_SECONDS,
    TokenKeeper,
    grant_lock_name,
    shared_lock_key,
)
from closesync.core.calendly_payloads import uuid_of
from closesync.core.close_payloads import Me
from closesync.core.connection import (
    Connection,
    Grant,
    Grants,
    connection_from,
)
from closesync.core.errors import CloseSyncError, ConnectionNotFound, EncryptionError
from closesync.core.retry import WaitBudget
from closesync.store.client import guard
from closesync.store.connections import grant_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """A Calendly member as pairing needs it (no secret)."""

    uri: str
    email: str | None
    name: str | None


@dataclass(frozen=True)
class Waiting:
    """A Close user who authorized but matches no Calendly member yet."""

    close_user_id: str
    email: str | None
    organization_id: str | None
    at: float


# A-Z -> a-z and nothing else: str.lower()/casefold() also fold lookalikes such as the Kelvin
# sign (U+212A) into "k", which would let a crafted address pair with someone else's.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def email_key(email: str) -> str:
    """An email as pairing compares it: surrounding spaces dropped, ASCII letters lowercased."""
    return email.strip().translate(_ASCII_LOWER)


def same_email(a: str | None, b: str | None) -> bool:
    """Emails compared as people mean them: ignoring ASCII case and surrounding spaces."""
    if not a or not b:
        return False
    return email_key(a) == email_key(b)


def match(email: str | None, members: list[Member]) -> Member | None:
    """The member with `email`, ignoring case; None when there is none."""
    return next((m for m in members if same_email(m.email, email)), None)


class OrganizationBusy(CloseSyncError):
    """The shared grant's refresh lock stayed held: the credential was not replaced."""


class _SharedGrantStore:
    """The GrantStore a TokenKeeper of the organization's own calls sees: the shared grant."""

    def __init__(self, connections: Any, ref: str) -> None:
        self.connections = connections
        self.ref = ref

    def grants(self, connection_id: str) -> Grants:
        grant: Grant = self.connections.shared_grant(self.ref)
        return Grants(close=grant, calendly=grant)

    def update_grant(self, connection_id: str, side: str, grant: Grant) -> None:
        self.connections.set_shared_grant(self.ref, grant)


class Organizations:
    """The shared Calendly credentials, their members, and the Close users waiting for one."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.redis = services.redis
        self.keys = services.keys
        self.box = services.box
        self.connections = services.connections

    # -- the shared credentials --------------------------------------------------------------

    @guard("listing Calendly organizations")
    def refs(self) -> list[str]:
        return sorted(str(m) for m in self.redis.smembers(self.keys.calendly_orgs()))

    @guard("reading a Calendly organization")
    def info(self, ref: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.keys.calendly_org(ref))
        return None if raw is None else dict(json.loads(raw))

    def connect(
        self,
        organization_uri: str,
        owner_uri: str,
        owner_email: str | None,
        grant: Grant,
        *,
        wait_seconds: float = REFRESH_WAIT_SECONDS,
    ) -> str:
        """Store (or replace) the organization's shared credential; its ref is returned.

        Under the shared refresh lock, so that a refresh in flight cannot write the replaced
        grant back over the new one; the replaced grant is revoked afterwards, best effort.
        OrganizationBusy (nothing stored) when the lock stays held.
        """
        ref = uuid_of(organization_uri)
        lock = self.services.refresh_lock(grant_lock_name("calendly", shared_lock_key(ref)))
        if not lock.acquire_wait(wait_seconds):
            raise OrganizationBusy(
                "the organization's Calendly credential is being refreshed right now"
            )
        try:
            old = self._stored_grant(ref)
            self._store(ref, organization_uri, owner_uri, owner_email, grant)
        finally:
            lock.release()
        if old is not None and old.access_token != grant.access_token:
            from closesync.connect.connector import revoke_grant  # connecting imports this module

            revoke_grant(self.services, "calendly", old)
        return ref

    def _stored_grant(self, ref: str) -> Grant | None:
        """The shared grant now stored, if any and readable (a replaced one is revoked)."""
        try:
            grant: Grant = self.connections.shared_grant(ref)
        except (ConnectionNotFound, EncryptionError):
            return None
        return grant

    @guard("storing a Calendly organization credential")
    def _store(
        self,
        ref: str,
        organization_uri: str,
        owner_uri: str,
        owner_email: str | None,
        grant: Grant,
    ) -> None:
        info = {
            "ref": ref,
            "organization_uri": organization_uri,
            "authorized_by": owner_uri,
            "authorized_by_email": owner_email,
            "at": time.time(),
        }
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.calendly_org(ref), json.dumps(info))
            pipe.set(self.keys.calendly_org_grant(ref), self.box.seal(grant_json(grant)))
            pipe.sadd(self.keys.calendly_orgs(), ref)
            pipe.execute()

    @guard("forgetting a Calendly organization")
    def forget(self, ref: str) -> None:
        """Erase the organization's credential and member list (after revoking it)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(
                self.keys.calendly_org(ref),
                self.keys.calendly_org_grant(ref),
                self.keys.calendly_org_members(ref),
            )
            pipe.srem(self.keys.calendly_orgs(), ref)
            pipe.execute()

    def users(self, ref: str) -> list[Connection]:
        """The connections that read the shared credential `ref`."""
        found: list[Connection] = self.connections.list()
        return [c for c in found if c.calendly_grant_ref == ref]

    def client(self, ref: str) -> CalendlyClient:
        """A Calendly client on the shared credential, refreshing under its shared lock."""
        services = self.services
        keeper = TokenKeeper(
            connection_id=ref,
            side="calendly",
            store=_SharedGrantStore(self.connections, ref),
            refresher=services.calendly_oauth(),
            lock_factory=services.refresh_lock,
            lock_key=shared_lock_key(ref),
        )
        budget = WaitBudget(services.settings.inline_wait_budget_seconds)
        http = services.api_http("Calendly", services.settings.calendly_api_url, budget)
        return CalendlyClient(http=http, token=keeper.access_token)

    # -- members -----------------------------------------------------------------------------

    def fetch_members(self, ref: str) -> list[Member]:
        """List the organization's members from Calendly and remember them for `status`."""
        info = self.info(ref)
        if info is None:
            return []
        members = [
            Member(uri=m.user.uri, email=m.user.email, name=m.user.name)
            for m in self.client(ref).iter_organization_memberships(info["organization_uri"])
        ]
        with guard("remembering Calendly members"):
            self.redis.set(
                self.keys.calendly_org_members(ref), json.dumps([asdict(m) for m in members])
            )
        return members

    @guard("reading Calendly members")
    def members(self, ref: str) -> list[Member]:
        """The members as last fetched."""
        raw = self.redis.get(self.keys.calendly_org_members(ref))
        return [] if raw is None else [Member(**m) for m in json.loads(raw)]

    # -- Close users waiting for a match -----------------------------------------------------

    @guard("remembering a Close user waiting for a Calendly match")
    def wait(self, me: Me, grant: Grant) -> None:
        entry = {"email": me.email, "organization_id": me.organization_id, "at": time.time()}
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.waiting_close(), me.id, json.dumps(entry))
            pipe.set(self.keys.waiting_close_grant(me.id), self.box.seal(grant_json(grant)))
            pipe.execute()

    @guard("reading the Close users waiting for a match")
    def waiting(self) -> list[Waiting]:
        raw = self.redis.hgetall(self.keys.waiting_close())
        return sorted(
            (Waiting(close_user_id=str(uid), **json.loads(v)) for uid, v in raw.items()),
            key=lambda w: (w.at, w.close_user_id),
        )

    @guard("reading a waiting Close user's grant")
    def _waiting_grant(self, close_user_id: str) -> Grant | None:
        sealed = self.redis.get(self.keys.waiting_close_grant(close_user_id))
        return None if sealed is None else Grant.model_validate_json(self.box.open(str(sealed)))

    @guard("forgetting a waiting Close user")
    def unwait(self, close_user_id: str) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.waiting_close(), close_user_id)
            pipe.delete(self.keys.waiting_close_grant(close_user_id))
            pipe.execute()

    # -- pairing -----------------------------------------------------------------------------

    def pair_close_user(self, me: Me, grant: Grant, name: str | None = None) -> Connection | None:
        """Pair a Close user who just authorized; None (and they wait) without a match."""
        for ref in self.refs():
            member = match(me.email, self.fetch_members(ref))
            if member is not None:
                connection = self._save(
                    ref, me.id, me.email, me.organization_id, member, grant, name
                )
                self.unwait(me.id)
                return connection
        self.wait(me, grant)
        log.info("Close user waits for a Calendly member", extra={"close_user_id": me.id})
        return None

    def pair_waiting(self) -> list[Connection]:
        """Pair every waiting Close user who now has a member (after an organization connects)."""
        paired: list[Connection] = []
        waiting = self.waiting()
        if not waiting:
            for ref in self.refs():
                self.fetch_members(ref)
            return paired
        for ref in self.refs():
            members = self.fetch_members(ref)
            for person in waiting:
                member = match(person.email, members)
                grant = self._waiting_grant(person.close_user_id) if member else None
                if member is None or grant is None:
                    continue
                paired.append(
                    self._save(
                        ref,
                        person.close_user_id,
                        person.email,
                        person.organization_id,
                        member,
                        grant,
                        None,
                    )
                )
                self.unwait(person.close_user_id)
            waiting = [
                w for w in waiting if all(c.close_user_id != w.close_user_id for c in paired)
            ]
        return paired

    def _save(
        self,
        ref: str,
        close_user_id: str,
        close_email: str | None,
        close_organization_id: str | None,
        member: Member,
        grant: Grant,
        name: str | None,
    ) -> Connection:
        info = self.info(ref) or {}
        existing: Connection | None = self.connections.find_by_close_user(close_user_id)
        now = time.time()
        connection = connection_from(
            existing=existing,
            close_user_id=close_user_id,
            close_email=close_email,
            close_organization_id=close_organization_id,
            calendly_user_uri=member.uri,
            calendly_email=member.email,
            calendly_organization_uri=info.get("organization_uri"),
            name=name,
            now=now,
            calendly_grant_ref=ref,
        )
        self.connections.save_shared(connection, grant)
        log.info("paired in organization mode", extra={"connection_id": connection.id})
        return connection

    # -- who is unmatched --------------------------------------------------------------------

    def unmatched(self) -> dict[str, Any]:
        """Close users waiting for a member, and members with no connection, per organization."""
        connections: list[Connection] = self.connections.list()
        paired_uris = {c.calendly_user_uri for c in connections}
        calendly = {
            ref: [
                {"email": m.email, "name": m.name, "uri": m.uri}
                for m in self.members(ref)
                if m.uri not in paired_uris
            ]
            for ref in self.refs()
        }
        close = [
            {"close_user_id": w.close_user_id, "email": w.email, "since": w.at}
            for w in self.waiting()
        ]
        return {"close": close, "calendly": calendly}
