"""Connections people make and leave: OAuth flows, Calendly organization mode, revoking.

Holds the steps shared by `closesync web` and `closesync connect` (`connector`, `steps`,
`oauth_flow`), organization mode (`organizations` pairs; `org_credentials`, `org_members`,
`org_waiting` hold its parts), revoking grants (`revoke`) and a user leaving (`leaving`). What
it needs of the process's services is the Protocol in `deps`.

May use `sync` (leaving deletes the links a sync made, with the sync's clients). Must not
import: `wiring` or the shells.
"""
