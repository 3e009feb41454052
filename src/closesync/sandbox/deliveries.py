"""Calendly's webhook deliveries: a queue of signed POSTs, sent by background threads.

A change to an event type made through the admin API (webhook_subscriptions.py decides which
subscriptions it goes to and builds each one's envelope `{"event", "created_at",
"created_by", "payload"}`) becomes one `Delivery` per subscription, its envelope serialised
once, so every retry sends the same bytes. The admin request only queues it; a small pool of
delivery threads (config `webhook_delivery_threads`), each with its own requests session,
sends it, so a slow or dead receiver never holds up the admin API. The deliveries of one
subscription go out one at a time, in queue order (config `webhook_serial_per_subscription`;
False sends them in parallel, as many at once as there are threads, to load a receiver);
different subscriptions' go out in parallel.

As Calendly does (api-facts.md, Webhooks): each attempt is signed anew,
`Calendly-Webhook-Signature: t=<unix>,v1=<hex HMAC-SHA256(key, "{t}." + body)>`, with `t`
from the sandbox clock; 10 s connect / 15 s read timeouts (configurable); only a 2xx counts
and a redirect is not followed (a failure); a 410 deletes the subscription without retry.
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
`attempts()`; `idle()` and `wait_idle()` say when nothing is queued, held or in flight, so
that tests await "all delivered" instead of sleeping. The record never holds a callback URL
or a key: an error is named by its exception class only (requests' messages carry the URL).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import itertools
import json
import random
import socket
import sys
import threading
import time
import traceback
import weakref
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from closesync.sandbox.config import SandboxConfig

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


def _tracking_session(sockets: weakref.WeakSet[socket.socket]) -> requests.Session:
    """A requests session whose every socket lands in `sockets`, so that stop() can shut down
    one blocked in an attempt (a read may otherwise wait out its full timeout)."""

    class Connection(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            sockets.add(self.sock)

    class SecureConnection(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            sockets.add(self.sock)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = SecureConnection

    adapter = HTTPAdapter(max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not reroute loopback
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


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
        # (monotonic due time, sequence, delivery): the earliest due first, ties in queue order.
        self._due: list[tuple[float, int, Delivery]] = []
        self._held: list[Delivery] = []
        # Attempts in flight per subscription: with config webhook_serial_per_subscription its
        # next delivery waits for the one in flight.
        self._busy: Counter[str] = Counter()
        self._attempts: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._stopping = False
        self._ids = itertools.count(1)
        self._seq = itertools.count()
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
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)
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
                delivery = Delivery(next(self._ids), uuid, uri, event, event_type, body)
                if self._take("drop_next") or self._rng.random() < config.webhook_drop_rate:
                    self._record(delivery, "dropped", error="dropped by the drop knob")
                    continue
                copies = [delivery]
                if self._take("duplicate_next"):
                    copies.append(Delivery(next(self._ids), uuid, uri, event, event_type, body))
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

    def _schedule(self, delivery: Delivery, delay: float) -> None:
        heapq.heappush(self._due, (time.monotonic() + delay, next(self._seq), delivery))

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for delivery in reversed(held):
            self._schedule(delivery, self._source.config.webhook_delay_seconds)

    def set_knobs(self, **changes: int) -> Knobs:
        """Set counter knobs (fields of Knobs); reorder_batch 0 releases a held batch."""
        known = {f.name for f in fields(Knobs)}
        with self._cond:
            for name, value in changes.items():
                if name not in known:
                    raise ValueError(f"unknown webhook knob {name}; known: {', '.join(known)}")
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"webhook knob {name} must be a whole number >= 0")
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
        return not (self._due or self._held or self._busy)

    def idle(self) -> dict[str, Any]:
        """Whether nothing is queued (retries waiting their backoff included), held by the
        reorder knob or in flight; with the counts of each."""
        with self._cond:
            return {
                "idle": self._idle(),
                "queued": len(self._due),
                "held": len(self._held),
                "in_flight": self._busy.total(),
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
    ) -> None:
        entry = {
            "delivery": delivery.id,
            "subscription": delivery.subscription_uri,
            "event": delivery.event,
            "event_type": delivery.event_type,
            "attempt": max(delivery.attempt, 1),
            "at": self._source.now(),
            "outcome": outcome,
            "status": status,
            "error": error,
            "signature": signature,
        }
        with self._cond:
            self._attempts.append(entry)

    # sending ----------------------------------------------------------------------------------

    def _run(self) -> None:
        with _tracking_session(self._sockets) as session:
            while True:
                delivery = self._next()
                if delivery is None:
                    return
                try:
                    self._attempt(session, delivery)
                except Exception:  # a sandbox bug must show, not end the thread silently
                    traceback.print_exc(file=sys.stderr)
                finally:
                    with self._cond:
                        self._busy[delivery.subscription] -= 1
                        if self._busy[delivery.subscription] <= 0:
                            del self._busy[delivery.subscription]
                        self._cond.notify_all()

    def _next(self) -> Delivery | None:
        """The next due delivery of a subscription not in flight; None once stopping."""
        with self._cond:
            while not self._stopping:
                serial = self._source.config.webhook_serial_per_subscription
                now, wait = time.monotonic(), None
                waiting: list[tuple[float, int, Delivery]] = []
                found = None
                while self._due:
                    due = self._due[0][0]
                    if due > now:
                        wait = due - now
                        break
                    item = heapq.heappop(self._due)
                    if serial and item[2].subscription in self._busy:
                        waiting.append(item)
                        continue
                    found = item[2]
                    break
                for item in waiting:
                    heapq.heappush(self._due, item)
                if found is not None:
                    self._busy[found.subscription] += 1
                    return found
                self._cond.wait(wait)
            return None

    def _attempt(self, session: requests.Session, delivery: Delivery) -> None:
        source, config = self._source, self._source.config
        delivery.attempt += 1
        target = source.delivery_target(delivery.subscription)
        if target is None:
            self._record(delivery, "skipped", error="not sent: the subscription is not active")
            return
        url, key = target
        with self._cond:
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
        except requests.RequestException as exc:
            error = type(exc).__name__
        if self._stopping:
            return
        outcome: Outcome
        if status is not None and 200 <= status < 300:
            outcome = "delivered"
        elif status == 410:
            outcome = "gone"
        else:
            outcome = "failed"
        retry = source.delivery_result(delivery.subscription, outcome)
        self._record(delivery, outcome, status, error, "wrong" if wrong else "valid")
        if retry:
            delay = backoff_delay(
                delivery.attempt, config.webhook_backoff_base, config.webhook_backoff_cap
            )
            with self._cond:
                self._schedule(delivery, delay)
