"""The receiver under load over loopback: 200 deliveries at once are each answered well within
Calendly's deadline and none is lost; one at a time each takes a few milliseconds."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.store.test_state import connection, grants
from tests.webhook_helpers import event_body, serving, signed
from tests.webhooks.conftest import APP_KEY, OWN_KEY, World

# Calendly gives a delivery 10 s to connect and 15 s to answer; the receiver must stay far below.
DEADLINE_SECONDS = 5.0
# What one delivery may take on its own (the figure): Redis round trips and a publish.
ONE_DELIVERY_SECONDS = 0.1


def _members(world: World, count: int) -> dict[str, str]:
    """`count` more connections of organization ORG1: Calendly user uuid -> connection id."""
    made = {}
    for n in range(count):
        conn_id, user = f"conn_1000000000{n:02d}", f"W{n:02d}"
        record = connection(
            conn_id,
            close_user_id=f"user_{user}",
            calendly_user_uri=f"https://api.calendly.com/users/{user}",
            calendly_grant_ref="ORG1",
        )
        world.services.connections.save(record, grants())
        made[user] = conn_id
    return made


def test_receiver_200_concurrent_deliveries_answered_in_time_none_lost(world: World) -> None:
    """200 deliveries posted at once (4 for each of 50 connections) are all accepted within the
    deadline, and every connection is asked exactly once: one queued sync each."""
    members = _members(world, 50)
    deliveries = [
        event_body("event_type.updated", f"ET-{user}-{n}", user, name=f"v{n}")
        for user in members
        for n in range(4)
    ]
    start = threading.Barrier(len(deliveries))
    with serving(world.receiver) as server:

        def post(body: bytes) -> tuple[int, str, float]:
            headers = signed(APP_KEY, body)
            start.wait()
            began = time.perf_counter()
            answer = server.post(world.org_sub.key, body, headers)
            return answer.status_code, answer.json()["status"], time.perf_counter() - began

        with ThreadPoolExecutor(max_workers=len(deliveries)) as pool:
            results = list(pool.map(post, deliveries))
    took = sorted(seconds for _, _, seconds in results)
    print(
        f"\n200 concurrent deliveries: p50 {took[99] * 1000:.0f} ms, "
        f"p95 {took[189] * 1000:.0f} ms, max {took[-1] * 1000:.0f} ms"
    )
    assert [(status, what) for status, what, _ in results] == [(200, "accepted")] * 200
    assert took[-1] < DEADLINE_SECONDS
    asked = world.asked()
    assert sorted(asked) == sorted(members.values())  # each once: the marker coalesced the rest


def test_receiver_one_delivery_at_a_time_takes_milliseconds(world: World) -> None:
    """Deliveries one after another (a keep-alive connection, as Calendly's) take well under
    100 ms each: the receiver makes no API call."""
    took = []
    with serving(world.receiver) as server, requests.Session() as session:
        for n in range(40):
            body = event_body("event_type.updated", f"ET{n}", "U1", name=f"v{n}")
            headers = signed(OWN_KEY, body)
            began = time.perf_counter()
            answer = server.post(world.user_sub.key, body, headers, session)
            took.append(time.perf_counter() - began)
            assert answer.status_code == 200
    ordered = sorted(took)
    print(
        f"\none at a time: p50 {statistics.median(took) * 1000:.1f} ms, "
        f"p95 {ordered[37] * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )
    assert statistics.median(took) < ONE_DELIVERY_SECONDS
