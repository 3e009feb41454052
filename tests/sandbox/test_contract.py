"""Contract: the Calendly emulator's answers validate against Calendly's 2023 OpenAPI spec.

The spec sits beside the clone (`../shared/specs/`); OpenAPI 3.0 schemas are turned into JSON
Schema by inlining `$ref`s and translating `nullable: true` into a `null` type. Fields newer
than the spec pass because the spec's objects allow additional properties.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import requests

from closesync.core.webhooks import EVENT_TYPE_EVENTS
from closesync.sandbox import Sandbox
from tests.sandbox.conftest import cal_get

SPEC = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "specs" / "calendly-openapi-2023.yaml"
)

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The parsed spec; a skip saying where it was looked for (a failure on CI, where it exists)."""
    if not SPEC.is_file():
        message = f"Calendly OpenAPI spec not found at {SPEC.resolve()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    loaded: dict[str, Any] = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    return loaded


def to_json_schema(node: Any, spec: dict[str, Any], depth: int = 0) -> Any:
    """Inline $refs and translate OpenAPI `nullable` into JSON Schema."""
    if depth > 30:
        raise RecursionError("schema nests too deep")
    if isinstance(node, list):
        return [to_json_schema(item, spec, depth + 1) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target: Any = spec
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return to_json_schema(target, spec, depth + 1)
    out = {
        key: to_json_schema(value, spec, depth + 1)
        for key, value in node.items()
        if key not in ("nullable", "example", "examples") and not key.startswith("x-")
    }
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def response_schema(spec: dict[str, Any], path: str) -> Any:
    """The 200 JSON schema of GET `path`."""
    raw = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    return to_json_schema(raw, spec)


def check(spec: dict[str, Any], path: str, response: requests.Response) -> None:
    """Assert a 200 whose body validates against the spec's schema for `path`."""
    assert response.status_code == 200, response.text
    jsonschema.validate(response.json(), response_schema(spec, path))


def test_contract_users_me_matches_spec(sandbox: Sandbox, spec: dict[str, Any]) -> None:
    """GET /users/me validates against the spec."""
    check(spec, "/users/me", cal_get(sandbox, "/users/me", sandbox.users[0]))


def test_contract_event_types_list_matches_spec(sandbox: Sandbox, spec: dict[str, Any]) -> None:
    """Every seeded user's event-type listing (every kind of type) validates."""
    for user in sandbox.users:
        response = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri, count=2)
        check(spec, "/event_types", response)
        next_page = response.json()["pagination"]["next_page"]
        headers = {"Authorization": f"Bearer {user.calendly_token}"}
        check(spec, "/event_types", requests.get(next_page, headers=headers, timeout=5))


def test_contract_event_type_including_deleted_matches_spec(
    sandbox: Sandbox, spec: dict[str, Any]
) -> None:
    """GET /event_types/{uuid} validates for every type, a soft-deleted one included."""
    user = sandbox.users[0]
    uris = [
        e["uri"]
        for u in sandbox.users
        for e in sandbox.world.list_event_types(u.calendly_user_uuid, None)
    ]
    sandbox.world.delete_event_type(uris[0].rsplit("/", 1)[1])
    for uri in uris:
        response = cal_get(sandbox, f"/event_types/{uri.rsplit('/', 1)[1]}", user)
        check(spec, "/event_types/{uuid}", response)


def test_contract_organization_memberships_matches_spec(
    sandbox: Sandbox, spec: dict[str, Any]
) -> None:
    """GET /organization_memberships validates."""
    owner = sandbox.users[0]
    response = cal_get(
        sandbox, "/organization_memberships", owner, organization=owner.calendly_organization_uri
    )
    check(spec, "/organization_memberships", response)


def test_contract_error_body_matches_spec_error_response(
    sandbox: Sandbox, spec: dict[str, Any]
) -> None:
    """A 400 answer validates against the spec's ErrorResponse."""
    owner = sandbox.users[0]
    response = cal_get(sandbox, "/event_types", owner, user=owner.calendly_user_uri, count=0)
    schema = to_json_schema(spec["components"]["schemas"]["ErrorResponse"], spec)
    assert response.status_code == 400
    jsonschema.validate(response.json(), schema)


def test_contract_schema_rejects_a_wrong_field_type(sandbox: Sandbox, spec: dict[str, Any]) -> None:
    """The translated schema is not vacuous: a corrupted event type fails validation."""
    user = sandbox.users[0]
    body = cal_get(sandbox, "/event_types", user, user=user.calendly_user_uri).json()
    body["collection"][0]["kind"] = "triple"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, response_schema(spec, "/event_types"))


def _with_event_type_events(schema: Any) -> Any:
    """The 2023 document's events enum lacks the (2026) event_type.* events: add them."""
    if isinstance(schema, dict):
        if schema.get("type") == "array" and "enum" in schema.get("items", {}):
            schema["items"]["enum"] = [*schema["items"]["enum"], *EVENT_TYPE_EVENTS]
        for value in schema.values():
            _with_event_type_events(value)
    elif isinstance(schema, list):
        for value in schema:
            _with_event_type_events(value)
    return schema


def test_contract_webhook_subscriptions_match_spec(sandbox: Sandbox, spec: dict[str, Any]) -> None:
    """POST, GET one and the listing of /webhook_subscriptions validate, both scopes."""
    owner, member = sandbox.users[0], sandbox.users[1]
    made = []
    for user, scope in ((member, "user"), (owner, "organization")):
        body = {
            "url": f"https://hooks.example.com/{scope}",
            "events": list(EVENT_TYPE_EVENTS),
            "organization": user.calendly_organization_uri,
            "scope": scope,
            "user": user.calendly_user_uri,
        }
        created = requests.post(
            sandbox.calendly_api_url + "/webhook_subscriptions",
            json=body,
            headers={"Authorization": f"Bearer {user.calendly_token}"},
            timeout=5,
        )
        assert created.status_code == 201, created.text
        post_schema = spec["paths"]["/webhook_subscriptions"]["post"]["responses"]["201"]
        raw = post_schema["content"]["application/json"]["schema"]
        jsonschema.validate(created.json(), _with_event_type_events(to_json_schema(raw, spec)))
        made.append(created.json()["resource"]["uri"])
    for uri in made:
        response = cal_get(sandbox, uri.removeprefix(sandbox.calendly_api_url), owner)
        schema = _with_event_type_events(
            response_schema(spec, "/webhook_subscriptions/{webhook_uuid}")
        )
        assert response.status_code == 200
        jsonschema.validate(response.json(), schema)
    listing = cal_get(
        sandbox,
        "/webhook_subscriptions",
        owner,
        organization=owner.calendly_organization_uri,
        scope="organization",
    )
    assert listing.status_code == 200
    jsonschema.validate(
        listing.json(), _with_event_type_events(response_schema(spec, "/webhook_subscriptions"))
    )
    assert len(listing.json()["collection"]) == 1


def test_contract_webhook_errors_match_spec(sandbox: Sandbox, spec: dict[str, Any]) -> None:
    """A member's organization-scope request (403) and a duplicate URL (409) validate."""
    member = sandbox.users[1]
    body = {
        "url": "https://hooks.example.com/dup",
        "events": ["event_type.updated"],
        "organization": member.calendly_organization_uri,
        "scope": "user",
        "user": member.calendly_user_uri,
    }
    headers = {"Authorization": f"Bearer {member.calendly_token}"}
    url = sandbox.calendly_api_url + "/webhook_subscriptions"
    responses = spec["paths"]["/webhook_subscriptions"]["post"]["responses"]
    assert requests.post(url, json=body, headers=headers, timeout=5).status_code == 201
    duplicate = requests.post(url, json=body, headers=headers, timeout=5)
    refused = requests.post(url, json={**body, "scope": "organization"}, headers=headers, timeout=5)
    for answer, status in ((duplicate, "409"), (refused, "403")):
        assert answer.status_code == int(status)
        raw = responses[status]["content"]["application/json"]["schema"]
        jsonschema.validate(answer.json(), to_json_schema(raw, spec))
    assert duplicate.json() == {
        "title": "Already Exists",
        "message": "Hook with this url already exists",
    }
