"""The `/_sandbox/` admin API, served on both ports: the World's methods over JSON HTTP.

Lets a demo, an e2e test or a person with curl change the world (add users and event types,
edit or delete Close links to simulate drift), inject faults, expire tokens, move the clock,
steer the next OAuth approval and read request counts (and how many of the answers were 429s
of the emulated rate limits, injected faults apart). For webhooks: list every subscription
whatever its owner (`GET /webhooks/subscriptions`, with where its signing key comes from and its
current run of failures, never the key) and disable one (`POST
/webhooks/subscriptions/{uuid}/disable`) as 24 h of failed deliveries would, to test
reconciliation; the OAuth application's signing key is config `calendly_webhook_signing_key`.
Deliveries (deliveries.py): `GET /webhooks/deliveries` lists every attempt (DELETE forgets
them), `GET /webhooks/idle[?wait=S]` says (after waiting up to S s for it) whether nothing is
queued, held or in flight, `GET`/`PUT /webhooks/knobs` read and set drop_next, drop_rate,
duplicate_next, delay_seconds, reorder_batch and wrong_signature_next. PUT /config and PUT
/webhooks/knobs are all or nothing: one bad field is a 400 naming it and changes nothing.
Admin requests are never counted, delayed, rate limited or faulted. Errors answer
{"error": …}: 400 for bad input, 404 for an unknown id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from closesync.sandbox.deliveries import check_knobs
from closesync.sandbox.routing import Handler, Request, Response, Router, json_response
from closesync.sandbox.world import World

_P = "/_sandbox"
# Seconds GET /webhooks/idle?wait= may hold an admin request waiting for the queue to drain.
_MAX_IDLE_WAIT = 30.0


def handle_admin(router: Router, request: Request) -> Response:
    """Route an admin request and turn World errors into JSON answers."""
    match = router.match(request.method, request.path)
    if match is None:
        return json_response(404, {"error": f"no admin endpoint {request.path}"})
    if match.handler is None:
        return json_response(405, {"error": f"{request.method} not allowed on {request.path}"})
    request.params = match.params
    try:
        return match.handler(request)
    except KeyError as exc:
        return json_response(404, {"error": str(exc.args[0]) if exc.args else "not found"})
    except (ValueError, TypeError) as exc:
        return json_response(400, {"error": str(exc)})


def _body(request: Request) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def _number(value: Any, name: str) -> float:
    """`value` as a float; ValueError naming `name` when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number") from None


def _ok(payload: Any = None) -> Response:
    return json_response(200, {"ok": True} if payload is None else payload)


def build_admin_router(world: World) -> Router:
    """Every admin route, bound to `world`."""
    router = Router()

    def add(method: str, path: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            router.add(method, _P + path, handler)
            return handler

        return register

    @add("GET", "/users")
    def users(request: Request) -> Response:
        return _ok([asdict(u) for u in world.users()])

    @add("POST", "/calendly/users")
    def create_user(request: Request) -> Response:
        body = _body(request)
        return _ok(asdict(world.create_user(body.get("email"), body.get("name"))))

    @add("POST", "/calendly/event_types")
    def create_type(request: Request) -> Response:
        body = _body(request)
        user = body.pop("user_uuid", None)
        if not user:
            raise ValueError("user_uuid is required")
        return _ok(world.create_event_type(user, **body))

    @add("PATCH", "/calendly/event_types/{uuid}")
    def update_type(request: Request) -> Response:
        return _ok(world.update_event_type(request.params["uuid"], **_body(request)))

    @add("DELETE", "/calendly/event_types/{uuid}")
    def delete_type(request: Request) -> Response:
        purge = (request.arg("purge") or "").lower() in ("1", "true", "yes")
        resource = world.delete_event_type(request.params["uuid"], purge=purge)
        return _ok({"purged": True} if resource is None else resource)

    @add("POST", "/calendly/event_types/{uuid}/members")
    def members(request: Request) -> Response:
        body = _body(request)
        changed = world.change_members(
            request.params["uuid"], list(body.get("add", [])), list(body.get("remove", []))
        )
        return _ok(changed)

    @add("GET", "/close/links")
    def links(request: Request) -> Response:
        return _ok(world.close_links(request.arg("user_id")))

    @add("POST", "/close/links")
    def create_link(request: Request) -> Response:
        body = _body(request)
        user = body.pop("user_id", None)
        if not user:
            raise ValueError("user_id is required")
        return _ok(world.create_link(user, body.pop("source", "MANUAL"), **body))

    @add("PATCH", "/close/links/{id}")
    def update_link(request: Request) -> Response:
        return _ok(world.update_link(request.params["id"], **_body(request)))

    @add("DELETE", "/close/links/{id}")
    def delete_link(request: Request) -> Response:
        if not world.delete_link(request.params["id"]):
            raise KeyError(f"no link {request.params['id']}")
        return _ok()

    @add("GET", "/requests")
    def counts(request: Request) -> Response:
        return _ok(world.request_counts())

    @add("GET", "/requests/rate_limited")
    def rate_limited(request: Request) -> Response:
        return _ok(world.rate_limited_counts())

    @add("POST", "/requests/reset")
    def reset_counts(request: Request) -> Response:
        world.reset_request_counts()
        return _ok()

    @add("GET", "/faults")
    def faults(request: Request) -> Response:
        return _ok(world.list_faults())

    @add("POST", "/faults")
    def add_fault(request: Request) -> Response:
        return _ok(world.add_fault(**_body(request)).to_dict())

    @add("DELETE", "/faults")
    def clear_faults(request: Request) -> Response:
        world.clear_faults()
        return _ok()

    @add("POST", "/tokens/expire")
    def expire(request: Request) -> Response:
        body = _body(request)
        hits = world.expire_token(body.get("token"), all=bool(body.get("all")))
        if hits == 0 and not body.get("all"):
            raise KeyError("no such access token")
        return _ok({"expired": hits})

    @add("POST", "/tokens/revoke")
    def revoke(request: Request) -> Response:
        if not world.revoke_token(str(_body(request).get("token", ""))):
            raise KeyError("no such token")
        return _ok()

    @add("GET", "/clock")
    def clock(request: Request) -> Response:
        return _ok({"now": world.now()})

    @add("POST", "/clock/advance")
    def advance(request: Request) -> Response:
        return _ok({"now": world.advance_clock(float(_body(request).get("seconds", 0)))})

    @add("POST", "/oauth/next")
    def oauth_next(request: Request) -> Response:
        body = _body(request)
        world.set_oauth_next(
            str(body.get("api")),
            body.get("user_email"),
            bool(body.get("deny")),
            body.get("organization_id"),
        )
        return _ok()

    @add("GET", "/webhooks/subscriptions")
    def subscriptions(request: Request) -> Response:
        return _ok(world.subscription_details())

    @add("POST", "/webhooks/subscriptions/{uuid}/disable")
    def disable_subscription(request: Request) -> Response:
        return _ok(world.disable_subscription(request.params["uuid"]))

    @add("GET", "/webhooks/deliveries")
    def deliveries(request: Request) -> Response:
        return _ok(world.deliverer.attempts())

    @add("DELETE", "/webhooks/deliveries")
    def clear_deliveries(request: Request) -> Response:
        world.deliverer.clear_attempts()
        return _ok()

    @add("GET", "/webhooks/idle")
    def idle(request: Request) -> Response:
        wait = float(request.arg("wait") or 0)
        if not 0 <= wait <= _MAX_IDLE_WAIT:
            raise ValueError(f"wait must be between 0 and {_MAX_IDLE_WAIT} seconds")
        if wait > 0:
            world.deliverer.wait_idle(wait)
        return _ok(world.deliverer.idle())

    def knobs() -> dict[str, Any]:
        config = world.update_config()
        return {
            **asdict(world.deliverer.knobs),
            "delay_seconds": config["webhook_delay_seconds"],
            "drop_rate": config["webhook_drop_rate"],
        }

    @add("GET", "/webhooks/knobs")
    def get_knobs(request: Request) -> Response:
        return _ok(knobs())

    @add("PUT", "/webhooks/knobs")
    def put_knobs(request: Request) -> Response:
        body = _body(request)
        # Every knob is checked before any is applied, so a 400 leaves nothing changed.
        config: dict[str, float] = {}
        if "delay_seconds" in body:
            delay = _number(body.pop("delay_seconds"), "delay_seconds")
            if delay < 0:
                raise ValueError("delay_seconds must be >= 0")
            config["webhook_delay_seconds"] = delay
        if "drop_rate" in body:
            rate = _number(body.pop("drop_rate"), "drop_rate")
            if not 0 <= rate <= 1:
                raise ValueError("drop_rate must be between 0 and 1")
            config["webhook_drop_rate"] = rate
        check_knobs(body)
        if config:
            world.update_config(None, **config)
        world.deliverer.set_knobs(**body)
        return _ok(knobs())

    @add("GET", "/config")
    def get_config(request: Request) -> Response:
        return _ok(world.update_config())

    @add("PUT", "/config")
    def put_config(request: Request) -> Response:
        body = _body(request)
        return _ok(world.update_config(body.pop("api", None), **body))

    return router
