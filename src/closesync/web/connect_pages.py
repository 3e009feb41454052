"""The connect pages: GET /connect (and /), /connect/organization and the two OAuth callbacks.

/connect starts a personal flow (Close, then Calendly), /connect/organization lets a Calendly
owner or admin connect the shared organization credential; the callbacks finish each step
through `closesync.connect.connector`. Redirect URIs are built from the app's base URL
(PUBLIC_BASE_URL), which must be where this process is reached.

Both starts set a fresh random cookie (`closesync_flow`: HttpOnly, SameSite=Lax so the
providers' top-level redirects back carry it, Secure when the base URL is https) whose digest
the pending flow keeps; a callback arriving without that cookie (a flow started by someone else
and handed over: login CSRF) is refused and nothing is stored. The routes take GET only: a HEAD
(a link previewer, a prefetch) must not consume a flow's one-time `state`.

A FlowError raised here becomes its page in `app.py`, which links back to the start the path
belongs to.
"""

from __future__ import annotations

from flask import Blueprint, request
from flask import Response as FlaskResponse

from closesync.connect.oauth_flow import STATE_TTL_SECONDS, Purpose, new_binding
from closesync.connect.steps import Step
from closesync.core.connection import Side
from closesync.web.context import current, reply
from closesync.web.pages import page, redirect

# The cookie binding a flow to the browser that started it.
FLOW_COOKIE = "closesync_flow"
# The cookie outlives the flow's `state` (its TTL), so a slow consent screen keeps it.
FLOW_COOKIE_MAX_AGE = 2 * STATE_TTL_SECONDS

blueprint = Blueprint("connect", __name__)

_DONE_TITLES = {
    "connected": "Connected",
    "waiting": "Almost there",
    "organization": "Organization connected",
}


@blueprint.get("/")
@blueprint.get("/connect")
def start_personal() -> FlaskResponse:
    """Start a personal flow: redirect to Close's authorize page, with a fresh flow cookie."""
    return _start("personal")


@blueprint.get("/connect/organization")
def start_organization() -> FlaskResponse:
    """Start an organization flow (Close first, to learn the admin's Close organization)."""
    return _start("organization")


@blueprint.get("/oauth/close/callback")
def close_callback() -> FlaskResponse:
    """Finish the Close step of a flow."""
    return _finish("close")


@blueprint.get("/oauth/calendly/callback")
def calendly_callback() -> FlaskResponse:
    """Finish the Calendly step of a flow."""
    return _finish("calendly")


def _start(purpose: Purpose) -> FlaskResponse:
    fresh = new_binding()
    answer = reply(redirect(current().connector.start(purpose, fresh)))
    _set_flow_cookie(answer, fresh, FLOW_COOKIE_MAX_AGE)
    return answer


def _finish(provider: Side) -> FlaskResponse:
    params = request.args.to_dict()  # the first value of each name
    binding = request.cookies.get(FLOW_COOKIE) or None
    step: Step = current().connector.callback(provider, params, binding)
    if step.next_url is not None:
        return reply(redirect(step.next_url))
    answer = reply(page(200, _DONE_TITLES[step.outcome], step.message))
    _set_flow_cookie(answer, "", 0)  # the flow is over
    return answer


def _set_flow_cookie(answer: FlaskResponse, value: str, max_age: int) -> None:
    answer.set_cookie(
        FLOW_COOKIE,
        value,
        max_age=max_age,
        path="/",
        secure=current().secure_cookie,
        httponly=True,
        samesite="Lax",
    )
