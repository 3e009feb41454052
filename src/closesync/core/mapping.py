"""Mapping: which Calendly event types become Close scheduling links, and what each link says.

This is the one place that decides what a user's links should be. The planner compares its
answer with what Close holds; the workers only carry the result. It must stay pure: it imports
nothing of requests, redis or celery (a test keeps that boundary), does no I/O and reads no
clock, so the same event types always give the same links, in any process.

Which event types are synced (`skip_reason_for`, checked in this order, first match wins):
deleted (`deleted_at` set), inactive, one-off (`type == "AdhocEventType"`, unless
`include_one_off`), secret (unless `include_secret` is off; secret types are included by
default because their link still works, it is only hidden from the landing page).

`source_id` is `<Calendly user uuid>:<event type uuid>`. Team event types appear under every
member with the same URI, so the user is part of the id; Close puts the id in a URL path, so each
part must be path-safe: 1-100 of `A-Z a-z 0-9 - . _ ~` and not only dots. An event type whose uuid
is not path-safe is unmappable; a user uuid that is not is the caller's error (`ValueError`),
because mapping none of a user's types would look like "delete all of their links".

`source_type` precedence: One-Off first (a one-off meeting may carry any kind), then the
pooling type (Round Robin, Collective, Multi-Pool: they say more than `kind`), then the kind
(Group); anything else, including a missing kind or an unknown pooling type, is One-on-One.

Values Close may refuse are made safe. Close documents no limits (unknown); the sandbox refuses
names over 255 and descriptions over 4000 characters, so we cut well below, leaving headroom for
a real limit counted differently (e.g. in UTF-16 units):
- Text is NFC-normalised, so a letter and its accent count as one character.
- Lone surrogates (not encodable as UTF-8) and control characters are removed; descriptions keep
  `\\n` and `\\t`, with `\\r\\n`, `\\r`, NEL, LS and PS turned into `\\n`. Format characters
  (ZWJ, bidi marks) are kept: emoji sequences and right-to-left names need them.
- Names: every whitespace run, newlines included, becomes one space. A name with nothing visible
  falls back to the slug; neither → unmappable. Descriptions: all-whitespace → None.
- Both are stripped, then cut at NAME_MAX = 200 / DESCRIPTION_MAX = 2000 characters, ending in
  "…" when cut (the ellipsis counts toward the limit). The cut moves back to the start of a
  grapheme cluster (combining marks, ZWJ sequences, emoji modifiers, tags, flag pairs, Hangul
  jamo), so no cut leaves a dangling accent or half an emoji; one cluster longer than the limit
  is cut hard.
- `url` must be an absolute http(s) URL with a host and no whitespace or control characters;
  `duration_in_minutes` that is not positive becomes None.

`fingerprint` hashes the canonical JSON of a payload, so "unchanged" needs no stored copy. The
hash of a given payload never changes; the payload made from text with characters newer than the
running Python's Unicode database may (NFC and categories follow that database). It hashes the
payload as Close may store it (`comparable`): text stripped, NFC, line breaks as `\\n`, an empty
description as None, the URL percent-encoded beyond ASCII with upper-case escapes. So the link
Close hands back after normalising what was sent has the fingerprint recorded when it was sent,
and the daily drift check does not rewrite every link. Mapping already sends such payloads, so
their fingerprints are those of the payloads themselves.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote, urlsplit

from closesync.core.calendly_payloads import EventType
from closesync.core.close_payloads import LinkPayload, SchedulingLink
from closesync.core.connection import Connection

# Below the sandbox's 255-character name limit (Close's real one is unknown): 55 of headroom.
NAME_MAX = 200
# Below the sandbox's 4000-character description limit: half of it, for the same reason.
DESCRIPTION_MAX = 2000
# One character, so a cut text is at most the limit long.
ELLIPSIS = "…"
# Each part of a source_id; Calendly uuids are at most 36 characters.
ID_PART_MAX = 100

SOURCE_TYPE_ONE_OFF = "One-Off"
SOURCE_TYPE_ROUND_ROBIN = "Round Robin"
SOURCE_TYPE_COLLECTIVE = "Collective"
SOURCE_TYPE_MULTI_POOL = "Multi-Pool"
SOURCE_TYPE_GROUP = "Group"
SOURCE_TYPE_ONE_ON_ONE = "One-on-One"

_POOLING_LABELS = {
    "round_robin": SOURCE_TYPE_ROUND_ROBIN,
    "collective": SOURCE_TYPE_COLLECTIVE,
    "multi_pool": SOURCE_TYPE_MULTI_POOL,
}
_ADHOC_TYPE = "AdhocEventType"

SkipReason = Literal["deleted", "inactive", "one-off", "secret"]

_ID_PART = re.compile(rf"[A-Za-z0-9._~-]{{1,{ID_PART_MAX}}}")
_SEPARATOR = ":"
_LINE_BREAKS = re.compile("\r\n|[\r\x85\u2028\u2029]")
_WHITESPACE_RUN = re.compile(r"\s+")
# The characters `_is_control` names (categories Cc and Cs), and those plus whitespace: one
# regex search over a clean text costs far less than a category lookup per character (checked
# equal over every code point by the tests), so the per-character pass runs only when it finds one.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_ZWJ = "\u200d"
_DESCRIPTION_KEEP = frozenset("\n\t")
# ASCII a URL keeps unencoded in `comparable` (with letters, digits and `-._~`); the rest, as a
# normalising server re-encodes it, is percent-encoded. `%` stays: existing escapes are kept.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]"
_ESCAPE = re.compile("%[0-9a-fA-F]{2}")


class UnmappableEventType(ValueError):
    """An event type that should be synced but cannot become a valid link; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class MappingOptions:
    """Which optional kinds of event type are synced."""

    include_secret: bool = True
    include_one_off: bool = False


@dataclass(frozen=True)
class MappingResult:
    """One user's mapped event types: links by source_id, the rest by event type URI."""

    links: dict[str, LinkPayload] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unmappable: dict[str, str] = field(default_factory=dict)


def _is_path_safe(part: str) -> bool:
    return _ID_PART.fullmatch(part) is not None and part.strip(".") != ""


def source_id_for(user_uuid: str, event_type_uuid: str) -> str:
    """The source_id of a user's event type; `ValueError` if either uuid is not path-safe."""
    for label, part in (("user", user_uuid), ("event type", event_type_uuid)):
        if not _is_path_safe(part):
            raise ValueError(f"{label} uuid is not path-safe: {part[:ID_PART_MAX]!r}")
    return f"{user_uuid}{_SEPARATOR}{event_type_uuid}"


def parse_source_id(source_id: str) -> tuple[str, str] | None:
    """`(user_uuid, event_type_uuid)` of one of our source_ids; None for any other id."""
    user_uuid, sep, event_type_uuid = source_id.partition(_SEPARATOR)
    if sep and _is_path_safe(user_uuid) and _is_path_safe(event_type_uuid):
        return user_uuid, event_type_uuid
    return None


def is_our_link(link: SchedulingLink, connection: Connection, close_client_id: str | None) -> bool:
    """A link this OAuth application made for this connection's Calendly user.

    The one definition of "ours": the sync adopts and deletes only such links, and so does
    `connections remove --delete-links`. THIRD_PARTY, with a source_id of closesync's format for
    this Calendly user, of this Close user (when Close says whose it is), and of our OAuth client
    (when both Close and the settings name one).
    """
    if link.source != "THIRD_PARTY" or not link.source_id:
        return False
    if link.user_id is not None and link.user_id != connection.close_user_id:
        return False
    if close_client_id is not None and link.oauth_client_id not in (None, close_client_id):
        return False
    parsed = parse_source_id(link.source_id)
    return parsed is not None and parsed[0] == connection.calendly_user_uuid


def skip_reason_for(event_type: EventType, options: MappingOptions) -> SkipReason | None:
    """Why an event type is intentionally not synced, or None if it is."""
    if event_type.deleted_at is not None:
        return "deleted"
    if not event_type.active:
        return "inactive"
    if event_type.type == _ADHOC_TYPE and not options.include_one_off:
        return "one-off"
    if event_type.secret and not options.include_secret:
        return "secret"
    return None


def is_synced(event_type: EventType, options: MappingOptions) -> bool:
    """Whether an event type should have a link in Close."""
    return skip_reason_for(event_type, options) is None


def label_source_type(event_type: EventType) -> str:
    """The short label Close shows for the event type's kind (precedence: module docstring)."""
    if event_type.type == _ADHOC_TYPE:
        return SOURCE_TYPE_ONE_OFF
    pooling = _POOLING_LABELS.get((event_type.pooling_type or "").lower())
    if pooling is not None:
        return pooling
    if (event_type.kind or "").lower() == "group":
        return SOURCE_TYPE_GROUP
    return SOURCE_TYPE_ONE_ON_ONE


def _is_control(char: str) -> bool:
    """A control character or a lone surrogate (which UTF-8 cannot encode)."""
    return unicodedata.category(char) in {"Cc", "Cs"}


def _is_visible(char: str) -> bool:
    return not char.isspace() and unicodedata.category(char)[0] not in {"C", "Z"}


def _is_regional_indicator(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _continues_cluster(text: str, index: int) -> bool:
    """Whether `text[index]` belongs to the grapheme cluster of `text[index - 1]` (simplified)."""
    char, before = text[index], text[index - 1]
    if unicodedata.category(char).startswith("M") or _ZWJ in (char, before):
        return True
    if "\U0001f3fb" <= char <= "\U0001f3ff" or "\U000e0020" <= char <= "\U000e007f":
        return True  # emoji skin-tone modifiers and tag characters extend the previous emoji
    if "\u1160" <= char <= "\u11ff":
        return True  # Hangul vowel and trailing jamo join the preceding syllable
    if _is_regional_indicator(char) and _is_regional_indicator(before):
        run = 0
        while index - run - 1 >= 0 and _is_regional_indicator(text[index - run - 1]):
            run += 1
        return run % 2 == 1  # an odd run before: `char` is the second half of a flag
    return False


def cut_text(text: str, limit: int) -> str:
    """`text` if at most `limit` long, else its start ending in "…", cut between clusters."""
    if len(text) <= limit:
        return text
    end = limit - len(ELLIPSIS)
    while end > 0 and _continues_cluster(text, end):
        end -= 1
    if end == 0:
        end = limit - len(ELLIPSIS)  # one cluster longer than the limit: nothing better to do
    return text[:end].rstrip().rstrip(_ZWJ).rstrip() + ELLIPSIS


def clean_name(text: str | None) -> str:
    """A name Close will take: one line, no control characters, cut; "" if nothing visible."""
    # Whitespace controls (newline, tab, ...) survive this step to become spaces in the next.
    text = text or ""
    if _CONTROL.search(text):
        text = "".join(c for c in text if c.isspace() or not _is_control(c))
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text)).strip()
    if not any(_is_visible(c) for c in text):
        return ""
    return cut_text(text, NAME_MAX)


def clean_description(text: str | None) -> str | None:
    """A description Close will take: lines and tabs kept, no other controls, cut; or None."""
    if text is None:
        return None
    text = _LINE_BREAKS.sub("\n", text)
    if _CONTROL.search(text):
        text = "".join(c for c in text if c in _DESCRIPTION_KEEP or not _is_control(c))
    text = unicodedata.normalize("NFC", text).strip()
    return cut_text(text, DESCRIPTION_MAX) if text else None


def _check_url(url: str | None) -> str:
    url = (url or "").strip()
    if not url:
        raise UnmappableEventType("no scheduling_url")
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
    except ValueError:  # e.g. an unbalanced "[" in the host
        scheme, host = "", None
    bad_char = _SPACE_OR_CONTROL.search(url) is not None
    if scheme not in {"http", "https"} or not host or bad_char:
        raise UnmappableEventType(f"scheduling_url is not an http(s) URL: {url[:100]!r}")
    return url


def map_event_type(user_uuid: str, event_type: EventType) -> LinkPayload:
    """The link for one event type, whether or not it is synced; `UnmappableEventType` if none.

    `ValueError` (not `UnmappableEventType`) if `user_uuid` itself is not path-safe.
    """
    if not _is_path_safe(event_type.uuid):
        raise UnmappableEventType(f"event type uuid is not path-safe: {event_type.uuid[:100]!r}")
    source_id = source_id_for(user_uuid, event_type.uuid)
    name = clean_name(event_type.name) or clean_name(event_type.slug)
    if not name:
        raise UnmappableEventType("no name or slug")
    duration = event_type.duration
    return LinkPayload(
        source_id=source_id,
        name=name,
        url=_check_url(event_type.scheduling_url),
        description=clean_description(event_type.description_plain),
        source_type=label_source_type(event_type),
        duration_in_minutes=duration if duration is not None and duration > 0 else None,
    )


def map_event_types(
    user_uuid: str, event_types: Iterable[EventType], options: MappingOptions
) -> MappingResult:
    """Every event type of one user, sorted into links, skipped and unmappable.

    An event type URI listed twice (a listing that shifted between pages) counts once: the first
    occurrence wins, and so does the first of two URIs that give the same source_id.
    `ValueError` if `user_uuid` is not path-safe.
    """
    if not _is_path_safe(user_uuid):
        raise ValueError(f"user uuid is not path-safe: {user_uuid[:ID_PART_MAX]!r}")
    result = MappingResult()
    seen: set[str] = set()
    for event_type in event_types:
        if event_type.uri in seen:
            continue
        seen.add(event_type.uri)
        reason = skip_reason_for(event_type, options)
        if reason is not None:
            result.skipped[event_type.uri] = reason
            continue
        try:
            link = map_event_type(user_uuid, event_type)
        except UnmappableEventType as error:
            result.unmappable[event_type.uri] = error.reason
            continue
        result.links.setdefault(link.source_id, link)
    return result


def _comparable_text(text: str) -> str:
    return unicodedata.normalize("NFC", _LINE_BREAKS.sub("\n", text)).strip()


def comparable(payload: LinkPayload) -> LinkPayload:
    """`payload` as a normalising Close may store it (see the module docstring)."""
    url = quote(payload.url.strip(), safe=_URL_SAFE)
    description = _comparable_text(payload.description or "")
    return payload.model_copy(
        update={
            "name": _comparable_text(payload.name),
            "url": _ESCAPE.sub(lambda m: m.group(0).upper(), url),
            "description": description or None,
            "source_type": payload.source_type.strip(),
        }
    )


def fingerprint(payload: LinkPayload) -> str:
    """32 hex characters of SHA-256 over the canonical JSON of `comparable(payload)`: equal
    payloads, and payloads that differ only as Close normalises them, have equal hashes.

    Sorted keys, no whitespace, ASCII escapes: the same bytes in every process and Python version.
    """
    canonical = json.dumps(
        comparable(payload).model_dump(mode="json"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


__all__ = [
    "DESCRIPTION_MAX",
    "ELLIPSIS",
    "NAME_MAX",
    "MappingOptions",
    "MappingResult",
    "SkipReason",
    "UnmappableEventType",
    "clean_description",
    "clean_name",
    "comparable",
    "cut_text",
    "fingerprint",
    "is_synced",
    "label_source_type",
    "map_event_type",
    "map_event_types",
    "parse_source_id",
    "skip_reason_for",
    "source_id_for",
]
