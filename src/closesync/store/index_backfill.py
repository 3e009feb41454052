"""One-time backfills of the indexes webhook deliveries read, safe against concurrent writes.

Two indexes arrived after the data they index: `calendly-org:{ref}:connections` (whom an
organization subscription serves) and `event-type:{uuid}:holders` (the connected hosts of a team
type). Saves, removals and link writes keep them from then on; what was stored before is given its
entries here, once per deployment, then a flag key says the index is complete (layout:
`closesync.store.keys`). Only worker tasks call this (the webhook fan-out), never a request: it
reads every connection.

Race-safety: each batch of records is read under WATCH and its entries written in one MULTI, so a
save, a forget or a reconnect that changes a record of the batch in between aborts the batch,
which is read again. An entry is therefore never written from a stale record: a connection moved
to another organization, or a link forgotten, during the backfill leaves no entry behind for good.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis

from closesync.core.connection import Connection
from closesync.core.mapping import parse_source_id
from closesync.store.client import guard
from closesync.store.keys import Keys, as_text

# Records one transaction of the backfill watches and reads: small enough that a busy fleet
# rarely aborts a batch, large enough that 10,000 connections take 100 round trips or so.
BATCH = 100
# Aborted tries of one batch before giving up for this call (the flag stays unset, so a later
# call tries again): a record rewritten that often is a bug, not a race.
MAX_TRIES = 20

# Reads a batch's watched keys and returns the (set key, member) pairs to add.
Reader = Callable[[redis.client.Pipeline, Sequence[str]], list[tuple[str, str]]]


class IndexBackfill:
    """Fills the organization and holders indexes from the records, once (module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys

    @guard("indexing the organizations' connections")
    def organizations(self) -> bool:
        """Give every connection its organization entry, unless done; whether this call did it."""
        return self._run(self.keys.calendly_org_index_complete(), self.keys.conn, self._refs)

    @guard("indexing who holds each event type")
    def holders(self) -> bool:
        """Give every link record its holders entry, unless done; whether this call did it."""
        return self._run(self.keys.event_type_holders_index_complete(), self.keys.links, self._held)

    def _run(self, flag: str, key_of: Callable[[str], str], read: Reader) -> bool:
        if self.redis.exists(flag):
            return False
        ids = sorted(as_text(m) for m in self.redis.smembers(self.keys.connections()))
        for start in range(0, len(ids), BATCH):
            self._batch(ids[start : start + BATCH], key_of, read)
        self.redis.set(flag, "1")
        return True

    def _batch(self, ids: Sequence[str], key_of: Callable[[str], str], read: Reader) -> None:
        watched = [key_of(conn_id) for conn_id in ids]
        for _ in range(MAX_TRIES):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*watched)  # type: ignore[no-untyped-call]
                    entries = read(pipe, ids)
                    pipe.multi()
                    for set_key, member in entries:
                        pipe.sadd(set_key, member)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
        raise redis.WatchError(f"records kept changing while indexing {len(ids)} of them")

    def _refs(self, pipe: redis.client.Pipeline, ids: Sequence[str]) -> list[tuple[str, str]]:
        raws = pipe.mget([self.keys.conn(conn_id) for conn_id in ids])
        found = (Connection.model_validate_json(raw) for raw in raws if raw is not None)
        return [
            (self.keys.calendly_org_connections(c.calendly_grant_ref), c.id)
            for c in found
            if c.calendly_grant_ref is not None
        ]

    def _held(self, pipe: redis.client.Pipeline, ids: Sequence[str]) -> list[tuple[str, str]]:
        entries: list[tuple[str, str]] = []
        for conn_id in ids:
            # Immediate mode (WATCHed, before MULTI): one HKEYS per connection of the batch.
            for source_id in pipe.hkeys(self.keys.links(conn_id)):
                parsed = parse_source_id(as_text(source_id))
                if parsed is not None:
                    entries.append((self.keys.event_type_holders(parsed[1]), conn_id))
        return entries
