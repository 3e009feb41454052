"""The HTTP layer and the two vendor clients: everything closesync says to Close and Calendly.

Holds the one transport and status-to-error mapping (`http`), response-body checks (`bodies`),
the OAuth token calls (`oauth_tokens`), access tokens kept fresh single-flight (`credentials`),
and one client per vendor (`calendly.client`, `close.client`) that only does HTTP and parses
into the core's payload types.

Must not import: `store`, `sync`, `connect`, `wiring` or the shells. Locks and grant storage
reach `credentials` as Protocols, passed in by the caller.
"""
