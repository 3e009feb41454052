"""A deployment for the receiver tests: Services on the session's Redis, a Celery app publishing
to it (no worker: the tests read the queues and run the drain and fan-out tasks' code
themselves), four connections in two organizations and the subscriptions that serve them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from pydantic import SecretStr

from closesync.core.webhooks import Subscription, WebhookState, new_key
from closesync.settings import Settings
from closesync.store.secretbox import generate_key
from closesync.web.webhooks import SyncAsker, WebhookReceiver
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from closesync.worker.celery_app import FANOUT_QUEUE, SYNC_QUEUE, create_app
from closesync.worker.tasks import drain
from closesync.worker.webhook_asks import WEBHOOK, fan_out_team_type, webhook_asker
from tests._broker import Queued, queued
from tests.store.test_state import connection, grants

ORG_URI = "https://api.calendly.com/organizations/ORG1"
# The OAuth application's key, and the key closesync generated for the user subscription.
APP_KEY = "app-signing-key-4f1c9a7e"
OWN_KEY = "own-signing-key-b83d02aa"
# C1..C3 share the Calendly organization credential ORG1, C4 is of ORG2; C1 also has a user
# subscription of its own (as a connection with its own credential would).
CONNECTIONS = {
    "conn_000000000001": ("U1", "ORG1"),
    "conn_000000000002": ("U2", "ORG1"),
    "conn_000000000003": ("U3", "ORG1"),
    "conn_000000000004": ("U4", "ORG2"),
}
C1, C2, C3, C4 = sorted(CONNECTIONS)


@dataclass
class World:
    services: Services
    app: Celery
    receiver: WebhookReceiver
    user_sub: Subscription
    org_sub: Subscription

    def queued(self) -> list[Queued]:
        return queued(self.services.redis, self.services.settings.redis_prefix, SYNC_QUEUE)

    def fanout_queue(self) -> list[Queued]:
        return queued(self.services.redis, self.services.settings.redis_prefix, FANOUT_QUEUE)

    def scheduled(self) -> dict[str, float]:
        """The webhook schedule: connection id -> when its sync is due (epoch seconds)."""
        key = self.services.keys.schedule(WEBHOOK)
        return {
            str(m): float(s) for m, s in self.services.redis.zrange(key, 0, -1, withscores=True)
        }

    def drain(self, at: float) -> int:
        """Run the drain task's code as a worker would at time `at`: the syncs it published."""
        return drain(self.services, self.app, kind=WEBHOOK, slot=WEBHOOK, clock=lambda: at)

    def run_fan_outs(self) -> int:
        """Run every queued webhook fan-out task's code: the syncs they scheduled."""
        tasks = [m for m in self.fanout_queue() if m.task == names.WEBHOOK_FAN_OUT]
        return sum(fan_out_team_type(self.services, self.app, *m.args) for m in tasks)

    def asked(self) -> list[str]:
        """The connection ids of the sync tasks on the queue, in order, once every sync the
        webhook schedule holds has fallen due and been drained."""
        self.drain(time.time() + 3600)
        return [message.args[0] for message in self.queued()]


def build_settings(redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": f"test-{uuid.uuid4().hex[:8]}",
        "closesync_encryption_keys": generate_key(),
        "calendly_webhook_signing_key": APP_KEY,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def build_world(redis_url: str, ask: SyncAsker | None = None, **overrides: Any) -> Iterator[World]:
    settings = build_settings(redis_url, **overrides)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    services = Services.build(settings, redis_client=client)
    app = create_app(settings, broker_url=redis_url)
    for conn_id, (user, ref) in CONNECTIONS.items():
        record = connection(
            conn_id,
            close_user_id=f"user_{user}",
            calendly_user_uri=f"https://api.calendly.com/users/{user}",
            calendly_grant_ref=ref,
        )
        services.connections.save(record, grants())
    user_sub = Subscription(
        key=new_key(),
        scope="user",
        organization_uri=ORG_URI,
        user_uri="https://api.calendly.com/users/U1",
        connection_id=C1,
        state=WebhookState.ACTIVE,
        own_signing_key=True,
        created_at=1.0,
        updated_at=1.0,
    )
    org_sub = Subscription(
        key=new_key(),
        scope="organization",
        organization_uri=ORG_URI,
        grant_ref="ORG1",
        state=WebhookState.ACTIVE,
        created_at=1.0,
        updated_at=1.0,
    )
    services.webhooks.save(user_sub, SecretStr(OWN_KEY))
    services.webhooks.save(org_sub)
    receiver = WebhookReceiver(services, ask or webhook_asker(services, app))
    try:
        yield World(services, app, receiver, user_sub, org_sub)
    finally:
        app.close()
        client.close()


@pytest.fixture
def world(redis_client: redis.Redis, redis_url: str) -> Iterator[World]:
    """The deployment, on an emptied Redis (the redis_client fixture flushed it)."""
    yield from build_world(redis_url)
