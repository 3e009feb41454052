"""The plan: what to write to Close so its links equal the desired ones. Pure: no I/O, no clock.

Inputs are what mapping wants (`desired`), what closesync recorded after Close accepted earlier
writes (`records`: per source_id the payload fingerprint and how many complete listings in a row
have missed its event type), what the Calendly listing showed (`ListingFacts`) and, for links whose
event type was missing from a complete listing, what a direct fetch said (`FetchVerdict`).

The rules, all in `make_plan`:

- create: desired, no record; update: desired, recorded fingerprint differs; unchanged: same.
- A payload that Close rejected (400) is not sent again until it changes (`rejected`); a deletion
  Close refused (its rejection says DELETE_REFUSED) is not asked again, but by a backfill, while
  the link stays undesired: once it is desired again the refusal is lifted, so that the next
  deletion of it is asked (the refusal was of that deletion, not of every later one).
- A record whose source_id names another Calendly user than the connection's (left by a
  reconnect to another Calendly user, or by a run of the old pairing) is dropped from the
  records, never deleted: that link is not this connection's and may be another connection's.
- Nothing is deleted unless the listing was complete (every page answered 2xx).
- A link whose event type was listed but is not synced (inactive, secret when excluded, one-off)
  is deleted at once: the complete listing itself says so.
- A link whose event type was listed but could not be mapped or parsed is kept: doubt.
- A link whose event type is missing from the listing is deleted at once when a direct fetch shows
  it gone (Calendly's own 404, `deleted_at`, inactive; a proxy's 404 page is a failed fetch).
  When the fetch shows it active and no longer this user's (a User profile naming another
  owner), the link is deleted once it has been missing from two complete listings in a row that
  ran at least `confirm_seconds` apart (`now` is the time of this run's listing): a retry, rerun
  or redelivery seconds after the first listing is no second opinion. When the fetch shows it
  active and still this user's, the listing contradicts it: the link is kept, however often it
  is missed, and reported. A failed fetch, or one that names no owner, proves nothing either:
  kept. Nor does an active team type's: its profile names one user (or the team), never its
  hosts, and Calendly offers no way to ask whether this user still hosts it, so a listing glitch
  and a user who left the team look the same. Its link is kept (and reported) until the type is
  deactivated or deleted, or the link is deleted in Close by hand.
- Mass-delete guard: when the deletions would exceed max(minimum, fraction x recorded links), or
  remove every link of a connection that has more than one (however few: the minimum alone would
  leave small connections unguarded), all of them are held (and reported) unless the run was
  allowed to mass-delete.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from closesync.core.calendly_payloads import EventType, uuid_of
from closesync.core.close_payloads import LinkPayload
from closesync.core.mapping import fingerprint, parse_source_id

# Stands for the connection's id in a held-deletions reason; the run puts the real id in.
CONNECTION_ID = "<connection id>"
# Complete listings in a row that must miss an event type (still existing elsewhere) before its
# link is deleted. Two: one glitch of Calendly's listing never deletes a link.
MISSING_LISTINGS_BEFORE_DELETE = 2
# Seconds that must separate the first and the last of those listings (DELETE_CONFIRM_SECONDS).
DELETE_CONFIRM_SECONDS = 600.0
# Stands for the payload fingerprint of a refused deletion in the rejections (no hash equals it).
DELETE_REFUSED = "delete"


@dataclass(frozen=True)
class LinkRecord:
    """What closesync knows of one link it wrote: Close accepted this payload fingerprint."""

    fingerprint: str
    event_type_uri: str
    # Complete listings in a row that did not contain the event type.
    missing: int = 0
    # Epoch seconds of the first of those listings; None while `missing` is 0 (or for a record
    # written before closesync kept the time: its count then starts its clock anew).
    missing_since: float | None = None


@dataclass(frozen=True)
class Misses:
    """How many complete listings in a row missed a record's event type, since when."""

    count: int
    since: float | None = None

    def elapsed(self, now: float | None) -> float:
        """Seconds from the first of those listings to `now`; 0 when either time is unknown."""
        return 0.0 if now is None or self.since is None else now - self.since

    def confirmed(self, now: float | None, confirm_seconds: float) -> bool:
        """Missed by enough listings, the first at least `confirm_seconds` before `now`."""
        return (
            self.count >= MISSING_LISTINGS_BEFORE_DELETE
            and now is not None
            and self.since is not None
            and self.elapsed(now) >= confirm_seconds
        )


class FetchVerdict(StrEnum):
    """What a direct fetch of a missing event type showed."""

    GONE = "gone"  # Calendly's 404, deleted_at set, or inactive: delete now
    # Active, a User profile naming another owner: delete once the misses are confirmed (two
    # complete listings, `confirm_seconds` apart).
    EXISTS = "exists"
    # Active and a team's: whether this user still hosts it is not in the answer: kept.
    TEAM = "team"
    # Active and its profile names this user: the listing was wrong, not the event type gone.
    OURS = "ours"
    UNKNOWN = "unknown"  # the fetch failed, or its profile names no owner: kept on doubt


def fetch_verdict(event_type: EventType, user_uuid: str) -> FetchVerdict:
    """What a direct fetch of an event type missing from `user_uuid`'s listing says."""
    if event_type.deleted_at is not None or not event_type.active:
        return FetchVerdict.GONE
    profile = event_type.profile
    if profile is not None and (profile.type or "").casefold() == "team":
        # The owner of a team type is no answer: every member but one would read "another's".
        return FetchVerdict.TEAM
    owner = profile.owner if profile is not None else None
    if not owner:
        return FetchVerdict.UNKNOWN
    return FetchVerdict.OURS if uuid_of(owner) == user_uuid else FetchVerdict.EXISTS


@dataclass(frozen=True)
class ListingFacts:
    """What one Calendly listing showed, beyond the desired links."""

    complete: bool
    # The uuid of every event type the listing returned, synced or not.
    listed_uuids: frozenset[str] = frozenset()
    # Listed event types that could not be mapped or parsed: their links are kept.
    doubtful_uuids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class MassDeleteRule:
    minimum: int = 5
    fraction: float = 0.5

    def threshold(self, recorded_links: int) -> float:
        return max(float(self.minimum), self.fraction * recorded_links)

    def holds(self, deletions: int, recorded_links: int) -> bool:
        """Whether deleting `deletions` of `recorded_links` links must wait for an allowance."""
        every_link = recorded_links > 1 and deletions >= recorded_links
        return deletions > self.threshold(recorded_links) or every_link


@dataclass(frozen=True)
class Deletion:
    source_id: str
    event_type_uri: str
    reason: str


@dataclass(frozen=True)
class Plan:
    creates: list[LinkPayload] = field(default_factory=list)
    updates: list[LinkPayload] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deletes: list[Deletion] = field(default_factory=list)
    held: list[Deletion] = field(default_factory=list)
    held_reason: str | None = None
    # Payloads Close refused before and that have not changed since: not sent again.
    still_rejected: list[str] = field(default_factory=list)
    # Deletions Close refused before: not asked again (a backfill asks again).
    refused_deletes: list[str] = field(default_factory=list)
    # Links desired again whose deletion Close refused before: that refusal is to be dropped.
    lifted_refusals: list[str] = field(default_factory=list)
    # Records of another Calendly user's source_ids: to be dropped from the records, untouched.
    foreign: list[str] = field(default_factory=list)
    # Links kept although their event type is not desired now, with why.
    kept: dict[str, str] = field(default_factory=dict)
    # New `missing` counts (and their start) of kept records; absent = unchanged.
    missing_counts: dict[str, Misses] = field(default_factory=dict)

    @property
    def writes(self) -> int:
        return len(self.creates) + len(self.updates) + len(self.deletes)


def names_another_user(source_id: str, user_uuid: str | None) -> bool:
    """Whether `source_id` has closesync's format for a Calendly user other than `user_uuid`."""
    parsed = parse_source_id(source_id)
    return user_uuid is not None and parsed is not None and parsed[0] != user_uuid


def missing_from_listing(
    records: Mapping[str, LinkRecord],
    desired: Mapping[str, LinkPayload],
    facts: ListingFacts,
    user_uuid: str | None = None,
) -> list[str]:
    """Recorded links whose event type a complete listing did not show: they need a direct fetch."""
    if not facts.complete:
        return []
    return sorted(
        source_id
        for source_id, record in records.items()
        if source_id not in desired
        and uuid_of(record.event_type_uri) not in facts.listed_uuids
        and not names_another_user(source_id, user_uuid)
    )


def make_plan(
    *,
    desired: Mapping[str, LinkPayload],
    records: Mapping[str, LinkRecord],
    facts: ListingFacts,
    verdicts: Mapping[str, FetchVerdict] | None = None,
    rejected: Mapping[str, str] | None = None,
    rule: MassDeleteRule | None = None,
    allow_mass_delete: bool = False,
    force: bool = False,
    now: float | None = None,
    confirm_seconds: float = DELETE_CONFIRM_SECONDS,
    user_uuid: str | None = None,
) -> Plan:
    """Compare desired links with the records and decide every write.

    `force` (backfill) pushes every desired link whatever the fingerprints say. `now` is when
    this run listed Calendly; without it no link is deleted for being missing alone.
    `user_uuid` is the connection's Calendly user: records of any other are set apart.
    """
    verdicts = verdicts or {}
    rejected = rejected or {}
    rule = rule or MassDeleteRule()
    foreign = sorted(sid for sid in records if names_another_user(sid, user_uuid))
    plan = Plan(foreign=foreign)
    for source_id in foreign:
        plan.kept[source_id] = (
            "recorded for another Calendly user than this connection's (it was reconnected): "
            "forgotten; the link is left in Close"
        )
    set_apart = set(foreign)
    records = {sid: record for sid, record in records.items() if sid not in set_apart}
    for source_id in sorted(desired):
        payload = desired[source_id]
        record = records.get(source_id)
        current = fingerprint(payload)
        if rejected.get(source_id) == DELETE_REFUSED:
            plan.lifted_refusals.append(source_id)
        if rejected.get(source_id) == current and not force:
            plan.still_rejected.append(source_id)
        elif record is None:
            plan.creates.append(payload)
        elif record.fingerprint != current or force:
            plan.updates.append(payload)
        else:
            plan.unchanged.append(source_id)
    deletes: list[Deletion] = []
    for source_id in sorted(set(records) - set(desired)):
        record = records[source_id]
        uri = record.event_type_uri
        uuid = uuid_of(uri)
        if not facts.complete:
            plan.kept[source_id] = "listing incomplete"
        elif parse_source_id(source_id) is None:
            plan.kept[source_id] = "source_id not in closesync's format"
        elif uuid in facts.doubtful_uuids:
            plan.kept[source_id] = "event type could not be read or mapped"
        elif uuid in facts.listed_uuids:
            deletes.append(Deletion(source_id, uri, "event type listed but not synced"))
        elif verdicts.get(source_id) is FetchVerdict.GONE:
            deletes.append(Deletion(source_id, uri, "event type gone"))
        else:
            verdict = verdicts.get(source_id, FetchVerdict.UNKNOWN)
            misses = _missed_again(record, now)
            if verdict is FetchVerdict.EXISTS and misses.confirmed(now, confirm_seconds):
                reason = (
                    f"missing from {misses.count} complete listings over "
                    f"{misses.elapsed(now):.0f} s, and no longer this user's"
                )
                deletes.append(Deletion(source_id, uri, reason))
            else:
                plan.kept[source_id] = _why_kept(verdict, misses, now, confirm_seconds)
                plan.missing_counts[source_id] = misses
    # A record whose event type a complete listing showed (desired, doubtful or not synced)
    # starts counting from zero: "missing twice" means twice in a row.
    if facts.complete:
        for source_id, record in records.items():
            if record.missing and uuid_of(record.event_type_uri) in facts.listed_uuids:
                plan.missing_counts[source_id] = Misses(0)
    if not force:
        refused = {d.source_id for d in deletes if rejected.get(d.source_id) == DELETE_REFUSED}
        plan.refused_deletes.extend(sorted(refused))
        deletes = [d for d in deletes if d.source_id not in refused]
    threshold = rule.threshold(len(records))
    if rule.holds(len(deletes), len(records)) and not allow_mass_delete:
        command = f"`closesync sync --allow-mass-delete {CONNECTION_ID}`"
        if len(deletes) > threshold:
            reason = (
                f"{len(deletes)} deletions of {len(records)} links exceed the mass-delete limit "
                f"of {threshold:g}; run {command} to let them through"
            )
        else:
            reason = (
                f"{len(deletes)} deletions would remove every link of this connection; if the "
                f"user really deleted all of their event types, run {command} to let them through"
            )
        return _with(plan, held=deletes, held_reason=reason)
    return _with(plan, deletes=deletes)


def _missed_again(record: LinkRecord, now: float | None) -> Misses:
    """The record's misses counting this listing; the clock starts with the first miss."""
    if record.missing and record.missing_since is not None:
        return Misses(record.missing + 1, record.missing_since)
    # A first miss, or an older record whose first miss has no time: this listing starts it.
    return Misses(record.missing + 1, now)


def _why_kept(
    verdict: FetchVerdict, misses: Misses, now: float | None, confirm_seconds: float
) -> str:
    listings = "one complete listing" if misses.count == 1 else f"{misses.count} complete listings"
    if verdict is FetchVerdict.OURS:
        return (
            f"missing from {listings}, but a direct fetch shows it active and this user's: "
            "the listing is doubtful"
        )
    if verdict is FetchVerdict.TEAM:
        return (
            f"missing from {listings}; a direct fetch shows an active team event type, and "
            "Calendly does not say whether this user still hosts it: kept until it is "
            "deactivated or deleted"
        )
    if verdict is not FetchVerdict.EXISTS:
        return f"missing from {listings}; its direct fetch failed or named no owner"
    if misses.count < MISSING_LISTINGS_BEFORE_DELETE:
        return "missing from one complete listing"
    return (
        f"missing from {listings} within {misses.elapsed(now):.0f} s; "
        f"deleted once two of them are {confirm_seconds:g} s apart"
    )


def _with(plan: Plan, **changes: object) -> Plan:
    return replace(plan, **changes)  # type: ignore[arg-type]


def describe(plan: Plan) -> list[str]:
    """A plan as lines a person reads: `create <source_id> 'name'`."""
    lines = [f"create {p.source_id} {p.name!r}" for p in plan.creates]
    lines += [f"update {p.source_id} {p.name!r}" for p in plan.updates]
    lines += [f"delete {d.source_id} ({d.reason})" for d in plan.deletes]
    lines += [f"hold {d.source_id} ({d.reason})" for d in plan.held]
    return lines
