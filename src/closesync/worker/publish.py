"""Publishing many tasks at once: one producer, its Redis writes pipelined by kombu.

`app.send_task` per message acquires a producer, subscribes to a result the tasks never store
and writes one LPUSH per round trip: 10,000 connections took about 20 s that way on a loaded
2-core machine. Here one producer publishes every message inside kombu's own publish batch
(`Producer.batch`, which buffers the LPUSHes in a non-transactional Redis pipeline and flushes
every BATCH_SIZE), results are not subscribed to, and a fan-out running inside a task does not
record 10,000 children on its request: about 8 s on the same machine (benchmarks/fanout.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import KombuError, OperationalError

# Messages buffered before kombu flushes them to Redis in one round trip.
BATCH_SIZE = 500


@dataclass(frozen=True)
class Message:
    """One task to publish: its name, its positional arguments and its task id."""

    task: str
    args: Sequence[Any]
    task_id: str


class PublishFailed(OperationalError):
    """Publishing failed midway: the messages of the batch that failed may or may not be queued."""


def publish(app: Celery, messages: Sequence[Message]) -> None:
    """Publish `messages` now, routed as the app's routes say, none with a countdown: a worker
    would take every such task at once and hold it unacknowledged until it is due.

    A broker error raises PublishFailed (an OperationalError, like a failed `send_task`); the
    caller withdraws what it asked for, since which of the last batch landed is unknown.
    """
    if not messages:
        return
    try:
        with app.producer_or_acquire() as producer, producer.batch(max_size=BATCH_SIZE):
            for message in messages:
                app.send_task(
                    message.task,
                    args=list(message.args),
                    task_id=message.task_id,
                    producer=producer,
                    # Nothing reads a result (task_ignore_result): do not subscribe to one.
                    ignore_result=True,
                    # Inside sync_all, each child would be kept on its request until it ends.
                    add_to_parent=False,
                    # Not re-declared per message (a third of the time): Celery routes to the
                    # queue's name on the default exchange, which needs no binding, and workers
                    # declare the queues they consume.
                    declare=[],
                )
    except (KombuError, redis.RedisError, OSError) as error:
        raise PublishFailed(f"publishing {len(messages)} tasks failed: {error}") from error
