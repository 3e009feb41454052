"""`closesync web` as it runs in production: gunicorn, two worker processes, real HTTP.

Against the sandbox and the test session's private Redis. A flow started in one worker may end
in the other: everything a flow needs is in Redis and the browser's cookie.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from pydantic import SecretStr

from closesync.core.webhooks import Subscription, WebhookState, new_key
from closesync.sandbox import Sandbox
from closesync.sandbox.connections import sandbox_connection
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.worker.celery_app import DRAIN_SCHEDULE, FANOUT_QUEUE
from tests._broker import queued
from tests._oauth import follow, sandbox_env, services_for
from tests._sandbox import running_sandbox
from tests._web import WebProcess, web_command
from tests.webhook_helpers import event_body, signed

SECRETS = ("CODEq8vN3kR7pXw2", "STATEmT9sYb4HcJ6", "RAWLINEdFgZq8vN3")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=2) as sandbox:
        yield sandbox


@pytest.fixture
def key() -> str:
    return generate_key()


def _env(sb: Sandbox, redis_url: str, keys: Keys, key: str, port: int) -> dict[str, str]:
    env = {
        **os.environ,
        **sandbox_env(sb, redis_url, keys.prefix, key),
        "LOG_FORMAT": "json",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
    }
    env.pop("PORT", None)
    return env


@pytest.fixture
def web(sb: Sandbox, redis_url: str, keys: Keys, key: str, tmp_path: Path) -> Iterator[WebProcess]:
    port = _free_port()
    env = _env(sb, redis_url, keys, key, port)
    with web_command(["--port", str(port), "--workers", "2", "--threads", "4"], env, tmp_path) as w:
        yield w


def _access_lines(web: WebProcess) -> list[str]:
    web.drain()
    messages = []
    for line in web.lines:
        if line.startswith("{"):
            record = json.loads(line)
            if record["logger"] == "closesync.web.app":
                messages.append(record["message"])
    return messages


def test_gunicorn_serves_the_pages_from_two_workers(sb: Sandbox, web: WebProcess) -> None:
    """Two gthread workers boot; /healthz, /connect (302 + cookie), 405 and 404 answer as before."""
    assert len(web.wait_for_all(r"Booting worker with pid: (\d+)", 2)) == 2
    assert web.wait_for(r"Using worker: (\w+)")[1] == "TimedThreadWorker"  # gthread, timed
    assert "2 workers x 4 threads" in web.wait_for(r"^closesync web on").string

    health = requests.get(web.url + "/healthz", timeout=10)
    assert (health.status_code, health.text) == (200, "ok\n")
    assert requests.head(web.url + "/healthz", timeout=10).status_code == 200

    start = requests.get(web.url + "/connect", allow_redirects=False, timeout=10)
    assert start.status_code == 302
    assert start.headers["Location"].startswith(sb.close_oauth_url)
    cookie = start.headers["Set-Cookie"]
    assert cookie.startswith("closesync_flow=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # PUBLIC_BASE_URL is http here

    refused = requests.post(web.url + "/connect", timeout=10)
    assert refused.status_code == 405
    assert refused.headers["Allow"] == "GET"
    missing = requests.get(web.url + "/no/such/page", timeout=10)
    assert missing.status_code == 404
    assert "start at /connect" in missing.text


def test_gunicorn_flow_completes_across_workers(
    sb: Sandbox, web: WebProcess, redis_client: redis.Redis, redis_url: str, keys: Keys, key: str
) -> None:
    """A whole browser flow through gunicorn stores the connection, whichever worker answers."""
    user = sb.users[1]
    sb.world.set_oauth_next("close", user_email=user.email)
    sb.world.set_oauth_next("calendly", user_email=user.email)
    with requests.Session() as browser:
        answer, _ = follow(browser, web.url + "/connect")
    assert answer is not None
    assert answer.status_code == 200
    assert "Connected" in answer.text
    services = services_for(sb, redis_client, redis_url, keys.prefix, key)
    [connection] = services.connections.list()
    assert connection.close_user_id == user.close_user_id


def _api_calls(text: str) -> float:
    """The sum of closesync_api_calls_total samples in a scrape."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("closesync_api_calls_total{")
    )


def test_gunicorn_metrics_sum_every_worker(sb: Sandbox, web: WebProcess) -> None:
    """GET /metrics answers the sum over gunicorn's workers (multiprocess mode): after a flow's
    API calls, every scrape, whichever worker answers it, shows the same count."""
    user = sb.users[0]
    sb.world.set_oauth_next("close", user_email=user.email)
    sb.world.set_oauth_next("calendly", user_email=user.email)
    with requests.Session() as browser:
        answer, _ = follow(browser, web.url + "/connect")
    assert answer is not None
    assert answer.status_code == 200
    scrapes = []
    for _ in range(6):  # new connections each time: both workers answer some of them
        got = requests.get(web.url + "/metrics", timeout=10, headers={"Connection": "close"})
        assert got.status_code == 200
        assert got.headers["Content-Type"].startswith("text/plain")
        scrapes.append(_api_calls(got.text))
    assert scrapes[0] > 0
    assert set(scrapes) == {scrapes[0]}
    assert len(web.wait_for_all(r"Booting worker with pid: (\d+)", 2)) == 2


def test_gunicorn_logs_carry_the_path_never_the_query_string(web: WebProcess) -> None:
    """Access lines are `web METHOD /path STATUS`; no query string reaches any line of the log."""
    code, state, raw = SECRETS
    requests.get(f"{web.url}/oauth/close/callback?code={code}&state={state}", timeout=10)
    requests.get(f"{web.url}/healthz?state={state}", timeout=10)
    # A request line gunicorn itself refuses (it quotes refused lines in its own log).
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as client:
        client.sendall(f"GET /x?code={raw} HTTP/1.1 junk\r\nHost: x\r\n\r\n".encode())
        assert client.recv(64).startswith(b"HTTP/1.1 400")
    web.wait_for(r"Invalid request from")
    web.wait_for(r"web GET /healthz 200")
    messages = _access_lines(web)
    assert "web GET /oauth/close/callback 400" in messages
    assert "web GET /healthz 200" in messages
    for secret in SECRETS:
        assert secret not in web.text()


def test_gunicorn_takes_a_webhook_delivery_and_queues_its_sync(
    sb: Sandbox, web: WebProcess, redis_client: redis.Redis, redis_url: str, keys: Keys, key: str
) -> None:
    """POST /webhooks/calendly/<key> through gunicorn: verified, answered 200, the owner's sync
    published to the broker (the worker's queue), and the key absent from the log."""
    services = services_for(sb, redis_client, redis_url, keys.prefix, key)
    user = sb.users[0]
    connection, grants = sandbox_connection(user, time.time())
    services.connections.save(connection, grants)
    subscription = Subscription(
        key=new_key(),
        scope="user",
        organization_uri=sb.world.calendly_org_uri,
        user_uri=connection.calendly_user_uri,
        connection_id=connection.id,
        state=WebhookState.ACTIVE,
        own_signing_key=True,
        created_at=1.0,
        updated_at=1.0,
    )
    services.webhooks.save(subscription, SecretStr("own-key-for-gunicorn"))
    body = event_body("event_type.updated", "ET1", user.calendly_user_uuid)
    answer = requests.post(
        f"{web.url}/webhooks/calendly/{subscription.key}",
        data=body,
        headers=signed("own-key-for-gunicorn", body),
        timeout=10,
    )
    assert answer.status_code == 200
    assert answer.json() == {"status": "accepted", "asked": 1}
    # Scheduled a debounce later in Redis, with the drain that will publish it on its way.
    assert redis_client.zrange(keys.schedule("webhook"), 0, -1) == [connection.id]
    [drain_task] = queued(redis_client, keys.prefix, FANOUT_QUEUE)
    assert drain_task.task == DRAIN_SCHEDULE
    assert drain_task.args == ["webhook", "webhook"]
    web.wait_for(r"web POST /webhooks/calendly/<")
    assert subscription.key not in web.text()


def test_gunicorn_drops_a_client_that_stalls_mid_request(
    sb: Sandbox, redis_url: str, keys: Keys, key: str, tmp_path: Path
) -> None:
    """Half a request holds a thread only until WEB_TIMEOUT_SECONDS; then it is dropped, quietly."""
    port = _free_port()
    env = {**_env(sb, redis_url, keys, key, port), "WEB_TIMEOUT_SECONDS": "4"}
    args = ["--port", str(port), "--workers", "1", "--threads", "1"]
    with web_command(args, env, tmp_path) as web:
        web.wait_for(r"Booting worker with pid")
        with socket.create_connection(("127.0.0.1", port), timeout=60) as stalled:
            stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            # The one thread is held by the stalled client until its deadline, then freed.
            answer = requests.get(web.url + "/healthz", timeout=30)
            assert answer.status_code == 200
            assert stalled.recv(1024) == b""  # closed by the server, long before our 60 s
        web.wait_for(r"dropped a client that stalled mid-request")
    assert "Traceback" not in web.text()
    assert "Socket error" not in web.text()
