"""The order webhook deliveries leave in: one FIFO lane per subscription and a heap of the lanes
ready to send.

Kept apart from deliveries.py (the threads and the HTTP) so that the ordering rule is a small
piece of pure bookkeeping, tested with literal times. A lane is one subscription's deliveries
in queue order (or, in parallel mode, a lane of its own per delivery). Only a lane's head can
leave, and only while nothing of that lane is in flight; a failed delivery goes back to the
head of its lane with its backoff due time, so a retry is never overtaken by a later delivery
of the same subscription. The heap holds each idle, non-empty lane once, keyed by its head's
due time, so taking the next delivery costs O(log lanes) however many deliveries wait behind
a busy or backing-off head (the old single heap was re-sorted on every wake-up).

Not thread-safe on its own: the Deliverer calls it with its condition held.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Lane(Generic[T]):
    items: deque[tuple[float, T]] = field(default_factory=deque)  # (due, item), head first
    busy: bool = False


class LaneQueue(Generic[T]):
    """Items in FIFO lanes; `take` gives the earliest-due head of a lane not in flight."""

    def __init__(self) -> None:
        self._lanes: dict[Hashable, _Lane[T]] = {}
        self._ready: list[tuple[float, int, Hashable]] = []  # (head due, tie-break, lane)
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Items waiting (in flight ones not counted)."""
        return sum(len(lane.items) for lane in self._lanes.values())

    def in_flight(self) -> int:
        """Lanes with an item taken and not yet done."""
        return sum(lane.busy for lane in self._lanes.values())

    def empty(self) -> bool:
        """Nothing waiting and nothing in flight."""
        return not self._lanes

    def push(self, lane: Hashable, due: float, item: T) -> None:
        """Queue `item` at the tail of `lane`, to leave no sooner than `due`."""
        entry = self._lanes.setdefault(lane, _Lane())
        entry.items.append((due, item))
        if len(entry.items) == 1 and not entry.busy:
            self._mark_ready(lane, entry)

    def take(self, now: float) -> tuple[tuple[Hashable, T] | None, float | None]:
        """((lane, item), None) for the next item due by `now`, its lane now in flight; else
        (None, seconds until the earliest head is due, or None when no lane is ready)."""
        if not self._ready:
            return None, None
        due, _, lane = self._ready[0]
        if due > now:
            return None, due - now
        heapq.heappop(self._ready)
        entry = self._lanes[lane]
        _, item = entry.items.popleft()
        entry.busy = True
        return (lane, item), None

    def done(self, lane: Hashable, retry_at: float | None = None, item: T | None = None) -> None:
        """The item taken from `lane` is finished; with `retry_at`, `item` goes back to the
        head of its lane, due then, ahead of everything queued behind it."""
        entry = self._lanes[lane]
        entry.busy = False
        if retry_at is not None and item is not None:
            entry.items.appendleft((retry_at, item))
        if entry.items:
            self._mark_ready(lane, entry)
        else:
            del self._lanes[lane]

    def _mark_ready(self, lane: Hashable, entry: _Lane[T]) -> None:
        heapq.heappush(self._ready, (entry.items[0][0], next(self._seq), lane))
