"""Connections users make themselves: the web and terminal OAuth flows against the sandbox."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import requests

from closesync.cli.connect import run_connect
from closesync.connecting import Step
from closesync.oauth_flow import Provider
from closesync.sandbox import Sandbox
from closesync.secretbox import generate_key
from closesync.services import Services
from closesync.state import Keys
from tests._oauth import follow, services_for, web_process
from tests._sandbox import running_sandbox


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=3) as sandbox:
        yield sandbox


@pytest.fixture
def services(sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys) -> Services:
    return services_for(sb, redis_client, redis_url, keys.prefix, generate_key())


def stored_keys(services: Services) -> list[str]:
    return sorted(str(k) for k in services.redis.scan_iter(f"{services.keys.prefix}:*"))


def test_web_flow_full_round_trip_stores_connection_and_links_sync(
    sb: Sandbox, services: Services
) -> None:
    """GET /connect through both authorize pages stores one connection whose links then sync."""
    user = sb.users[1]
    sb.world.set_oauth_next("close", user_email=user.email)
    sb.world.set_oauth_next("calendly", user_email=user.email)
    with web_process(services) as web, requests.Session() as browser:
        answer, _ = follow(browser, web.url + "/connect")
    assert answer is not None
    assert answer.status_code == 200
    assert "Connected" in answer.text
    [connection] = services.connections.list()
    assert connection.close_user_id == user.close_user_id
    assert connection.calendly_user_uri == user.calendly_user_uri
    grants = services.connections.grants(connection.id)
    assert grants.close.refresh_token is not None
    assert grants.calendly.refresh_token is not None
    report = services.engine(wait_budget=5).run(connection.id)
    assert report.outcome.value == "ok"
    assert report.created > 0


def test_web_flow_same_close_user_again_updates_connection(sb: Sandbox, services: Services) -> None:
    """Connecting the same Close user twice keeps one connection, with the new grants."""
    with web_process(services) as web, requests.Session() as browser:
        follow(browser, web.url + "/connect")
        [first] = services.connections.list()
        old = services.connections.grants(first.id).close.access_token.get_secret_value()
        answer, _ = follow(browser, web.url + "/connect")
    assert answer is not None
    assert "Updated" in answer.text
    [second] = services.connections.list()
    assert second.id == first.id
    assert services.connections.grants(first.id).close.access_token.get_secret_value() != old


def test_terminal_flow_no_browser_round_trip_stores_connection(
    sb: Sandbox, services: Services
) -> None:
    """`closesync connect --no-browser`: the printed URLs lead through both callbacks."""
    user = sb.users[2]
    sb.world.set_oauth_next("close", user_email=user.email)
    sb.world.set_oauth_next("calendly", user_email=user.email)
    urls: queue.Queue[tuple[Provider, str]] = queue.Queue()
    result: list[Step | BaseException] = []

    def operator() -> None:
        try:
            result.append(
                run_connect(services, port=0, timeout=10, announce=lambda p, u: urls.put((p, u)))
            )
        except BaseException as error:  # surfaced by the assertion below
            result.append(error)

    thread = threading.Thread(target=operator)
    thread.start()
    with requests.Session() as browser:
        provider, url = urls.get(timeout=10)
        assert provider == "close"
        # The browser follows Close, our callback, then on to Calendly and our callback again.
        answer, _ = follow(browser, url)
        assert urls.get(timeout=10)[0] == "calendly"
    thread.join(timeout=10)
    assert answer is not None
    assert answer.status_code == 200
    [step] = result
    assert isinstance(step, Step)
    assert step.connection is not None
    assert step.connection.close_user_id == user.close_user_id
    assert services.connections.get(step.connection.id).calendly_user_uri == user.calendly_user_uri


def test_web_flow_close_denied_shows_page_and_stores_nothing(
    sb: Sandbox, services: Services
) -> None:
    """A declined Close consent answers a clear page and leaves no key in Redis."""
    sb.world.set_oauth_next("close", deny=True)
    with web_process(services) as web, requests.Session() as browser:
        answer, _ = follow(browser, web.url + "/connect")
    assert answer is not None
    assert answer.status_code == 403
    assert "You declined access to Close" in answer.text
    assert stored_keys(services) == []


def test_web_flow_calendly_denied_revokes_close_grant_and_stores_nothing(
    sb: Sandbox, services: Services
) -> None:
    """Declining Calendly after approving Close stores nothing and revokes the Close grant."""
    sb.world.set_oauth_next("calendly", deny=True)
    with sb.world.lock:
        before = set(sb.world.tokens.tokens)
    with web_process(services) as web, requests.Session() as browser:
        answer, _ = follow(browser, web.url + "/connect")
    assert answer is not None
    assert answer.status_code == 403
    assert "You declined access to Calendly" in answer.text
    assert stored_keys(services) == []
    with sb.world.lock:
        new = [t for v, t in sb.world.tokens.tokens.items() if v not in before]
    assert sorted(t.kind for t in new) == ["access", "refresh"]
    assert all(t.api == "close" and t.revoked for t in new)


def test_web_callback_replayed_state_is_refused(sb: Sandbox, services: Services) -> None:
    """A callback replayed with the same state is refused the second time; nothing more stored."""
    with web_process(services) as web, requests.Session() as browser:
        _, callback = follow(browser, web.url + "/connect", stop_before="/oauth/close/callback")
        first = browser.get(callback, allow_redirects=False, timeout=10)
        assert first.status_code == 302
        again = browser.get(callback, allow_redirects=False, timeout=10)
    assert again.status_code == 400
    assert "no longer valid" in again.text
    assert services.connections.list() == []


def test_web_callback_wrong_state_is_refused_and_stores_nothing(
    sb: Sandbox, services: Services
) -> None:
    """A callback whose state was never issued is refused; the real flow is not consumed."""
    with web_process(services) as web, requests.Session() as browser:
        _, callback = follow(browser, web.url + "/connect", stop_before="/oauth/close/callback")
        query = parse_qs(urlsplit(callback).query)
        forged = f"{web.url}/oauth/close/callback?code={query['code'][0]}&state=forged"
        answer = browser.get(forged, allow_redirects=False, timeout=10)
    assert answer.status_code == 400
    assert "unknown, has expired or was already used" in answer.text
    assert services.connections.list() == []
    assert query["code"][0] not in answer.text


def test_web_callback_expired_code_shows_page_and_stores_nothing(
    sb: Sandbox, services: Services
) -> None:
    """A code redeemed after its lifetime (sandbox clock advanced) gives a clear page, no state."""
    with web_process(services) as web, requests.Session() as browser:
        _, callback = follow(browser, web.url + "/connect", stop_before="/oauth/close/callback")
        sb.world.advance_clock(sb.world.config.auth_code_ttl + 1)
        answer = browser.get(callback, allow_redirects=False, timeout=10)
    assert answer.status_code == 400
    assert "authorization code has expired or was already used" in answer.text
    assert stored_keys(services) == []


def test_web_healthz_answers_ok(services: Services) -> None:
    """GET /healthz answers 200 while Redis answers."""
    with web_process(services) as web:
        answer = requests.get(web.url + "/healthz", timeout=5)
    assert answer.status_code == 200


def test_connect_command_without_key_against_real_apis_refuses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    """Outside the sandbox, `closesync connect` without CLOSESYNC_ENCRYPTION_KEYS refuses."""
    from closesync.cli.main import main

    monkeypatch.delenv("CLOSESYNC_ENCRYPTION_KEYS", raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.chdir("/")  # no .env
    assert main(["connect", "--no-browser", "--port", "0"]) == 2
    assert "CLOSESYNC_ENCRYPTION_KEYS is not set" in capsys.readouterr().err
