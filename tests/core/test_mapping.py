"""The mapping core: which event types become links and what each link says."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from closesync.core.calendly_payloads import EventType
from closesync.core.close_payloads import LinkPayload
from closesync.core.mapping import (
    DESCRIPTION_MAX,
    NAME_MAX,
    MappingOptions,
    UnmappableEventType,
    clean_description,
    clean_name,
    comparable,
    cut_text,
    fingerprint,
    is_synced,
    label_source_type,
    map_event_type,
    map_event_types,
    parse_source_id,
    skip_reason_for,
    source_id_for,
)

USER = "USER0001"
OTHER_USER = "USER0002"
BASE = "https://api.calendly.com/event_types/"
DEFAULTS = MappingOptions()


def event_type(**fields: Any) -> EventType:
    """A plain, synced one-on-one event type, with `fields` overriding the defaults."""
    values: dict[str, Any] = {
        "uri": BASE + "ET0001",
        "active": True,
        "name": "Intro call",
        "slug": "intro-call",
        "scheduling_url": "https://calendly.com/ann/intro-call",
        "duration": 30,
        "kind": "solo",
        "pooling_type": None,
        "type": "StandardEventType",
        "secret": False,
        "deleted_at": None,
        "description_plain": "Talk about your needs.",
    }
    values.update(fields)
    return EventType.model_validate(values)


def payload(**fields: Any) -> LinkPayload:
    """The link of the default event type, with `fields` overriding."""
    values: dict[str, Any] = {
        "source_id": "USER0001:ET0001",
        "name": "Intro call",
        "url": "https://calendly.com/ann/intro-call",
        "description": "Talk about your needs.",
        "source_type": "One-on-One",
        "duration_in_minutes": 30,
    }
    values.update(fields)
    return LinkPayload(**values)


# --- which event types are synced -------------------------------------------------------------


def test_map_event_type_plain_type_gives_every_field() -> None:
    """A plain event type maps field by field to the link payload."""
    assert map_event_type(USER, event_type()) == payload()


def test_is_synced_active_standard_type_true() -> None:
    """An active, not deleted, standard event type is synced."""
    assert is_synced(event_type(), DEFAULTS)


def test_map_event_types_secret_by_default_included() -> None:
    """Secret event types are synced unless the option excludes them."""
    result = map_event_types(USER, [event_type(secret=True)], DEFAULTS)
    assert list(result.links) == ["USER0001:ET0001"]
    assert result.skipped == {}


def test_map_event_types_secret_with_option_off_skipped() -> None:
    """With include_secret off, a secret event type is skipped as "secret"."""
    options = MappingOptions(include_secret=False)
    result = map_event_types(USER, [event_type(secret=True)], options)
    assert result.links == {}
    assert result.skipped == {BASE + "ET0001": "secret"}


def test_map_event_types_one_off_by_default_skipped() -> None:
    """One-off meetings are skipped as "one-off" by default."""
    result = map_event_types(USER, [event_type(type="AdhocEventType")], DEFAULTS)
    assert result.links == {}
    assert result.skipped == {BASE + "ET0001": "one-off"}


def test_map_event_types_one_off_with_option_on_mapped() -> None:
    """With include_one_off on, a one-off meeting becomes a One-Off link."""
    options = MappingOptions(include_one_off=True)
    result = map_event_types(USER, [event_type(type="AdhocEventType")], options)
    assert result.links == {"USER0001:ET0001": payload(source_type="One-Off")}


def test_map_event_types_inactive_skipped() -> None:
    """An inactive event type is skipped as "inactive"."""
    result = map_event_types(USER, [event_type(active=False)], DEFAULTS)
    assert result.links == {}
    assert result.skipped == {BASE + "ET0001": "inactive"}


def test_map_event_types_deleted_skipped() -> None:
    """A deleted event type is skipped as "deleted", even if still marked active."""
    deleted = event_type(deleted_at=datetime(2024, 5, 1, tzinfo=UTC))
    result = map_event_types(USER, [deleted], DEFAULTS)
    assert result.skipped == {BASE + "ET0001": "deleted"}


def test_skip_reason_for_deleted_inactive_secret_one_off_deleted_first() -> None:
    """Deleted wins over every other reason, then inactive, then one-off, then secret."""
    options = MappingOptions(include_secret=False)
    everything = {"active": False, "secret": True, "type": "AdhocEventType"}
    when = datetime(2024, 5, 1, tzinfo=UTC)
    assert skip_reason_for(event_type(deleted_at=when, **everything), options) == "deleted"
    assert skip_reason_for(event_type(**everything), options) == "inactive"
    assert skip_reason_for(event_type(secret=True, type="AdhocEventType"), options) == "one-off"
    assert skip_reason_for(event_type(secret=True), options) == "secret"


def test_map_event_types_same_uri_twice_mapped_once() -> None:
    """An event type listed twice maps once; the first occurrence wins."""
    first, second = event_type(name="First"), event_type(name="Second")
    result = map_event_types(USER, [first, second], DEFAULTS)
    assert result.links == {"USER0001:ET0001": payload(name="First")}


# --- name, url, description, duration ---------------------------------------------------------


def test_map_event_type_no_name_falls_back_to_slug() -> None:
    """Without a name, the slug is the link's name."""
    assert map_event_type(USER, event_type(name=None)).name == "intro-call"


def test_map_event_type_blank_or_invisible_name_falls_back_to_slug() -> None:
    """A name of whitespace, controls or zero-width characters counts as missing."""
    for name in ["   ", "\n\t", "\x00\x07", "\u200b\u200e"]:
        assert map_event_type(USER, event_type(name=name)).name == "intro-call"


def test_map_event_type_empty_name_and_slug_unmappable() -> None:
    """Neither name nor slug: the event type is unmappable, saying so."""
    with pytest.raises(UnmappableEventType, match="no name or slug") as caught:
        map_event_type(USER, event_type(name="", slug=" "))
    assert caught.value.reason == "no name or slug"


def test_map_event_types_missing_url_unmappable_others_still_mapped() -> None:
    """An event type without a scheduling_url is unmappable; the others still map."""
    broken = event_type(uri=BASE + "ET0002", scheduling_url=None)
    result = map_event_types(USER, [broken, event_type()], DEFAULTS)
    assert result.unmappable == {BASE + "ET0002": "no scheduling_url"}
    assert result.links == {"USER0001:ET0001": payload()}


@pytest.mark.parametrize(
    "url",
    [
        "ftp://calendly.com/ann",
        "calendly.com/ann",
        "https://",
        "https://calendly.com/a b",
        "http://[",
    ],
)
def test_map_event_type_url_not_http_unmappable(url: str) -> None:
    """A scheduling_url that is not an absolute http(s) URL makes the type unmappable."""
    with pytest.raises(UnmappableEventType, match=r"scheduling_url is not an http\(s\) URL"):
        map_event_type(USER, event_type(scheduling_url=url))


def test_map_event_type_url_surrounding_spaces_stripped() -> None:
    """Whitespace around the scheduling_url is dropped."""
    mapped = map_event_type(USER, event_type(scheduling_url=" http://calendly.com/ann \n"))
    assert mapped.url == "http://calendly.com/ann"


@pytest.mark.parametrize(("duration", "expected"), [(45, 45), (None, None), (0, None), (-5, None)])
def test_map_event_type_duration_not_positive_none(
    duration: int | None, expected: int | None
) -> None:
    """A positive duration is kept; a missing or non-positive one becomes None."""
    assert map_event_type(USER, event_type(duration=duration)).duration_in_minutes == expected


def test_map_event_type_description_none_kept() -> None:
    """A missing description stays None."""
    assert map_event_type(USER, event_type(description_plain=None)).description is None


def test_clean_description_all_whitespace_none() -> None:
    """A description of whitespace and controls only becomes None."""
    assert clean_description("  \n\t \x00 ") is None


def test_clean_description_controls_removed_lines_and_tabs_kept() -> None:
    """Controls are removed, CR LF becomes LF, newlines and tabs survive, ends are stripped."""
    text = "\n Line 1\r\nLine 2\x00\tend\x1b\rLast\u2028 "
    assert clean_description(text) == "Line 1\nLine 2\tend\nLast"


def test_clean_name_controls_removed() -> None:
    """Control characters and lone surrogates vanish from names."""
    assert clean_name("Intro\x00 call\x07\ud800") == "Intro call"


def test_clean_name_whitespace_runs_one_space() -> None:
    """Every whitespace run, newlines and tabs included, becomes one space; ends stripped."""
    assert clean_name("  Intro\n\n \t call\u00a0 now\r\n") == "Intro call now"


def test_clean_name_decomposed_accent_composed() -> None:
    """Names are NFC-normalised, so "e" + combining acute is one character."""
    assert clean_name("Cafe\u0301") == "Caf\u00e9"


def test_map_event_type_long_name_cut_to_200_with_ellipsis() -> None:
    """A name over 200 characters is cut to exactly 200, the last being "…"."""
    name = map_event_type(USER, event_type(name="a" * 300)).name
    assert name == "a" * 199 + "…"
    assert len(name) == NAME_MAX


def test_map_event_type_name_of_200_not_cut() -> None:
    """A name of exactly 200 characters is left whole."""
    assert map_event_type(USER, event_type(name="b" * 200)).name == "b" * 200


def test_map_event_type_long_description_cut_to_2000_with_ellipsis() -> None:
    """A description over 2000 characters is cut to 2000, ending in "…"."""
    description = map_event_type(USER, event_type(description_plain="d" * 5000)).description
    assert description == "d" * 1999 + "…"


def test_cut_text_trailing_space_before_cut_stripped() -> None:
    """The kept part loses trailing whitespace before the ellipsis is added."""
    assert cut_text("a" * 198 + " " + "b" * 10, 200) == "a" * 198 + "…"


def test_cut_text_combining_mark_at_cut_kept_with_its_letter() -> None:
    """A cut never separates a letter from its combining mark."""
    assert cut_text("x\u0301" * 150, 200) == "x\u0301" * 99 + "…"


def test_cut_text_zwj_emoji_at_cut_dropped_whole() -> None:
    """A ZWJ emoji sequence across the cut is dropped whole, leaving no dangling joiner."""
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert cut_text("a" * 196 + family, 200) == "a" * 196 + "…"


def test_cut_text_flag_at_cut_dropped_whole() -> None:
    """A flag (two regional indicators) across the cut is not split in half."""
    assert cut_text("a" * 198 + "\U0001f1eb\U0001f1f7\U0001f1e9\U0001f1ea", 200) == "a" * 198 + "…"


def test_cut_text_flag_pairs_before_cut_kept() -> None:
    """Whole flags before the cut are kept; only the one split by it goes."""
    flags = "\U0001f1eb\U0001f1f7" * 3
    assert cut_text("a" * 195 + flags, 200) == "a" * 195 + "\U0001f1eb\U0001f1f7" * 2 + "…"


def test_cut_text_single_huge_cluster_cut_hard() -> None:
    """One cluster longer than the limit is cut at the limit rather than emptied."""
    assert cut_text("x" + "\u0301" * 300, 10) == "x" + "\u0301" * 8 + "…"


@pytest.mark.parametrize(
    ("fields", "label"),
    [
        ({"kind": "solo", "pooling_type": None}, "One-on-One"),
        ({"kind": "group", "pooling_type": None}, "Group"),
        ({"kind": "solo", "pooling_type": "round_robin"}, "Round Robin"),
        ({"kind": "solo", "pooling_type": "collective"}, "Collective"),
        ({"kind": "solo", "pooling_type": "multi_pool"}, "Multi-Pool"),
        ({"type": "AdhocEventType"}, "One-Off"),
        ({"type": "AdhocEventType", "pooling_type": "round_robin", "kind": "group"}, "One-Off"),
        ({"kind": "group", "pooling_type": "collective"}, "Collective"),
        ({"kind": None, "pooling_type": None}, "One-on-One"),
        ({"kind": "solo", "pooling_type": "future_pool"}, "One-on-One"),
        ({"kind": "group", "pooling_type": "future_pool"}, "Group"),
    ],
)
def test_label_source_type_kind_and_pooling_label(fields: dict[str, Any], label: str) -> None:
    """One-Off first, then the pooling type, then the kind; anything else is One-on-One."""
    assert label_source_type(event_type(**fields)) == label


# --- source_id -------------------------------------------------------------------------------


def test_source_id_for_user_and_type_joined_by_colon() -> None:
    """The source_id is the user uuid and the event type uuid joined by ":"."""
    assert source_id_for("U1", "E1") == "U1:E1"


def test_parse_source_id_round_trip_parts() -> None:
    """A source_id parses back to its user and event type uuids."""
    assert parse_source_id(source_id_for("U-1", "e_2.x~")) == ("U-1", "e_2.x~")


@pytest.mark.parametrize("source_id", ["abc", "a:b:c", ":b", "a:", "a/b:c", "a:b/c", "..:b", ""])
def test_parse_source_id_foreign_format_none(source_id: str) -> None:
    """Ids not in our format (other apps', malformed) parse to None."""
    assert parse_source_id(source_id) is None


@pytest.mark.parametrize("bad", ["a/b", "a:b", "", ".", "..", "a b", "x" * 101])
def test_source_id_for_unsafe_uuid_value_error(bad: str) -> None:
    """A uuid that is not path-safe cannot be part of a source_id, in either position."""
    with pytest.raises(ValueError, match="not path-safe"):
        source_id_for(bad, "E1")
    with pytest.raises(ValueError, match="not path-safe"):
        source_id_for("U1", bad)


def test_map_event_types_unsafe_type_uuid_unmappable() -> None:
    """An event type whose uuid is not path-safe is unmappable; the others still map."""
    odd = event_type(uri=BASE + "ET:0002")
    result = map_event_types(USER, [odd, event_type()], DEFAULTS)
    assert result.unmappable == {BASE + "ET:0002": "event type uuid is not path-safe: 'ET:0002'"}
    assert list(result.links) == ["USER0001:ET0001"]


def test_map_event_types_unsafe_user_uuid_value_error() -> None:
    """A user uuid that is not path-safe stops the mapping instead of mapping nothing."""
    with pytest.raises(ValueError, match="user uuid is not path-safe"):
        map_event_types("a/b", [event_type()], DEFAULTS)


def test_map_event_types_team_type_under_two_users_two_source_ids() -> None:
    """A team event type listed under two members gives each member their own source_id."""
    team = event_type(pooling_type="round_robin")
    first = map_event_types(USER, [team], DEFAULTS).links
    second = map_event_types(OTHER_USER, [team], DEFAULTS).links
    assert list(first) == ["USER0001:ET0001"]
    assert list(second) == ["USER0002:ET0001"]


# --- fingerprint -----------------------------------------------------------------------------


def test_fingerprint_known_payload_literal_value() -> None:
    """The fingerprint of a known payload is a fixed value in every process and version."""
    assert fingerprint(payload()) == "be7dbbf74a88b82a6d8fe2d0da1b9e73"


def test_fingerprint_non_ascii_and_nulls_literal_value() -> None:
    """Non-ASCII text is hashed as JSON ASCII escapes and None as null: a fixed value."""
    link = LinkPayload(
        source_id="U1:E1",
        name="Caf\u00e9 \u2615",
        url="https://calendly.com/x",
        description=None,
        source_type="Group",
        duration_in_minutes=None,
    )
    assert fingerprint(link) == "81dcf38fb289021c14fcc5652f962b1b"


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ({"name": "Intro call"}, {"name": "  Intro call \t"}),
        ({"description": "Line one\nLine two"}, {"description": " Line one\r\nLine two\r\n"}),
        ({"description": None}, {"description": ""}),
        ({"description": None}, {"description": "  "}),
        ({"name": "Caf\u00e9"}, {"name": "Cafe\u0301"}),
        (
            {"url": "https://calendly.com/ann/caf\u00e9"},
            {"url": "https://calendly.com/ann/caf%C3%A9"},
        ),
        (
            {"url": "https://calendly.com/ann/caf%c3%a9"},
            {"url": " https://calendly.com/ann/caf%C3%A9"},
        ),
        ({"source_type": "Group"}, {"source_type": "Group "}),
    ],
)
def test_fingerprint_of_what_close_normalised_equals_what_was_sent(
    sent: dict[str, Any], stored: dict[str, Any]
) -> None:
    """Trimmed, CRLF, "" for null, NFC and percent-encoded forms hash as the payload sent."""
    assert fingerprint(payload(**stored)) == fingerprint(payload(**sent))


def test_comparable_leaves_what_mapping_sends_as_it_is() -> None:
    """A mapped payload is its own comparable form: its fingerprint is that of the payload."""
    mapped = map_event_type(
        USER, event_type(name=" Caf\u00e9  call ", description_plain="a\r\nb \n", slug="x")
    )
    assert comparable(mapped) == mapped


def test_fingerprint_equal_payloads_equal() -> None:
    """Two equal payloads built separately have the same 32-hex-character fingerprint."""
    first, second = fingerprint(payload()), fingerprint(payload())
    assert first == second
    assert len(first) == 32
    assert set(first) <= set("0123456789abcdef")


@pytest.mark.parametrize(
    "change",
    [
        {"source_id": "USER0001:ET0002"},
        {"name": "Intro call!"},
        {"url": "https://calendly.com/ann/intro"},
        {"description": None},
        {"description": "Talk about your needs"},
        {"source_type": "Group"},
        {"duration_in_minutes": 31},
        {"duration_in_minutes": None},
    ],
)
def test_fingerprint_any_field_changed_different(change: dict[str, Any]) -> None:
    """Changing any one field changes the fingerprint."""
    assert fingerprint(payload(**change)) != fingerprint(payload())


# --- properties ------------------------------------------------------------------------------

_uuids = st.one_of(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-", min_size=1, max_size=40),
    st.text(max_size=20),
)
_texts = st.one_of(
    st.none(),
    st.text(max_size=50),
    st.text(max_size=600),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=5), st.integers(0, 1200)),
)
_urls = st.one_of(
    st.none(),
    st.builds(lambda path: "https://calendly.com/" + path, st.text(max_size=30)),
    st.sampled_from(["http://calendly.com/x", "ftp://x", "https://", ""]),
    st.text(max_size=30),
)
_event_types = st.builds(
    EventType,
    uri=st.builds(lambda uuid: BASE + uuid, _uuids),
    active=st.booleans(),
    name=_texts,
    slug=_texts,
    scheduling_url=_urls,
    duration=st.one_of(st.none(), st.integers(-100, 10**6)),
    kind=st.one_of(st.none(), st.sampled_from(["solo", "group"]), st.text(max_size=10)),
    pooling_type=st.one_of(
        st.none(), st.sampled_from(["round_robin", "collective", "multi_pool", "other"])
    ),
    type=st.one_of(st.none(), st.sampled_from(["StandardEventType", "AdhocEventType"])),
    secret=st.booleans(),
    deleted_at=st.one_of(st.none(), st.datetimes(timezones=st.just(UTC))),
    description_plain=_texts,
)
_options = st.builds(MappingOptions, include_secret=st.booleans(), include_one_off=st.booleans())
_user_uuids = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=36)


def _has_control(text: str, allowed: str = "") -> bool:
    return any(unicodedata.category(c) in {"Cc", "Cs"} and c not in allowed for c in text)


@given(user_uuid=_user_uuids, et=_event_types)
def test_map_event_type_arbitrary_input_payload_always_safe(user_uuid: str, et: EventType) -> None:
    """Any mapped payload has a clean, bounded name and description and a parseable source_id."""
    try:
        link = map_event_type(user_uuid, et)
    except UnmappableEventType:
        return
    assert link.name
    assert link.name == link.name.strip()
    assert len(link.name) <= NAME_MAX
    assert not _has_control(link.name)
    assert "\n" not in link.name
    assert "\t" not in link.name
    if link.description is not None:
        assert link.description
        assert len(link.description) <= DESCRIPTION_MAX
        assert not _has_control(link.description, allowed="\n\t")
    assert link.duration_in_minutes is None or link.duration_in_minutes > 0
    assert link.url.startswith(("http://", "https://"))
    assert "/" not in link.source_id
    assert parse_source_id(link.source_id) == (user_uuid, et.uuid)


@given(user_uuid=_user_uuids, ets=st.lists(_event_types, max_size=8), options=_options)
def test_map_event_types_arbitrary_input_deterministic_and_complete(
    user_uuid: str, ets: list[EventType], options: MappingOptions
) -> None:
    """Mapping twice gives equal results, and every input URI is linked, skipped or unmappable."""
    result = map_event_types(user_uuid, ets, options)
    assert map_event_types(user_uuid, list(ets), options) == result
    fingerprints = {sid: fingerprint(link) for sid, link in result.links.items()}
    assert fingerprints == {sid: fingerprint(link) for sid, link in result.links.items()}
    linked = {sid.partition(":")[2] for sid in result.links}
    first_by_uri: dict[str, EventType] = {}
    for et in ets:
        first_by_uri.setdefault(et.uri, et)
    for et in first_by_uri.values():
        places = [
            et.uri in result.skipped,
            et.uri in result.unmappable,
            et.uuid in linked and is_synced(et, options),
        ]
        assert any(places)
        assert not (et.uri in result.skipped and et.uri in result.unmappable)
    for sid, link in result.links.items():
        assert link.source_id == sid
        assert sid.startswith(user_uuid + ":")


# --- purity ----------------------------------------------------------------------------------


def test_core_import_pulls_no_io_libraries() -> None:
    """Importing every core module loads none of requests, redis or celery, even indirectly.

    The import-linter contract checks closesync's own imports; this checks what Python really
    loads, third-party packages' own imports included.
    """
    code = (
        "import pkgutil, importlib, sys, closesync.core as core; "
        "[importlib.import_module(m.name) "
        "for m in pkgutil.walk_packages(core.__path__, 'closesync.core.')]; "
        "io = {'requests', 'redis', 'celery'}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in io); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_control_regexes_match_the_per_character_rule_at_every_code_point() -> None:
    """The fast regex checks name exactly the characters `_is_control` (and whitespace) name."""
    from closesync.core.mapping import _CONTROL, _SPACE_OR_CONTROL, _is_control

    wrong = [
        hex(i)
        for i in range(sys.maxunicode + 1)
        if bool(_CONTROL.match(chr(i))) != _is_control(chr(i))
        or bool(_SPACE_OR_CONTROL.match(chr(i))) != (chr(i).isspace() or _is_control(chr(i)))
    ]
    assert wrong == []
