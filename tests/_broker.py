"""What sits on a Celery queue in Redis, read straight from the broker's list (no worker).

kombu's Redis transport keeps a queue as a list under `{global_keyprefix}{queue}` (closesync's
prefix is `{REDIS_PREFIX}:celery:`), each item the JSON envelope of one message: headers (task
protocol 2: `task`, `id`, `eta`, ...) and a base64 body `[args, kwargs, embed]`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import redis


@dataclass(frozen=True)
class Queued:
    """One message on a queue, as a worker would receive it."""

    task: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]


def queue_key(prefix: str, queue: str) -> str:
    return f"{prefix}:celery:{queue}"


def queued(client: redis.Redis, prefix: str, queue: str) -> list[Queued]:
    """The messages on `queue`, oldest first (kombu LPUSHes and a worker BRPOPs)."""
    found = []
    for raw in reversed(client.lrange(queue_key(prefix, queue), 0, -1)):
        envelope = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        headers = envelope["headers"]
        found.append(Queued(headers["task"], headers["id"], args, kwargs, headers))
    return found
