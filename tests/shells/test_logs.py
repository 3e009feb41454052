"""Structured logs: JSON lines carry connection and run ids; secrets never reach a line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from closesync.wiring.logs import bind, configure, redact

TOKEN = "close_at_0123456789abcdef0123456789abcdef"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Root logging into a StringIO as JSON lines, restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    configure("DEBUG", "json", stream=out)
    try:
        yield out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_engine_extra_fields_appear(stream: io.StringIO) -> None:
    """The engine's `extra=` fields become top-level keys next to ts, level, logger, message."""
    logging.getLogger("closesync.sync.engine").info(
        "run finished: %s",
        "ok",
        extra={"connection_id": "conn_1", "run_id": "run_1", "links_created": 2},
    )
    (line,) = lines(stream)
    assert line["message"] == "run finished: ok"
    assert line["level"] == "INFO"
    assert line["logger"] == "closesync.sync.engine"
    assert (line["connection_id"], line["run_id"], line["links_created"]) == ("conn_1", "run_1", 2)
    assert str(line["ts"]).endswith("+00:00")


def test_json_line_bound_context_reaches_deep_loggers(stream: io.StringIO) -> None:
    """Fields bound by a task appear on lines logged by code that was never told them."""
    with bind(connection_id="conn_2", run_id="run_2"):
        logging.getLogger("closesync.apis.http").warning("Close answered 502")
    logging.getLogger("closesync.apis.http").warning("outside")
    inside, outside = lines(stream)
    assert (inside["connection_id"], inside["run_id"]) == ("conn_2", "run_2")
    assert (outside["connection_id"], outside["run_id"]) == (None, None)


def test_json_line_token_in_message_args_extra_and_traceback_masked(stream: io.StringIO) -> None:
    """A token in the message, its args, an extra field or a traceback never reaches the line."""
    log = logging.getLogger("closesync.apis.credentials")
    log.info("using Bearer %s", TOKEN, extra={"access_token": "short", "note": f"t={TOKEN}"})
    try:
        raise RuntimeError(f"refresh failed for refresh_token={TOKEN}")
    except RuntimeError:
        log.exception("refresh failed")
    text = stream.getvalue()
    assert TOKEN not in text
    assert "short" not in text
    first, second = lines(stream)
    assert first["message"] == "using Bearer [redacted]"
    assert first["access_token"] == "[redacted]"
    assert "refresh_token=[redacted]" in str(second["exc"])


def test_text_format_shows_fields_after_message() -> None:
    """Text lines read `time LEVEL logger: message  key=value`."""
    root = logging.getLogger()
    saved = list(root.handlers)
    out = io.StringIO()
    configure("INFO", "text", stream=out)
    try:
        logging.getLogger("closesync.sync.engine").info("done", extra={"connection_id": "conn_3"})
    finally:
        root.handlers[:] = saved
    assert "INFO    closesync.sync.engine: done  connection_id=conn_3" in out.getvalue()


def test_redact_keeps_ids_masks_token_shapes() -> None:
    """Connection ids, run ids and uuids stay readable; tokens, JWTs and URL passwords go."""
    text = (
        "conn_0123456789ab run_0123456789ab 3f2b6c1e-9a4d-4c1b-8e2f-0a1b2c3d4e5f "
        f"{TOKEN} eyJhbGciOi.eyJzdWIiOi.sig redis://:hunter2@redis:6379/0 "
        '"client_secret": "abc"'
    )
    assert redact(text) == (
        "conn_0123456789ab run_0123456789ab 3f2b6c1e-9a4d-4c1b-8e2f-0a1b2c3d4e5f "
        '[redacted] [redacted] redis://:[redacted]@redis:6379/0 "client_secret": "[redacted]"'
    )


def test_redact_masks_base64url_tokens_even_without_digits() -> None:
    """Opaque base64url tokens are masked whether or not they hold a digit or a dash."""
    for token in (
        "Zm9vYmFyYmF6cXV4cXV1eA",  # digits
        "abcDEFghiJKLmnoPQRstuVWX",  # no digit, mixed case
        "ab-CD_ef-GH_ij-KL_mn-OP",  # dashes and underscores
        "oa2at_abc123abc123abc123",  # short, prefixed
    ):
        assert token not in redact(f"refresh failed for {token}: 400")


def test_redact_masks_oauth_code_and_state_in_query_strings() -> None:
    """The one-time values of an OAuth callback never reach a log line."""
    line = redact("GET /oauth/close/callback?code=abcDEF&state=xyz HTTP/1.1")
    assert line == "GET /oauth/close/callback?code=[redacted]&state=[redacted] HTTP/1.1"


def test_redact_keeps_urls_source_ids_close_ids_and_exception_names() -> None:
    """What an operator must read stays: URLs with uuids, source_ids, Close ids, class names."""
    text = (
        "https://api.calendly.com/event_types/3f2b6c1e-9a4d-4c1b-8e2f-0a1b2c3d4e5f "
        "3f2b6c1e-9a4d-4c1b-8e2f-0a1b2c3d4e5f:0a2b6c1e-9a4d-4c1b-8e2f-0a1b2c3d4e5f "
        "user_5ubbbPIa84yRnBUbHoWC8FJo schlnk_abc123def456ghi ConnectionRefusedError "
        "scheduling_link_integration redis://127.0.0.1:6379/15"
    )
    assert redact(text) == text


def test_redact_keeps_plain_numbers() -> None:
    """A long run of digits (a duration's decimals, a timestamp in ms) is a number, not a token."""
    assert redact("task succeeded in 0.0012345678901234567s") == (
        "task succeeded in 0.0012345678901234567s"
    )
