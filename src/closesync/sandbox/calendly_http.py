"""Calendly's answer shapes that every Calendly endpoint module shares: error bodies and paged
collections.

Kept apart from calendly_api.py so that the event-type and the webhook-subscription endpoints
answer errors and pages exactly alike without importing each other. Pure: no World, no lock.
"""

from __future__ import annotations

from typing import Any

from closesync.sandbox.paging import CALENDLY_DEFAULT_COUNT, decode_token, encode_token, page_url
from closesync.sandbox.routing import Request, Response, json_response


def calendly_error(
    status: int,
    title: str,
    message: str,
    details: list[dict[str, str]] | None = None,
    **extra: Any,
) -> Response:
    """Calendly's error body: {title, message, details: [{parameter, message}]}, plus `extra`."""
    body: dict[str, Any] = {"title": title, "message": message}
    if details:
        body["details"] = details
    body.update(extra)
    return json_response(status, body)


def invalid(parameter: str, message: str) -> Response:
    """A 400 naming the parameter at fault."""
    detail = [{"parameter": parameter, "message": message}]
    return calendly_error(400, "Invalid Argument", "The supplied parameters are invalid.", detail)


def forbidden(message: str = "You do not have permission") -> Response:
    """A 403 Permission Denied."""
    return calendly_error(403, "Permission Denied", message)


def not_found() -> Response:
    """Calendly's 404."""
    return calendly_error(
        404, "Resource Not Found", "The server could not find the requested resource."
    )


def insufficient_scope(scope: str) -> Response:
    """The 403 of a token without `scope`, with `required_scopes` as the current document has."""
    return calendly_error(
        403,
        "Insufficient scope",
        f"This request requires the {scope} scope.",
        required_scopes=[scope],
    )


def paging_of(request: Request) -> tuple[int, int] | Response:
    """(count, offset) of a listing request, or the 400 its `count` / `page_token` deserves."""
    raw_count = request.arg("count")
    count = CALENDLY_DEFAULT_COUNT
    if raw_count is not None:
        if not raw_count.isdigit() or not 1 <= int(raw_count) <= 100:
            return invalid("count", "must be an integer between 1 and 100")
        count = int(raw_count)
    offset = 0
    page_token = request.arg("page_token")
    if page_token:
        decoded = decode_token(page_token)
        if decoded is None:
            return invalid("page_token", "is invalid")
        offset = decoded
    return count, offset


def paged(
    base: str, request: Request, items: list[dict[str, Any]], count: int, offset: int
) -> Response:
    """One page of `items` as {"collection", "pagination"}, with next/previous links."""
    has_next = offset + count < len(items)
    previous = max(offset - count, 0) if offset > 0 else None
    pagination = {
        "count": len(items[offset : offset + count]),
        "next_page": page_url(base, request.path, request.query, offset + count)
        if has_next
        else None,
        "previous_page": page_url(base, request.path, request.query, previous)
        if previous is not None
        else None,
        "next_page_token": encode_token(offset + count) if has_next else None,
        "previous_page_token": encode_token(previous) if previous is not None else None,
    }
    return json_response(
        200, {"collection": items[offset : offset + count], "pagination": pagination}
    )
