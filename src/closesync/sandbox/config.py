"""How a sandbox is configured, and the credentials of its two OAuth apps.

Kept apart from the World so that the CLI, the tests and the demo can build a config without
importing the servers. Every default says its unit and why it was picked.
"""

from __future__ import annotations

from dataclasses import dataclass

# The one Close OAuth app the sandbox knows; sync code is configured with these.
CLOSE_CLIENT_ID = "oa2client_sandbox"
CLOSE_CLIENT_SECRET = "sandbox-close-secret"
# The one Calendly OAuth app the sandbox knows.
CALENDLY_CLIENT_ID = "sandbox-calendly-client"
CALENDLY_CLIENT_SECRET = "sandbox-calendly-secret"
# The default webhook signing key of that app (config `calendly_webhook_signing_key`).
CALENDLY_WEBHOOK_SIGNING_KEY = "sandbox-calendly-webhook-signing-key"

APIS = ("calendly", "close")


@dataclass
class SandboxConfig:
    """Everything a sandbox run can vary; the same seed gives the same users, types and tokens."""

    # Seed of every random choice (ids, tokens, fault draws): same seed, same world.
    seed: int = 0
    # Seeded user pairs (one Calendly user and one Close user with the same email).
    users: int = 3
    # Event types owned per seeded user (team types also appear under their other members).
    event_types: int = 5
    # TCP port of the Calendly API and auth server; 0 picks a free one (tests), CLI uses 8701.
    calendly_port: int = 0
    # TCP port of the Close API and OAuth server; 0 picks a free one (tests), CLI uses 8702.
    close_port: int = 0
    # Interface to bind; loopback so the sandbox never faces a network.
    host: str = "127.0.0.1"
    # Milliseconds added before every API answer (both APIs); 0 keeps tests fast.
    latency_ms: float = 0
    # Fraction (0..1) of API requests answered 500/502/503 at random; 0 = never.
    error_rate: float = 0
    # Close requests allowed per window, per endpoint group and token (org-wide: 3x this).
    close_rate_limit: int = 100
    # Seconds of one Close rate-limit window; short windows give fractional `reset` values.
    close_rate_window: float = 1.0
    # Calendly requests per user per minute (500 on paid plans, 50 on Free).
    calendly_rate_limit: int = 500
    # Seconds a Close OAuth access token lives (Close documents 3600).
    access_token_ttl_close: int = 3600
    # Seconds a Calendly OAuth access token lives (Calendly documents 2 h).
    access_token_ttl_calendly: int = 7200
    # Calendly token-endpoint requests per user per minute (Calendly documents 8).
    calendly_token_requests_per_minute: int = 8
    # Seconds an authorization code stays redeemable (sandbox clock).
    auth_code_ttl: int = 60
    # Seconds a "hang" fault holds a request before dropping it; stop() releases it sooner.
    hang_seconds: float = 60
    # Seconds a request body may take to arrive after its headers (one shorter than its
    # Content-Length, a chunked body that stops); then 408 and the connection is closed. Ample
    # for any loopback client, yet a stalled one cannot hold a server thread for good.
    body_read_timeout: float = 10
    # True: the sandbox clock moves only through advance (fully deterministic tests);
    # False: it follows wall time too, as a long-running CLI sandbox should.
    freeze_clock: bool = False
    # Whether Close's GET /scheduling_link/ lists every link of the token user's organization
    # (True) or only the token user's (False). Close's docs leave it open; closesync must treat
    # other users' links as not its own either way, and tests check it with True.
    close_lists_organization_links: bool = False
    # Print one line per request to stderr (the CLI turns it on).
    log_requests: bool = False
    # True: Close stores integration links normalised, as a real one may (its docs are silent):
    # text fields trimmed, a null description as "", line breaks as CRLF, non-ASCII URL
    # characters percent-encoded. False (default): stored exactly as sent.
    close_normalises: bool = False
    # Space-separated Calendly scopes no token has, whatever it was granted (e.g.
    # "webhooks:write" to test a missing scope); "" withholds none.
    calendly_withheld_scopes: str = ""
    # The Calendly OAuth application's webhook signing key: it signs the deliveries of every
    # subscription made with an OAuth token, a signing_key passed with one being ignored
    # (Calendly shows it in the developer console). A fixed dev value so that a receiver can
    # be configured with it.
    calendly_webhook_signing_key: str = CALENDLY_WEBHOOK_SIGNING_KEY
    # Threads that send webhook deliveries (read at start): one slow receiver holds only one.
    webhook_delivery_threads: int = 4
    # True: one subscription's deliveries go out one at a time, in order, a failed one's
    # retries before anything queued after it (the reorder knob is then exact); False: in
    # parallel, to load a receiver with concurrent deliveries. Read as each delivery is queued.
    webhook_serial_per_subscription: bool = True
    # Seconds a delivery may take to connect / to answer (Calendly: 10 and 15).
    webhook_connect_timeout: float = 10.0
    webhook_read_timeout: float = 15.0
    # Seconds before the first retry of a failed delivery, doubled per attempt up to the cap;
    # small so tests see retries quickly (Calendly spreads its retries over 24 h).
    webhook_backoff_base: float = 0.05
    webhook_backoff_cap: float = 1.0
    # Consecutive failed deliveries after which a subscription becomes `disabled`.
    webhook_disable_after: int = 5
    # Knobs (see deliveries.py): seconds every delivery waits before its first attempt, and
    # the fraction (0..1, seeded) of deliveries never sent.
    webhook_delay_seconds: float = 0.0
    webhook_drop_rate: float = 0.0
