"""At most one queued sync per connection: who owes a connection its next sync. Pure, no I/O.

Every ask for a sync of a connection (a tick's fan-out, `closesync sync ID --enqueue`, later a
webhook) goes through the connection's *marker* (a Redis string, see `closesync.store.keys`),
whose value names who owes the connection its next run:

- absent: nobody. The ask sets the marker to `queued:<task id>` and publishes that task.
- `queued:<task id>`: that task is on the queue and has not started. The ask is coalesced into it:
  it will run after the ask, which is all the ask wants. The task clears the marker when it
  starts, so an ask arriving during its run queues exactly one more.
- `holder`: a task started while another run held the connection's run lock (asked for during a
  run, published, picked up by another worker slot). It cannot run, so it hands its ask to the
  holder, which runs once more when its run ends. Asks coalesce into that rerun, but only while
  the lock is held: a `holder` marker with no lock held is stale (the holder was an inline
  `closesync sync`, which does not rerun, or it died), and the next ask replaces it.

So the queue holds at most one sync per connection however far the workers fall behind, and a
run in progress is followed by at most one more. The marker lives at most
BROKER_VISIBILITY_TIMEOUT (the caller's TTL): a lost message cannot hold a connection longer.
"""

from __future__ import annotations

HOLDER = "holder"
_QUEUED = "queued:"

# Seconds between two drains of a schedule at most: how late a scheduled run may be published.
# Shorter = more punctual, more (tiny) drain tasks while a schedule is not empty.
DRAIN_EVERY_SECONDS = 1.0
# Seconds the next drain waits at least, so that a burst of due times does not make a busy loop.
DRAIN_AT_LEAST_SECONDS = 0.05


def queued_by(task_id: str) -> str:
    """The marker of a sync that the task `task_id` owes (published, not started)."""
    return f"{_QUEUED}{task_id}"


def ask_publishes(marker: str | None, run_lock_held: bool) -> bool:
    """Whether an ask finding `marker` must publish a task (else it is coalesced).

    A queued task covers the ask; so does the holder's rerun while the holder holds the lock.
    """
    if marker is None:
        return True
    if marker == HOLDER:
        return not run_lock_held
    return not marker.startswith(_QUEUED)


def start_clears(marker: str | None, task_id: str) -> bool:
    """Whether the task `task_id`, starting, clears `marker`: only when the marker names it.

    A redelivered copy of an earlier task, or a task published without a marker, leaves the
    marker of the one queued after it alone.
    """
    return marker == queued_by(task_id)


def retry_takes_over(marker: str | None, task_id: str) -> bool:
    """Whether the task `task_id`, about to be retried, owes the next sync (the marker names it).

    Yes when nobody else does, or when the holder's rerun was asked for: the retry runs after the
    ask too. No when another task is queued: that one runs the sync and the retry is dropped.
    """
    return not (marker is not None and marker.startswith(_QUEUED) and marker != queued_by(task_id))


def holder_reruns(marker: str | None) -> bool:
    """Whether the run that held the lock owes the connection one more run."""
    return marker == HOLDER


def next_drain_in(next_due: float | None, now: float) -> float | None:
    """Seconds until the next drain of a schedule whose earliest entry is due at `next_due`.

    None when the schedule is empty. At most DRAIN_EVERY_SECONDS, since a new tick may add
    entries due sooner than the earliest one seen now.
    """
    if next_due is None:
        return None
    return min(DRAIN_EVERY_SECONDS, max(DRAIN_AT_LEAST_SECONDS, next_due - now))
