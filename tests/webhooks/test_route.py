"""The receiver mounted on the web app: POST /webhooks/calendly/<key> through Flask over loopback
(werkzeug's threaded server in this process), as `closesync web --dev` serves it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import requests

from closesync.web.serving import WebServer
from closesync.web.webhooks import key_digest
from closesync.worker.webhook_asks import webhook_asker
from tests.webhook_helpers import event_body, signed
from tests.webhooks.conftest import C1, OWN_KEY, World

UPDATED = "event_type.updated"


@pytest.fixture
def server(world: World) -> Iterator[WebServer]:
    web = WebServer(("127.0.0.1", 0), world.services, ask=webhook_asker(world.services, world.app))
    web.start_background()
    try:
        yield web
    finally:
        web.shutdown()
        web.server_close()


def test_route_takes_a_signed_delivery_and_asks_its_sync(
    world: World, server: WebServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed delivery is answered 200 and queues its owner's sync; the log shows the route
    with a digest of the key, never the key."""
    body = event_body(UPDATED, "ET1", "U1")
    with caplog.at_level(logging.INFO):
        answer = requests.post(
            f"{server.url}/webhooks/calendly/{world.user_sub.key}",
            data=body,
            headers=signed(OWN_KEY, body),
            timeout=10,
        )
    assert answer.status_code == 200
    assert answer.json() == {"status": "accepted", "asked": 1}
    assert world.asked() == [C1]
    access = [r.getMessage() for r in caplog.records if r.getMessage().startswith("web POST")]
    assert access == [f"web POST /webhooks/calendly/<{key_digest(world.user_sub.key)}> 200"]
    assert world.user_sub.key not in caplog.text


def test_route_refusals_keep_their_status(world: World, server: WebServer) -> None:
    """Bad signature 401, unknown key 404, GET 405: the receiver's answers pass through."""
    body = event_body(UPDATED, "ET1", "U1")
    url = f"{server.url}/webhooks/calendly/{world.user_sub.key}"
    bad = requests.post(url, data=body, headers=signed("not-the-key", body), timeout=10)
    assert bad.status_code == 401
    unknown = requests.post(
        f"{server.url}/webhooks/calendly/nosuchkey123",
        data=body,
        headers=signed(OWN_KEY, body),
        timeout=10,
    )
    assert unknown.status_code == 404
    got = requests.get(url, timeout=10)
    assert got.status_code == 405
    assert got.headers["Allow"] == "POST"
    assert world.queued() == []


def test_route_refuses_a_chunked_body_over_the_cap_with_413(world: World) -> None:
    """A body sent chunked (no Content-Length) past WEB_MAX_BODY_BYTES gets 413, not a 401 of a
    truncated body."""
    world.services.settings.web_max_body_bytes = 1024
    web = WebServer(("127.0.0.1", 0), world.services, ask=webhook_asker(world.services, world.app))
    web.start_background()
    try:

        def chunks() -> Iterator[bytes]:
            for _ in range(8):
                yield b"x" * 512

        answer = requests.post(
            f"{web.url}/webhooks/calendly/{world.user_sub.key}", data=chunks(), timeout=10
        )
    finally:
        web.shutdown()
        web.server_close()
    assert answer.status_code == 413
    assert world.queued() == []


def test_route_without_an_asker_is_503_never_410(world: World) -> None:
    """An app built without a way to enqueue answers 503, which Calendly retries."""
    web = WebServer(("127.0.0.1", 0), world.services)
    web.start_background()
    try:
        body = event_body(UPDATED, "ET1", "U1")
        answer = requests.post(
            f"{web.url}/webhooks/calendly/{world.user_sub.key}",
            data=body,
            headers=signed(OWN_KEY, body),
            timeout=10,
        )
    finally:
        web.shutdown()
        web.server_close()
    assert answer.status_code == 503
    assert world.queued() == []
