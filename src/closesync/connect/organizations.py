"""Calendly organization mode: one owner or admin credential serves every member of the org.

An owner or admin authorizes once (`closesync connect --organization`, or /connect/organization
on the web process); the grant is stored once, sealed, under the organization's ref (its uuid),
bound to that admin's Close organization. Each Close user of that Close organization (and only
of it: `OrgCredentials.refs_for`) who authorizes Close is then paired with the Calendly member
of the same email, compared ignoring ASCII case only (`same_email`); the resulting connections
keep no Calendly grant of their own but `calendly_grant_ref`, so they all read, refresh and
rotate the ONE shared grant under ONE refresh lock (`credentials.shared_lock_key`). Reconnecting
replaces the grant under that lock, so a refresh in flight cannot write the old grant back, and
revokes the old grant only once the new one is stored. Which organizations may connect at all is
CALENDLY_ORGANIZATION_URIS and CLOSE_ORGANIZATION_IDS (checked by `closesync.connect.connector`;
the latter again here for users who waited). A Close user with no matching member waits (their
Close grant sealed) until a later pairing pass finds one; `closesync status` lists who is
unmatched on either side from the member list as last fetched, without calling Calendly. A
member another connection already has (paired, or connected with its own Calendly
grant) is never paired again: one Calendly user, one connection (its uuid is in every
`source_id`). The Close user who matches them is refused, and `status` lists the refusal.

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
from closesync.connect.org_waiting import Refusal, WaitingRoom
from closesync.connect.revoke import revoke_grant
from closesync.connect.saving import save_shared_connection
from closesync.core.close_payloads import Me
from closesync.core.connection import Connection, Grant, connection_from
from closesync.core.errors import PairingRefused

log = logging.getLogger(__name__)


class Organizations:
    """Pairs Close users with the members of the connected Calendly organizations."""

    def __init__(self, services: ConnectServices) -> None:
        self.credentials = OrgCredentials(services)
        self.members = MemberCache(self.credentials)
        self.waiting_room = WaitingRoom(services.redis, services.keys, services.box)
        self.connections = services.connections
        self.settings = services.settings
        self.services = services

    def pair_close_user(self, me: Me, grant: Grant, name: str | None = None) -> Connection | None:
        """Pair a Close user who just authorized; None (and they wait) without a match.

        PairingRefused (nothing stored, the refusal remembered for `status`) when every member
        with their email is another connection's already.
        """
        refused: PairingRefused | None = None
        for ref in self.credentials.refs_for(me.organization_id):
            member = match(me.email, self.members.fetch(ref))
            if member is None:
                continue
            try:
                connection = self._save(
                    ref, me.id, me.email, me.organization_id, member, grant, name
                )
            except PairingRefused as error:
                self._remember_refusal(me.id, me.email, me.organization_id, member, error)
                refused = refused or error
                continue
            # A grant they waited with before is replaced by this one: nothing would use it.
            self._revoke_replaced(self.waiting_room.unwait(me.id), grant)
            return connection
        if refused is not None:
            raise refused
        self._revoke_replaced(self.waiting_room.wait(me, grant), grant)
        log.info("Close user waits for a Calendly member", extra={"close_user_id": me.id})
        return None

    def _revoke_replaced(self, old: Grant | None, new: Grant) -> None:
        """Revoke a waiting Close grant that `new` replaced (never one sharing its tokens)."""
        if old is not None and old.replaced_by(new):
            revoke_grant(self.services, "close", old)

    def pair_waiting(self) -> list[Connection]:
        """Pair every waiting Close user who now has a member (after an organization connects)."""
        paired: list[Connection] = []
        waiting = self.waiting_room.waiting()
        if not waiting:
            for ref in self.credentials.refs():
                self.members.fetch(ref)
            return paired
        for ref in self.credentials.refs():
            bound = self.credentials.bound_to(ref)
            members = self.members.fetch(ref)
            for person in waiting:
                if bound is None or person.organization_id != bound:
                    continue  # never paired across Close organizations, whatever the email
                if not self.settings.close_organization_allowed(person.organization_id):
                    continue  # CLOSE_ORGANIZATION_IDS narrowed since they waited
                member = match(person.email, members)
                grant = self.waiting_room.grant(person.close_user_id) if member else None
                if member is None or grant is None:
                    continue
                try:
                    connection = self._save(
                        ref,
                        person.close_user_id,
                        person.email,
                        person.organization_id,
                        member,
                        grant,
                        None,
                    )
                except PairingRefused as error:
                    # They keep waiting (paired if the other connection leaves); status says why.
                    self._remember_refusal(
                        person.close_user_id, person.email, person.organization_id, member, error
                    )
                    continue
                paired.append(connection)
                self.waiting_room.unwait(person.close_user_id)  # its grant is the connection's now
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
        self.waiting_room.forget_refusal(close_user_id)
        log.info("paired in organization mode", extra={"connection_id": connection.id})
        return connection

    def _remember_refusal(
        self,
        close_user_id: str,
        email: str | None,
        organization_id: str | None,
        member: Member,
        error: PairingRefused,
    ) -> None:
        log.warning(
            "refused pairing a Close user with a Calendly member another connection has",
            extra={"close_user_id": close_user_id, "connection_id": error.connection_id},
        )
        self.waiting_room.refuse(
            Refusal(
                close_user_id=close_user_id,
                email=email,
                organization_id=organization_id,
                calendly_user_uri=member.uri,
                calendly_email=member.email,
                connection_id=error.connection_id,
                at=time.time(),
            )
        )

    def unmatched(self) -> dict[str, Any]:
        """Close users waiting for a member, members with no connection (per organization), and
        refused pairings whose Calendly user another connection still has."""
        connections: list[Connection] = self.connections.list()
        paired_uris = {c.calendly_user_uri for c in connections}
        holders = {c.calendly_user_uri: c for c in connections}
        refused = [
            {
                "close_user_id": r.close_user_id,
                "email": r.email,
                "calendly_user_uri": r.calendly_user_uri,
                "calendly_email": r.calendly_email,
                "connection_id": holder.id,
                "since": r.at,
            }
            for r in self.waiting_room.refused()
            if (holder := holders.get(r.calendly_user_uri)) is not None
            and holder.close_user_id != r.close_user_id
        ]
        refused_ids = {r["close_user_id"] for r in refused}
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
            if w.close_user_id not in refused_ids
        ]
        return {"close": close, "calendly": calendly, "refused": refused}
