"""The /_sandbox/ admin API on both ports: users, event types, links, counts, tokens, clock."""

from __future__ import annotations

import pytest
import requests

from closesync.sandbox import Sandbox
from tests.sandbox.conftest import admin, cal_get, close_call


def test_admin_users_lists_seeded_users_with_tokens_on_both_ports(sandbox: Sandbox) -> None:
    """GET /_sandbox/users answers the same users on the Calendly and the Close port."""
    on_close = admin(sandbox, "GET", "/users").json()
    on_calendly = requests.get(sandbox.calendly_api_url + "/_sandbox/users", timeout=5).json()
    assert on_close == on_calendly
    assert [u["email"] for u in on_close] == [f"user{i}@example.com" for i in range(3)]
    assert on_close[0]["calendly_token"].startswith("cal_pat_")


def test_admin_create_user_pair_is_usable_on_both_sides(sandbox: Sandbox) -> None:
    """A user created through admin authenticates on both APIs with the same email."""
    created = admin(sandbox, "POST", "/calendly/users", json={}).json()
    assert created["email"] == "user3@example.com"
    me = requests.get(
        sandbox.calendly_api_url + "/users/me",
        headers={"Authorization": f"Bearer {created['calendly_token']}"},
        timeout=5,
    ).json()["resource"]
    close_me = close_call(sandbox, "GET", "/me/", created["close_access_token"]).json()
    assert me["email"] == close_me["email"] == "user3@example.com"


def test_admin_event_type_create_patch_delete_moves_updated_at(sandbox: Sandbox) -> None:
    """Create, rename, deactivate and soft-delete an event type through admin."""
    user = sandbox.users[0]
    created = admin(
        sandbox,
        "POST",
        "/calendly/event_types",
        json={"user_uuid": user.calendly_user_uuid, "name": "New One", "duration": 20},
    ).json()
    uuid = created["uri"].rsplit("/", 1)[1]
    patched = admin(
        sandbox, "PATCH", f"/calendly/event_types/{uuid}", json={"name": "Renamed", "active": False}
    ).json()
    deleted = admin(sandbox, "DELETE", f"/calendly/event_types/{uuid}").json()
    assert (patched["name"], patched["active"]) == ("Renamed", False)
    assert patched["updated_at"] > created["updated_at"]
    assert deleted["deleted_at"] is not None
    purged = admin(sandbox, "DELETE", f"/calendly/event_types/{uuid}", params={"purge": "true"})
    assert purged.json() == {"purged": True}
    assert cal_get(sandbox, f"/event_types/{uuid}", user).status_code == 404


def test_admin_members_add_and_remove_change_listings(sandbox: Sandbox) -> None:
    """Joining and leaving a team type adds it to and removes it from a user's listing."""
    owner, joiner = sandbox.users[0], sandbox.users[2]
    team = admin(
        sandbox,
        "POST",
        "/calendly/event_types",
        json={"user_uuid": owner.calendly_user_uuid, "name": "Squad", "pooling_type": "collective"},
    ).json()
    uuid = team["uri"].rsplit("/", 1)[1]

    def listed() -> bool:
        uris = [e["uri"] for e in sandbox.world.list_event_types(joiner.calendly_user_uuid, None)]
        return team["uri"] in uris

    admin(
        sandbox,
        "POST",
        f"/calendly/event_types/{uuid}/members",
        json={"add": [joiner.calendly_user_uuid]},
    )
    joined = listed()
    admin(
        sandbox,
        "POST",
        f"/calendly/event_types/{uuid}/members",
        json={"remove": [joiner.calendly_user_uuid]},
    )
    assert (joined, listed()) == (True, False)


def test_admin_links_create_patch_delete_simulate_drift(sandbox: Sandbox) -> None:
    """Admin creates a CALENDLY-source link, edits it and deletes it."""
    user_id = sandbox.users[0].close_user_id
    link = admin(
        sandbox,
        "POST",
        "/close/links",
        json={"user_id": user_id, "source": "CALENDLY", "name": "Native", "url": "https://n.test"},
    ).json()
    edited = admin(sandbox, "PATCH", f"/close/links/{link['id']}", json={"name": "Edited"}).json()
    listed = admin(sandbox, "GET", "/close/links", params={"user_id": user_id}).json()
    removed = admin(sandbox, "DELETE", f"/close/links/{link['id']}")
    assert edited["name"] == "Edited"
    assert [entry["source"] for entry in listed] == ["CALENDLY"]
    assert removed.status_code == 200
    assert admin(sandbox, "DELETE", f"/close/links/{link['id']}").status_code == 404


def test_admin_requests_counts_per_template_and_resets(sandbox: Sandbox) -> None:
    """Requests are counted per "api METHOD template"; admin calls are not counted."""
    cal_get(sandbox, "/event_types/some-uuid", sandbox.users[0])
    close_call(
        sandbox, "DELETE", "/scheduling_link/integration/abc/", sandbox.users[0].close_access_token
    )
    counts = admin(sandbox, "GET", "/requests").json()
    assert counts == {
        "calendly GET /event_types/{uuid}": 1,
        "close DELETE /api/v1/scheduling_link/integration/{source_id}/": 1,
    }
    admin(sandbox, "POST", "/requests/reset")
    assert admin(sandbox, "GET", "/requests").json() == {}


def test_admin_faults_add_list_clear(sandbox: Sandbox) -> None:
    """Faults are added, listed and cleared over HTTP; a bad rule answers 400."""
    added = admin(sandbox, "POST", "/faults", json={"api": "close", "kind": "502", "count": 2})
    bad = admin(sandbox, "POST", "/faults", json={"api": "close", "kind": "nope"})
    listed = admin(sandbox, "GET", "/faults").json()
    admin(sandbox, "DELETE", "/faults")
    assert added.json()["count"] == 2
    assert bad.status_code == 400
    assert len(listed) == 1
    assert admin(sandbox, "GET", "/faults").json() == []


def test_admin_tokens_expire_and_revoke(sandbox: Sandbox) -> None:
    """An expired access token answers 401; a revoked refresh token no longer refreshes."""
    user = sandbox.users[0]
    admin(sandbox, "POST", "/tokens/expire", json={"token": user.close_access_token})
    admin(sandbox, "POST", "/tokens/revoke", json={"token": user.close_refresh_token})
    refresh = requests.post(
        sandbox.close_oauth_url + "/token/",
        data={
            "client_id": "oa2client_sandbox",
            "client_secret": "sandbox-close-secret",
            "grant_type": "refresh_token",
            "refresh_token": user.close_refresh_token,
        },
        timeout=5,
    )
    assert close_call(sandbox, "GET", "/me/", user.close_access_token).status_code == 401
    assert refresh.json()["error"] == "invalid_grant"


def test_admin_clock_advance_moves_time(sandbox: Sandbox) -> None:
    """The clock advances by exactly the seconds asked for."""
    before = admin(sandbox, "GET", "/clock").json()["now"]
    after = admin(sandbox, "POST", "/clock/advance", json={"seconds": 90}).json()["now"]
    assert after - before == 90


def test_admin_config_put_sets_error_rate_for_one_api(sandbox: Sandbox) -> None:
    """PUT /_sandbox/config with api narrows error_rate to that API."""
    admin(sandbox, "PUT", "/config", json={"api": "close", "error_rate": 1})
    close_status = close_call(
        sandbox, "GET", "/me/", sandbox.users[0].close_access_token
    ).status_code
    calendly_status = cal_get(sandbox, "/users/me", sandbox.users[0]).status_code
    assert close_status in (500, 502, 503)
    assert calendly_status == 200


def test_admin_unknown_endpoint_answers_404_json(sandbox: Sandbox) -> None:
    """An unknown admin path is a JSON 404, not a fault or an API route."""
    response = admin(sandbox, "GET", "/nope")
    assert response.status_code == 404
    assert "error" in response.json()


@pytest.mark.parametrize(("sent", "stored"), [(False, False), ("false", False), ("True", True)])
def test_admin_config_booleans_parse_strictly(sandbox: Sandbox, sent: object, stored: bool) -> None:
    """A boolean field takes JSON true/false or the strings true/false; "false" is False."""
    answer = admin(sandbox, "PUT", "/config", json={"webhook_serial_per_subscription": sent})
    assert answer.status_code == 200, answer.text
    assert answer.json()["webhook_serial_per_subscription"] is stored
    assert sandbox.world.config.webhook_serial_per_subscription is stored


@pytest.mark.parametrize("sent", ["no", 0, 1, "", None])
def test_admin_config_bad_boolean_answers_400_and_changes_nothing(
    sandbox: Sandbox, sent: object
) -> None:
    """Anything but true/false for a boolean is a 400 naming the field; nothing in the same
    request is applied."""
    body = {"webhook_delay_seconds": 2.0, "webhook_serial_per_subscription": sent}
    answer = admin(sandbox, "PUT", "/config", json=body)
    assert answer.status_code == 400
    assert "webhook_serial_per_subscription" in answer.json()["error"]
    assert sandbox.world.config.webhook_serial_per_subscription is True
    assert sandbox.world.config.webhook_delay_seconds == 0.0
