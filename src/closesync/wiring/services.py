"""Builds closesync's parts from the settings: Redis, the stores, the API clients, the engine.

The CLI commands and the Celery tasks both start here, so that a run is wired the same way
whether a person or a worker starts it. Nothing here decides anything about the sync.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import requests
from redis import Redis

from closesync.apis.calendly.client import CalendlyClient, CalendlyOAuth
from closesync.apis.close.client import CloseClient, CloseOAuth
from closesync.apis.credentials import TokenKeeper, shared_lock_key
from closesync.apis.http import ApiHttp, HttpSessions
from closesync.apis.oauth_tokens import token_http
from closesync.core.connection import Connection
from closesync.core.mapping import MappingOptions
from closesync.core.plan import MassDeleteRule
from closesync.core.retry import WaitBudget
from closesync.settings import Settings, load_settings
from closesync.store.client import connect
from closesync.store.connections import ConnectionStore
from closesync.store.embedded import embedded
from closesync.store.keys import Keys
from closesync.store.locks import RedisLock, hold
from closesync.store.rate_budget import RateBudgets
from closesync.store.schedule import Schedule
from closesync.store.secretbox import SecretBox, box_from_settings, require_key
from closesync.store.sync_state import SyncState
from closesync.store.webhooks import WebhookStore
from closesync.sync.engine import SyncEngine
from closesync.sync.parts import Clients, EngineConfig, LockHandle


def redis_url_of(settings: Settings) -> str:
    """REDIS_URL, or the embedded Redis in DATA_DIR when it is unset."""
    return settings.redis_url or embedded(settings.data_dir)


@dataclass
class Services:
    """Everything a command or a task needs, built once per process.

    Shared by the runs the process makes at once (a worker's threads, an inline `--concurrency`):
    what it holds is per process (Redis, the HTTP sessions, the stores); what is per run (clients,
    budgets, counters) is built for each run by `clients_for`.
    """

    settings: Settings
    redis: Redis
    keys: Keys
    box: SecretBox
    connections: ConnectionStore
    state: SyncState
    # The rate budgets every process shares; None: each run only heeds the headers it saw
    # itself (tests whose sleeps move a fake clock, which a budget on Redis's clock ignores).
    budgets: RateBudgets | None
    schedule: Schedule
    webhooks: WebhookStore
    http: HttpSessions = field(default_factory=HttpSessions)

    @classmethod
    def build(cls, settings: Settings, *, redis_client: Redis | None = None) -> Services:
        """Connect to Redis and build the stores; raises ConfigError or StoreUnavailable.

        Without an encryption key this still succeeds (what decrypts nothing works); storing or
        reading a token then fails, and `require_key` says so up front.
        """
        box = box_from_settings(settings)
        client = redis_client if redis_client is not None else connect(redis_url_of(settings))
        keys = Keys(settings.redis_prefix)
        return cls(
            settings=settings,
            redis=client,
            keys=keys,
            box=box,
            connections=ConnectionStore(client, keys, box),
            state=SyncState(client, keys, queued_ttl=settings.broker_visibility_timeout),
            schedule=Schedule(client, keys),
            webhooks=WebhookStore(client, keys, box),
            budgets=RateBudgets.from_settings(client, keys, settings),
            # Sized for a worker's runs at once; an inline `--concurrency` reserves its own.
            http=HttpSessions(settings.worker_concurrency),
        )

    def close(self) -> None:
        """Close the process's HTTP connections (at shutdown; later calls open new ones)."""
        self.http.close()

    def require_key(self) -> None:
        """ConfigError naming CLOSESYNC_ENCRYPTION_KEYS unless tokens can be stored and read."""
        require_key(self.box)

    # -- API clients -------------------------------------------------------------------------

    def api_http(
        self,
        api: str,
        base_url: str,
        budget: WaitBudget,
        session: requests.Session | None = None,
        **kwargs: object,
    ) -> ApiHttp:
        """An ApiHttp (per run) with the configured timeouts, sharing `budget`; on `session` when
        given (a bulk import's own, per thread), else on the process's session of `api`."""
        return ApiHttp(
            api=api,
            base_url=base_url,
            session=session or self.http.get(api),
            timeout=self.settings.http_timeout,
            budget=budget,
            **kwargs,  # type: ignore[arg-type]
        )

    def close_oauth(self) -> CloseOAuth | None:
        """Close's token endpoint client, when the app's credentials are configured."""
        s = self.settings
        if not s.close_client_id or s.close_client_secret is None:
            return None
        return CloseOAuth(
            http=token_http(
                "Close", s.close_oauth_url, session=self.http.get("Close"), timeout=s.http_timeout
            ),
            client_id=s.close_client_id,
            client_secret=s.close_client_secret.get_secret_value(),
        )

    def calendly_oauth(self) -> CalendlyOAuth | None:
        """Calendly's token endpoint client, when the app's credentials are configured."""
        s = self.settings
        if not s.calendly_client_id or s.calendly_client_secret is None:
            return None
        return CalendlyOAuth(
            http=token_http(
                "Calendly",
                s.calendly_auth_url,
                session=self.http.get("Calendly"),
                timeout=s.http_timeout,
            ),
            client_id=s.calendly_client_id,
            client_secret=s.calendly_client_secret.get_secret_value(),
        )

    def refresh_lock(self, name: str) -> RedisLock:
        """The single-flight lock of one grant's token refresh.

        A refresh renews it for as long as its token call lasts (`TokenKeeper`), since timeouts
        bound each socket read, not the call; the TTL (a token call's timeouts, twice, for
        margin) only bounds how long a holder that died keeps the grant from being refreshed.
        """
        s = self.settings
        ttl = 2 * (s.http_connect_timeout + s.http_read_timeout) + 5
        return RedisLock(self.redis, self.keys.refresh_lock(name), ttl_seconds=ttl)

    def clients_for(
        self,
        connection: Connection,
        budget: WaitBudget,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Clients:
        """The clients of one run, refreshing tokens through the single-flight keepers."""
        s = self.settings

        lock_factory = self.refresh_lock

        close_tokens = TokenKeeper(
            connection_id=connection.id,
            side="close",
            store=self.connections,
            refresher=self.close_oauth(),
            lock_factory=lock_factory,
        )

        def calendly_lock_key() -> str:
            # Organization mode: every connection of the organization refreshes under one lock.
            # Read from what is sealed now, not `connection` as the run read it: a reconnect may
            # have moved the connection onto or off the shared grant since.
            ref = self.connections.shared_ref(connection.id)
            return shared_lock_key(ref) if ref is not None else connection.id

        calendly_tokens = TokenKeeper(
            connection_id=connection.id,
            side="calendly",
            store=self.connections,
            refresher=self.calendly_oauth(),
            lock_factory=lock_factory,
            lock_key_of=calendly_lock_key,
        )
        rand = random.random
        # Every process calling for the same Close organization / Calendly account shares these.
        budgets = self.budgets
        calendly_rate = (
            budgets.calendly(connection.calendly_user_uuid, connection.calendly_grant_ref)
            if budgets
            else None
        )
        close_rate = (
            budgets.close(connection.close_organization_id, connection.close_user_id)
            if budgets
            else None
        )
        calendly_http = self.api_http(
            "Calendly",
            s.calendly_api_url,
            budget,
            sleep=sleep,
            rand=rand,
            rate_budget=calendly_rate,
        )
        close_http = self.api_http(
            "Close", s.close_api_url, budget, sleep=sleep, rand=rand, rate_budget=close_rate
        )
        return Clients(
            calendly=CalendlyClient(http=calendly_http, token=calendly_tokens.access_token),
            close=CloseClient(http=close_http, token=close_tokens.access_token),
            calendly_http=calendly_http,
            close_http=close_http,
            calendly_tokens=calendly_tokens,
            close_tokens=close_tokens,
        )

    # -- the engine --------------------------------------------------------------------------

    def engine_config(self) -> EngineConfig:
        s = self.settings
        return EngineConfig(
            mapping=MappingOptions(
                include_secret=s.include_secret_event_types,
                include_one_off=s.include_one_off_event_types,
            ),
            mass_delete=MassDeleteRule(minimum=s.mass_delete_min, fraction=s.mass_delete_fraction),
            reports_kept=s.reports_kept,
            run_lock_ttl=s.run_lock_ttl_seconds,
            close_client_id=s.close_client_id,
            calendly_api_url=s.calendly_api_url,
            delete_confirm_seconds=s.delete_confirm_seconds,
        )

    def engine(
        self,
        *,
        wait_budget: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        shared_clock: Callable[[], float] | None = None,
    ) -> SyncEngine:
        """An engine whose runs may each wait `wait_budget` seconds inline for the APIs.

        `clock` (epoch seconds) times the reports; `shared_clock` (default: Redis's TIME, the
        same for every worker) times the listings whose misses confirm a deletion.
        """

        def clients_for(connection: Connection) -> Clients:
            return self.clients_for(connection, WaitBudget(wait_budget), sleep)

        return SyncEngine(
            config=self.engine_config(),
            connections=self.connections,
            state=self.state,
            run_lock=self.run_lock,
            clients_for=clients_for,
            clock=clock,
            shared_clock=shared_clock or self.state.now,
        )

    @contextmanager
    def run_lock(self, connection_id: str, ttl: int, wait: float = 0.0) -> Iterator[LockHandle]:
        """The per-connection run lock, renewed while held; `wait`: seconds to wait for it."""
        with hold(self.redis, self.keys.run_lock(connection_id), ttl, wait=wait) as lock:
            yield lock


def require_token_storage(settings: Settings) -> None:
    """At the start of a process that will store tokens before it builds its Services (the
    worker, whose pool builds them later): ConfigError unless a key is set or plaintext allowed."""
    require_key(box_from_settings(settings))


def load_services(settings: Settings | None = None) -> Services:
    """The services for `settings`, or for the settings of the environment and .env."""
    return Services.build(settings or load_settings())
