"""Calendly organization mode, the members: who belongs to a connected organization, by email.

Emails are compared ignoring ASCII case only (`same_email`). The member list is remembered as
last fetched, so that `closesync status` can say who is unmatched without calling Calendly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from closesync.connect.org_credentials import OrgCredentials
from closesync.store.client import guard


@dataclass(frozen=True)
class Member:
    """A Calendly member as pairing needs it (no secret)."""

    uri: str
    email: str | None
    name: str | None


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


class MemberCache:
    """The members of each connected organization: fetched from Calendly, remembered in Redis."""

    def __init__(self, credentials: OrgCredentials) -> None:
        self.credentials = credentials
        self.redis = credentials.redis
        self.keys = credentials.keys

    def fetch(self, ref: str) -> list[Member]:
        """List the organization's members from Calendly and remember them for `status`."""
        info = self.credentials.info(ref)
        if info is None:
            return []
        members = [
            Member(uri=m.user.uri, email=m.user.email, name=m.user.name)
            for m in self.credentials.client(ref).iter_organization_memberships(
                info["organization_uri"]
            )
        ]
        with guard("remembering Calendly members"):
            self.redis.set(
                self.keys.calendly_org_members(ref), json.dumps([asdict(m) for m in members])
            )
        return members

    @guard("reading Calendly members")
    def remembered(self, ref: str) -> list[Member]:
        """The members as last fetched."""
        raw = self.redis.get(self.keys.calendly_org_members(ref))
        return [] if raw is None else [Member(**m) for m in json.loads(raw)]
