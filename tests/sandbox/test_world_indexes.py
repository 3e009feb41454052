"""The World's per-user indexes follow every change a listing, a slug or an upsert depends on."""

from __future__ import annotations

from closesync.sandbox import CLOSE_CLIENT_ID, Sandbox, SandboxConfig


def _listed(sb: Sandbox, user_uuid: str) -> set[str]:
    return {item["uri"].rsplit("/", 1)[-1] for item in sb.world.list_event_types(user_uuid, None)}


def test_purged_type_leaves_every_listing_and_frees_its_slug() -> None:
    """A purged team type is listed under no member, and its owner may reuse the slug."""
    with Sandbox.start(SandboxConfig(seed=2, users=2, event_types=0, freeze_clock=True)) as sb:
        owner, member = (u.calendly_user_uuid for u in sb.users)
        made = sb.world.create_event_type(
            owner, name="Team", slug="team", pooling_type="round_robin", members=[member]
        )
        uuid = made["uri"].rsplit("/", 1)[-1]
        assert uuid in _listed(sb, owner) & _listed(sb, member)
        sb.world.delete_event_type(uuid, purge=True)
        assert uuid not in _listed(sb, owner) | _listed(sb, member)
        again = sb.world.create_event_type(owner, name="Team", slug="team")
        assert again["slug"] == "team"


def test_member_changes_move_a_team_type_between_listings() -> None:
    """A removed member stops listing a team type, an added one starts, the owner keeps it."""
    with Sandbox.start(SandboxConfig(seed=2, users=3, event_types=0, freeze_clock=True)) as sb:
        owner, first, second = (u.calendly_user_uuid for u in sb.users)
        made = sb.world.create_event_type(
            owner, name="Team", pooling_type="collective", members=[first]
        )
        uuid = made["uri"].rsplit("/", 1)[-1]
        sb.world.change_members(uuid, add=[second], remove=[first])
        assert uuid in _listed(sb, owner)
        assert uuid not in _listed(sb, first)
        assert uuid in _listed(sb, second)


def test_deleted_link_leaves_the_user_listing_and_upsert_creates_anew() -> None:
    """After either kind of delete the link is not listed, and the same source_id is new."""
    with Sandbox.start(SandboxConfig(seed=2, users=1, event_types=0, freeze_clock=True)) as sb:
        world, user = sb.world, sb.users[0].close_user_id
        values = {"source_id": "u:e", "name": "Call", "url": "https://calendly.com/u/call"}
        first = world.upsert_integration_link(CLOSE_CLIENT_ID, user, values)
        assert world.delete_integration_link(CLOSE_CLIENT_ID, user, "u:e")
        assert world.close_links(user) == []
        second = world.upsert_integration_link(CLOSE_CLIENT_ID, user, values)
        assert second["id"] != first["id"]
        assert world.delete_link(second["id"])
        assert world.close_links(user) == []
        assert not world.delete_integration_link(CLOSE_CLIENT_ID, user, "u:e")
