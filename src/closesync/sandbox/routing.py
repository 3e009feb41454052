"""Plain request/response values and a small path-template router.

The emulators are written against these values, so that each handler reads like the vendor
docs and knows nothing of sockets; server.py turns them into HTTP. A route's template (e.g.
`/event_types/{uuid}`) is also the name requests are counted and rate limited under.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote


@dataclass
class Request:
    """One HTTP request; header names are lower-cased."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    template: str = ""

    def arg(self, name: str) -> str | None:
        """First value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else None

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name."""
        return self.headers.get(name.lower())

    def form(self) -> dict[str, str]:
        """The urlencoded form body (first value of each field)."""
        parsed = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        return {key: values[0] for key, values in parsed.items()}

    def json(self) -> Any:
        """The JSON body; an empty body reads as {}. Raises ValueError when malformed."""
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except RecursionError as exc:
            # Nesting deeper than the parser's stack is bad input, to be refused like any other.
            raise ValueError("the JSON body nests too deeply") from exc


@dataclass
class Response:
    """What to answer; `action` other than "send" is a fault (see faults.py): "hang" and
    "reset" are carried out by the server, "omit" by the pipeline (the emulator's answer less
    the listed item `omit`)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    action: Literal["send", "hang", "reset", "omit"] = "send"
    omit: str | None = None


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer."""
    body = json.dumps(payload).encode("utf-8")
    all_headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
    return Response(status, body, all_headers)


def text_response(status: int, text: str, content_type: str = "text/plain") -> Response:
    """A non-JSON answer."""
    return Response(
        status, text.encode("utf-8"), {"Content-Type": f"{content_type}; charset=utf-8"}
    )


def redirect(location: str) -> Response:
    """A 302 to `location`."""
    return Response(302, b"", {"Location": location})


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Match:
    """A path matched a template; `handler` is None when the method is not allowed there, and
    `allowed` then lists the methods that are (for the 405's Allow header)."""

    template: str
    handler: Handler | None
    params: dict[str, str]
    allowed: tuple[str, ...] = ()


class Router:
    """Maps (method, path) to a handler, first-added template first."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], str, Handler]] = []

    def add(self, method: str, template: str, handler: Handler) -> None:
        """Register `handler` for `method` on `template` ({name} matches one path segment)."""
        pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
        pattern = re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{pattern}$"), template, handler))

    def match(self, method: str, path: str) -> Match | None:
        """The route for this request, or None when no template fits the path."""
        first: Match | None = None
        methods: list[str] = []
        for route_method, pattern, template, handler in self._routes:
            found = pattern.match(path)
            if not found:
                continue
            params = {key: unquote(value) for key, value in found.groupdict().items()}
            if route_method == method:
                return Match(template, handler, params)
            first = first or Match(template, None, params)
            if route_method not in methods:
                methods.append(route_method)
        return None if first is None else Match(first.template, None, first.params, tuple(methods))
