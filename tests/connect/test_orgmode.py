"""Calendly organization mode: pairing by email, unmatched users, one shared refreshing grant."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from pydantic import SecretStr

from closesync.apis.credentials import grant_lock_name, shared_lock_key
from closesync.cli.main import main
from closesync.connect.org_credentials import OrganizationBusy
from closesync.connect.org_members import Member, match
from closesync.connect.org_waiting import WaitingRoom
from closesync.connect.organizations import Organizations
from closesync.core.close_payloads import Me
from closesync.core.connection import Connection, Grant
from closesync.core.errors import EncryptionError, GrantRevoked
from closesync.core.retry import WaitBudget
from closesync.sandbox import Sandbox
from closesync.settings import Settings
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from tests._oauth import follow, sandbox_env, services_for, web_process
from tests._sandbox import running_sandbox


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with running_sandbox(users=4) as sandbox:
        yield sandbox


@pytest.fixture
def secret_key() -> str:
    return generate_key()


@pytest.fixture
def services(
    sb: Sandbox, redis_client: redis.Redis, redis_url: str, keys: Keys, secret_key: str
) -> Services:
    return services_for(sb, redis_client, redis_url, keys.prefix, secret_key)


def set_close_email(sb: Sandbox, close_user_id: str, email: str) -> None:
    with sb.world.lock:
        sb.world.close_users[close_user_id].email = email


def connect_org(sb: Sandbox, web_url: str, browser: requests.Session) -> requests.Response:
    sb.world.set_oauth_next("calendly", user_email=sb.users[0].email)  # the owner
    answer, _ = follow(browser, web_url + "/connect/organization")
    assert answer is not None
    return answer


def connect_close(sb: Sandbox, web_url: str, browser: requests.Session, email: str) -> str:
    sb.world.set_oauth_next("close", user_email=email)
    answer, _ = follow(browser, web_url + "/connect")
    assert answer is not None
    assert answer.status_code == 200
    return answer.text


def test_match_email_ignores_case_and_spaces() -> None:
    """Pairing compares emails ignoring case and surrounding spaces; None without one."""
    members = [Member("u1", "Ada@Example.COM", "Ada"), Member("u2", None, "No mail")]
    assert match(" ada@example.com", members) == members[0]
    assert match("grace@example.com", members) is None
    assert match(None, members) is None


def test_orgmode_close_users_pair_by_email_ignoring_case_and_share_one_grant(
    sb: Sandbox, services: Services
) -> None:
    """Close users whose email differs only in case pair with the member and share its grant."""
    one, two = sb.users[1], sb.users[2]
    set_close_email(sb, one.close_user_id, one.email.upper())
    with web_process(services) as web, requests.Session() as browser:
        assert "Organization connected" in connect_org(sb, web.url, browser).text
        assert "Connected" in connect_close(sb, web.url, browser, one.email)
        assert "Connected" in connect_close(sb, web.url, browser, two.email)
    by_user = {c.close_user_id: c for c in services.connections.list()}
    assert by_user[one.close_user_id].calendly_user_uri == one.calendly_user_uri
    assert by_user[two.close_user_id].calendly_user_uri == two.calendly_user_uri
    refs = {c.calendly_grant_ref for c in by_user.values()}
    assert len(refs) == 1
    assert None not in refs
    tokens = {
        services.connections.grants(c.id).calendly.access_token.get_secret_value()
        for c in by_user.values()
    }
    assert len(tokens) == 1
    report = services.engine(wait_budget=5).run(by_user[one.close_user_id].id)
    assert report.outcome.value == "ok"
    assert report.created > 0


def test_orgmode_waiting_close_user_paired_once_a_member_has_the_email(
    sb: Sandbox, services: Services
) -> None:
    """A Close user no member matches waits (nothing synced); a later pairing pass pairs them."""
    late = sb.users[3]
    set_close_email(sb, late.close_user_id, "late@example.com")
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        assert "Almost there" in connect_close(sb, web.url, browser, "late@example.com")
        assert services.connections.list() == []
        assert [w.close_user_id for w in Organizations(services).waiting_room.waiting()] == [
            late.close_user_id
        ]
        newcomer = sb.world.create_user(email="LATE@example.com", name="Late Comer")
        answer = connect_org(sb, web.url, browser)
    assert "1 waiting Close user(s) were paired" in answer.text
    [connection] = services.connections.list()
    assert connection.close_user_id == late.close_user_id
    assert connection.calendly_user_uri == newcomer.calendly_user_uri
    assert Organizations(services).waiting_room.waiting() == []


def test_status_lists_unmatched_users_on_both_sides(
    sb: Sandbox,
    services: Services,
    redis_url: str,
    keys: Keys,
    secret_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """`closesync status` names the Close user no member matches and the unpaired members."""
    stranger = sb.users[3]
    set_close_email(sb, stranger.close_user_id, "stranger@elsewhere.example")
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, sb.users[1].email)
        assert "Almost there" in connect_close(sb, web.url, browser, "stranger@elsewhere.example")
    for name, value in sandbox_env(sb, redis_url, keys.prefix, secret_key).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--json"]) == 0
    unmatched = json.loads(capsys.readouterr().out)["unmatched"]
    assert [p["email"] for p in unmatched["close"]] == ["stranger@elsewhere.example"]
    [members] = unmatched["calendly"].values()
    assert sorted(m["email"] for m in members) == sorted(
        [sb.users[0].email, sb.users[2].email, stranger.email]
    )
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert "unmatched Close user stranger@elsewhere.example" in text
    assert f"unmatched Calendly member {sb.users[2].email}" in text


def test_orgmode_non_admin_cannot_connect_organization(sb: Sandbox, services: Services) -> None:
    """A plain member authorizing the organization gets a clear page and nothing is stored."""
    sb.world.set_oauth_next("calendly", user_email=sb.users[1].email)
    with web_process(services) as web, requests.Session() as browser:
        answer, _ = follow(browser, web.url + "/connect/organization")
    assert answer is not None
    assert answer.status_code == 403
    assert "owner or admin" in answer.text
    assert list(services.redis.scan_iter(f"{services.keys.prefix}:*")) == []


def _refresh_in_process(
    env: dict[str, str], conn_id: str, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    try:
        settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[call-arg]
        services = Services.build(settings)
        connection = services.connections.get(conn_id)
        clients = services.clients_for(connection, WaitBudget(5))
        barrier.wait(timeout=30)
        results.put(("ok", clients.calendly.get_current_user().uri))
    except BaseException as error:
        results.put(("error", f"{type(error).__name__}: {error}"))


def test_shared_grant_refreshed_by_four_processes_at_once_is_never_lost(
    sb: Sandbox, services: Services, redis_url: str, keys: Keys, secret_key: str
) -> None:
    """Four processes refreshing the one expired org grant at once: one refresh, grant kept."""
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, sb.users[1].email)
        connect_close(sb, web.url, browser, sb.users[2].email)
    connections: list[Connection] = services.connections.list()
    ref = connections[0].calendly_grant_ref
    assert ref is not None
    shared = services.connections.shared_grant(ref)
    services.connections.set_shared_grant(
        ref, shared.model_copy(update={"expires_at": time.time() - 1})
    )
    sb.world.reset_request_counts()
    env = sandbox_env(sb, redis_url, keys.prefix, secret_key)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=_refresh_in_process,
            args=(env, connections[i % 2].id, barrier, results),
        )
        for i in range(4)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert [kind for kind, _ in outcomes] == ["ok"] * 4, outcomes
    assert sb.world.request_counts().get("calendly POST /oauth/token") == 1
    after = services.connections.shared_grant(ref)
    assert after.access_token != shared.access_token
    assert after.refresh_token is not None
    oauth = services.calendly_oauth()
    assert oauth is not None
    # The stored refresh token is the live one: it refreshes again.
    assert oauth.refresh(after.refresh_token.get_secret_value()).access_token


def test_daily_pass_pairs_a_waiting_user_without_the_organization_reconnecting(
    sb: Sandbox, services: Services
) -> None:
    """The drift check's pairing pass pairs a waiting Close user once a member has the email."""
    from closesync.worker.tasks import pair_organizations

    late = sb.users[3]
    set_close_email(sb, late.close_user_id, "later@example.com")
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, "later@example.com")
    assert services.connections.list() == []
    assert pair_organizations(services) == 0
    newcomer = sb.world.create_user(email="Later@Example.com", name="Later Comer")
    assert pair_organizations(services) == 1
    [connection] = services.connections.list()
    assert connection.calendly_user_uri == newcomer.calendly_user_uri
    assert Organizations(services).waiting_room.waiting() == []


def test_match_email_does_not_fold_non_ascii_lookalikes() -> None:
    """Only ASCII case is ignored: a Kelvin sign (U+212A) is not the letter k."""
    members = [Member("u1", "\u212aate@example.com", "Lookalike")]
    assert match("kate@example.com", members) is None
    assert match("KATE@example.com", [Member("u2", "kate@example.com", "Kate")]) is not None


def test_orgmode_reconnect_with_member_listing_failing_keeps_the_organization_working(
    sb: Sandbox, services: Services
) -> None:
    """Reconnecting while member listing answers 503 keeps the new grant stored and working."""
    no_wait = Services.build(
        services.settings.model_copy(update={"inline_wait_budget_seconds": 0}),
        redis_client=services.redis,
    )
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, sb.users[1].email)
    [connection] = services.connections.list()
    ref = connection.calendly_grant_ref
    assert ref is not None
    old = services.connections.shared_grant(ref)
    # The role check lists memberships once; the pairing pass after storing gets the 503.
    sb.world.add_fault(
        api="calendly", kind="503", path_prefix="/organization_memberships", skip=1, count=5
    )
    with web_process(no_wait) as web, requests.Session() as browser:
        answer = connect_org(sb, web.url, browser)
    assert answer.status_code == 200
    assert "pairing deferred (the daily check pairs later)" in answer.text
    new = services.connections.shared_grant(ref)
    assert new.access_token != old.access_token
    sb.world.clear_faults()
    report = services.engine(wait_budget=5).run(connection.id)
    assert report.outcome.value == "ok"
    oauth = services.calendly_oauth()
    assert oauth is not None
    assert old.refresh_token is not None
    with pytest.raises(GrantRevoked):  # the replaced grant was revoked, after the new one
        oauth.refresh(old.refresh_token.get_secret_value())


def test_orgmode_reconnect_waits_for_the_shared_refresh_lock(
    sb: Sandbox, services: Services
) -> None:
    """Replacing the shared grant takes its refresh lock: while held elsewhere, nothing changes."""
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
    [ref] = Organizations(services).credentials.refs()
    old = services.connections.shared_grant(ref)
    held = services.refresh_lock(grant_lock_name("calendly", shared_lock_key(ref)))
    assert held.acquire()
    orgs = Organizations(services)
    try:
        with pytest.raises(OrganizationBusy):
            orgs.credentials.connect(sb.world.calendly_org_uri, "owner", None, old, wait_seconds=0)
    finally:
        held.release()
    assert services.connections.shared_grant(ref).access_token == old.access_token


def test_orgmode_organization_outside_allowlist_is_refused_and_revoked(
    sb: Sandbox, services: Services
) -> None:
    """CALENDLY_ORGANIZATION_URIS refuses another organization (grant revoked, nothing stored)."""

    def with_allowlist(value: str) -> Services:
        settings = services.settings.model_copy(update={"calendly_organization_uris": value})
        return Services.build(settings, redis_client=services.redis)

    other = f"{sb.calendly_api_url}/organizations/ANOTHERORGANIZATION"
    with sb.world.lock:
        before = set(sb.world.tokens.tokens)
    with web_process(with_allowlist(other)) as web, requests.Session() as browser:
        refused = connect_org(sb, web.url, browser)
    assert refused.status_code == 403
    assert "not one this closesync serves" in refused.text
    assert list(services.redis.scan_iter(f"{services.keys.prefix}:*")) == []
    with sb.world.lock:
        issued = [t for v, t in sb.world.tokens.tokens.items() if v not in before]
    assert issued
    assert all(t.revoked for t in issued)
    allowed = with_allowlist(f"{other}, {sb.world.calendly_org_uri}/ ")
    with web_process(allowed) as web, requests.Session() as browser:
        assert "Organization connected" in connect_org(sb, web.url, browser).text
    assert len(Organizations(services).credentials.refs()) == 1


def test_orgmode_waiting_grant_copied_to_another_close_user_is_refused(services: Services) -> None:
    """A waiting Close user's sealed grant written under another waiting user's key won't open."""
    room = WaitingRoom(services.redis, services.keys, services.box)
    for user in ("user_a", "user_b"):
        me = Me.model_validate({"id": user, "email": f"{user}@example.com"})
        room.wait(me, Grant(access_token=SecretStr(f"tok_of_{user}")))
    moved = services.redis.get(services.keys.waiting_close_grant("user_a"))
    services.redis.set(services.keys.waiting_close_grant("user_b"), moved)
    with pytest.raises(EncryptionError, match="sealed for another"):
        room.grant("user_b")
    grant = room.grant("user_a")
    assert grant is not None
    assert grant.access_token.get_secret_value() == "tok_of_user_a"


def test_orgmode_close_user_reauthorizing_revokes_only_their_old_close_grant(
    sb: Sandbox, services: Services
) -> None:
    """A paired Close user authorizing again: the old Close grant is revoked, the shared kept."""
    one = sb.users[1]
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, one.email)
        [connection] = services.connections.list()
        old = services.connections.grants(connection.id)
        assert "Connected" in connect_close(sb, web.url, browser, one.email)
    new = services.connections.grants(connection.id)
    assert new.close != old.close
    assert new.calendly == old.calendly  # the organization's shared grant
    with sb.world.lock:
        tokens = sb.world.tokens.tokens
        assert tokens[old.close.access_token.get_secret_value()].revoked
        assert not tokens[new.close.access_token.get_secret_value()].revoked
        assert not tokens[old.calendly.access_token.get_secret_value()].revoked
