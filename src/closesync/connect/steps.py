"""What a step of a connect flow leads to, and what the user is told when it cannot finish.

Shared by the web pages and the terminal flow, which show these messages as they are: every
message is written for the person connecting, and names no token, code or `state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from closesync.core.connection import Connection

FlowErrorKind = Literal[
    "denied", "state", "browser", "code", "provider", "not_admin", "not_allowed", "taken"
]
# The error codes of RFC 6749 §4.1.2.1: the only `error` values a page may name. Anything else is
# attacker-controllable text (content spoofing) and is reported as "returned an error".
KNOWN_ERRORS = frozenset(
    {
        "access_denied",
        "invalid_request",
        "unauthorized_client",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
    }
)


class FlowError(Exception):
    """An authorization that cannot finish; `str()` is a message for the user."""

    def __init__(self, kind: FlowErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Step:
    """What a callback led to: a stored connection, the next authorize URL, or a wait."""

    outcome: Literal["connected", "next", "waiting", "organization"]
    message: str
    connection: Connection | None = None
    next_url: str | None = None
    paired: int = 0


def step_json(step: Step) -> dict[str, Any]:
    """A step as printed by `--json`: public fields only."""
    value: dict[str, Any] = {"outcome": step.outcome, "message": step.message}
    if step.connection is not None:
        value["connection"] = step.connection.model_dump(mode="json")
        value["id"] = step.connection.id
    if step.outcome == "organization":
        value["paired"] = step.paired
    return value
