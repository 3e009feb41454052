"""Calendly's webhook deliveries: a queue of signed POSTs, sent by background threads.

A change to an event type made through the admin API (webhook_subscriptions.py decides which
subscriptions it goes to and builds each one's envelope `{"event", "created_at",
"created_by", "payload"}`) becomes one `Delivery` per subscription, its envelope serialised
once, so every retry sends the same bytes. The admin request only queues it; a small pool of
delivery threads (config `webhook_delivery_threads`), each with its own requests session,
sends it, so a slow or dead receiver never holds up the admin API. The deliveries of one
subscription go out one at a time, in queue order, a failed one's retries included: a retry
waits out its backoff at the head of its subscription's lane and nothing queued behind it
overtakes it (delivery_queue.py). Calendly documents that deliveries may arrive out of order;
the sandbox keeps serial mode exact on purpose, so that a test decides when they do (the
reorder and duplicate knobs below) instead of a retry's timing. Config
`webhook_serial_per_subscription` False (read when a delivery is queued) sends one
subscription's deliveries in parallel instead, as many at once as there are threads, to load a
receiver; different subscriptions' always go out in parallel.

As Calendly does (api-facts.md, Webhooks): each attempt is signed anew,
`Calendly-Webhook-Signature: t=<unix>,v1=<hex HMAC-SHA256(key, "{t}." + body)>`, with `t`
from the sandbox clock; 10 s connect / 15 s read timeouts (configurable); only a 2xx counts
and a redirect is not followed (a failure); a 410 deletes the subscription without retry.
A connection error on a kept-alive connection reused from an earlier delivery (the receiver
closed it meanwhile) is retried at once, once, on a new connection before it counts, as any
HTTP client pool does; on a new connection it counts at once.
A failure is retried after `backoff_delay` real seconds (the sandbox clock may be frozen, so
backoff runs on the monotonic clock; config `webhook_backoff_base`/`_cap`, small by default
so tests run fast, where Calendly retries for 24 h) until the subscription is disabled after
`webhook_disable_after` consecutive failures.

Knobs, to test a receiver against a misbehaving sender: `drop_next` (the next N deliveries
are never sent) and config `webhook_drop_rate` (a seeded fraction of them), `duplicate_next`
(the next N are sent twice), config `webhook_delay_seconds` (every delivery waits that long
before its first attempt), `reorder_batch` (hold the next N and then send them reversed;
setting it to 0 releases a batch still held) and `wrong_signature_next` (the next N attempts
are signed with a wrong key). Every attempt, and every drop or skip, is recorded for
`attempts()`, with `at` (the sandbox clock, which may be frozen) and `sent_at` (the monotonic
clock, to measure backoff gaps and throughput); `idle()` and `wait_idle()` say when nothing
is queued, held or in flight, so that tests await "all delivered" instead of sleeping. The
record never holds a callback URL or a key: an error is named by its exception class only
(requests' messages carry the URL).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random
import sys
import threading
import time
import traceback
from collections.abc import Hashable
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import requests

from closesync.sandbox.config import SandboxConfig
from closesync.sandbox.delivery_queue import LaneQueue
from closesync.sandbox.delivery_sessions import Connects, SocketRegistry, tracking_session

SIGNATURE_HEADER = "Calendly-Webhook-Signature"
Outcome = Literal["delivered", "failed", "gone"]
Recorded = Literal["delivered", "failed", "gone", "dropped", "skipped"]


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): base·2^(attempt-1), ≤ cap."""
    return float(min(cap, base * 2.0 ** (attempt - 1)))


def sign(key: str, timestamp: int, body: bytes) -> str:
    """The Calendly-Webhook-Signature value of `body` sent at `timestamp`."""
    digest = hmac.new(key.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


class DeliverySource(Protocol):
    """What the deliverer needs of the World."""

    config: SandboxConfig

    def now(self) -> float: ...

    def delivery_target(self, uuid: str) -> tuple[str, str] | None: ...

    def delivery_result(self, uuid: str, outcome: Outcome) -> bool: ...


@dataclass
class Delivery:
    """One envelope on its way to one subscription."""

    id: int
    subscription: str  # uuid
    subscription_uri: str
    event: str
    event_type: str  # uri
    body: bytes
    lane: Hashable = ""  # the subscription uuid, or (uuid, id) in parallel mode
    attempt: int = 0


@dataclass
class Knobs:
    """Counters of the delivery knobs; each is spent one delivery (or attempt) at a time."""

    drop_next: int = 0
    duplicate_next: int = 0
    wrong_signature_next: int = 0
    reorder_batch: int = 0


class Deliverer:
    """The delivery queue and its threads; start() them, stop() ends them promptly."""

    def __init__(self, source: DeliverySource, seed: int) -> None:
        self._source = source
        self._cond = threading.Condition()
        # Due on the monotonic clock, one lane per subscription (delivery_queue.py).
        self._queue: LaneQueue[Delivery] = LaneQueue()
        self._held: list[Delivery] = []
        self._attempts: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []
        self._sockets = SocketRegistry()
        self._stopping = False
        self._ids = itertools.count(1)
        self._rng = random.Random(f"webhooks-{seed}")
        self.knobs = Knobs()

    def start(self, threads: int) -> None:
        """Start `threads` delivery threads."""
        for n in range(max(threads, 1)):
            thread = threading.Thread(target=self._run, name=f"webhook-delivery-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 2.0) -> None:
        """Send nothing more, cut attempts in flight (their results are dropped) and wait up
        to `timeout` s in all for the threads to end."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._sockets.close_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0))

    def alive(self) -> int:
        """How many delivery threads are still running."""
        return sum(thread.is_alive() for thread in self._threads)

    # queueing -------------------------------------------------------------------------------

    def enqueue(
        self, targets: list[tuple[str, str, dict[str, Any]]], event: str, event_type: str
    ) -> None:
        """Queue each (subscription uuid, uri, envelope) in `targets`, knobs applied."""
        config = self._source.config
        with self._cond:
            for uuid, uri, envelope in targets:
                body = json.dumps(envelope).encode("utf-8")
                delivery = self._delivery(uuid, uri, event, event_type, body)
                if self._take("drop_next") or self._rng.random() < config.webhook_drop_rate:
                    self._record(delivery, "dropped", error="dropped by the drop knob")
                    continue
                copies = [delivery]
                if self._take("duplicate_next"):
                    copies.append(self._delivery(uuid, uri, event, event_type, body))
                for copy in copies:
                    if self.knobs.reorder_batch > 0:
                        self._held.append(copy)
                    else:
                        self._schedule(copy, config.webhook_delay_seconds)
            if 0 < self.knobs.reorder_batch <= len(self._held):
                self.knobs.reorder_batch = 0
                self._release_held()
            self._cond.notify_all()

    def _take(self, knob: str) -> bool:
        """Spend one unit of a counter knob; True if there was one (call with _cond held)."""
        left = getattr(self.knobs, knob)
        if left > 0:
            setattr(self.knobs, knob, left - 1)
        return bool(left > 0)

    def _delivery(self, uuid: str, uri: str, event: str, event_type: str, body: bytes) -> Delivery:
        delivery = Delivery(next(self._ids), uuid, uri, event, event_type, body)
        serial = self._source.config.webhook_serial_per_subscription
        delivery.lane = uuid if serial else (uuid, delivery.id)
        return delivery

    def _schedule(self, delivery: Delivery, delay: float) -> None:
        self._queue.push(delivery.lane, time.monotonic() + delay, delivery)

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for delivery in reversed(held):
            self._schedule(delivery, self._source.config.webhook_delay_seconds)

    def set_knobs(self, **changes: int) -> Knobs:
        """Set counter knobs (fields of Knobs); reorder_batch 0 releases a held batch."""
        check_knobs(changes)  # all of them first: a 400 must leave nothing changed
        with self._cond:
            for name, value in changes.items():
                setattr(self.knobs, name, value)
            if self.knobs.reorder_batch == 0 or self.knobs.reorder_batch <= len(self._held):
                self.knobs.reorder_batch = 0
                self._release_held()
            self._cond.notify_all()
            return Knobs(**vars(self.knobs))

    # state for tests and benchmarks -----------------------------------------------------------

    def attempts(self) -> list[dict[str, Any]]:
        """Every attempt so far (and every drop and skip), oldest first."""
        with self._cond:
            return [dict(a) for a in self._attempts]

    def clear_attempts(self) -> None:
        """Forget the recorded attempts."""
        with self._cond:
            self._attempts.clear()

    def _idle(self) -> bool:
        return self._queue.empty() and not self._held

    def idle(self) -> dict[str, Any]:
        """Whether nothing is queued (retries waiting their backoff included), held by the
        reorder knob or in flight; with the counts of each."""
        with self._cond:
            return {
                "idle": self._idle(),
                "queued": len(self._queue),
                "held": len(self._held),
                "in_flight": self._queue.in_flight(),
            }

    def wait_idle(self, timeout: float) -> bool:
        """Wait until idle (True) or `timeout` seconds pass or stop() is called (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or self._idle(), timeout)
            return self._idle()

    def _record(
        self,
        delivery: Delivery,
        outcome: Recorded,
        status: int | None = None,
        error: str | None = None,
        signature: str = "valid",
        sent_at: float | None = None,
    ) -> None:
        entry = {
            "delivery": delivery.id,
            "subscription": delivery.subscription_uri,
            "event": delivery.event,
            "event_type": delivery.event_type,
            "attempt": max(delivery.attempt, 1),
            "at": self._source.now(),
            # Monotonic seconds the attempt was sent (recorded, for a drop or skip).
            "sent_at": time.monotonic() if sent_at is None else sent_at,
            "outcome": outcome,
            "status": status,
            "error": error,
            "signature": signature,
        }
        with self._cond:
            self._attempts.append(entry)

    # sending ----------------------------------------------------------------------------------

    def _run(self) -> None:
        connects = Connects()
        with tracking_session(self._sockets, connects) as session:
            while True:
                delivery = self._next()
                if delivery is None:
                    return
                retry_at: float | None = None
                try:
                    retry_at = self._attempt(session, connects, delivery)
                except Exception:  # a sandbox bug must show, not end the thread silently
                    traceback.print_exc(file=sys.stderr)
                finally:
                    with self._cond:
                        self._queue.done(delivery.lane, retry_at, delivery)
                        self._cond.notify_all()

    def _next(self) -> Delivery | None:
        """The next due delivery of a lane not in flight; None once stopping."""
        with self._cond:
            while not self._stopping:
                taken, wait = self._queue.take(time.monotonic())
                if taken is not None:
                    return taken[1]
                self._cond.wait(wait)
            return None

    def _attempt(
        self, session: requests.Session, connects: Connects, delivery: Delivery
    ) -> float | None:
        """Send one attempt; the monotonic time to retry it at, or None when it is done."""
        source, config = self._source, self._source.config
        delivery.attempt += 1
        target = source.delivery_target(delivery.subscription)
        if target is None:
            self._record(delivery, "skipped", error="not sent: the subscription is not active")
            return None
        url, key = target
        with self._cond:
            if self._stopping:  # stop() may have come while delivery_target ran
                return None
            wrong = self._take("wrong_signature_next")
        timestamp = int(source.now())
        signature = sign(key + "-not-the-key" if wrong else key, timestamp, delivery.body)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Calendly-Webhooks (closesync sandbox)",
            SIGNATURE_HEADER: signature,
        }
        status: int | None = None
        error: str | None = None
        sent_at = time.monotonic()
        for tries in (1, 2):
            opened = connects.count
            try:
                response = session.post(
                    url,
                    data=delivery.body,
                    headers=headers,
                    timeout=(config.webhook_connect_timeout, config.webhook_read_timeout),
                    allow_redirects=False,
                )
                status = response.status_code
                response.close()
                break
            except requests.ConnectionError as exc:
                error = type(exc).__name__
                reused = connects.count == opened
                if not reused or tries == 2 or self._stopping:
                    break
            except requests.RequestException as exc:
                error = type(exc).__name__
                break
        if self._stopping:
            return None
        error = None if status is not None else error
        outcome: Outcome
        if status is not None and 200 <= status < 300:
            outcome = "delivered"
        elif status == 410:
            outcome = "gone"
        else:
            outcome = "failed"
        retry = source.delivery_result(delivery.subscription, outcome)
        self._record(delivery, outcome, status, error, "wrong" if wrong else "valid", sent_at)
        if not retry:
            return None
        delay = backoff_delay(
            delivery.attempt, config.webhook_backoff_base, config.webhook_backoff_cap
        )
        return time.monotonic() + delay


def check_knobs(changes: dict[str, Any]) -> None:
    """Raise ValueError naming the first unknown counter knob or bad value in `changes`."""
    known = [f.name for f in fields(Knobs)]
    for name, value in changes.items():
        if name not in known:
            raise ValueError(f"unknown webhook knob {name}; known: {', '.join(known)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"webhook knob {name} must be a whole number >= 0")
