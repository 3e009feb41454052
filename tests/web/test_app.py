"""The Flask app's shared rules, driven over loopback HTTP: methods, body cap, errors, logging.

The routes' own behaviour (the flows, cookies, pages) is tested in tests/connect; here a test
blueprint stands in for the routes to come (the webhook receiver) where a rule needs one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
import requests
from flask import Blueprint, Flask, request
from pydantic import SecretStr

from closesync.settings import Settings
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.web.serving import WebServer
from closesync.wiring.services import Services

CAP = 2048

probe = Blueprint("probe", __name__)


@probe.post("/probe/body")
def body_size() -> str:
    """Reads the raw body, as the webhook receiver will."""
    return str(len(request.get_data()))


@probe.get("/probe/gone")
def gone() -> tuple[str, int]:
    return "gone", 410


@probe.get("/probe/crash")
def crash() -> str:
    raise RuntimeError("code=Zq8vN3kR7pXw2LmT9sYb4HcJ6dFg")


@pytest.fixture
def services(redis_client: redis.Redis, keys: Keys) -> Services:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        redis_prefix=keys.prefix,
        closesync_encryption_keys=generate_key(),
        web_max_body_bytes=CAP,
    )
    return Services.build(settings, redis_client=redis_client)


@pytest.fixture
def web(services: Services) -> Iterator[WebServer]:
    server = WebServer(("127.0.0.1", 0), services)
    server.app.register_blueprint(probe)
    server.start_background()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_create_app_returns_a_flask_app_with_the_body_cap(services: Services) -> None:
    """create_app builds a Flask app whose MAX_CONTENT_LENGTH is WEB_MAX_BODY_BYTES."""
    from closesync.web.app import create_app

    app = create_app(services, "https://connect.example")
    assert isinstance(app, Flask)
    assert app.config["MAX_CONTENT_LENGTH"] == CAP


def test_app_routes_answer_only_their_methods_with_allow(web: WebServer) -> None:
    """POST, OPTIONS and HEAD on a GET route get 405 with Allow: GET; /healthz allows HEAD."""
    answers = {
        method: requests.request(method, web.url + "/connect", allow_redirects=False, timeout=5)
        for method in ("POST", "OPTIONS", "HEAD", "PUT")
    }
    for method, answer in answers.items():
        assert answer.status_code == 405, method
        assert answer.headers["Allow"] == "GET", method
    health = requests.post(web.url + "/healthz", timeout=5)
    assert health.status_code == 405
    assert health.headers["Allow"] == "GET, HEAD"
    assert requests.head(web.url + "/healthz", timeout=5).status_code == 200


def test_app_trailing_slash_is_the_same_route(web: WebServer) -> None:
    """/connect/ starts a flow like /connect, /healthz/ answers like /healthz (as before)."""
    assert requests.get(web.url + "/healthz/", timeout=5).text == "ok\n"
    assert requests.get(web.url + "/connect/", allow_redirects=False, timeout=5).status_code in (
        302,
        503,  # no OAuth application configured here: the page says so
    )


def test_app_unknown_path_gets_the_404_page(web: WebServer) -> None:
    """An unknown path gets closesync's 404 page pointing at /connect."""
    answer = requests.get(web.url + "/nothing/here?code=abc", timeout=5)
    assert answer.status_code == 404
    assert "start at /connect" in answer.text
    assert "abc" not in answer.text


def test_app_declared_oversize_body_gets_413_before_routing(web: WebServer) -> None:
    """A Content-Length over WEB_MAX_BODY_BYTES gets 413 on any path, never 404, 405 or 410."""
    for path in ("/probe/body", "/connect", "/nowhere"):
        answer = requests.post(web.url + path, data=b"x" * (CAP + 1), timeout=5)
        assert answer.status_code == 413, path
        assert f"over {CAP} bytes" in answer.text


def test_app_chunked_oversize_body_gets_413_when_read(web: WebServer) -> None:
    """A chunked body (no Content-Length) past the cap gets 413 once the route reads it."""

    def chunks(count: int) -> Iterator[bytes]:
        for _ in range(count):
            yield b"x" * 1024

    over = requests.post(web.url + "/probe/body", data=chunks(3), timeout=5)
    assert over.status_code == 413
    at_cap = requests.post(web.url + "/probe/body", data=chunks(CAP // 1024), timeout=5)
    assert at_cap.status_code == 200
    assert at_cap.text == str(CAP)


def test_app_never_answers_410(web: WebServer, caplog: pytest.LogCaptureFixture) -> None:
    """A route answering 410 (Calendly would delete its subscription) is sent as 500, logged."""
    with caplog.at_level(logging.ERROR, logger="closesync.web.app"):
        answer = requests.get(web.url + "/probe/gone", timeout=5)
    assert answer.status_code == 500
    assert any("answered 410" in r.getMessage() for r in caplog.records)


def test_app_crash_is_a_500_page_without_traceback(
    web: WebServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception gives a plain 500 page; the log has it, the user does not."""
    with caplog.at_level(logging.INFO, logger="closesync.web.app"):
        answer = requests.get(web.url + "/probe/crash", timeout=5)
    assert answer.status_code == 500
    assert "Something went wrong" in answer.text
    assert "Traceback" not in answer.text
    assert "Zq8vN3kR7pXw2LmT9sYb4HcJ6dFg" not in answer.text
    assert any(r.getMessage() == "web request crashed" for r in caplog.records)


def test_app_access_log_has_the_path_and_status_never_the_query(
    web: WebServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request logs `web METHOD /path STATUS`; the query string (codes, state) never shows."""
    with caplog.at_level(logging.DEBUG):
        requests.get(web.url + "/oauth/close/callback?code=CODE123&state=STATE456", timeout=5)
        requests.get(web.url + "/healthz?state=STATE789", timeout=5)
    # Everything the server side logged (urllib3 is this test's own client, quoting its URL).
    messages = [r.getMessage() for r in caplog.records if not r.name.startswith("urllib3")]
    assert "web GET /oauth/close/callback 400" in messages
    assert "web GET /healthz 200" in messages
    for text in messages:
        assert "CODE123" not in text
        assert "STATE456" not in text
        assert "STATE789" not in text


def test_healthz_without_redis_answers_503(services: Services, keys: Keys) -> None:
    """/healthz answers 503 (not a crash) when Redis does not answer."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    offline = Services.build(services.settings, redis_client=dead)
    server = WebServer(("127.0.0.1", 0), offline)
    server.start_background()
    try:
        answer = requests.get(server.url + "/healthz", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert answer.status_code == 503


def test_app_crash_reaches_sentry_without_code_state_or_cookie(services: Services) -> None:
    """A crash is reported to Sentry with the request scrubbed: no code, state or flow cookie."""
    import json

    import sentry_sdk

    from closesync.wiring.observability import init_sentry
    from tests.shells.test_sentry import MemoryTransport

    memory = MemoryTransport()
    with_dsn = services.settings.model_copy(
        update={"sentry_dsn": SecretStr("https://public@sentry.invalid/1")}
    )
    assert init_sentry(with_dsn, transport=memory)
    server = WebServer(("127.0.0.1", 0), services)
    server.app.register_blueprint(probe)
    server.start_background()
    try:
        answer = requests.get(
            server.url + "/probe/crash?code=CODEq8vN3kR7pXw2&state=STATEmT9sYb4HcJ6",
            cookies={"closesync_flow": "COOKIEdFgZq8vN3kR7"},
            timeout=5,
        )
        sentry_sdk.flush(timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    assert answer.status_code == 500
    events = memory.items("event")
    assert events, "the crash was not reported"
    sent = json.dumps(events)
    assert "probe/crash" in sent
    for secret in ("CODEq8vN3kR7pXw2", "STATEmT9sYb4HcJ6", "COOKIEdFgZq8vN3kR7"):
        assert secret not in sent
