"""The pure planner: literal inputs, literal plans."""

from __future__ import annotations

import subprocess
import sys

from closesync.core.calendly_payloads import EventType
from closesync.core.close_payloads import LinkPayload
from closesync.core.mapping import fingerprint
from closesync.core.plan import (
    DELETE_REFUSED,
    FetchVerdict,
    LinkRecord,
    ListingFacts,
    MassDeleteRule,
    Misses,
    describe,
    fetch_verdict,
    make_plan,
    missing_from_listing,
)

USER = "u1"
BASE = "https://api.calendly.com/event_types"


def link(et: str, name: str = "Intro") -> LinkPayload:
    return LinkPayload(
        source_id=f"{USER}:{et}",
        name=name,
        url=f"https://calendly.com/x/{et}",
        description=None,
        source_type="One-on-One",
        duration_in_minutes=30,
    )


def record(
    et: str, name: str = "Intro", missing: int = 0, since: float | None = None
) -> LinkRecord:
    return LinkRecord(fingerprint(link(et, name)), f"{BASE}/{et}", missing, since)


def facts(*listed: str, doubtful: tuple[str, ...] = (), complete: bool = True) -> ListingFacts:
    return ListingFacts(complete, frozenset(listed), frozenset(doubtful))


def test_plan_new_changed_and_same_links_sort_into_create_update_unchanged() -> None:
    """No record: create; other fingerprint: update; same: unchanged."""
    desired = {p.source_id: p for p in (link("a"), link("b", "New name"), link("c"))}
    records = {"u1:b": record("b"), "u1:c": record("c")}
    plan = make_plan(desired=desired, records=records, facts=facts("a", "b", "c"))
    assert [p.source_id for p in plan.creates] == ["u1:a"]
    assert [p.source_id for p in plan.updates] == ["u1:b"]
    assert plan.unchanged == ["u1:c"]
    assert plan.deletes == []
    assert plan.writes == 2


def test_plan_force_pushes_unchanged_links() -> None:
    """A backfill pushes every desired link whatever the fingerprints say."""
    desired = {"u1:a": link("a")}
    plan = make_plan(desired=desired, records={"u1:a": record("a")}, facts=facts("a"), force=True)
    assert [p.source_id for p in plan.updates] == ["u1:a"]


def test_plan_rejected_payload_is_not_sent_again_until_it_changes() -> None:
    """A payload Close refused is held back; once it changes it is sent."""
    desired = {"u1:a": link("a")}
    same = make_plan(
        desired=desired, records={}, facts=facts("a"), rejected={"u1:a": fingerprint(link("a"))}
    )
    assert same.still_rejected == ["u1:a"]
    assert same.creates == []
    changed = make_plan(desired=desired, records={}, facts=facts("a"), rejected={"u1:a": "old"})
    assert [p.source_id for p in changed.creates] == ["u1:a"]


def test_plan_refused_deletion_is_not_asked_again_but_by_a_backfill() -> None:
    """A deletion Close refused is reported, not planned again; a backfill (force) asks again."""
    records = {"u1:a": record("a"), "u1:b": record("b"), "u1:c": record("c")}
    args = {
        "desired": {"u1:c": link("c")},
        "records": records,
        "facts": facts("a", "b", "c"),
        "rejected": {"u1:a": DELETE_REFUSED},
    }
    plan = make_plan(**args)  # type: ignore[arg-type]
    assert [d.source_id for d in plan.deletes] == ["u1:b"]
    assert plan.refused_deletes == ["u1:a"]
    forced = make_plan(**args, force=True)  # type: ignore[arg-type]
    assert [d.source_id for d in forced.deletes] == ["u1:a", "u1:b"]
    assert forced.refused_deletes == []


def test_plan_refused_deletion_of_a_link_desired_again_is_lifted() -> None:
    """A link whose deletion Close refused and that is desired again loses the refusal."""
    plan = make_plan(
        desired={"u1:a": link("a")},
        records={"u1:a": record("a")},
        facts=facts("a"),
        rejected={"u1:a": DELETE_REFUSED},
    )
    assert plan.unchanged == ["u1:a"]
    assert plan.lifted_refusals == ["u1:a"]
    rejected_payload = make_plan(
        desired={"u1:a": link("a")},
        records={},
        facts=facts("a"),
        rejected={"u1:a": fingerprint(link("a"))},
    )
    assert rejected_payload.lifted_refusals == []


def test_plan_incomplete_listing_deletes_nothing() -> None:
    """Without a complete listing every recorded link is kept."""
    records = {"u1:a": record("a", missing=5)}
    plan = make_plan(desired={}, records=records, facts=facts(complete=False))
    assert plan.deletes == []
    assert plan.kept == {"u1:a": "listing incomplete"}
    assert missing_from_listing(records, {}, facts(complete=False)) == []


def test_plan_listed_but_not_synced_is_deleted_at_once() -> None:
    """An event type the complete listing shows (inactive, say) but not desired: delete now."""
    plan = make_plan(desired={}, records={"u1:a": record("a")}, facts=facts("a"))
    assert [(d.source_id, d.reason) for d in plan.deletes] == [
        ("u1:a", "event type listed but not synced")
    ]


def test_plan_doubtful_event_type_keeps_its_link() -> None:
    """A listed event type that could not be mapped keeps its link."""
    plan = make_plan(desired={}, records={"u1:a": record("a")}, facts=facts("a", doubtful=("a",)))
    assert plan.deletes == []
    assert plan.kept == {"u1:a": "event type could not be read or mapped"}


def test_plan_missing_type_deleted_when_fetch_shows_it_gone() -> None:
    """Missing from the listing and gone on a direct fetch: delete in this run."""
    records = {"u1:a": record("a")}
    assert missing_from_listing(records, {}, facts()) == ["u1:a"]
    plan = make_plan(
        desired={}, records=records, facts=facts(), verdicts={"u1:a": FetchVerdict.GONE}
    )
    assert [d.reason for d in plan.deletes] == ["event type gone"]


def test_plan_missing_type_that_exists_waits_for_a_second_listing() -> None:
    """Missing but still existing: kept (missed at 1000 s); deleted when missed 600 s later."""
    first = make_plan(
        desired={},
        records={"u1:a": record("a")},
        facts=facts(),
        verdicts={"u1:a": FetchVerdict.EXISTS},
        now=1000.0,
    )
    assert first.deletes == []
    assert first.missing_counts == {"u1:a": Misses(1, 1000.0)}
    second = make_plan(
        desired={},
        records={"u1:a": record("a", missing=1, since=1000.0)},
        facts=facts(),
        verdicts={"u1:a": FetchVerdict.EXISTS},
        now=1600.0,
    )
    assert [d.reason for d in second.deletes] == [
        "missing from 2 complete listings over 600 s, and no longer this user's"
    ]


def test_plan_missing_type_the_fetch_shows_ours_is_kept_and_reported() -> None:
    """Active and this user's by its fetch: the listing is doubtful; kept however long missed."""
    plan = make_plan(
        desired={},
        records={"u1:a": record("a", missing=4, since=1000.0)},
        facts=facts(),
        verdicts={"u1:a": FetchVerdict.OURS},
        now=100_000.0,
    )
    assert plan.deletes == []
    assert plan.kept["u1:a"] == (
        "missing from 5 complete listings, but a direct fetch shows it active and this user's: "
        "the listing is doubtful"
    )
    assert plan.missing_counts == {"u1:a": Misses(5, 1000.0)}


def test_plan_missing_team_type_is_never_deleted_for_misses() -> None:
    """A team type missing from listings far apart is kept, with why: membership is unknowable."""
    plan = make_plan(
        desired={},
        records={"u1:a": record("a", missing=7, since=1000.0)},
        facts=facts(),
        verdicts={"u1:a": FetchVerdict.TEAM},
        now=90_000.0,
    )
    assert plan.deletes == []
    assert "active team event type" in plan.kept["u1:a"]
    assert plan.missing_counts == {"u1:a": Misses(8, 1000.0)}


def test_plan_missing_type_whose_fetch_failed_is_never_deleted_for_misses() -> None:
    """A failed fetch (or one naming no owner) proves nothing: kept, even missed long enough."""
    plan = make_plan(
        desired={},
        records={"u1:a": record("a", missing=1, since=1000.0)},
        facts=facts(),
        verdicts={"u1:a": FetchVerdict.UNKNOWN},
        now=5000.0,
    )
    assert plan.deletes == []
    assert plan.kept["u1:a"] == (
        "missing from 2 complete listings; its direct fetch failed or named no owner"
    )
    no_verdict = make_plan(
        desired={}, records={"u1:a": record("a", missing=1, since=1000.0)}, facts=facts(), now=5e3
    )
    assert no_verdict.deletes == []


def event_type(**fields: object) -> EventType:
    return EventType.model_validate({"uri": f"{BASE}/a", "active": True, **fields})


def test_fetch_verdict_reads_gone_ours_elsewhere_team_and_unknown() -> None:
    """Deleted or inactive: gone; owner this user: ours; another: exists; a team's: team."""
    me = "https://api.calendly.com/users/u1"
    other = "https://api.calendly.com/users/u2"
    team = {"type": "Team", "name": "Sales", "owner": other}
    assert fetch_verdict(event_type(deleted_at="2026-01-01T00:00:00Z"), "u1") is FetchVerdict.GONE
    assert fetch_verdict(event_type(active=False), "u1") is FetchVerdict.GONE
    assert fetch_verdict(event_type(profile={"owner": me}), "u1") is FetchVerdict.OURS
    assert fetch_verdict(event_type(profile={"type": "User", "owner": other}), "u1") is (
        FetchVerdict.EXISTS
    )
    assert fetch_verdict(event_type(profile=team), "u1") is FetchVerdict.TEAM
    assert fetch_verdict(event_type(profile={**team, "owner": me}), "u1") is FetchVerdict.TEAM
    assert fetch_verdict(event_type(profile=None), "u1") is FetchVerdict.UNKNOWN
    assert fetch_verdict(event_type(profile={"type": "User"}), "u1") is FetchVerdict.UNKNOWN


def test_plan_second_miss_seconds_later_keeps_the_link() -> None:
    """Two complete listings 5 s apart (a retry, a rerun) are no second opinion: the link stays."""
    plan = make_plan(
        desired={},
        records={"u1:a": record("a", missing=1, since=1000.0)},
        facts=facts(),
        verdicts={"u1:a": FetchVerdict.EXISTS},
        now=1005.0,
    )
    assert plan.deletes == []
    assert plan.missing_counts == {"u1:a": Misses(2, 1000.0)}
    assert plan.kept["u1:a"] == (
        "missing from 2 complete listings within 5 s; deleted once two of them are 600 s apart"
    )


def test_plan_confirm_seconds_sets_how_far_apart_the_misses_must_be() -> None:
    """With confirm_seconds=60 a second miss 60 s after the first deletes; 59 s does not."""
    args = {
        "desired": {},
        "records": {"u1:a": record("a", missing=1, since=1000.0)},
        "facts": facts(),
        "verdicts": {"u1:a": FetchVerdict.EXISTS},
        "confirm_seconds": 60.0,
    }
    assert make_plan(**args, now=1059.0).deletes == []  # type: ignore[arg-type]
    assert len(make_plan(**args, now=1060.0).deletes) == 1  # type: ignore[arg-type]


def test_plan_miss_counted_without_a_time_starts_the_clock_now() -> None:
    """A record counted before misses were timed starts its clock at this listing: kept."""
    plan = make_plan(
        desired={},
        records={"u1:a": record("a", missing=3)},
        facts=facts(),
        verdicts={"u1:a": FetchVerdict.EXISTS},
        now=5000.0,
    )
    assert plan.deletes == []
    assert plan.missing_counts == {"u1:a": Misses(4, 5000.0)}


def test_plan_without_a_clock_deletes_nothing_for_misses_alone() -> None:
    """No `now`: a missing type whose fetch shows it existing is kept whatever its count."""
    plan = make_plan(
        desired={},
        records={"u1:a": record("a", missing=5, since=1.0)},
        facts=facts(),
        verdicts={"u1:a": FetchVerdict.EXISTS},
    )
    assert plan.deletes == []


def test_plan_seen_again_resets_the_missing_count() -> None:
    """A link whose event type is listed again starts counting (and timing) from zero."""
    plan = make_plan(
        desired={"u1:a": link("a")},
        records={"u1:a": record("a", missing=1, since=1000.0)},
        facts=facts("a"),
    )
    assert plan.missing_counts == {"u1:a": Misses(0)}
    assert plan.unchanged == ["u1:a"]


def test_plan_foreign_source_id_is_never_deleted() -> None:
    """A record whose source_id is not in closesync's format is kept."""
    records = {"manual-thing": LinkRecord("f", f"{BASE}/zz", 3)}
    plan = make_plan(desired={}, records=records, facts=facts(), verdicts={})
    assert plan.deletes == []
    assert plan.kept == {"manual-thing": "source_id not in closesync's format"}


def test_plan_record_of_another_calendly_user_is_set_apart_never_deleted() -> None:
    """Records naming another Calendly user are set apart (to forget), not fetched or counted."""
    records = {"u0:a": record("a"), "u1:b": record("b"), "u1:c": record("c")}
    plan = make_plan(
        desired={},
        records=records,
        facts=facts(),
        verdicts={sid: FetchVerdict.GONE for sid in records},
        user_uuid=USER,
    )
    assert plan.foreign == ["u0:a"]
    assert "another Calendly user" in plan.kept["u0:a"]
    # Both of this user's links going is every link of the connection: held.
    assert [d.source_id for d in plan.held] == ["u1:b", "u1:c"]
    assert missing_from_listing(records, {}, facts(), USER) == ["u1:b", "u1:c"]
    unchecked = make_plan(desired={}, records=records, facts=facts(), allow_mass_delete=True)
    assert unchecked.foreign == []


def test_plan_mass_delete_over_threshold_is_held() -> None:
    """Six of ten links going exceeds max(5, 0.5 x 10) = 5: all six are held with a reason."""
    records = {f"u1:{i}": record(str(i)) for i in range(10)}
    desired = {f"u1:{i}": link(str(i)) for i in range(6, 10)}
    plan = make_plan(desired=desired, records=records, facts=facts(*map(str, range(10))))
    assert plan.deletes == []
    assert len(plan.held) == 6
    assert plan.held_reason is not None
    assert "6 deletions of 10 links exceed the mass-delete limit of 5" in plan.held_reason
    allowed = make_plan(
        desired=desired,
        records=records,
        facts=facts(*map(str, range(10))),
        allow_mass_delete=True,
    )
    assert len(allowed.deletes) == 6
    assert allowed.held == []


def test_plan_deleting_every_link_of_a_small_connection_is_held() -> None:
    """Three of three links going is under the minimum of 5 but is every link: held."""
    records = {f"u1:{i}": record(str(i)) for i in range(3)}
    plan = make_plan(desired={}, records=records, facts=facts(*map(str, range(3))))
    assert plan.deletes == []
    assert [d.source_id for d in plan.held] == ["u1:0", "u1:1", "u1:2"]
    assert plan.held_reason == (
        "3 deletions would remove every link of this connection; if the user really deleted "
        "all of their event types, run `closesync sync --allow-mass-delete <connection id>` "
        "to let them through"
    )
    allowed = make_plan(
        desired={}, records=records, facts=facts(*map(str, range(3))), allow_mass_delete=True
    )
    assert len(allowed.deletes) == 3


def test_plan_small_connection_losing_some_links_or_its_only_one_is_not_held() -> None:
    """Two of three links, or the one link of a connection that has one, go without a hold."""
    three = {f"u1:{i}": record(str(i)) for i in range(3)}
    keep_one = make_plan(desired={"u1:2": link("2")}, records=three, facts=facts("0", "1", "2"))
    assert (len(keep_one.deletes), keep_one.held) == (2, [])
    only = make_plan(desired={}, records={"u1:0": record("0")}, facts=facts("0"))
    assert (len(only.deletes), only.held) == (1, [])


def test_plan_mass_delete_threshold_arithmetic() -> None:
    """The limit is max(minimum, fraction x recorded links), and every one of 2+ links is held."""
    rule = MassDeleteRule(minimum=5, fraction=0.5)
    assert rule.threshold(4) == 5
    assert rule.threshold(30) == 15
    assert MassDeleteRule(minimum=0, fraction=0.1).threshold(50) == 5
    assert [rule.holds(2, 2), rule.holds(1, 1), rule.holds(1, 2), rule.holds(6, 30)] == [
        True,
        False,
        False,
        False,
    ]


def test_plan_describe_lists_each_write() -> None:
    """describe() turns a plan into readable lines."""
    plan = make_plan(desired={"u1:a": link("a")}, records={"u1:b": record("b")}, facts=facts("b"))
    assert describe(plan) == [
        "create u1:a 'Intro'",
        "delete u1:b (event type listed but not synced)",
    ]


def test_plan_and_mapping_import_no_io_library() -> None:
    """The pure core imports nothing of requests, redis or celery."""
    code = (
        "import sys, closesync.core.plan, closesync.core.mapping\n"
        "bad = {m.split('.')[0] for m in sys.modules} & {'requests', 'redis', 'celery', 'kombu'}\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_listed_doubtful_type_resets_the_missing_count() -> None:
    """A listing that showed the event type (even unmappable) breaks the "twice in a row"."""
    plan = make_plan(
        desired={}, records={"u1:a": record("a", missing=1)}, facts=facts("a", doubtful=("a",))
    )
    assert plan.deletes == []
    assert plan.missing_counts == {"u1:a": Misses(0)}
