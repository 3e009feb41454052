"""The delivery queue's order and its edges: a retry stays ahead of its subscription's later
deliveries, deliveries queued behind a failure that disables or deletes the subscription are
skipped, stop() sends nothing once called, and a reused connection the receiver closed is not
a failure."""

from __future__ import annotations

import threading
import time

from closesync.sandbox import Sandbox, SandboxConfig
from closesync.sandbox.deliveries import Deliverer, Outcome
from tests.sandbox.conftest import admin
from tests.sandbox.webhook_helpers import (
    KEY,
    await_idle,
    create_type,
    deliveries_of,
    envelope_of,
    subscribe,
    uuid_of,
)
from tests.sandbox.webhook_receiver import Receiver


def _first_in_flight_second_queued(sandbox: Sandbox, receiver: Receiver) -> None:
    """Hold the receiver on a first delivery, then queue a second behind it."""
    member = sandbox.users[1]
    receiver.hold = True
    create_type(sandbox, member, name="first")
    receiver.wait_for(1)
    create_type(sandbox, member, name="second")
    state = admin(sandbox, "GET", "/webhooks/idle").json()
    assert (state["in_flight"], state["queued"]) == (1, 1)


def test_a_retry_is_not_overtaken_by_a_later_delivery(sandbox: Sandbox, receiver: Receiver) -> None:
    """The first delivery fails while a second waits: its retry (after the backoff) still goes
    before the second, so one subscription's deliveries arrive in order."""
    assert admin(sandbox, "PUT", "/config", json={"webhook_backoff_base": 0.3}).ok
    subscribe(sandbox, sandbox.users[1], receiver.url())
    receiver.answer(500)
    _first_in_flight_second_queued(sandbox, receiver)
    receiver.release()
    await_idle(sandbox)
    names = [envelope_of(r)["payload"]["name"] for r in receiver.wait_for(3)]
    assert names == ["first", "first", "second"]
    assert [(a["attempt"], a["outcome"]) for a in deliveries_of(sandbox)] == [
        (1, "failed"),
        (2, "delivered"),
        (1, "delivered"),
    ]


def test_a_delivery_queued_behind_the_failure_that_disables_is_skipped(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """webhook_disable_after=1: the first delivery's failure disables the subscription, and the
    delivery queued behind it is recorded as skipped, never sent."""
    assert admin(sandbox, "PUT", "/config", json={"webhook_disable_after": 1}).ok
    subscribe(sandbox, sandbox.users[1], receiver.url())
    receiver.answer(500)
    _first_in_flight_second_queued(sandbox, receiver)
    receiver.release()
    await_idle(sandbox)
    assert [a["outcome"] for a in deliveries_of(sandbox)] == ["failed", "skipped"]
    assert len(receiver.received) == 1
    assert admin(sandbox, "GET", "/webhooks/subscriptions").json()[0]["state"] == "disabled"


def test_a_delivery_queued_when_the_admin_disables_is_skipped(
    sandbox: Sandbox, receiver: Receiver
) -> None:
    """Disabling through the admin API while a delivery waits: that delivery is skipped."""
    sub = subscribe(sandbox, sandbox.users[1], receiver.url())
    _first_in_flight_second_queued(sandbox, receiver)
    path = f"/webhooks/subscriptions/{uuid_of(sub['uri'])}/disable"
    assert admin(sandbox, "POST", path).ok
    receiver.release()
    await_idle(sandbox)
    assert [a["outcome"] for a in deliveries_of(sandbox)] == ["delivered", "skipped"]
    assert len(receiver.received) == 1


def test_a_delivery_queued_behind_a_410_is_skipped(sandbox: Sandbox, receiver: Receiver) -> None:
    """A 410 deletes the subscription: the delivery queued behind it is skipped."""
    subscribe(sandbox, sandbox.users[1], receiver.url())
    receiver.answer(410)
    _first_in_flight_second_queued(sandbox, receiver)
    receiver.release()
    await_idle(sandbox)
    assert [a["outcome"] for a in deliveries_of(sandbox)] == ["gone", "skipped"]
    assert len(receiver.received) == 1
    assert admin(sandbox, "GET", "/webhooks/subscriptions").json() == []


def test_a_reused_connection_the_receiver_closed_is_retried_at_once(receiver: Receiver) -> None:
    """A kept-alive connection the receiver closes when the next delivery arrives on it is
    retried on a new connection within the same attempt: no failure, no backoff."""
    config = SandboxConfig(seed=1, freeze_clock=True, webhook_delivery_threads=1)
    with Sandbox.start(config) as sb:
        member = sb.users[1]
        receiver.reset_reused = True
        subscribe(sb, member, receiver.url())
        create_type(sb, member, name="first")
        await_idle(sb)
        create_type(sb, member, name="second")  # same thread, same kept-alive connection
        await_idle(sb)
        names = [envelope_of(r)["payload"]["name"] for r in receiver.wait_for(2)]
        assert names == ["first", "second"]
        assert [(a["attempt"], a["outcome"], a["error"]) for a in deliveries_of(sb)] == [
            (1, "delivered", None),
            (1, "delivered", None),
        ]


class _SlowTarget:
    """A DeliverySource whose delivery_target blocks until told to go on, to let stop() land
    between a thread taking a delivery and its POST."""

    def __init__(self, url: str) -> None:
        self.config = SandboxConfig()
        self.url = url
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def now(self) -> float:
        return 1_700_000_000.0

    def delivery_target(self, uuid: str) -> tuple[str, str] | None:
        self.entered.set()
        self.proceed.wait(5)
        return self.url, KEY

    def delivery_result(self, uuid: str, outcome: Outcome) -> bool:
        return False


def test_stop_while_a_thread_holds_a_delivery_sends_nothing(receiver: Receiver) -> None:
    """stop() called after a thread took a delivery but before it connected: the thread
    neither opens a connection nor sends, and ends."""
    source = _SlowTarget(receiver.url())
    deliverer = Deliverer(source, seed=0)
    deliverer.start(1)
    deliverer.enqueue([("sub", "uri", {"event": "event_type.created"})], "e", "et")
    assert source.entered.wait(5)
    deliverer.stop(timeout=0)  # cut and refuse, without waiting for the thread
    source.proceed.set()
    deliverer.stop(timeout=5)
    assert deliverer.alive() == 0
    assert receiver.received == []
    assert deliverer.attempts() == []


def test_stop_returns_while_many_threads_open_connections(receiver: Receiver) -> None:
    """stop() during a burst (threads adding sockets as it copies them) returns promptly with
    every thread ended."""
    source = _SlowTarget(receiver.url())
    source.proceed.set()
    deliverer = Deliverer(source, seed=0)
    deliverer.start(8)
    receiver.hold = True
    deliverer.enqueue(
        [(f"sub{n}", f"uri{n}", {"event": "event_type.created"}) for n in range(50)], "e", "et"
    )
    receiver.wait_for(8)
    started = time.monotonic()
    deliverer.stop(timeout=5)
    assert time.monotonic() - started < 3
    assert deliverer.alive() == 0
