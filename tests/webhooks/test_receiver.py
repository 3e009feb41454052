"""The webhook receiver over loopback HTTP: what each delivery is answered, what it changes, and
whom it asks to sync (real Redis, a real Celery app publishing to it, no worker)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import redis
import requests

from closesync.core.plan import LinkRecord
from closesync.core.webhook_signature import signature_header
from closesync.web.webhooks import WebhookReceiver
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from tests.webhook_helpers import event_body, serving, signed
from tests.webhooks.conftest import APP_KEY, C1, C2, C3, C4, OWN_KEY, World, build_world

UPDATED = "event_type.updated"


def _changed(world: World) -> dict[str, object]:
    """What a refused delivery must leave untouched: the queue, markers, notes, replay marks."""
    client, keys = world.services.redis, world.services.keys
    return {
        "queued": world.asked(),
        "markers": sorted(client.scan_iter(keys.queued("*"))),
        "notes": sorted(client.scan_iter(keys.webhook_last_delivery("*"))),
        "replays": sorted(client.scan_iter(keys.webhook_delivery("*"))),
    }


def test_receiver_valid_delivery_notes_it_and_asks_the_owner_with_a_debounce(
    world: World,
) -> None:
    """A signed delivery is noted and schedules one sync of its owner's connection a debounce
    later in Redis, with one drain due then; the sync is published when due, with no countdown."""
    body = event_body(UPDATED, "ET1", "U1")
    before = time.time()
    with serving(world.receiver) as server:
        answer = server.post(world.user_sub.key, body, signed(OWN_KEY, body))
    assert answer.status_code == 200
    assert answer.json() == {"status": "accepted", "asked": 1}
    debounce = world.services.settings.webhook_debounce_seconds
    [(conn_id, due)] = world.scheduled().items()
    assert conn_id == C1
    assert before + debounce <= due <= time.time() + debounce
    assert world.queued() == []  # nothing a worker would hold for a countdown
    [drain_task] = world.fanout_queue()
    assert drain_task.task == names.DRAIN_SCHEDULE
    assert drain_task.headers["eta"] is not None  # the one countdown: the drain, due with it
    assert world.drain(due - 0.2) == 0
    assert world.drain(due) == 1
    [message] = world.queued()
    assert message.args == [C1, "webhook"]
    assert message.headers["eta"] is None
    noted = world.services.webhooks.last_delivery(world.user_sub.key)
    assert noted is not None
    assert abs(noted - world.services.state.now()) < 5


def _bad_signature_cases(body: bytes) -> dict[str, dict[str, str]]:
    now = int(time.time())
    return {
        "tampered body": {
            "Calendly-Webhook-Signature": signature_header(OWN_KEY.encode(), now, body + b" ")
        },
        "wrong key": {"Calendly-Webhook-Signature": signature_header(b"not-it", now, body)},
        "stale": {
            "Calendly-Webhook-Signature": signature_header(OWN_KEY.encode(), now - 600, body)
        },
        "future": {
            "Calendly-Webhook-Signature": signature_header(OWN_KEY.encode(), now + 600, body)
        },
    }


@pytest.mark.parametrize("case", ["tampered body", "wrong key", "stale", "future"])
def test_receiver_bad_signature_or_time_is_401_and_changes_nothing(world: World, case: str) -> None:
    """A wrong signature, or a timestamp outside the tolerance, is refused and changes nothing."""
    body = event_body(UPDATED, "ET1", "U1")
    before = _changed(world)
    with serving(world.receiver) as server:
        answer = server.post(world.user_sub.key, body, _bad_signature_cases(body)[case])
    assert answer.status_code == 401
    assert _changed(world) == before


@pytest.mark.parametrize(
    ("header", "problem"),
    [(None, "missing"), ("t=1", "no v1"), ("v1=abc", "exactly one t")],
)
def test_receiver_missing_or_malformed_signature_is_400(
    world: World, header: str | None, problem: str
) -> None:
    """No header, or one that cannot be read, is a 400 naming the problem; nothing changes."""
    body = event_body(UPDATED, "ET1", "U1")
    headers = {} if header is None else {"Calendly-Webhook-Signature": header}
    before = _changed(world)
    with serving(world.receiver) as server:
        answer = server.post(world.user_sub.key, body, headers)
    assert answer.status_code == 400
    assert problem in answer.json()["error"]
    assert _changed(world) == before


@pytest.mark.parametrize("key", ["unknownkey123456", "../../etc", "x"])
def test_receiver_unknown_key_is_404(world: World, key: str) -> None:
    """A callback key closesync owns no subscription for is a 404 (never 410)."""
    body = event_body(UPDATED, "ET1", "U1")
    with serving(world.receiver) as server:
        answer = server.post(key, body, signed(OWN_KEY, body))
    assert answer.status_code == 404
    assert world.asked() == []


def test_receiver_body_over_the_cap_is_413_unread(world: World) -> None:
    """A body longer than WEBHOOK_MAX_BODY_BYTES is refused before it is read or verified."""
    cap = world.services.settings.webhook_max_body_bytes
    body = event_body(UPDATED, "ET1", "U1", description_plain="x" * cap)
    with serving(world.receiver) as server:
        answer = server.post(world.user_sub.key, body, signed(OWN_KEY, body))
    assert answer.status_code == 413
    assert world.receiver.receive(world.user_sub.key, signed(OWN_KEY, body), body).status == 413
    assert world.asked() == []


def test_receiver_replay_is_200_and_does_nothing(world: World) -> None:
    """The same signed request again is answered 200 and asks nothing, even once the first
    ask's task has started (its marker gone)."""
    body = event_body(UPDATED, "ET1", "U1")
    headers = signed(OWN_KEY, body)
    with serving(world.receiver) as server:
        first = server.post(world.user_sub.key, body, headers)
        assert world.asked() == [C1]
        [message] = world.queued()
        world.services.state.sync_started(C1, message.task_id)
        again = server.post(world.user_sub.key, body, headers)
    assert first.json()["status"] == "accepted"
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate"}
    assert world.asked() == [C1]
    ttl = world.services.redis.ttl(next(iter(_changed(world)["replays"])))  # type: ignore[call-overload]
    tolerance = world.services.settings.webhook_tolerance_seconds
    assert 2 * tolerance < ttl <= 2 * tolerance + 60


def test_receiver_unknown_event_is_acknowledged_and_ignored(world: World) -> None:
    """An event other than event_type.* is 200, noted, and asks nothing."""
    body = b'{"event": "invitee.created", "payload": {"uri": "x"}}'
    with serving(world.receiver) as server:
        answer = server.post(world.user_sub.key, body, signed(OWN_KEY, body))
    assert answer.json() == {"status": "ignored"}
    assert world.asked() == []
    assert world.services.webhooks.last_delivery(world.user_sub.key) is not None


@pytest.mark.parametrize(
    "payload",
    [
        b'{"name": "no uri"}',
        b'{"uri": "https://api.calendly.com/event_types/X", "profile": {"owner": {"a": 1}}}',
    ],
    ids=["missing uri", "owner an object"],
)
def test_receiver_signed_body_that_is_no_delivery_is_2xx_warned_and_left_to_the_poll(
    world: World, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    """A validly signed body that does not parse is answered 200 (a 4xx would be retried for a
    day, then Calendly disables the subscription), warned of without its body, and asks only
    a user subscription's own connection; the organization's asks nobody."""
    body = b'{"event": "event_type.created", "payload": ' + payload + b"}"
    with caplog.at_level(logging.WARNING), serving(world.receiver) as server:
        own = server.post(world.user_sub.key, body, signed(OWN_KEY, body))
        org = server.post(world.org_sub.key, body, signed(APP_KEY, body))
    assert (own.status_code, own.json()) == (200, {"status": "unreadable", "asked": 1})
    assert (org.status_code, org.json()) == (200, {"status": "unreadable", "asked": 0})
    assert world.asked() == [C1]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert all("unreadable" in r.getMessage() for r in warned)
    text = " ".join(f"{r.getMessage()} {r.__dict__}" for r in warned)
    for leaked in ("no uri", "event_types/X", world.user_sub.key, OWN_KEY):
        assert leaked not in text


def test_receiver_redis_down_is_503(world: World) -> None:
    """With Redis unreachable the receiver answers 503, which Calendly retries."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, decode_responses=True)
    services = Services.build(world.services.settings, redis_client=dead)
    receiver = WebhookReceiver(services, lambda ids: ids)
    body = event_body(UPDATED, "ET1", "U1")
    with serving(receiver) as server:
        answer = server.post(world.user_sub.key, body, signed(OWN_KEY, body))
    assert answer.status_code == 503


def test_receiver_without_the_application_key_is_500_naming_the_setting(
    redis_client: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An application-signed subscription without CALENDLY_WEBHOOK_SIGNING_KEY: a 5xx (Calendly
    retries) whose log line names the setting; nothing is asked."""
    for world in build_world(redis_url, calendly_webhook_signing_key=None):
        body = event_body(UPDATED, "ET1", "U1")
        with caplog.at_level(logging.ERROR), serving(world.receiver) as server:
            answer = server.post(world.org_sub.key, body, signed(APP_KEY, body))
        assert answer.status_code == 500
        assert "CALENDLY_WEBHOOK_SIGNING_KEY" in caplog.text
        assert world.asked() == []


def test_receiver_failed_ask_is_503_and_releases_the_delivery(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """An ask that fails (the broker down) is a 503, and the same delivery retried is taken."""
    from closesync.core.errors import StoreUnavailable

    calls: list[list[str]] = []

    def ask(ids: list[str]) -> list[str]:
        calls.append(ids)
        if len(calls) == 1:
            raise StoreUnavailable("the broker cannot be reached while enqueueing syncs")
        return ids

    for world in build_world(redis_url, ask=ask):
        body = event_body(UPDATED, "ET1", "U1")
        headers = signed(OWN_KEY, body)
        with serving(world.receiver) as server:
            first = server.post(world.user_sub.key, body, headers)
            retried = server.post(world.user_sub.key, body, headers)
        assert first.status_code == 503
        assert retried.json() == {"status": "accepted", "asked": 1}
        assert calls == [[C1], [C1]]


def test_receiver_never_answers_410_on_any_error_path(
    world: World, redis_url: str, redis_client: redis.Redis
) -> None:
    """Every refusal and failure path is answered, and none with 410 (which would make Calendly
    delete the subscription)."""
    body = event_body(UPDATED, "ET1", "U1")
    statuses: dict[str, int] = {}

    def boom(ids: list[str]) -> list[str]:
        raise RuntimeError("a bug")

    broken = WebhookReceiver(world.services, boom)
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    down = WebhookReceiver(Services.build(world.services.settings, redis_client=dead), boom)
    cases: dict[str, Callable[[], int]] = {
        "unknown key": lambda: (
            world.receiver.receive("nosuchkey1234", signed(OWN_KEY, body), body).status
        ),
        "too large": lambda: (
            world.receiver.receive(
                world.user_sub.key, {}, b"x" * (world.receiver.max_body_bytes + 1)
            ).status
        ),
        "no header": lambda: world.receiver.receive(world.user_sub.key, {}, body).status,
        "bad header": lambda: (
            world.receiver.receive(
                world.user_sub.key, {"calendly-webhook-signature": "t=x"}, body
            ).status
        ),
        "not a delivery": lambda: (
            world.receiver.receive(world.user_sub.key, signed(OWN_KEY, b"[]"), b"[]").status
        ),
        "redis down": lambda: down.receive(world.user_sub.key, signed(OWN_KEY, body), body).status,
        "bug": lambda: broken.receive(world.user_sub.key, signed(OWN_KEY, body), body).status,
    }
    for name, header in _bad_signature_cases(body).items():
        cases[name] = lambda header=header: (
            world.receiver.receive(  # type: ignore[misc]
                world.user_sub.key, header, body
            ).status
        )
    for name, case in cases.items():
        statuses[name] = case()
    assert 410 not in statuses.values()
    assert statuses == {
        "unknown key": 404,
        "too large": 413,
        "no header": 400,
        "bad header": 400,
        "not a delivery": 200,
        "redis down": 503,
        "bug": 500,
        "tampered body": 401,
        "wrong key": 401,
        "stale": 401,
        "future": 401,
    }


def _hold(world: World, conn_id: str, user: str, event_type: str) -> None:
    """Record that `conn_id` holds a link of `event_type` (as a run that wrote it would)."""
    uri = f"https://api.calendly.com/event_types/{event_type}"
    world.services.state.record_write(
        conn_id, f"{user}:{event_type}", LinkRecord(fingerprint="fp", event_type_uri=uri)
    )


def test_receiver_team_type_syncs_every_connected_host_within_the_organization(
    world: World,
) -> None:
    """A team type's delivery asks its owner and every connection holding it that the
    organization subscription serves; a holder of another organization is not asked."""
    _hold(world, C2, "U2", "TEAM")
    _hold(world, C3, "U3", "TEAM")
    _hold(world, C4, "U4", "TEAM")
    body = event_body(UPDATED, "TEAM", "U1", team=True)
    with serving(world.receiver) as server:
        answer = server.post(world.org_sub.key, body, signed(APP_KEY, body))
    assert answer.json() == {"status": "accepted", "asked": 3}
    assert sorted(world.asked()) == [C1, C2, C3]


def test_receiver_new_team_type_asks_every_connection_the_subscription_serves(
    world: World,
) -> None:
    """A team type nobody holds yet: one fan-out task, which schedules every connection of the
    organization over the fan-out window, and no other."""
    body = event_body("event_type.created", "NEWTEAM", "U9", team=True)
    with serving(world.receiver) as server:
        server.post(world.org_sub.key, body, signed(APP_KEY, body))
    assert world.scheduled() == {}  # the request asked nobody itself
    assert world.run_fan_outs() == 3
    window = world.services.settings.webhook_fanout_window_seconds
    due = world.scheduled()
    assert sorted(due) == [C1, C2, C3]
    assert max(due.values()) - time.time() <= window + 1
    assert sorted(world.asked()) == [C1, C2, C3]


def test_receiver_user_subscription_never_syncs_another_connection(world: World) -> None:
    """A delivery to C1's own URL naming another user's type asks nobody; a team type held by
    others asks only C1."""
    solo = event_body(UPDATED, "ET2", "U2")
    _hold(world, C2, "U2", "TEAM")
    team = event_body(UPDATED, "TEAM", "U2", team=True)
    with serving(world.receiver) as server:
        first = server.post(world.user_sub.key, solo, signed(OWN_KEY, solo))
        second = server.post(world.user_sub.key, team, signed(OWN_KEY, team))
    assert first.json() == {"status": "accepted", "asked": 0}
    assert second.json() == {"status": "accepted", "asked": 1}
    assert world.asked() == [C1]


def test_receiver_burst_of_deliveries_makes_one_queued_sync(world: World) -> None:
    """Thirty deliveries about one user's types within the debounce make one schedule entry,
    due one debounce after the first, one drain task, and, drained, one sync task."""
    first = time.time()
    with serving(world.receiver) as server, requests.Session() as session:
        for n in range(30):
            body = event_body(UPDATED, f"ET{n % 3}", "U1", name=f"rename {n}")
            answer = server.post(world.user_sub.key, body, signed(OWN_KEY, body), session)
            assert answer.json()["status"] == "accepted"
    debounce = world.services.settings.webhook_debounce_seconds
    [(conn_id, due)] = world.scheduled().items()
    assert conn_id == C1
    assert due - first < debounce + 0.5  # kept from the first delivery (ZADD LT)
    assert len(world.fanout_queue()) == 1  # one drain for the whole burst
    assert world.queued() == []
    assert world.drain(due) == 1
    assert world.drain(due + 10) == 0
    assert world.asked() == [C1]


def test_receiver_keeps_every_key_out_of_logs_replies_and_redis(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither signing key appears in a log line, an answer or any Redis value."""
    body = event_body(UPDATED, "ET1", "U1")
    answers: list[str] = []
    with caplog.at_level(logging.DEBUG), serving(world.receiver) as server:
        for key, headers in (
            (world.user_sub.key, signed(OWN_KEY, body)),
            (world.org_sub.key, signed(APP_KEY, body)),
            (world.user_sub.key, signed("wrong", body)),
            (world.user_sub.key, {"Calendly-Webhook-Signature": f"t=1,v1={OWN_KEY}"}),
        ):
            answers.append(server.post(key, body, headers).text)
        # Redis down: the error logged names no key of Redis (they embed the callback key).
        dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
        down = WebhookReceiver(Services.build(world.services.settings, redis_client=dead), list)
        assert down.receive(world.user_sub.key, signed(OWN_KEY, body), body).status == 503
    client = world.services.redis
    stored = [str(client.dump(key)) for key in client.scan_iter(f"{world.services.keys.prefix}:*")]
    # closesync's own log lines (the test's HTTP client logs the URLs it calls).
    ours = "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith("closesync")
    )
    assert "webhook delivery" in ours
    for secret in (OWN_KEY, APP_KEY, world.user_sub.key, world.org_sub.key):
        assert secret not in ours
        assert not any(secret in answer for answer in answers)
    for secret in (OWN_KEY, APP_KEY):
        assert not any(secret in value for value in stored)


class _Asker:
    """An asker that fails its first ask (the broker down) and, before failing, lets the same
    delivery arrive again, as Calendly's retry or a duplicate send would mid-enqueue."""

    def __init__(self, again: Callable[[], int]) -> None:
        self.again, self.calls, self.answers = again, 0, list[int]()

    def __call__(self, ids: list[str]) -> list[str]:
        from closesync.core.errors import StoreUnavailable

        self.calls += 1
        if self.calls == 1:
            self.answers.append(self.again())
            raise StoreUnavailable("the broker cannot be reached while enqueueing syncs")
        return ids

    def organization(self, grant_ref: str, event_type_uuid: str) -> bool:
        return False


def test_receiver_duplicate_of_a_pending_delivery_is_503_so_the_hint_survives_a_failure(
    world: World,
) -> None:
    """The same delivery arriving while the first is still enqueueing is answered 503 (not
    "200 duplicate"): when the first then fails, Calendly's retry is taken and asks the sync."""
    body = event_body(UPDATED, "ET1", "U1")
    headers = signed(OWN_KEY, body)
    receiver: WebhookReceiver

    def again() -> int:
        return receiver.receive(world.user_sub.key, headers, body).status

    asker = _Asker(again)
    receiver = WebhookReceiver(world.services, asker)
    first = receiver.receive(world.user_sub.key, headers, body)
    assert (first.status, asker.answers) == (503, [503])
    retried = receiver.receive(world.user_sub.key, headers, body)
    assert (retried.status, retried.body) == (200, {"status": "accepted", "asked": 1})
    replay = receiver.receive(world.user_sub.key, headers, body)
    assert (replay.status, replay.body) == (200, {"status": "duplicate"})
    assert asker.calls == 2


def test_receiver_signing_key_sealed_for_another_subscription_logs_no_callback_key(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A signing key copied in Redis from another subscription does not open (EncryptionError),
    and neither that error in the log nor the answer names either callback key."""
    keys, client = world.services.keys, world.services.redis
    other = "otherSubscriptionKey_0123456789"
    sealed = client.get(keys.webhook_signing_key(world.user_sub.key))
    world.services.webhooks.save(world.user_sub.model_copy(update={"key": other}), None)
    client.set(keys.webhook_signing_key(other), str(sealed))
    body = event_body(UPDATED, "ET1", "U1")
    with caplog.at_level(logging.DEBUG):
        reply = world.receiver.receive(other, signed(OWN_KEY, body), body)
    assert reply.status == 500
    logged = "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith("closesync")
    )
    assert "cannot be opened" in logged
    assert "sealed for another owner" in logged
    for secret in (world.user_sub.key, other, OWN_KEY):
        assert secret not in logged
        assert secret not in str(reply.body)
