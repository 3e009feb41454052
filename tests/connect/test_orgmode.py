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
from closesync.core.close_payloads import Me, Organization
from closesync.core.connection import Connection, Grant
from closesync.core.errors import EncryptionError, GrantRevoked
from closesync.core.retry import WaitBudget
from closesync.sandbox import Sandbox
from closesync.sandbox.connections import sandbox_connection
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


def test_orgmode_member_connected_by_another_close_user_is_refused_and_listed(
    sb: Sandbox,
    services: Services,
    redis_url: str,
    keys: Keys,
    secret_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """A Close user whose member another connection has is refused, stored nowhere, listed."""
    owner, member = sb.users[0], sb.users[1]
    with web_process(services) as web, requests.Session() as browser:
        # The owner's Close user connected personally with the member's Calendly account.
        sb.world.set_oauth_next("close", user_email=owner.email)
        sb.world.set_oauth_next("calendly", user_email=member.email)
        follow(browser, web.url + "/connect")
        [held] = services.connections.list()
        connect_org(sb, web.url, browser)
        with sb.world.lock:
            before = set(sb.world.tokens.tokens)
        sb.world.set_oauth_next("close", user_email=member.email)
        answer, _ = follow(browser, web.url + "/connect")
    assert answer is not None
    assert answer.status_code == 409
    assert f"connection {held.id}" in answer.text
    assert services.connections.list() == [held]
    assert Organizations(services).waiting_room.waiting() == []
    issued = [t for v, t in sb.world.tokens.tokens.items() if v not in before]
    assert issued
    assert all(t.api == "close" and t.revoked for t in issued)
    for name, value in sandbox_env(sb, redis_url, keys.prefix, secret_key).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--json"]) == 0
    [refused] = json.loads(capsys.readouterr().out)["unmatched"]["refused"]
    assert (refused["close_user_id"], refused["connection_id"]) == (member.close_user_id, held.id)
    assert main(["status"]) == 0
    assert f"refused pairing: Close user {member.email}" in capsys.readouterr().out


def test_orgmode_waiting_user_whose_member_is_taken_keeps_waiting_unpaired(
    sb: Sandbox, services: Services
) -> None:
    """The daily pass does not pair a waiting user with a member another connection has."""
    from closesync.worker.tasks import pair_organizations

    late = sb.users[3]
    set_close_email(sb, late.close_user_id, "later@example.com")
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, "later@example.com")
    newcomer = sb.world.create_user(email="later@example.com", name="Later Comer")
    # The newcomer's own Close user connects with their own token, as `connections add` does.
    held, grants = sandbox_connection(newcomer, time.time())
    services.connections.save(held, grants)
    assert pair_organizations(services) == 0
    assert services.connections.list() == [held]
    orgs = Organizations(services)
    assert [w.close_user_id for w in orgs.waiting_room.waiting()] == [late.close_user_id]
    [refused] = orgs.unmatched()["refused"]
    assert (refused["close_user_id"], refused["connection_id"]) == (late.close_user_id, held.id)


def _status_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["status", "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_orgmode_refused_shared_grant_marks_the_organization_once_and_reconnect_revives_all(
    sb: Sandbox,
    services: Services,
    redis_url: str,
    keys: Keys,
    secret_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Calendly refusing the org grant marks it once, skips its users; reconnecting revives all."""
    for name, value in sandbox_env(sb, redis_url, keys.prefix, secret_key).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    engine = services.engine(wait_budget=5)
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, sb.users[1].email)
        connect_close(sb, web.url, browser, sb.users[2].email)
        members = services.connections.list()
        ref = members[0].calendly_grant_ref
        assert ref is not None
        shared = services.connections.shared_grant(ref)
        assert shared.refresh_token is not None
        sb.world.revoke_token(shared.refresh_token.get_secret_value())
        sb.world.expire_token(shared.access_token.get_secret_value())
        sb.world.reset_request_counts()
        failed, skipped = (engine.run(c.id) for c in members)
        assert (failed.outcome.value, failed.failure) == ("failed", "auth")
        assert skipped.outcome.value == "skipped"
        assert f"Calendly refused the organization credential {ref}" in skipped.errors[0]
        # One refresh was tried, by the first run; the second did not spend one.
        assert sb.world.request_counts().get("calendly POST /oauth/token") == 1
        assert [services.connections.get(c.id).state for c in members] == ["active", "active"]
        status = _status_json(capsys)
        assert [(r["state"], ref in r["state_reason"]) for r in status["connections"]] == [
            ("needs_reauth", True),
            ("needs_reauth", True),
        ]
        [org] = status["organizations"]
        assert (org["ref"], org["state"]) == (ref, "needs_reauth")
        assert "connect --organization" in org["state_reason"]
        connect_org(sb, web.url, browser)
    assert [engine.run(c.id).outcome.value for c in members] == ["ok", "ok"]
    status = _status_json(capsys)
    assert [r["state"] for r in status["connections"]] == ["active", "active"]
    assert [o["state"] for o in status["organizations"]] == ["active"]


def test_orgmode_refused_close_grant_marks_only_its_connection_naming_close(
    sb: Sandbox, services: Services
) -> None:
    """A refused Close grant marks its own connection (reason names Close); the org is untouched."""
    engine = services.engine(wait_budget=5)
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, sb.users[1].email)
        connect_close(sb, web.url, browser, sb.users[2].email)
    refused, other = services.connections.list()
    close = services.connections.grants(refused.id).close
    assert close.refresh_token is not None
    sb.world.revoke_token(close.refresh_token.get_secret_value())
    sb.world.expire_token(close.access_token.get_secret_value())
    report = engine.run(refused.id)
    assert (report.outcome.value, report.failure) == ("failed", "auth")
    marked = services.connections.get(refused.id)
    assert marked.state == "needs_reauth"
    assert (marked.state_reason or "").startswith("Close refused this connection's own Close grant")
    assert refused.calendly_grant_ref is not None
    assert services.connections.shared_refused(refused.calendly_grant_ref) is None
    assert engine.run(other.id).outcome.value == "ok"
    assert services.connections.get(other.id).state == "active"


def set_close_organization(sb: Sandbox, close_user_id: str, organization_id: str) -> None:
    with sb.world.lock:
        sb.world.close_users[close_user_id].organization_id = organization_id


def test_orgmode_connect_binds_the_admins_close_organization_keeping_no_close_grant(
    sb: Sandbox, services: Services
) -> None:
    """The organization flow authorizes Close first; the credential is bound to that Close org."""
    with sb.world.lock:
        before = set(sb.world.tokens.tokens)
    with web_process(services) as web, requests.Session() as browser:
        assert "Organization connected" in connect_org(sb, web.url, browser).text
    orgs = Organizations(services)
    [ref] = orgs.credentials.refs()
    info = orgs.credentials.info(ref)
    assert info is not None
    assert info["close_organization_id"] == sb.world.close_org_id
    assert info["close_authorized_by"] == sb.users[0].close_user_id
    assert services.connections.list() == []
    assert orgs.waiting_room.waiting() == []
    issued = [t for v, t in sb.world.tokens.tokens.items() if v not in before]
    close = [t for t in issued if t.api == "close"]
    assert sorted(t.kind for t in close) == ["access", "refresh"]
    assert all(t.revoked for t in close)  # only the admin's identity was needed


def test_orgmode_close_user_of_another_close_organization_is_never_paired(
    sb: Sandbox, services: Services
) -> None:
    """A Close user of another Close org is never paired with a member, whatever their email."""
    from closesync.worker.tasks import pair_organizations

    colleague, foreign = sb.users[1], sb.users[2]
    set_close_organization(sb, foreign.close_user_id, "orga_foreign")
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        sb.world.set_oauth_next("close", user_email=foreign.email)
        answer, url = follow(browser, web.url + "/connect", stop_before=sb.calendly_auth_url)
        # Not paired by email: the personal flow goes on to authorize their own Calendly.
        assert answer is None
        assert url.startswith(sb.calendly_auth_url)
        assert services.connections.list() == []
        # A user of that organization already waiting (with the member's email) stays waiting.
        me = Me(
            id=foreign.close_user_id,
            email=foreign.email.upper(),
            organizations=[Organization(id="orga_foreign")],
        )
        grant = Grant(access_token=SecretStr(foreign.close_access_token))
        Organizations(services).waiting_room.wait(me, grant)
        assert pair_organizations(services) == 0
        assert services.connections.list() == []
        assert "Connected" in connect_close(sb, web.url, browser, colleague.email)
    [connection] = services.connections.list()
    assert connection.close_user_id == colleague.close_user_id


def test_orgmode_credential_stored_before_binding_pairs_nobody_until_reconnected(
    sb: Sandbox,
    services: Services,
    redis_url: str,
    keys: Keys,
    secret_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """A credential with no Close organization (older closesync) pairs nobody; status says so."""
    for name, value in sandbox_env(sb, redis_url, keys.prefix, secret_key).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        [ref] = Organizations(services).credentials.refs()
        info = json.loads(services.redis.get(services.keys.calendly_org(ref)) or "{}")
        unbound = {k: v for k, v in info.items() if not k.startswith("close_")}
        services.redis.set(services.keys.calendly_org(ref), json.dumps(unbound))
        sb.world.set_oauth_next("close", user_email=sb.users[1].email)
        answer, _ = follow(browser, web.url + "/connect", stop_before=sb.calendly_auth_url)
        assert answer is None  # on to their own Calendly, not paired by email
        assert main(["status"]) == 0
        assert f"Calendly organization {ref} is bound to no Close organization" in (
            capsys.readouterr().out
        )
        connect_org(sb, web.url, browser)
        assert "Connected" in connect_close(sb, web.url, browser, sb.users[1].email)
    assert [c.close_user_id for c in services.connections.list()] == [sb.users[1].close_user_id]


def test_orgmode_reconnect_from_another_close_organization_is_refused_while_in_use(
    sb: Sandbox, services: Services
) -> None:
    """An admin of another Close org cannot rebind a credential that connections use."""
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, sb.users[1].email)
        [ref] = Organizations(services).credentials.refs()
        kept = services.connections.shared_grant(ref)
        set_close_organization(sb, sb.users[0].close_user_id, "orga_foreign")
        with sb.world.lock:
            before = set(sb.world.tokens.tokens)
        refused = connect_org(sb, web.url, browser)
    assert refused.status_code == 403
    assert "already connected for another Close organization" in refused.text
    assert Organizations(services).credentials.bound_to(ref) == sb.world.close_org_id
    assert services.connections.shared_grant(ref) == kept
    issued = [t for v, t in sb.world.tokens.tokens.items() if v not in before]
    assert {t.api for t in issued} == {"close", "calendly"}
    assert all(t.revoked for t in issued)


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
    admin = Me(id=sb.users[0].close_user_id, organizations=[Organization(id=sb.world.close_org_id)])
    try:
        with pytest.raises(OrganizationBusy):
            orgs.credentials.connect(
                sb.world.calendly_org_uri, "owner", None, old, close_admin=admin, wait_seconds=0
            )
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


def test_orgmode_close_refresh_of_expired_access_token_stores_the_rotated_grant(
    sb: Sandbox, services: Services
) -> None:
    """An org-mode connection's expired Close token is refreshed, stored, and keeps syncing."""
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, sb.users[1].email)
    [connection] = services.connections.list()
    assert connection.calendly_grant_ref is not None
    before = services.connections.grants(connection.id)
    sb.world.expire_token(before.close.access_token.get_secret_value())
    engine = services.engine(wait_budget=5)
    report = engine.run(connection.id)
    assert (report.outcome.value, report.errors) == ("ok", [])
    after = services.connections.grants(connection.id)
    # The refresh spent the old refresh token at Close: only the rotated grant is usable now.
    assert after.close.refresh_token != before.close.refresh_token
    assert after.calendly == before.calendly  # still the organization's shared grant
    assert services.connections.shared_grant(connection.calendly_grant_ref) == before.calendly
    sb.world.expire_token(after.close.access_token.get_secret_value())
    assert engine.run(connection.id).outcome.value == "ok"
    assert services.connections.get(connection.id).state == "active"


def test_orgmode_admin_and_users_of_several_close_orgs_bind_and_pair_by_the_tokens_org(
    sb: Sandbox, services: Services
) -> None:
    """The credential is bound to the org of the admin's token, and a user whose token is for
    that org pairs and is recorded under it, whatever /me/ lists first."""
    admin, user = sb.users[0], sb.users[1]
    for person in (admin, user):
        sb.world.join_close_organization(person.close_user_id, "orga_listed_first")
    with web_process(services) as web, requests.Session() as browser:
        assert "Organization connected" in connect_org(sb, web.url, browser).text
        assert "Connected" in connect_close(sb, web.url, browser, user.email)
    [ref] = Organizations(services).credentials.refs()
    assert Organizations(services).credentials.bound_to(ref) == sb.world.close_org_id
    [connection] = services.connections.list()
    assert connection.close_organization_id == sb.world.close_org_id
    assert connection.calendly_grant_ref == ref


def test_orgmode_reconnect_mid_run_refreshes_under_the_shared_lock_it_turned_to(
    sb: Sandbox, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run begun on a personal connection that becomes organization-mode refreshes the shared
    grant under the shared refresh lock, not the lock of the connection it started with."""
    user = sb.users[1]
    taken: list[str] = []
    real_lock = services.refresh_lock

    def recording(name: str) -> Any:
        taken.append(name)
        return real_lock(name)

    monkeypatch.setattr(services, "refresh_lock", recording)
    with web_process(services) as web, requests.Session() as browser:
        sb.world.set_oauth_next("close", user_email=user.email)
        sb.world.set_oauth_next("calendly", user_email=user.email)
        follow(browser, web.url + "/connect")  # a personal connection first
        [personal] = services.connections.list()
        assert personal.calendly_grant_ref is None
        clients = services.clients_for(personal, WaitBudget(5))  # a run starts
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, user.email)  # authorizes again: organization mode
    [shared] = services.connections.list()
    assert shared.calendly_grant_ref is not None
    shared_lock = grant_lock_name("calendly", shared_lock_key(shared.calendly_grant_ref))
    keeper = clients.calendly_tokens
    taken.clear()
    keeper.refresh(keeper.current())  # its revoked personal token: the shared one is picked up
    keeper.refresh(keeper.current())  # a real refresh of the shared grant
    assert taken == [shared_lock, shared_lock]
    assert keeper.refreshes == 1
    assert services.connections.shared_grant(shared.calendly_grant_ref).access_token == (
        services.connections.grants(shared.id).calendly.access_token
    )


def test_orgmode_reconnect_mid_run_then_refused_marks_the_shared_credential(
    sb: Sandbox, services: Services
) -> None:
    """A run that began personal and met the organization's refused grant marks that credential,
    not the connection (which an organization reconnect then revives)."""
    from closesync.sync.engine import SyncEngine
    from closesync.sync.parts import Clients

    user = sb.users[1]
    with web_process(services) as web, requests.Session() as browser:
        sb.world.set_oauth_next("close", user_email=user.email)
        sb.world.set_oauth_next("calendly", user_email=user.email)
        follow(browser, web.url + "/connect")
        [personal] = services.connections.list()

        def reconnected_mid_run(connection: Connection) -> Clients:
            clients = services.clients_for(connection, WaitBudget(5))
            connect_org(sb, web.url, browser)
            connect_close(sb, web.url, browser, user.email)
            ref = services.connections.get(connection.id).calendly_grant_ref
            assert ref is not None
            grant = services.connections.shared_grant(ref)
            assert grant.refresh_token is not None
            sb.world.revoke_token(grant.refresh_token.get_secret_value())
            sb.world.expire_token(grant.access_token.get_secret_value())
            return clients

        engine = SyncEngine(
            config=services.engine_config(),
            connections=services.connections,
            state=services.state,
            run_lock=services.run_lock,
            clients_for=reconnected_mid_run,
        )
        report = engine.run(personal.id)
    assert (report.outcome.value, report.failure) == ("failed", "auth")
    connection = services.connections.get(personal.id)
    assert connection.calendly_grant_ref is not None
    assert connection.state == "active"
    assert services.connections.shared_refused(connection.calendly_grant_ref) is not None


def _revoked(sb: Sandbox, grant: Grant) -> bool:
    with sb.world.lock:
        return sb.world.tokens.tokens[grant.access_token.get_secret_value()].revoked


def test_orgmode_waiting_close_user_authorizing_again_revokes_the_grant_replaced(
    sb: Sandbox, services: Services
) -> None:
    """A waiting Close user's earlier grant is revoked when they authorize again, whether they
    wait again or are paired now; the grant kept is never revoked."""
    late = sb.users[3]
    set_close_email(sb, late.close_user_id, "late@example.com")
    room = Organizations(services).waiting_room
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, "late@example.com")
        first = room.grant(late.close_user_id)
        connect_close(sb, web.url, browser, "late@example.com")  # waits again
        second = room.grant(late.close_user_id)
        assert first is not None
        assert second is not None
        assert _revoked(sb, first)
        assert not _revoked(sb, second)
        sb.world.create_user(email="late@example.com", name="Late Comer")
        assert "Connected" in connect_close(sb, web.url, browser, "late@example.com")
    [connection] = services.connections.list()
    assert room.grant(late.close_user_id) is None
    assert _revoked(sb, second)
    assert not _revoked(sb, services.connections.grants(connection.id).close)


def test_orgmode_reconnect_from_another_close_organization_is_refused_while_users_wait(
    sb: Sandbox, services: Services
) -> None:
    """An admin of another Close org cannot rebind a credential Close users still wait for."""
    late = sb.users[3]
    set_close_email(sb, late.close_user_id, "late@example.com")
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, "late@example.com")  # waits: no connection
        [ref] = Organizations(services).credentials.refs()
        set_close_organization(sb, sb.users[0].close_user_id, "orga_foreign")
        refused = connect_org(sb, web.url, browser)
    assert refused.status_code == 403
    assert "already connected for another Close organization" in refused.text
    assert Organizations(services).credentials.bound_to(ref) == sb.world.close_org_id


def test_orgmode_record_pointed_at_another_member_is_refused_at_run_start(
    sb: Sandbox, services: Services
) -> None:
    """A connection whose public record a Redis writer pointed at another member fails its run:
    the shared admin grant never reads that member's event types into this Close user."""
    one, two = sb.users[1], sb.users[2]
    with web_process(services) as web, requests.Session() as browser:
        connect_org(sb, web.url, browser)
        connect_close(sb, web.url, browser, one.email)
    [connection] = services.connections.list()
    moved = connection.model_copy(update={"calendly_user_uri": two.calendly_user_uri})
    services.redis.set(services.keys.conn(connection.id), moved.model_dump_json())
    report = services.engine(wait_budget=5).run(connection.id)
    assert report.outcome.value == "failed"
    assert "another Calendly user" in " ".join(report.errors)
    assert sb.world.close_links(one.close_user_id) == []
