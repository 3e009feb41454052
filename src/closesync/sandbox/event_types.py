"""The World's Calendly event-type operations: create, edit, delete, membership, listing.

A mixin of World (which supplies the lock, clock, ids and rendering) kept in its own module
so that each file stays one noun. Every method takes the World's lock.

Documented choices (unknown in the docs): listings leave out soft-deleted types; inactive
types are listed unless `active=true`; one-off (`AdhocEventType`) types are listed; team
types are listed with `user=` for every member and never with `organization=`; `name` sorts
by the slug when the name is null; ties left by every sort term are broken by uri.

Every change (create, update, delete, purge of a live type, a membership change) is announced
to the webhook subscriptions (webhook_subscriptions.py) with the event type as rendered after
it: `event_type.created`, `event_type.updated` (membership changes included, to the hosts
before and after), `event_type.deleted` (once: deleting an already deleted type, or purging
it, announces nothing more; a purged live type is announced with `deleted_at` set).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from closesync.sandbox.records import JSON, CalendlyUser, EventType

_EDITABLE = {"name", "description", "duration", "secret", "active", "slug", "internal_note"}
_KINDS = ("solo", "group")
_POOLING = (None, "round_robin", "collective", "multi_pool")
_TYPES = ("StandardEventType", "AdhocEventType")
# The `sort` fields of GET /event_types in Calendly's current API document.
_SORT_KEYS: dict[str, Callable[[EventType], Any]] = {
    "name": lambda et: (et.name or et.slug).lower(),
    "position": lambda et: et.position,
    "created_at": lambda et: et.created_at,
    "updated_at": lambda et: et.updated_at,
}
SORT_FIELDS = tuple(_SORT_KEYS)


def slugify(text: str) -> str:
    """A Calendly-looking slug."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "meeting"


class EventTypeBook:
    """Event-type operations; state lives on the World."""

    lock: threading.RLock
    cal_users: dict[str, CalendlyUser]
    event_types: dict[str, EventType]

    def __init__(self) -> None:
        # Indexes of `event_types` by owner and by member, so that a user's listing, a slug
        # check and a purge cost that user's types, not the whole world's (a fleet of 10,000
        # users has 60,000 types). Kept by the methods below, the only writers.
        self._owned: dict[str, dict[str, EventType]] = {}
        self._listed: dict[str, dict[str, EventType]] = {}

    def _index(self, et: EventType, members: list[str]) -> None:
        for member in members:
            self._listed.setdefault(member, {})[et.uuid] = et

    def _unindex(self, et: EventType, members: list[str]) -> None:
        for member in members:
            self._listed.get(member, {}).pop(et.uuid, None)

    def new_uuid(self) -> str:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def render_type(self, et: EventType) -> JSON:
        raise NotImplementedError

    def announce(self, event: str, et: EventType, hosts: set[str]) -> None:
        """Queue webhook deliveries of a change (webhook_subscriptions.py)."""
        raise NotImplementedError

    def create_event_type(
        self,
        user_uuid: str,
        *,
        name: str | None = "Sandbox Meeting",
        description: str | None = None,
        duration: int = 30,
        secret: bool = False,
        active: bool = True,
        kind: str = "solo",
        pooling_type: str | None = None,
        type: str = "StandardEventType",
        members: list[str] | None = None,
        slug: str | None = None,
        team_name: str | None = None,
        internal_note: str | None = None,
        color: str = "#8247f5",
        created_at: float | None = None,
    ) -> JSON:
        """A new event type owned by `user_uuid`; team types also list `members`."""
        if kind not in _KINDS or pooling_type not in _POOLING or type not in _TYPES:
            raise ValueError("kind, pooling_type or type is not one Calendly uses")
        if isinstance(duration, bool) or not isinstance(duration, int) or duration <= 0:
            raise ValueError("duration must be a positive whole number of minutes")
        with self.lock:
            if user_uuid not in self.cal_users:
                raise KeyError(f"no Calendly user {user_uuid}")
            member_list = [user_uuid] + [m for m in (members or []) if m != user_uuid]
            unknown = [m for m in member_list if m not in self.cal_users]
            if unknown:
                raise KeyError(f"no Calendly user {unknown[0]}")
            if len(member_list) > 1 and pooling_type is None:
                raise ValueError("only team types (pooling_type set) have several members")
            now = self.now() if created_at is None else created_at
            et = EventType(
                uuid=self.new_uuid(),
                owner_uuid=user_uuid,
                name=name,
                slug=self._free_slug(user_uuid, slug or slugify(name or "meeting")),
                duration=duration,
                created_at=now,
                updated_at=now,
                active=active,
                secret=secret,
                kind=kind,
                pooling_type=pooling_type,
                type=type,
                description=description,
                internal_note=internal_note,
                color=color,
                team_name=team_name or ("Sandbox Team" if pooling_type else None),
                position=len(self.event_types),
                members=member_list,
            )
            self.event_types[et.uuid] = et
            self._owned.setdefault(user_uuid, {})[et.uuid] = et
            self._index(et, member_list)
            self.announce("event_type.created", et, set(member_list))
            return self.render_type(et)

    def _free_slug(self, owner: str, wanted: str) -> str:
        taken = {e.slug for e in self._owned.get(owner, {}).values()}
        slug, n = wanted, 1
        while slug in taken:
            n += 1
            slug = f"{wanted}-{n}"
        return slug

    def _live(self, uuid: str) -> EventType:
        et = self.event_types.get(uuid)
        if et is None:
            raise KeyError(f"no event type {uuid}")
        return et

    def _touch(self, et: EventType) -> None:
        # updated_at always moves forward, even when the clock is frozen.
        et.updated_at = max(self.now(), et.updated_at + 0.001)

    def update_event_type(self, uuid: str, **changes: Any) -> JSON:
        """Rename, re-describe, (de)activate, make secret…; updated_at moves."""
        unknown = set(changes) - _EDITABLE
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        with self.lock:
            et = self._live(uuid)
            for key, value in changes.items():
                setattr(et, key, value)
            self._touch(et)
            self.announce("event_type.updated", et, set(et.members))
            return self.render_type(et)

    def delete_event_type(self, uuid: str, purge: bool = False) -> JSON | None:
        """Soft delete (deleted_at set, still fetchable) or purge (gone, 404)."""
        with self.lock:
            et = self._live(uuid)
            if purge:
                if et.deleted_at is None:
                    stamp = max(self.now(), et.updated_at + 0.001)
                    gone = replace(et, deleted_at=stamp, updated_at=stamp)
                    self.announce("event_type.deleted", gone, set(et.members))
                del self.event_types[uuid]
                self._owned.get(et.owner_uuid, {}).pop(uuid, None)
                self._unindex(et, et.members)
                return None
            if et.deleted_at is None:
                self._touch(et)
                et.deleted_at = et.updated_at
                self.announce("event_type.deleted", et, set(et.members))
            return self.render_type(et)

    def change_members(self, uuid: str, add: list[str], remove: list[str]) -> JSON:
        """Users join or leave a team event type."""
        with self.lock:
            et = self._live(uuid)
            if not et.shared:
                raise ValueError("only team event types have members")
            before = set(et.members)
            for member in add:
                if member not in self.cal_users:
                    raise KeyError(f"no Calendly user {member}")
                if member not in et.members:
                    et.members.append(member)
            et.members = [m for m in et.members if m not in remove]
            self._unindex(et, remove)
            self._index(et, et.members)
            self._touch(et)
            self.announce("event_type.updated", et, before | set(et.members))
            return self.render_type(et)

    def get_event_type(self, uuid: str) -> JSON | None:
        """One event type, deleted ones included; None once purged."""
        with self.lock:
            et = self.event_types.get(uuid)
            return self.render_type(et) if et else None

    def list_event_types(
        self,
        user_uuid: str | None,
        active: bool | None,
        order: Sequence[tuple[str, bool]] = (("name", False),),
    ) -> list[JSON]:
        """A user's types (theirs and teams'), or with None the organization's own types, in
        `order`: (field of SORT_FIELDS, descending) terms, the first one deciding first."""
        with self.lock:
            candidates = self._listed.get(user_uuid, {}) if user_uuid else self.event_types
            found = [
                et
                for et in candidates.values()
                if et.deleted_at is None
                and (active is None or et.active == active)
                and (user_uuid in et.members if user_uuid else not et.shared)
            ]
            found.sort(key=lambda et: et.uuid)
            # Stable sorts applied last term first give the first term precedence.
            for field_name, descending in reversed(order):
                found.sort(key=_SORT_KEYS[field_name], reverse=descending)
            return [self.render_type(et) for et in found]
