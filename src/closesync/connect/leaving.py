"""A user leaving: delete the links closesync made for them, revoke their grants, forget them.

Used by `closesync connections remove ID [--revoke] [--delete-links]` (`remove_connection`), in
an order that no run of the connection can interleave with:

1. the removal mark is set: from then on a run stops before its next write, a queued or
   redelivered task does nothing, and no sync state of the connection is written;
2. the run lock is taken, waiting (REMOVE_WAIT_SECONDS at most) for a run in progress to stop;
   if it cannot be taken, the mark is cleared and nothing was changed, but the syncs of the
   connection that found the mark meanwhile did nothing: the run holding the lock is asked to
   run once more (a rerun request, as those syncs would have left without the mark). A backfill
   or drift check that found the mark is not made up: it waits for the next one asked;
3. the connection's own webhook subscription is deleted at Calendly, while its Calendly grant
   still works (`closesync.connect.webhooks`; a delete Calendly failed for a passing reason
   stops the removal here, the record kept, so that running it again deletes the subscription
   rather than leave one nothing can list any more); the links go, while the Close
   grant still works; then the grants are revoked at both
   providers; then every key of the connection is erased and the mark gets its TTL, in one
   transaction. A removal stopped in this step keeps the mark (the connection is no longer
   synced, so no deleted link comes back) until it is run again.

A connection in Calendly organization mode shares its Calendly grant: that one is revoked only
when the last connection using it leaves (and the organization's credential is then forgotten
too, after its organization-scope webhook subscription is deleted), never while other users
still sync with it or Close users of its Close organization still wait to be paired with it.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass

from closesync.connect.deps import ConnectServices
from closesync.connect.org_credentials import OrgCredentials
from closesync.connect.org_waiting import WaitingRoom
from closesync.connect.revoke import revoke_grant
from closesync.connect.webhooks import Subscriptions
from closesync.core.connection import Connection
from closesync.core.errors import CloseSyncError, RemovalIncomplete, RunLocked
from closesync.core.mapping import is_our_link
from closesync.core.retry import WaitBudget
from closesync.store.secretbox import require_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removal:
    """What a removal did: links deleted in Close (None: not asked to) and grants revoked."""

    links_deleted: int | None
    revoked: list[str]


def remove_connection(
    services: ConnectServices, connection: Connection, *, delete_links: bool, revoke: bool
) -> Removal:
    """Remove a connection so that no run of it writes during or after (module docstring)."""
    conn_id = connection.id
    settings = services.settings
    if delete_links or revoke:
        # Both open the grants: without a key they would fail only after the mark was set,
        # leaving the connection out of every run until someone runs the removal again.
        require_key(services.box)
    marked = services.connections.mark_removing(conn_id)
    with ExitStack() as stack:
        try:
            stack.enter_context(
                services.run_lock(
                    conn_id, settings.run_lock_ttl_seconds, settings.remove_wait_seconds
                )
            )
        except BaseException as error:
            # Nothing was changed: the connection syncs as before (unless an earlier removal
            # stopped midway, whose mark stays).
            if marked:
                services.connections.unmark_removing(conn_id)
                services.state.request_rerun(conn_id)
            if isinstance(error, RunLocked):
                raise RunLocked(
                    f"a run of {conn_id} still held its lock after "
                    f"{settings.remove_wait_seconds:g} s (REMOVE_WAIT_SECONDS); nothing was "
                    "removed: try again"
                ) from None
            raise
        # Another `remove` may have finished while we waited: ConnectionNotFound, as for any id.
        # And the record read before the mark may be stale (a reconnect to another Calendly
        # user, new grants): what is deleted and revoked is what is stored now.
        connection = services.connections.get(conn_id)
        try:
            # Its webhook subscription first, while its Calendly credential still works.
            # A failed delete stops the removal here (RemovalIncomplete: run it again).
            Subscriptions(services).drop_before_removal(connection)
            deleted = delete_our_links(services, connection) if delete_links else None
            revoked = revoke_connection(services, connection) if revoke else []
            services.connections.remove(conn_id, lock_held=True)
        except CloseSyncError as error:
            raise RemovalIncomplete(
                f"removing {conn_id} stopped midway: {error}. It is no longer synced; run "
                "`closesync connections remove` with the same options again to finish"
            ) from error
    return Removal(deleted, revoked)


def delete_our_links(services: ConnectServices, connection: Connection) -> int:
    """Delete the THIRD_PARTY links of this app made for the connection's Calendly user."""
    clients = services.clients_for(
        connection, WaitBudget(services.settings.inline_wait_budget_seconds)
    )
    client_id = services.settings.close_client_id
    deleted = 0
    for link in clients.close.list_scheduling_links():
        if not is_our_link(link, connection, client_id) or link.source_id is None:
            continue
        if clients.close.delete_link(link.source_id):
            deleted += 1
    # No records are touched here: the removal mark refuses them, and the erase drops them.
    return deleted


def revoke_connection(services: ConnectServices, connection: Connection) -> list[str]:
    """Revoke the connection's grants at the providers; which sides were revoked."""
    grants = services.connections.grants(connection.id)
    revoked = []
    if revoke_grant(services, "close", grants.close):
        revoked.append("close")
    ref = connection.calendly_grant_ref
    if ref is None:
        if revoke_grant(services, "calendly", grants.calendly):
            revoked.append("calendly")
        return revoked
    orgs = OrgCredentials(services)
    others = [c for c in orgs.users(ref) if c.id != connection.id]
    # Close users waiting for a member of this organization would be paired with it: kept.
    waiting = WaitingRoom(services.redis, services.keys, services.box).waiting_in(
        orgs.bound_to(ref)
    )
    if not others and not waiting:
        Subscriptions(services).drop_before_organization_goes(ref)
        if revoke_grant(services, "calendly", grants.calendly):
            revoked.append("calendly organization")
        orgs.forget(ref)
    return revoked
