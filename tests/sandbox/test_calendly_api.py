"""The Calendly emulator over loopback HTTP: users, listings, paging, auth and rate limits."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import requests

from closesync.sandbox import Sandbox, SandboxConfig
from tests.sandbox.conftest import cal_get


def test_users_me_with_pat_returns_the_token_owner(sandbox: Sandbox) -> None:
    """GET /users/me answers the PAT owner's resource with the organization."""
    user = sandbox.users[0]
    body = cal_get(sandbox, "/users/me", user).json()["resource"]
    assert body["uri"] == user.calendly_user_uri
    assert body["email"] == "user0@example.com"
    assert body["current_organization"] == user.calendly_organization_uri


def test_event_types_paging_walks_every_page_without_repeats(sandbox: Sandbox) -> None:
    """Following next_page with count=2 yields the full listing once, then a null token."""
    user = sandbox.users[0]
    expected = [e["uri"] for e in sandbox.world.list_event_types(user.calendly_user_uuid, None)]
    first = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri, count=2).json()
    seen, page = [e["uri"] for e in first["collection"]], first
    assert first["pagination"]["previous_page"] is None
    while page["pagination"]["next_page"]:
        page = requests.get(
            page["pagination"]["next_page"],
            headers={"Authorization": f"Bearer {user.calendly_token}"},
            timeout=5,
        ).json()
        assert page["pagination"]["previous_page_token"] is not None
        seen += [e["uri"] for e in page["collection"]]
    assert seen == expected
    assert len(seen) > 2
    assert page["pagination"]["next_page_token"] is None


def test_event_types_count_out_of_range_answers_400_with_details(sandbox: Sandbox) -> None:
    """count=101 is refused with Calendly's error shape naming the parameter."""
    user = sandbox.users[0]
    response = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri, count=101)
    assert response.status_code == 400
    assert response.json()["details"] == [
        {"parameter": "count", "message": "must be an integer between 1 and 100"}
    ]


def test_event_types_without_user_or_organization_answers_400(sandbox: Sandbox) -> None:
    """A listing must name a user or an organization."""
    response = cal_get(sandbox, "/event_types", sandbox.users[0])
    assert response.status_code == 400
    assert response.json()["title"] == "Invalid Argument"


def test_event_types_other_user_as_plain_member_answers_403(sandbox: Sandbox) -> None:
    """A plain member may not list a colleague's event types."""
    member, owner = sandbox.users[1], sandbox.users[0]
    response = cal_get(sandbox, "/event_types", member, user=owner.calendly_user_uri)
    assert response.status_code == 403
    assert response.json()["title"] == "Permission Denied"


def test_event_types_organization_as_owner_excludes_team_types(sandbox: Sandbox) -> None:
    """The owner lists the organization's types; shared team types only appear with user=."""
    owner = sandbox.users[0]
    body = cal_get(
        sandbox, "/event_types", owner, organization=owner.calendly_organization_uri, count=100
    ).json()
    assert body["collection"]
    assert all(e["profile"]["type"] == "User" for e in body["collection"])


def test_event_types_team_type_is_listed_under_every_member(sandbox: Sandbox) -> None:
    """A team type appears, with the same uri, in each member's listing."""
    team = next(
        e
        for user in sandbox.users
        for e in sandbox.world.list_event_types(user.calendly_user_uuid, None)
        if e["pooling_type"]
    )
    holders = [
        u
        for u in sandbox.users
        if team["uri"]
        in [e["uri"] for e in sandbox.world.list_event_types(u.calendly_user_uuid, None)]
    ]
    assert len(holders) >= 2


def test_event_types_active_true_leaves_out_inactive_types(sandbox: Sandbox) -> None:
    """active=true lists only active types; without it inactive ones are listed too."""
    user = sandbox.users[0]
    everything = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri).json()
    active = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri, active="true")
    assert any(not e["active"] for e in everything["collection"])
    assert all(e["active"] for e in active.json()["collection"])


def test_event_type_soft_deleted_is_unlisted_but_fetchable(sandbox: Sandbox) -> None:
    """A deleted type leaves the listing, and GET by uuid shows deleted_at."""
    user = sandbox.users[0]
    created = sandbox.world.create_event_type(user.calendly_user_uuid, name="Gone Soon")
    uuid = created["uri"].rsplit("/", 1)[1]
    sandbox.world.delete_event_type(uuid)
    listing = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri, count=100)
    assert created["uri"] not in [e["uri"] for e in listing.json()["collection"]]
    assert cal_get(sandbox, f"/event_types/{uuid}", user).json()["resource"]["deleted_at"]


def test_event_type_purged_answers_404(sandbox: Sandbox) -> None:
    """A purged type is gone entirely."""
    user = sandbox.users[0]
    uuid = sandbox.world.create_event_type(user.calendly_user_uuid)["uri"].rsplit("/", 1)[1]
    sandbox.world.delete_event_type(uuid, purge=True)
    response = cal_get(sandbox, f"/event_types/{uuid}", user)
    assert response.status_code == 404
    assert response.json()["title"] == "Resource Not Found"


def test_auth_unknown_token_answers_401_invalid(sandbox: Sandbox) -> None:
    """An unknown bearer token is refused with Calendly's message."""
    response = requests.get(
        sandbox.calendly_api_url + "/users/me",
        headers={"Authorization": "Bearer cal_pat_nope"},
        timeout=5,
    )
    assert response.status_code == 401
    assert response.json() == {
        "title": "Unauthenticated",
        "message": "The access token is invalid",
    }


def test_auth_expired_access_token_answers_401_expired(
    sandbox: Sandbox, http: requests.Session
) -> None:
    """An OAuth access token past its lifetime says it is expired."""
    location = http.get(
        sandbox.calendly_auth_url + "/oauth/authorize",
        params={
            "client_id": "sandbox-calendly-client",
            "response_type": "code",
            "redirect_uri": "http://localhost/cb",
        },
        allow_redirects=False,
        timeout=5,
    ).headers["Location"]
    code = location.split("code=")[1].split("&")[0]
    token = http.post(
        sandbox.calendly_auth_url + "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": "http://localhost/cb",
        },
        auth=("sandbox-calendly-client", "sandbox-calendly-secret"),
        timeout=5,
    ).json()["access_token"]
    sandbox.world.advance_clock(7200)
    response = http.get(
        sandbox.calendly_api_url + "/users/me",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    assert response.status_code == 401
    assert response.json()["message"] == "The access token is expired"


def test_rate_limit_exhausted_answers_429_with_headers_until_window_ends() -> None:
    """With a limit of 2 per minute the third call is a 429; a minute later calls pass again."""
    config = SandboxConfig(seed=1, calendly_rate_limit=2, freeze_clock=True)
    with Sandbox.start(config) as sb:
        user = sb.users[0]
        first = cal_get(sb, "/users/me", user)
        cal_get(sb, "/users/me", user)
        refused = cal_get(sb, "/users/me", user)
        assert first.headers["X-RateLimit-Limit"] == "2"
        assert first.headers["X-RateLimit-Remaining"] == "1"
        assert refused.status_code == 429
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert 1 <= int(refused.headers["X-RateLimit-Reset"]) <= 60
        assert refused.json()["title"] == "Too Many Requests"
        sb.world.advance_clock(60)
        assert cal_get(sb, "/users/me", user).status_code == 200


def test_memberships_email_filter_returns_one_member(sandbox: Sandbox) -> None:
    """organization_memberships?email= finds the member with that email and their role."""
    owner = sandbox.users[0]
    body = cal_get(
        sandbox,
        "/organization_memberships",
        owner,
        organization=owner.calendly_organization_uri,
        email="user1@example.com",
    ).json()
    assert [m["user"]["email"] for m in body["collection"]] == ["user1@example.com"]
    assert body["collection"][0]["role"] == "user"


def test_memberships_paging_lists_owner_first(sandbox: Sandbox) -> None:
    """Memberships page like event types; the first seeded user is the owner."""
    owner = sandbox.users[0]
    body = cal_get(
        sandbox,
        "/organization_memberships",
        owner,
        organization=owner.calendly_organization_uri,
        count=1,
    ).json()
    assert body["collection"][0]["role"] == "owner"
    assert body["pagination"]["next_page_token"] is not None


def test_event_type_one_off_profile_is_the_owner_user_object(sandbox: Sandbox) -> None:
    """An AdhocEventType carries a User profile, never null, as the current API document has it."""
    user = sandbox.users[0]
    created = sandbox.world.create_event_type(
        user.calendly_user_uuid, name="One-off", type="AdhocEventType"
    )
    uuid = created["uri"].rsplit("/", 1)[1]
    resource = cal_get(sandbox, f"/event_types/{uuid}", user).json()["resource"]
    assert resource["profile"] == {
        "type": "User",
        "name": user.name,
        "owner": user.calendly_user_uri,
    }


def test_event_types_every_listed_profile_is_an_object(sandbox: Sandbox) -> None:
    """Across every kind of seeded type, each profile has a type, a name and an owner."""
    for user in sandbox.users:
        listing = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri, count=100)
        profiles = [e["profile"] for e in listing.json()["collection"]]
        assert profiles
        for profile in profiles:
            assert profile["type"] in ("User", "Team")
            assert isinstance(profile["name"], str)
            assert profile["owner"].startswith(f"{sandbox.calendly_api_url}/users/")


def test_scope_missing_answers_403_with_required_scopes(sandbox: Sandbox) -> None:
    """A token without event_types:read is refused with the scope it lacks in required_scopes."""
    user = sandbox.users[0]
    with sandbox.world.lock:
        token = sandbox.world.tokens.issue(
            "calendly", "pat", user.calendly_user_uuid, sandbox.world.now(), scope="users:read"
        )
    response = requests.get(
        sandbox.calendly_api_url + "/event_types",
        params={"user": user.calendly_user_uri},
        headers={"Authorization": f"Bearer {token.value}"},
        timeout=5,
    )
    assert response.status_code == 403
    body = response.json()
    assert body["title"] == "Insufficient scope"
    assert body["required_scopes"] == ["event_types:read"]


def _sort_key(event_type: dict[str, Any], field: str) -> Any:
    if field == "name":
        return (event_type["name"] or event_type["slug"]).lower()
    return event_type[field]


@pytest.mark.parametrize(
    "sort",
    ["position:desc", "position", "created_at:asc", "updated_at:desc,name:asc", "name:desc"],
)
def test_event_types_sort_by_a_documented_field_orders_the_listing(
    sandbox: Sandbox, sort: str
) -> None:
    """Every sort field of the current document is accepted, and the listing follows it."""
    user = sandbox.users[1]
    response = cal_get(
        sandbox, "/event_types", user, user=user.calendly_user_uri, count=100, sort=sort
    )
    assert response.status_code == 200, response.text
    listed = response.json()["collection"]
    assert len(listed) > 2
    for before, after in itertools.pairwise(listed):
        for field, _, direction in (part.partition(":") for part in sort.split(",")):
            first, second = _sort_key(before, field), _sort_key(after, field)
            if first != second:
                assert (first < second) == (direction != "desc"), (field, before, after)
                break


@pytest.mark.parametrize("sort", ["color:asc", "name:up", "name:asc,", "position:asc:desc"])
def test_event_types_sort_unknown_field_or_direction_answers_400(
    sandbox: Sandbox, sort: str
) -> None:
    """A sort outside the documented fields and directions is a 400 naming the parameter."""
    user = sandbox.users[0]
    response = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri, sort=sort)
    assert response.status_code == 400
    assert response.json()["details"][0]["parameter"] == "sort"
