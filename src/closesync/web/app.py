"""The web app users connect through: `create_app(services, base_url)` builds it, as a Flask app.

Flask because it is mature, plain WSGI (so gunicorn serves it, `web/production.py`) and small:
routing, cookies, a body cap and error handlers are all this process needs. Falcon would do as
well for an API but brings no more here; Starlette and FastAPI are ASGI, which buys nothing for
a handful of redirects and a webhook that only records and enqueues.

Routes live in blueprints, one module each, registered in `create_app`:
`connect_pages` (/, /connect, /connect/organization, the OAuth callbacks), `health` (/healthz)
and `webhook_route` (`POST /webhooks/calendly/<key>`, the only POST route: Calendly's
deliveries, handed to the framework-free `web/webhooks.WebhookReceiver`). A new route is one
function in a blueprint module of its own, added to `_BLUEPRINTS`; `metrics` serves
Prometheus's `GET /metrics`. Such a route gets from here, without a line of its own:

- exact methods: a route answers only the methods it names (werkzeug would add HEAD to every
  GET route; a HEAD must not consume a flow), anything else gets 405 with `Allow`;
- a body cap, WEB_MAX_BODY_BYTES (Flask's MAX_CONTENT_LENGTH): a declared length above it gets
  413 before routing, a chunked body when the route reads it with `request.get_data()`
  (`CappedRequest`; read the body that way, not from `request.stream`);
- never a 410: Calendly deletes a subscription at once on 410 Gone, so an answer of 410 (a bug)
  is logged and becomes a 500, which Calendly retries;
- errors as pages: FlowError with its status (`pages.FLOW_STATUS`), ConfigError and any other
  CloseSyncError 503, an unexpected exception 500 without a traceback (it may hold a code);
- one access-log line per request, `web METHOD /path STATUS`: the path alone, never the query
  string (it carries codes and `state`), and a webhook callback key shown as its digest.

Pages never echo a query parameter (`pages`).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Request, request
from flask import Response as FlaskResponse
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.routing import Rule

from closesync.connect.steps import FlowError
from closesync.core.errors import CloseSyncError, ConfigError
from closesync.core.webhooks import CALLBACK_PATH
from closesync.web import connect_pages, health, metrics, webhook_route
from closesync.web.context import WebContext, reply
from closesync.web.pages import FLOW_STATUS, FLOW_TITLE, page
from closesync.web.webhooks import SyncAsker, key_digest
from closesync.wiring.services import Services

log = logging.getLogger(__name__)

_BLUEPRINTS = (
    health.blueprint,
    connect_pages.blueprint,
    webhook_route.blueprint,
    metrics.blueprint,
)


class CappedRequest(Request):
    """A request whose body past MAX_CONTENT_LENGTH is refused with 413, a chunked one too.

    werkzeug refuses a declared Content-Length over the cap but cuts a chunked body at the cap
    without a word: a receiver would then see a truncated body fail its signature check, and
    answer 400 where 413 is the truth. `get_data` looks one byte past the cap to tell them apart.
    """

    def get_data(  # type: ignore[override]  # one signature for werkzeug's overloads
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> bytes | str:
        data = super().get_data(cache=cache, as_text=False, parse_form_data=parse_form_data)
        cap = self.max_content_length
        chunked = self.content_length is None
        if chunked and cap is not None and len(data) >= cap and self.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
        return data.decode("utf-8", "replace") if as_text else data


class ExactMethodsRule(Rule):
    """A URL rule that serves exactly the methods its route names (no implicit HEAD)."""

    def __init__(self, string: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(string, *args, **kwargs)
        declared = kwargs.get("methods")
        if declared is not None:
            self.methods = {method.upper() for method in declared}


def create_app(
    services: Services, base_url: str | None = None, ask: SyncAsker | None = None
) -> Flask:
    """The web app on `services`; redirect URIs are built from `base_url` (or PUBLIC_BASE_URL).

    `ask` is how webhook deliveries ask for syncs (`closesync.worker.webhook_asks.webhook_asker`,
    given by the CLI: the web layer sits beside the worker); without it deliveries get 503.
    """
    settings = services.settings
    app = Flask(__name__)
    app.request_class = CappedRequest
    app.url_rule_class = ExactMethodsRule
    app.url_map.strict_slashes = False  # /connect/ is /connect, as it always was
    app.config.update(
        MAX_CONTENT_LENGTH=settings.web_max_body_bytes,
        # OPTIONS is not served either: nothing here is called cross-origin.
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    WebContext.build(services, base_url or settings.public_base_url, ask).install(app)
    for blueprint in _BLUEPRINTS:
        app.register_blueprint(blueprint)
    app.before_request(_refuse_oversize_body)
    app.after_request(_never_gone)
    app.after_request(_access_log)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(FlowError, _flow_error)
    app.register_error_handler(ConfigError, _config_error)
    app.register_error_handler(CloseSyncError, _closesync_error)
    app.register_error_handler(Exception, _crash)
    return app


def _refuse_oversize_body() -> None:
    # Before routing answers 404 or 405: a declared length over the cap is refused unread.
    limit = request.max_content_length
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge()


def _never_gone(response: FlaskResponse) -> FlaskResponse:
    if response.status_code != 410:
        return response
    log.error("web %s %s answered 410; sent 500 instead", request.method, shown_path())
    return reply(page(500, "Something went wrong", "Please try again in a moment."))


def shown_path() -> str:
    """The request's path as logs may show it: no query string (that is where the codes and
    `state` are), and a webhook callback key replaced by its digest (it is half of what a
    delivery proves)."""
    path = request.path
    if path.startswith(CALLBACK_PATH):
        return f"{CALLBACK_PATH}<{key_digest(path[len(CALLBACK_PATH) :])}>"
    return path


def _access_log(response: FlaskResponse) -> FlaskResponse:
    log.info("web %s %s %s", request.method, shown_path(), response.status_code)
    return response


def _http_error(error: HTTPException) -> FlaskResponse:
    status = error.code or 500
    if isinstance(error, MethodNotAllowed):
        allowed = ", ".join(sorted(error.valid_methods or ()))
        answer = reply(page(405, "Method not allowed", f"Only {allowed} is served here."))
        answer.headers["Allow"] = allowed
        return answer
    if status == 404:
        return reply(page(404, "Not found", "There is nothing here; start at /connect."))
    if isinstance(error, RequestEntityTooLarge):
        limit = request.max_content_length
        return reply(page(413, "Request too large", f"Bodies over {limit} bytes are refused."))
    return reply(page(status, error.name, error.description or error.name))


def _flow_error(error: FlowError) -> FlaskResponse:
    again = "/connect/organization" if "organization" in request.path else "/connect"
    return reply(
        page(FLOW_STATUS[error.kind], FLOW_TITLE[error.kind], str(error), (again, "Start again"))
    )


def _config_error(error: ConfigError) -> FlaskResponse:
    return reply(page(503, "closesync is not configured", str(error)))


def _closesync_error(error: CloseSyncError) -> FlaskResponse:
    log.warning("web request failed: %s", error)
    return reply(page(503, "Temporarily unavailable", "Please try again in a moment."))


def _crash(error: Exception) -> FlaskResponse:
    # A bug must not show a traceback (it may hold a code) to the user; the log has it.
    log.exception("web request crashed")
    return reply(page(500, "Something went wrong", "Please start again at /connect."))
