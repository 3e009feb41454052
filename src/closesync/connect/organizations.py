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

The parts live beside this module: the shared credential (`org_credentials`), the member lists
(`org_members`), the Close users waiting for a match (`org_waiting`); this one pairs them.
Pairing decides nothing about the sync; it must never print or log a token.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from closesync.connect.deps import ConnectServices
from closesync.connect.org_credentials import OrgCredentials
from closesync.connect.org_members import Member, MemberCache, match
from closesync.connect.org_waiting import WaitingRoom
from closesync.connect.saving import save_shared_connection
from closesync.core.close_payloads import Me
from closesync.core.connection import Connection, Grant, connection_from

log = logging.getLogger(__name__)


class Organizations:
    """Pairs Close users with the members of the connected Calendly organizations."""

    def __init__(self, services: ConnectServices) -> None:
        self.credentials = OrgCredentials(services)
        self.members = MemberCache(self.credentials)
        self.waiting_room = WaitingRoom(services.redis, services.keys, services.box)
        self.connections = services.connections
        self.services = services

    def pair_close_user(self, me: Me, grant: Grant, name: str | None = None) -> Connection | None:
        """Pair a Close user who just authorized; None (and they wait) without a match."""
        for ref in self.credentials.refs():
            member = match(me.email, self.members.fetch(ref))
            if member is not None:
                connection = self._save(
                    ref, me.id, me.email, me.organization_id, member, grant, name
                )
                self.waiting_room.unwait(me.id)
                return connection
        self.waiting_room.wait(me, grant)
        log.info("Close user waits for a Calendly member", extra={"close_user_id": me.id})
        return None

    def pair_waiting(self) -> list[Connection]:
        """Pair every waiting Close user who now has a member (after an organization connects)."""
        paired: list[Connection] = []
        waiting = self.waiting_room.waiting()
        if not waiting:
            for ref in self.credentials.refs():
                self.members.fetch(ref)
            return paired
        for ref in self.credentials.refs():
            members = self.members.fetch(ref)
            for person in waiting:
                member = match(person.email, members)
                grant = self.waiting_room.grant(person.close_user_id) if member else None
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
                self.waiting_room.unwait(person.close_user_id)
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
        info = self.credentials.info(ref) or {}
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
        # A re-authorizing Close user: under the old grants' refresh locks, which it revokes.
        save_shared_connection(self.services, existing, connection, grant)
        log.info("paired in organization mode", extra={"connection_id": connection.id})
        return connection

    def unmatched(self) -> dict[str, Any]:
        """Close users waiting for a member, and members with no connection, per organization."""
        connections: list[Connection] = self.connections.list()
        paired_uris = {c.calendly_user_uri for c in connections}
        calendly = {
            ref: [
                {"email": m.email, "name": m.name, "uri": m.uri}
                for m in self.members.remembered(ref)
                if m.uri not in paired_uris
            ]
            for ref in self.credentials.refs()
        }
        close = [
            {"close_user_id": w.close_user_id, "email": w.email, "since": w.at}
            for w in self.waiting_room.waiting()
        ]
        return {"close": close, "calendly": calendly}
