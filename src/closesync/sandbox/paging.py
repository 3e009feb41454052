"""Page tokens and page numbers for both APIs' listings.

Calendly pages with opaque `page_token`s; the sandbox's are the base64 of the offset, so
fault rules can target "page k" of any listing and a stale token keeps meaning the same
offset. Close pages with `_skip`/`_limit`. Page numbers are 1-based; page 1 is the request
without `page_token` (Calendly) or with `_skip=0` (Close).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from urllib.parse import urlencode

CALENDLY_DEFAULT_COUNT = 20
CLOSE_DEFAULT_LIMIT = 100


def encode_token(offset: int) -> str:
    """The page token of a listing offset."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def decode_token(token: str) -> int | None:
    """The offset a page token stands for; None when it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    prefix, _, number = text.partition(":")
    if prefix != "offset" or not number.isdigit():
        return None
    return int(number)


def page_url(base: str, path: str, query: Mapping[str, list[str]], offset: int) -> str:
    """The full URL of the page at `offset`, keeping the request's other parameters."""
    pairs = [
        (key, value) for key, values in query.items() if key != "page_token" for value in values
    ]
    pairs.append(("page_token", encode_token(offset)))
    return f"{base}{path}?{urlencode(pairs)}"


def _int(value: str | None, default: int) -> int:
    try:
        return default if value is None else int(value)
    except ValueError:
        return default


def page_number(api: str, query: Mapping[str, list[str]]) -> int:
    """Which page (1-based) a listing request asks for."""

    def first(name: str) -> str | None:
        values = query.get(name)
        return values[0] if values else None

    if api == "calendly":
        token = first("page_token")
        offset = decode_token(token) if token else 0
        count = max(_int(first("count"), CALENDLY_DEFAULT_COUNT), 1)
        return (offset or 0) // count + 1
    skip = max(_int(first("_skip"), 0), 0)
    limit = max(_int(first("_limit"), CLOSE_DEFAULT_LIMIT), 1)
    return skip // limit + 1
