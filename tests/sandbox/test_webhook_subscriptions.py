"""The Calendly /webhook_subscriptions emulator over loopback HTTP: CRUD, permissions, scopes,
409 on a duplicate URL, 400s naming the bad parameter, and paging like the event types."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from closesync.core.webhooks import EVENT_TYPE_EVENTS
from closesync.sandbox import Sandbox, SeededUser
from tests.sandbox.conftest import admin, cal_call, calendly_oauth_token


def _body(user: SeededUser, scope: str = "user", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "url": f"https://hooks.example.com/webhooks/calendly/{user.calendly_user_uuid}",
        "events": list(EVENT_TYPE_EVENTS),
        "organization": user.calendly_organization_uri,
        "scope": scope,
    }
    if scope == "user":
        body["user"] = user.calendly_user_uri
    body.update(changes)
    return body


def _create(sb: Sandbox, token: str, body: dict[str, Any]) -> requests.Response:
    return cal_call(sb, "POST", "/webhook_subscriptions", token, json=body)


def test_create_user_scope_answers_201_with_the_full_resource(sandbox: Sandbox) -> None:
    """A member subscribing itself gets 201 and every documented field, never the key."""
    member = sandbox.users[1]
    response = _create(sandbox, member.calendly_token, _body(member, signing_key="k" * 32))
    assert response.status_code == 201
    resource = response.json()["resource"]
    assert set(resource) == {
        "uri",
        "callback_url",
        "created_at",
        "updated_at",
        "retry_started_at",
        "state",
        "events",
        "scope",
        "organization",
        "user",
        "group",
        "creator",
    }
    assert resource["uri"].startswith(sandbox.calendly_api_url + "/webhook_subscriptions/")
    assert resource["state"] == "active"
    assert resource["scope"] == "user"
    assert resource["user"] == member.calendly_user_uri
    assert resource["creator"] == member.calendly_user_uri
    assert resource["events"] == list(EVENT_TYPE_EVENTS)
    assert resource["retry_started_at"] is None
    assert resource["group"] is None
    assert "k" * 32 not in response.text


def test_create_organization_scope_by_owner_has_no_user(sandbox: Sandbox) -> None:
    """The owner may create an organization subscription; its `user` is null."""
    owner = sandbox.users[0]
    response = _create(sandbox, owner.calendly_token, _body(owner, "organization"))
    assert response.status_code == 201
    resource = response.json()["resource"]
    assert resource["scope"] == "organization"
    assert resource["user"] is None
    assert resource["organization"] == owner.calendly_organization_uri


def test_create_same_url_for_same_user_answers_409(sandbox: Sandbox) -> None:
    """Calendly refuses two subscriptions of one user on one URL."""
    member = sandbox.users[1]
    assert _create(sandbox, member.calendly_token, _body(member)).status_code == 201
    again = _create(sandbox, member.calendly_token, _body(member))
    assert again.status_code == 409
    assert again.json()["title"] == "Already Exists"
    other_url = _body(member, url="https://hooks.example.com/webhooks/calendly/other")
    assert _create(sandbox, member.calendly_token, other_url).status_code == 201


def test_create_member_asking_organization_scope_answers_403(sandbox: Sandbox) -> None:
    """A plain member may not subscribe to the whole organization."""
    member = sandbox.users[1]
    response = _create(sandbox, member.calendly_token, _body(member, "organization"))
    assert response.status_code == 403
    assert response.json()["title"] == "Permission Denied"


def test_create_member_for_another_user_answers_403_owner_may(sandbox: Sandbox) -> None:
    """A member may subscribe only itself; the owner may subscribe any member."""
    owner, member, other = sandbox.users[0], sandbox.users[1], sandbox.users[2]
    assert _create(sandbox, member.calendly_token, _body(other)).status_code == 403
    created = _create(sandbox, owner.calendly_token, _body(other))
    assert created.status_code == 201
    assert created.json()["resource"]["user"] == other.calendly_user_uri
    assert created.json()["resource"]["creator"] == owner.calendly_user_uri


def test_create_without_webhooks_write_answers_403_insufficient_scope(sandbox: Sandbox) -> None:
    """An OAuth token granted without webhooks:write is refused with required_scopes."""
    member = sandbox.users[1]
    token = calendly_oauth_token(sandbox, member, "users:read event_types:read webhooks:read")
    response = _create(sandbox, token, _body(member))
    assert response.status_code == 403
    assert response.json()["title"] == "Insufficient scope"
    assert response.json()["required_scopes"] == ["webhooks:write"]
    listed = cal_call(
        sandbox,
        "GET",
        "/webhook_subscriptions",
        token,
        params={
            "organization": member.calendly_organization_uri,
            "scope": "user",
            "user": member.calendly_user_uri,
        },
    )
    assert listed.status_code == 200


def test_withheld_scope_knob_refuses_every_token(sandbox: Sandbox) -> None:
    """Config calendly_withheld_scopes takes webhooks:read from the PATs too, at run time."""
    owner = sandbox.users[0]
    params = {"organization": owner.calendly_organization_uri, "scope": "organization"}
    assert admin(sandbox, "PUT", "/config", json={"calendly_withheld_scopes": "webhooks:read"}).ok
    refused = cal_call(
        sandbox, "GET", "/webhook_subscriptions", owner.calendly_token, params=params
    )
    assert refused.status_code == 403
    assert refused.json()["required_scopes"] == ["webhooks:read"]
    assert admin(sandbox, "PUT", "/config", json={"calendly_withheld_scopes": ""}).ok
    allowed = cal_call(
        sandbox, "GET", "/webhook_subscriptions", owner.calendly_token, params=params
    )
    assert allowed.status_code == 200


def test_default_oauth_grant_carries_the_webhook_scopes(sandbox: Sandbox) -> None:
    """An OAuth grant that asks for no particular scope may create subscriptions."""
    member = sandbox.users[1]
    token = calendly_oauth_token(sandbox, member)
    assert _create(sandbox, token, _body(member)).status_code == 201


@pytest.mark.parametrize(
    ("changes", "parameter"),
    [
        ({"url": None}, "url"),
        ({"url": "ftp://hooks.example.com/x"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"events": []}, "events"),
        ({"events": ["event_type.renamed"]}, "events"),
        ({"events": "event_type.created"}, "events"),
        ({"scope": "team"}, "scope"),
        ({"scope": "group", "group": "https://api.calendly.com/groups/x"}, "scope"),
        ({"organization": None}, "organization"),
        ({"user": None}, "user"),
        ({"signing_key": ""}, "signing_key"),
    ],
)
def test_create_bad_body_answers_400_naming_the_parameter(
    sandbox: Sandbox, changes: dict[str, Any], parameter: str
) -> None:
    """Every bad body is a 400 in Calendly's error shape whose detail names the parameter."""
    member = sandbox.users[1]
    body = {k: v for k, v in {**_body(member), **changes}.items() if v is not None}
    response = _create(sandbox, member.calendly_token, body)
    assert response.status_code == 400
    assert response.json()["title"] == "Invalid Argument"
    assert response.json()["details"][0]["parameter"] == parameter


def test_create_group_scope_says_it_is_not_emulated(sandbox: Sandbox) -> None:
    """Group scope is refused with a message saying the sandbox does not emulate it."""
    member = sandbox.users[1]
    response = _create(sandbox, member.calendly_token, _body(member, scope="group"))
    assert "not emulated" in response.json()["details"][0]["message"]


def test_create_non_json_body_answers_400(sandbox: Sandbox) -> None:
    """A body that is not a JSON object is a 400, not a 500."""
    member = sandbox.users[1]
    response = cal_call(
        sandbox, "POST", "/webhook_subscriptions", member.calendly_token, data=b"[1, 2"
    )
    assert response.status_code == 400
    assert response.json()["details"][0]["parameter"] == "body"


def test_list_pages_like_event_types_oldest_first(sandbox: Sandbox) -> None:
    """count=2 over five subscriptions walks three pages via next_page, each item once."""
    owner = sandbox.users[0]
    made = [
        _create(
            sandbox,
            owner.calendly_token,
            _body(owner, "organization", url=f"https://hooks.example.com/h/{n}"),
        ).json()["resource"]["uri"]
        for n in range(5)
    ]
    params = {"organization": owner.calendly_organization_uri, "scope": "organization", "count": 2}
    page = cal_call(sandbox, "GET", "/webhook_subscriptions", owner.calendly_token, params=params)
    seen = [s["uri"] for s in page.json()["collection"]]
    pages = 1
    while page.json()["pagination"]["next_page"]:
        page = requests.get(
            page.json()["pagination"]["next_page"],
            headers={"Authorization": f"Bearer {owner.calendly_token}"},
            timeout=5,
        )
        seen += [s["uri"] for s in page.json()["collection"]]
        pages += 1
    assert seen == made
    assert pages == 3
    assert page.json()["pagination"]["next_page_token"] is None


def test_list_user_scope_shows_only_that_users_subscriptions(sandbox: Sandbox) -> None:
    """scope=user&user=X lists X's user subscriptions, not the organization's nor others'."""
    owner, member = sandbox.users[0], sandbox.users[1]
    mine = _create(sandbox, member.calendly_token, _body(member)).json()["resource"]["uri"]
    _create(sandbox, owner.calendly_token, _body(owner))
    _create(sandbox, owner.calendly_token, _body(owner, "organization", url="https://h.example/o"))
    params = {
        "organization": member.calendly_organization_uri,
        "scope": "user",
        "user": member.calendly_user_uri,
    }
    listed = cal_call(
        sandbox, "GET", "/webhook_subscriptions", member.calendly_token, params=params
    )
    assert [s["uri"] for s in listed.json()["collection"]] == [mine]


@pytest.mark.parametrize(
    ("params", "status", "parameter"),
    [
        ({"scope": "user"}, 400, "organization"),
        ({"organization": "ORG"}, 400, "scope"),
        ({"organization": "ORG", "scope": "user"}, 400, "user"),
        ({"organization": "ORG", "scope": "organization", "count": 0}, 400, "count"),
        ({"organization": "ORG", "scope": "organization"}, 403, None),
    ],
)
def test_list_bad_or_forbidden_query_is_refused(
    sandbox: Sandbox, params: dict[str, Any], status: int, parameter: str | None
) -> None:
    """A member's listing without its parameters is a 400 naming one; of the org a 403."""
    member = sandbox.users[1]
    query = {k: (member.calendly_organization_uri if v == "ORG" else v) for k, v in params.items()}
    response = cal_call(
        sandbox, "GET", "/webhook_subscriptions", member.calendly_token, params=query
    )
    assert response.status_code == status
    if parameter:
        assert response.json()["details"][0]["parameter"] == parameter


def test_get_and_delete_by_uuid_then_404(sandbox: Sandbox) -> None:
    """GET answers the resource; DELETE answers 204; both then answer 404."""
    member = sandbox.users[1]
    uri = _create(sandbox, member.calendly_token, _body(member)).json()["resource"]["uri"]
    path = uri.removeprefix(sandbox.calendly_api_url)
    got = cal_call(sandbox, "GET", path, member.calendly_token)
    assert got.status_code == 200
    assert got.json()["resource"]["uri"] == uri
    assert cal_call(sandbox, "DELETE", path, member.calendly_token).status_code == 204
    assert cal_call(sandbox, "GET", path, member.calendly_token).status_code == 404
    gone = cal_call(sandbox, "DELETE", path, member.calendly_token)
    assert gone.status_code == 404
    assert gone.json()["title"] == "Resource Not Found"


def test_member_may_not_read_or_delete_anothers_subscription(sandbox: Sandbox) -> None:
    """Another member's subscription answers 403 to get and delete, and survives."""
    member, other = sandbox.users[1], sandbox.users[2]
    uri = _create(sandbox, member.calendly_token, _body(member)).json()["resource"]["uri"]
    path = uri.removeprefix(sandbox.calendly_api_url)
    assert cal_call(sandbox, "GET", path, other.calendly_token).status_code == 403
    assert cal_call(sandbox, "DELETE", path, other.calendly_token).status_code == 403
    assert cal_call(sandbox, "GET", path, sandbox.users[0].calendly_token).status_code == 200


def test_subscription_endpoints_are_faultable_and_counted(sandbox: Sandbox) -> None:
    """A fault rule on /webhook_subscriptions hits the create; requests are counted."""
    member = sandbox.users[1]
    rule = {"api": "calendly", "kind": "503", "path_prefix": "/webhook_subscriptions"}
    assert admin(sandbox, "POST", "/faults", json=rule).ok
    assert _create(sandbox, member.calendly_token, _body(member)).status_code == 503
    assert _create(sandbox, member.calendly_token, _body(member)).status_code == 201
    counts = admin(sandbox, "GET", "/requests").json()
    assert counts["calendly POST /webhook_subscriptions"] == 2


def test_subscription_endpoints_are_rate_limited(sandbox: Sandbox) -> None:
    """They spend the user's Calendly budget like every endpoint: 429 once it is spent."""
    member = sandbox.users[1]
    assert admin(sandbox, "PUT", "/config", json={"calendly_rate_limit": 1}).ok
    params = {
        "organization": member.calendly_organization_uri,
        "scope": "user",
        "user": member.calendly_user_uri,
    }
    first = cal_call(sandbox, "GET", "/webhook_subscriptions", member.calendly_token, params=params)
    second = cal_call(
        sandbox, "GET", "/webhook_subscriptions", member.calendly_token, params=params
    )
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.headers["X-RateLimit-Remaining"] == "0"


def test_admin_lists_every_subscription_and_disables_one(sandbox: Sandbox) -> None:
    """The admin listing shows all owners' subscriptions; disable makes one `disabled`."""
    owner, member = sandbox.users[0], sandbox.users[1]
    mine = _create(sandbox, member.calendly_token, _body(member)).json()["resource"]
    _create(sandbox, owner.calendly_token, _body(owner, "organization"))
    listed = admin(sandbox, "GET", "/webhooks/subscriptions").json()
    assert [s["scope"] for s in listed] == ["user", "organization"]
    assert listed[0]["key_source"] == "random"
    assert "signing_key" not in listed[0]
    uuid = mine["uri"].rsplit("/", 1)[1]
    disabled = admin(sandbox, "POST", f"/webhooks/subscriptions/{uuid}/disable").json()
    assert disabled["state"] == "disabled"
    assert disabled["retry_started_at"] is not None
    got = cal_call(sandbox, "GET", f"/webhook_subscriptions/{uuid}", member.calendly_token)
    assert got.json()["resource"]["state"] == "disabled"
    unknown = admin(sandbox, "POST", "/webhooks/subscriptions/nope/disable")
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["error"]
