"""A user leaving: delete the links closesync made for them, revoke their grants, forget them.

Used by `closesync connections remove ID --revoke [--delete-links]`. Links go first, while the
Close grant still works; then the grants are revoked at both providers; the caller then erases
the connection's state. A connection in Calendly organization mode shares its Calendly grant:
that one is revoked only when the last connection using it leaves (and the organization's
credential is then forgotten too), never while other users still sync with it.
"""

from __future__ import annotations

import logging

from closesync.connect.deps import ConnectServices
from closesync.connect.org_credentials import OrgCredentials
from closesync.connect.revoke import revoke_grant
from closesync.core.connection import Connection
from closesync.core.mapping import is_our_link
from closesync.core.retry import WaitBudget

log = logging.getLogger(__name__)


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
    services.state.replace_records(connection.id, {})
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
    if not others:
        if revoke_grant(services, "calendly", grants.calendly):
            revoked.append("calendly organization")
        orgs.forget(ref)
    return revoked
