"""Reading a delivery and choosing whom it asks to sync (pure, literal values)."""

from __future__ import annotations

import json

import pytest

from closesync.core.webhook_delivery import (
    EventTypeChange,
    MalformedDelivery,
    needs_fan_out,
    parse_delivery,
    targets,
)

API = "https://api.calendly.com"


def _body(event: str = "event_type.updated", **payload: object) -> bytes:
    base: dict[str, object] = {
        "uri": f"{API}/event_types/ET1",
        "profile": {"type": "User", "owner": f"{API}/users/U1", "name": "Ann"},
    }
    base.update(payload)
    return json.dumps(
        {"event": event, "created_at": "2026-12-02T05:00:00Z", "created_by": "x", "payload": base}
    ).encode()


def test_parse_delivery_reads_what_it_uses_and_ignores_the_rest() -> None:
    """Unknown fields anywhere are ignored; uri, profile and deleted_at are read."""
    delivery = parse_delivery(_body(color="#fff", deleted_at="2026-12-02T05:00:00Z"))
    assert delivery is not None
    assert delivery.event == "event_type.updated"
    assert delivery.change.uuid == "ET1"
    assert delivery.change.owner_uuid == "U1"
    assert delivery.change.is_team is False
    assert delivery.change.deleted_at == "2026-12-02T05:00:00Z"


def test_parse_delivery_unknown_event_is_none() -> None:
    """An event closesync did not subscribe to is acknowledged and ignored: None."""
    assert parse_delivery(json.dumps({"event": "invitee.created", "payload": {}}).encode()) is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"not json", "not a webhook delivery"),
        (b"[]", "not a webhook delivery"),
        (json.dumps({"payload": {}}).encode(), "event"),
        (json.dumps({"event": "event_type.deleted", "payload": {}}).encode(), "uri"),
        (json.dumps({"event": "event_type.created", "payload": "x"}).encode(), "not an event"),
        (json.dumps({"event": "event_type.created", "payload": {"uri": ""}}).encode(), "uri"),
    ],
)
def test_parse_delivery_malformed_names_the_problem(body: bytes, problem: str) -> None:
    """A body that is no delivery, or a known event without a usable payload, says why."""
    with pytest.raises(MalformedDelivery, match=problem):
        parse_delivery(body)


def test_parse_delivery_error_never_echoes_the_input() -> None:
    """The error names the field, not what was posted there."""
    body = json.dumps({"event": "event_type.created", "payload": {"uri": ["s3cret-value"]}})
    with pytest.raises(MalformedDelivery) as caught:
        parse_delivery(body.encode())
    assert "s3cret-value" not in str(caught.value)


def _change(team: bool) -> EventTypeChange:
    profile = {"type": "Team" if team else "User", "owner": f"{API}/users/U1"}
    return EventTypeChange.model_validate({"uri": f"{API}/event_types/ET1", "profile": profile})


def test_targets_solo_type_asks_the_owner_only() -> None:
    """A user's own type: its owner's connection; holders are not read for it."""
    got = targets(_change(False), owner="c1", hosts={"c2"}, served={"c1", "c2"})
    assert got == ["c1"]


def test_targets_team_type_asks_every_connected_host() -> None:
    """A team type: the owner and every connection holding a link of it."""
    got = targets(_change(True), owner="c1", hosts={"c2", "c3"}, served={"c1", "c2", "c3"})
    assert got == ["c1", "c2", "c3"]


def test_targets_never_outside_the_subscription() -> None:
    """A candidate the subscription does not serve is never asked."""
    got = targets(_change(True), owner="c9", hosts={"c2", "c8"}, served={"c2"})
    assert got == ["c2"]
    assert targets(_change(False), owner="c9", hosts=set(), served=set()) == []


def test_targets_new_team_type_asks_every_served_connection() -> None:
    """A team type no connection holds yet: every connection the subscription serves."""
    change = _change(True)
    assert needs_fan_out(change, set()) is True
    got = targets(change, owner=None, hosts=set(), served=set(), all_served={"c4", "c5"})
    assert got == ["c4", "c5"]


def test_targets_held_team_type_does_not_widen() -> None:
    """Once a served connection holds the team type, only its holders (and owner) are asked."""
    change = _change(True)
    assert needs_fan_out(change, {"c2"}) is False
    assert needs_fan_out(_change(False), set()) is False
    assert targets(change, owner=None, hosts={"c2"}, served={"c2"}, all_served=None) == ["c2"]


def test_targets_team_type_held_only_outside_widens_to_the_served() -> None:
    """Holders the subscription does not serve count for nothing: its own connections are asked."""
    change = _change(True)
    got = targets(change, owner=None, hosts={"c9"}, served=set(), all_served={"c1"})
    assert got == ["c1"]
