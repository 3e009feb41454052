"""Seeding: deterministic per seed, one email per pair, and the full mix of event types."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from closesync.sandbox import Sandbox, SandboxConfig


def _snapshot(sb: Sandbox) -> dict[str, Any]:
    """Users and listings with the port-dependent base URL taken out."""
    text = repr(
        (
            [asdict(u) for u in sb.users],
            [sb.world.list_event_types(u.calendly_user_uuid, None) for u in sb.users],
        )
    )
    return {"state": text.replace(sb.calendly_api_url, "BASE")}


def test_seed_same_seed_gives_identical_worlds() -> None:
    """Two sandboxes with one seed have the same users, tokens and event types."""
    with Sandbox.start(SandboxConfig(seed=7)) as one, Sandbox.start(SandboxConfig(seed=7)) as two:
        assert _snapshot(one) == _snapshot(two)


def test_seed_different_seeds_give_different_tokens() -> None:
    """Another seed gives other tokens."""
    with Sandbox.start(SandboxConfig(seed=1)) as one, Sandbox.start(SandboxConfig(seed=2)) as two:
        assert one.users[0].calendly_token != two.users[0].calendly_token


def test_seed_users_pair_by_email_in_one_organization_each(sandbox: Sandbox) -> None:
    """User i is user{i}@example.com on both sides; one Close and one Calendly organization."""
    users = sandbox.users
    assert [u.email for u in users] == [
        "user0@example.com",
        "user1@example.com",
        "user2@example.com",
    ]
    assert len({u.close_organization_id for u in users}) == 1
    assert len({u.calendly_organization_uri for u in users}) == 1
    assert sandbox.world.calendly_role(users[0].calendly_user_uuid) == "owner"
    assert all(u.close_organization_id.startswith("orga_") for u in users)
    assert all(u.close_user_id.startswith("user_") for u in users)


def test_seed_default_mix_covers_every_kind_of_event_type(sandbox: Sandbox) -> None:
    """Secret, inactive, one-off, group, round robin and collective types are all seeded."""
    types = {
        e["uri"]: e
        for u in sandbox.users
        for e in sandbox.world.list_event_types(u.calendly_user_uuid, None)
    }.values()
    assert any(e["secret"] for e in types)
    assert any(not e["active"] for e in types)
    assert any(e["type"] == "AdhocEventType" for e in types)
    assert any(e["kind"] == "group" for e in types)
    assert {"round_robin", "collective"} <= {e["pooling_type"] for e in types}
    standard = [e for e in types if e["active"] and not e["secret"] and e["kind"] == "solo"]
    assert len(standard) > len(types) / 2


def test_seed_null_names_fall_back_to_a_slug() -> None:
    """Some seeds produce a null name; such a type always has a slug."""
    with Sandbox.start(SandboxConfig(seed=3, users=4, event_types=10)) as sb:
        types = [e for u in sb.users for e in sb.world.list_event_types(u.calendly_user_uuid, None)]
    nameless = [e for e in types if e["name"] is None]
    assert nameless
    assert all(e["slug"] for e in nameless)
    assert any(e["description_plain"] is None for e in types)
