"""Structured logging: one JSON object (or one readable line) per record, secrets masked.

Every line carries `connection_id` and `run_id` when they are known: either passed in `extra=`
(as the engine does) or bound for a block of work with `bind(...)` (as the Celery tasks do), so
the HTTP layer and the token keeper deep inside a run need not be told. Secrets never reach a
line: `RedactFilter` masks anything token-shaped in the message, its arguments, extra fields
and tracebacks, whatever code logged it.

This module configures handlers only when asked (`configure`); importing it changes nothing.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

MASK = "[redacted]"

# An immutable default: a bound block replaces the mapping, never mutates it.
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "closesync_log_context", default=MappingProxyType({})
)

# Attributes every LogRecord has; anything else on a record came from `extra=` or a filter.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Names whose values are secrets whatever they look like (in extra fields, headers, query
# strings, JSON bodies): tokens, passwords, keys, cookies, the Sentry DSN, and the one-time
# values of an OAuth flow (authorization code, PKCE verifier, state).
SECRET_NAME = re.compile(
    r"token|secret|passw|authorization|api[_-]?key|cookie|dsn|credential|encryption[_-]?keys?"
    r"|verifier|^code$|^state$|^oauth_state$",
    re.IGNORECASE,
)
# Long identifiers that are not secrets and that operators need to read: uuids (Calendly),
# closesync's own ids, Close object ids, and source_ids made of two uuids.
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_NUMBER = re.compile(r"\d+(?:[a-z]{1,2})?")
_CAMEL_CASE = re.compile(r"(?:[A-Z][a-z]+)+")
_READABLE = re.compile(
    rf"{_UUID}|(?:conn|run)_[0-9a-f]{{12}}"
    r"|(?:user|orga|schlnk|oa2client|membership|lead|acti)_[A-Za-z0-9]{10,40}"
)
_PATTERNS = (
    # `Authorization: Bearer abc`, `Basic abc`.
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"),
    # key=value and "key": "value" where the key names a secret.
    re.compile(
        r"(?i)([\"']?[\w-]*(?:token|secret|passw\w*|api[_-]?key|authorization|verifier)[\"']?"
        r"\s*[=:]\s*[\"']?|(?<![\w-])(?:code|state)=)([^\"'&\s,;}]+)"
    ),
    # JWTs.
    re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]*"),
    # A password in a URL's userinfo: redis://:pw@host.
    re.compile(r"(?<=://)([^/@\s:]*:)[^/@\s]+(?=@)"),
    # Opaque tokens: a run of 20+ token characters (base64url included; "/" and "." split runs
    # so that URLs stay readable). Which runs are masked: see _mask_unless_readable.
    re.compile(r"[A-Za-z0-9_~+=-]{20,}"),
)


def redact(text: str) -> str:
    """`text` with everything token-shaped replaced by [redacted]."""
    bearer, named, jwt, userinfo, opaque = _PATTERNS
    text = bearer.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = named.sub(lambda m: m.group(1) + MASK, text)
    text = jwt.sub(MASK, text)
    text = userinfo.sub(lambda m: m.group(1) + MASK, text)
    return opaque.sub(_mask_unless_readable, text)


def _mask_unless_readable(match: re.Match[str]) -> str:
    """Mask a long run that looks random: it holds a digit, or both letter cases.

    Words joined by underscores (`scheduling_link_integration`), CamelCase names of exception
    classes (`ConnectionRefusedError`) and readable identifiers (uuids, conn_/run_ ids, Close
    object ids) stay.
    """
    value = match.group(0)
    if _READABLE.fullmatch(value) or _CAMEL_CASE.fullmatch(value):
        return value
    if _NUMBER.fullmatch(value):
        return value  # a number, perhaps with a unit (a duration's decimals, ms), not a token
    has_digit = any(c.isdigit() for c in value)
    mixed_case = any(c.islower() for c in value) and any(c.isupper() for c in value)
    return MASK if has_digit or mixed_case else value


def scrub(value: Any, name: str = "") -> Any:
    """A copy of `value` with secret-named entries masked and strings redacted, recursively."""
    if name and SECRET_NAME.search(name) and value not in (None, "", [], {}):
        return MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # Header lists: [["Authorization", "Bearer x"], ...].
        if len(value) == 2 and isinstance(value[0], str) and SECRET_NAME.search(value[0]):
            return [value[0], MASK]
        return [scrub(item) for item in value]
    return value


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add `fields` (e.g. connection_id, run_id) to every record logged inside the block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bound() -> Mapping[str, Any]:
    """The fields bound right now."""
    return _context.get()


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record; `extra=` given at the call wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class RedactFilter(logging.Filter):
    """Masks secrets in the message, extra fields and traceback before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for key in set(record.__dict__) - _STANDARD:
            setattr(record, key, scrub(record.__dict__[key], key))
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, connection_id, run_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "connection_id": getattr(record, "connection_id", None),
            "run_id": getattr(record, "run_id", None),
        }
        line.update({k: v for k, v in _fields(record).items() if k not in line})
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`ts LEVEL logger message key=value …` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC).strftime("%H:%M:%S")
        extras = " ".join(f"{k}={v}" for k, v in sorted(_fields(record).items()) if v is not None)
        text = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            text += f"  {extras}"
        if record.exc_text:
            text += "\n" + record.exc_text
        return text


def configure(level: str = "INFO", fmt: str | None = None, stream: TextIO | None = None) -> None:
    """Route every logger through one handler on `stream` (stderr) with context and redaction.

    `fmt` None picks text when the stream is a terminal, JSON otherwise (decisions.md).
    """
    out = stream if stream is not None else sys.stderr
    chosen = fmt or ("text" if out.isatty() else "json")
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    # Filters on the handler see records of every logger, propagated ones included.
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_closesync", False):
            root.removeHandler(old)
    handler._closesync = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs every connection at DEBUG; at INFO and above it is noise.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))
