"""What waits in the Celery queues on the Redis broker: their names, and how many messages each
holds.

The names are the wire format between whoever enqueues and the workers
(`closesync.worker.celery_app` routes the tasks to them); they live here, below the worker, so
that the metrics of any process (the web's included) and `closesync health --worker` can read
the depth of every queue without importing Celery. kombu's Redis transport keeps a queue's ready
messages in one list (the key is `closesync.store.keys.Keys.celery_queue`); a message a worker
took but has not acknowledged, or one published with a countdown, is not in it, so the depth
counts exactly the work no one has taken.
"""

from __future__ import annotations

import redis

from closesync.store.client import guard
from closesync.store.keys import Keys

SYNC_QUEUE = "sync"
BACKFILL_QUEUE = "backfill"
# The fan-outs and the drains of their schedules: short tasks that must never wait behind
# thousands of per-connection runs. Every worker consumes it, whatever `--queues` says.
FANOUT_QUEUE = "fanout"
QUEUES = (SYNC_QUEUE, BACKFILL_QUEUE, FANOUT_QUEUE)


def queue_depths(
    client: redis.Redis, keys: Keys, queues: tuple[str, ...] = QUEUES
) -> dict[str, int]:
    """Messages ready in each of `queues`, read in one pipeline; StoreUnavailable if Redis fails."""
    with (
        guard("reading the depth of the Celery queues"),
        client.pipeline(transaction=False) as pipe,
    ):
        for queue in queues:
            pipe.llen(keys.celery_queue(queue))
        lengths = pipe.execute()
    return {queue: int(length) for queue, length in zip(queues, lengths, strict=True)}
