"""Checking a response body against its pydantic model, for both API clients.

A body that does not have the documented shape becomes `BadResponse` with a short message naming
the API, the method and the endpoint, and listing what was wrong by field path only. The message
must never echo the body: it may hold a token (token endpoints) or customer data. For the same
reason pydantic's own error, whose text quotes the input, is never chained to ours.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from closesync.core.errors import BadResponse

M = TypeVar("M", bound=BaseModel)

# Field errors named in a message; the rest are counted. Enough to diagnose, short enough to log.
MAX_ERRORS_SHOWN = 3


def summarize(error: ValidationError) -> str:
    """`loc: msg` for the first few errors of a validation failure, without any input value."""
    details = error.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for item in details[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(part) for part in item["loc"]) or "body"
        parts.append(f"{loc}: {item['msg']}")
    if len(details) > MAX_ERRORS_SHOWN:
        parts.append(f"(+{len(details) - MAX_ERRORS_SHOWN} more)")
    return "; ".join(parts)


def unexpected_body(api: str, method: str, endpoint: str, detail: str) -> BadResponse:
    """The error for a 2xx answer whose body is not the documented shape."""
    return BadResponse(
        f"{api} {method} {endpoint} answered 200 with an unexpected body: {detail}",
        api=api,
        method=method,
        endpoint=endpoint,
        status=200,
    )


def parse_body(model: type[M], value: Any, *, api: str, method: str, endpoint: str) -> M:
    """`value` (a decoded JSON body) as `model`, or BadResponse naming where it came from."""
    if value is None:
        raise BadResponse(
            f"{api} {method} {endpoint} answered with an empty body",
            api=api,
            method=method,
            endpoint=endpoint,
        )
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise unexpected_body(api, method, endpoint, summarize(error)) from None
