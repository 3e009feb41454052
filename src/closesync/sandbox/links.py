"""The World's Close scheduling-link operations, for the API and for drift simulation.

A mixin of World (which supplies the lock and ids). Integration links are keyed for
upsert by (oauth client, user, source_id): the documented choice for the unknown scope of
`source_id` is "per app AND user", so two users of one app may reuse a source_id without
their links merging. Listing order is creation order.
"""

from __future__ import annotations

import threading
from typing import Any

from closesync.sandbox.records import JSON, CloseUser, Link, render_link

SOURCES = ("MANUAL", "THIRD_PARTY", "CALENDLY")
_LINK_FIELDS = {
    "name",
    "url",
    "description",
    "source_id",
    "source_type",
    "duration_in_minutes",
    "type",
    "oauth_client_id",
}


class LinkBook:
    """Scheduling-link operations; state lives on the World."""

    lock: threading.RLock
    close_users: dict[str, CloseUser]

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        # `links` by user, in creation order: listing a user's links and finding an upsert's
        # link cost that user's links, not the whole organization's. Kept by the methods below.
        self._by_user: dict[str, dict[str, Link]] = {}

    def new_id(self, prefix: str) -> str:
        raise NotImplementedError

    def close_links(
        self, user_id: str | None = None, *, organization_of: str | None = None
    ) -> list[JSON]:
        """Every link (of one user, or of the organization of `organization_of`, when given),
        all sources, in creation order."""
        with self.lock:
            if organization_of is not None:
                # The organization's links (close_lists_organization_links): a scan, rarely used.
                organization = self.close_users[organization_of].organization_id
                return [
                    render_link(link)
                    for link in self.links.values()
                    if (user_id is None or link.user_id == user_id)
                    and link.organization_id == organization
                ]
            links = self.links if user_id is None else self._by_user.get(user_id, {})
            return [render_link(link) for link in links.values()]

    def create_link(self, user_id: str, source: str = "MANUAL", **values: Any) -> JSON:
        """A link of any source, created directly (admin) or by POST /scheduling_link/."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")
        unknown = set(values) - _LINK_FIELDS
        if unknown:
            raise ValueError(f"unknown link fields: {', '.join(sorted(unknown))}")
        if not values.get("name") or not values.get("url"):
            raise ValueError("name and url are required")
        with self.lock:
            user = self.close_users.get(user_id)
            if user is None:
                raise KeyError(f"no Close user {user_id}")
            link = Link(
                id=self.new_id("schlnk_"),
                user_id=user_id,
                organization_id=user.organization_id,
                source=source,
                **values,
            )
            self.links[link.id] = link
            self._by_user.setdefault(user_id, {})[link.id] = link
            return render_link(link)

    def get_link(self, link_id: str) -> JSON | None:
        """One link by id."""
        with self.lock:
            link = self.links.get(link_id)
            return render_link(link) if link else None

    def update_link(self, link_id: str, **changes: Any) -> JSON:
        """Edit any link (drift simulation, or PUT on a MANUAL link)."""
        unknown = set(changes) - _LINK_FIELDS
        if unknown:
            raise ValueError(f"unknown link fields: {', '.join(sorted(unknown))}")
        with self.lock:
            link = self.links.get(link_id)
            if link is None:
                raise KeyError(f"no link {link_id}")
            for key, value in changes.items():
                setattr(link, key, value)
            return render_link(link)

    def delete_link(self, link_id: str) -> bool:
        """Remove any link; False when there was none."""
        with self.lock:
            link = self.links.pop(link_id, None)
            if link is None:
                return False
            self._by_user.get(link.user_id, {}).pop(link_id, None)
            return True

    def _integration_link(self, client_id: str, user_id: str, source_id: str) -> Link | None:
        for link in self._by_user.get(user_id, {}).values():
            if (link.oauth_client_id, link.user_id, link.source_id) == (
                client_id,
                user_id,
                source_id,
            ) and link.source == "THIRD_PARTY":
                return link
        return None

    def upsert_integration_link(self, client_id: str, user_id: str, values: dict[str, Any]) -> JSON:
        """Create or update the app's link for (user, source_id); same id on update."""
        with self.lock:
            link = self._integration_link(client_id, user_id, values["source_id"])
            if link is None:
                return self.create_link(
                    user_id, "THIRD_PARTY", oauth_client_id=client_id, type="USER", **values
                )
            for key, value in values.items():
                setattr(link, key, value)
            return render_link(link)

    def delete_integration_link(self, client_id: str, user_id: str, source_id: str) -> bool:
        """Delete the app's link for (user, source_id); False when there was none."""
        with self.lock:
            link = self._integration_link(client_id, user_id, source_id)
            if link is None:
                return False
            return self.delete_link(link.id)
