"""The pages users see: small self-contained HTML answers, and what each flow error shows.

Kept free of Flask so that `closesync connect` (a stdlib loopback server) shows the same pages
without importing the web stack, and `closesync --help` stays fast. A page never echoes a query
parameter: a code or `state` could end up in a screenshot, and an `error` is named only when it
is one of RFC 6749's codes (`closesync.connect.steps`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from closesync.connect.steps import FlowErrorKind

# HTTP status and page title of each way a connect flow can fail.
FLOW_STATUS: dict[FlowErrorKind, int] = {
    "denied": 403,
    "state": 400,
    "browser": 403,
    "code": 400,
    "provider": 502,
    "not_admin": 403,
    "not_allowed": 403,
    "taken": 409,
}
FLOW_TITLE: dict[FlowErrorKind, str] = {
    "denied": "Access declined",
    "state": "This link is no longer valid",
    "browser": "This link was started in another browser",
    "code": "The authorization expired",
    "provider": "The provider did not answer as expected",
    "not_admin": "An owner or admin is needed",
    "not_allowed": "This organization cannot be connected here",
    "taken": "This Calendly user is already connected",
}


@dataclass
class Response:
    """An answer before it meets a server: status, body and headers."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def page(status: int, title: str, message: str, link: tuple[str, str] | None = None) -> Response:
    """A small self-contained HTML page."""
    extra = f'<p><a href="{html.escape(link[0])}">{html.escape(link[1])}</a></p>' if link else ""
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)} - closesync</title></head>"
        "<body style='font-family:sans-serif;max-width:40em;margin:3em auto'>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>{extra}</body></html>"
    )
    return Response(
        status,
        body.encode(),
        {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"},
    )


def redirect(url: str) -> Response:
    """A 302 to `url`, never cached (it carries a fresh `state`)."""
    return Response(302, b"", {"Location": url, "Cache-Control": "no-store"})
