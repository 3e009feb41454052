"""Fault injection: queued rules that hit matching API requests, and what each fault sends.

A rule names an API and optionally a method, a path prefix (matched against the path
without its query) and a listing page (1-based; page 1 is the one without `page_token` /
with `_skip=0`). It hits the next `count` matching requests. Faults apply to API endpoints
(the OAuth ones included) and never to `/_sandbox/` admin endpoints. The transport faults
`hang` and `reset` are carried out by server.py; everything else is an ordinary Response.
An injected 429 carries the rate-limit headers a natural one does (ratelimit.py's formats, the
configured limit, nothing remaining): Close `RateLimit` and `Retry-After`, Calendly
`X-RateLimit-*` without `Retry-After`.

Holds no lock: the World calls it under its one lock.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from closesync.sandbox.ratelimit import RateVerdict, calendly_headers, close_header, retry_after
from closesync.sandbox.routing import Response, json_response, text_response

# `omit` answers a listing as the emulator would, less one event type: a listing that contradicts
# the event type's own resource (still fetchable, active), as a Calendly glitch would. `404` is the
# vendor's own JSON 404, or with `json_body` False a proxy's HTML 404 page (no word of the API's).
KINDS = (
    "429",
    "500",
    "502",
    "503",
    "html",
    "truncated",
    "empty",
    "not_json",
    "hang",
    "reset",
    "omit",
    "400",
    "404",
    "422",
)

_HTML_404 = (
    "<html><head><title>404 Not Found</title></head>"
    "<body><center><h1>404 Not Found</h1></center><hr><center>nginx</center></body></html>"
)
_HTML_PAGE = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@dataclass
class FaultRule:
    """One queued fault; `json_body` picks the 429 body (default empty) or the 5xx body
    (default JSON; False sends plain text). `retry_after`/`reset` are seconds for 429s."""

    api: str
    kind: str
    method: str | None = None
    path_prefix: str | None = None
    count: int = 1
    page: int | None = None
    retry_after: float | None = None
    reset: float | None = None
    json_body: bool | None = None
    # Matching requests to let through before the rule starts hitting (fail the k-th write).
    skip: int = 0
    # Kind `omit`: the uuid of the event type a listing leaves out (None: its first item). An
    # answer without that item (a direct fetch, say) goes out unchanged, the hit still spent.
    omit: str | None = None

    def __post_init__(self) -> None:
        if self.api not in ("calendly", "close"):
            raise ValueError(f"api must be 'calendly' or 'close', not {self.api!r}")
        self.kind = str(self.kind)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.count < 1:
            raise ValueError("count must be at least 1")
        if self.skip < 0:
            raise ValueError("skip must not be negative")
        if self.page is not None and self.page < 1:
            raise ValueError("page is 1-based")
        if self.method is not None:
            self.method = self.method.upper()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultRule:
        """Build from admin JSON; unknown keys are an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Admin JSON."""
        return asdict(self)

    def matches(self, api: str, method: str, path: str, page: int | None) -> bool:
        """Whether this rule hits the request."""
        if api != self.api or (self.method is not None and method != self.method):
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        return self.page is None or page == self.page


class FaultBook:
    """The queue of rules; the first matching rule with hits left wins."""

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []

    def add(self, rule: FaultRule) -> None:
        """Queue a rule."""
        self.rules.append(rule)

    def clear(self) -> None:
        """Drop every rule."""
        self.rules.clear()

    def take(self, api: str, method: str, path: str, page: int | None) -> FaultRule | None:
        """The rule hitting this request, spending one of its hits."""
        for rule in self.rules:
            if rule.matches(api, method, path, page):
                if rule.skip > 0:
                    rule.skip -= 1
                    return None
                rule.count -= 1
                if rule.count == 0:
                    self.rules.remove(rule)
                return rule
        return None


def fault_response(api: str, rule: FaultRule, rate_limit: int) -> Response:
    """The answer a fault gives, in the vendor's style; `rate_limit` is the API's configured one."""
    kind = rule.kind
    if kind in ("hang", "reset"):
        return Response(0, action="hang" if kind == "hang" else "reset")
    if kind == "429":
        return _too_many(api, rule, rate_limit)
    if kind in ("500", "502", "503"):
        status = int(kind)
        if rule.json_body is False:
            return text_response(status, f"{status} Server Error")
        return json_response(status, _error_body(api, status))
    if kind == "omit":
        return Response(0, action="omit", omit=rule.omit)
    if kind in ("400", "422"):
        return json_response(int(kind), _refusal_body(api, int(kind)))
    if kind == "404":
        if rule.json_body is False:
            return text_response(404, _HTML_404, "text/html")
        if api == "close":
            return json_response(404, {"error": "Not found."})
        return json_response(
            404, {"title": "Resource Not Found", "message": "The server could not find it."}
        )
    if kind == "html":
        return text_response(502, _HTML_PAGE, "text/html")
    if kind == "truncated":
        return Response(200, b'{"collection": [{"uri": "htt', {"Content-Type": "application/json"})
    if kind == "empty":
        return Response(200, b"", {"Content-Type": "application/json"})
    return text_response(200, "OK, but not JSON")


def omit_listed(response: Response, uuid: str | None) -> Response:
    """`response` less one item of its `collection`: the one whose uri ends in `uuid`, else the
    first. Any other answer (no collection, not JSON) is returned unchanged."""
    try:
        body = json.loads(response.body)
    except ValueError:
        return response
    items = body.get("collection") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        return response
    if uuid is None:
        kept = items[1:]
    else:
        kept = [i for i in items if not str(i.get("uri", "")).endswith(f"/{uuid}")]
    return Response(
        response.status, json.dumps({**body, "collection": kept}).encode(), response.headers
    )


def random_error(api: str, status: int) -> Response:
    """The answer of a random server error (global error_rate)."""
    return json_response(status, _error_body(api, status))


def _too_many(api: str, rule: FaultRule, rate_limit: int) -> Response:
    wait = rule.reset if rule.reset is not None else rule.retry_after
    wait = 1.0 if wait is None else wait
    verdict = RateVerdict(allowed=False, limit=rate_limit, remaining=0, reset=wait)
    headers: dict[str, str]
    if api == "close":
        headers = {"RateLimit": close_header(verdict), "Retry-After": str(retry_after(wait))}
    else:
        headers = calendly_headers(verdict)
    if not rule.json_body:
        return Response(429, b"", headers)
    body = (
        {"error": "Rate limit exceeded."}
        if api == "close"
        else {"title": "Too Many Requests", "message": "You have exceeded the rate limit."}
    )
    headers["Content-Type"] = "application/json"
    return Response(429, json.dumps(body).encode(), headers)


def _refusal_body(api: str, status: int) -> dict[str, Any]:
    """A 400/422 as each vendor words one: Close's errors and field-errors, Calendly's title."""
    if api == "close":
        return {"errors": [f"The request was refused ({status})."], "field-errors": {}}
    return {"title": "Invalid Argument", "message": f"The request was refused ({status})."}


def _error_body(api: str, status: int) -> dict[str, Any]:
    if api == "close":
        return {"error": f"Internal error ({status}), please try again."}
    return {"title": "Internal Server Error", "message": f"The server answered {status}."}
