"""Calendly organization mode, the shared credential: one owner or admin grant per organization.

The grant is stored once, sealed, under the organization's ref (its uuid), bound to the Close
organization of the admin who connected it (who authorized Close first in the same flow): only
Close users of that Close organization are ever paired with its members, whatever their email,
since Calendly member emails are whatever that Calendly organization says they are. A credential
stored before this binding existed is bound to no Close organization and pairs nobody new until
an owner or admin connects it again. The connections of the
organization keep no Calendly grant of their own but `calendly_grant_ref`, so they all read,
refresh and rotate the ONE shared grant under ONE refresh lock (`credentials.shared_lock_key`).
Reconnecting replaces the grant under that lock, so a refresh in flight cannot write the old
grant back, and revokes the old grant only once the new one is stored. It also clears the mark a
refused shared grant left (`ConnectionStore.mark_shared_refused`), so every connection of the
organization syncs again at once.

It must never print or log a token.
"""

from __future__ import annotations

import json
import time
from typing import Any

from closesync.apis.calendly.client import CalendlyClient
from closesync.apis.credentials import (
    REFRESH_WAIT_SECONDS,
    TokenKeeper,
    grant_lock_name,
    shared_lock_key,
)
from closesync.connect.deps import ConnectServices
from closesync.connect.revoke import revoke_grant
from closesync.core.calendly_payloads import uuid_of
from closesync.core.close_payloads import Me
from closesync.core.connection import Connection, Grant, Grants, Side
from closesync.core.errors import CloseSyncError, ConnectionNotFound, EncryptionError
from closesync.core.retry import WaitBudget
from closesync.store.client import guard
from closesync.store.connections import ConnectionStore, grant_json
from closesync.store.keys import Owner


class OrganizationBusy(CloseSyncError):
    """The shared grant's refresh lock stayed held: the credential was not replaced."""


class _SharedGrantStore:
    """The GrantStore a TokenKeeper of the organization's own calls sees: the shared grant."""

    def __init__(self, connections: ConnectionStore, ref: str) -> None:
        self.connections = connections
        self.ref = ref

    def grants(self, connection_id: str) -> Grants:
        grant: Grant = self.connections.shared_grant(self.ref)
        return Grants(close=grant, calendly=grant)

    def update_grant(self, connection_id: str, side: Side, grant: Grant) -> None:
        self.connections.set_shared_grant(self.ref, grant)


class OrgCredentials:
    """The organizations' shared Calendly credentials, and the connections that use them."""

    def __init__(self, services: ConnectServices) -> None:
        self.services = services
        self.redis = services.redis
        self.keys = services.keys
        self.box = services.box
        self.connections = services.connections

    @guard("listing Calendly organizations")
    def refs(self) -> list[str]:
        return sorted(str(m) for m in self.redis.smembers(self.keys.calendly_orgs()))

    @guard("reading a Calendly organization")
    def info(self, ref: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.keys.calendly_org(ref))
        return None if raw is None else dict(json.loads(raw))

    def bound_to(self, ref: str) -> str | None:
        """The Close organization whose users may be paired with `ref`'s members; None: none."""
        bound = (self.info(ref) or {}).get("close_organization_id")
        return None if bound is None else str(bound)

    def refs_for(self, close_organization_id: str | None) -> list[str]:
        """The credentials bound to `close_organization_id`: the only ones its users pair with."""
        if close_organization_id is None:
            return []
        return [ref for ref in self.refs() if self.bound_to(ref) == close_organization_id]

    def users_elsewhere(
        self, organization_uri: str, close_organization_id: str
    ) -> list[Connection]:
        """Connections of other Close organizations reading this organization's credential."""
        return [
            c
            for c in self.users(uuid_of(organization_uri))
            if c.close_organization_id != close_organization_id
        ]

    def connect(
        self,
        organization_uri: str,
        owner_uri: str,
        owner_email: str | None,
        grant: Grant,
        *,
        close_admin: Me,
        wait_seconds: float = REFRESH_WAIT_SECONDS,
    ) -> str:
        """Store (or replace) the organization's shared credential; its ref is returned.

        `close_admin` is the Close user who connected it: the credential is bound to their
        Close organization.

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
            self._store(ref, organization_uri, owner_uri, owner_email, grant, close_admin)
        finally:
            lock.release()
        if old is not None and old.access_token != grant.access_token:
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
        close_admin: Me,
    ) -> None:
        info = {
            "ref": ref,
            "organization_uri": organization_uri,
            "authorized_by": owner_uri,
            "authorized_by_email": owner_email,
            "close_organization_id": close_admin.organization_id,
            "close_authorized_by": close_admin.id,
            "close_authorized_by_email": close_admin.email,
            "at": time.time(),
        }
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.calendly_org(ref), json.dumps(info))
            sealed = self.box.seal(grant_json(grant), owner=Owner.organization(ref))
            pipe.set(self.keys.calendly_org_grant(ref), sealed)
            pipe.delete(self.keys.calendly_org_refused(ref))
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
                self.keys.calendly_org_refused(ref),
            )
            pipe.srem(self.keys.calendly_orgs(), ref)
            pipe.execute()

    def overview(self) -> list[dict[str, Any]]:
        """Each shared credential's public facts and state (`needs_reauth` once refused)."""
        found = []
        for ref in self.refs():
            info = self.info(ref) or {}
            refused = self.connections.shared_refused(ref)
            found.append(
                {
                    "ref": ref,
                    "organization_uri": info.get("organization_uri"),
                    "authorized_by_email": info.get("authorized_by_email"),
                    "close_organization_id": info.get("close_organization_id"),
                    "state": "active" if refused is None else "needs_reauth",
                    "state_reason": refused,
                }
            )
        return found

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
