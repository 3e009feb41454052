"""What the connect flows need of the process's services, as a Protocol.

`closesync.wiring.services.Services` is the one implementation; the flows name only this, so
that `connect` stays below the wiring that builds it (no import of `wiring` from here).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import requests
from redis import Redis

from closesync.apis.calendly.client import CalendlyOAuth
from closesync.apis.close.client import CloseOAuth
from closesync.apis.http import ApiHttp
from closesync.core.connection import Connection
from closesync.core.retry import WaitBudget
from closesync.settings import Settings
from closesync.store.connections import ConnectionStore
from closesync.store.keys import Keys
from closesync.store.locks import RedisLock
from closesync.store.secretbox import SecretBox
from closesync.store.sync_state import SyncState
from closesync.store.webhooks import WebhookStore
from closesync.sync.parts import Clients, LockHandle


class ConnectServices(Protocol):
    """The settings, stores and client factories the OAuth flows, pairing and leaving use."""

    settings: Settings
    redis: Redis
    keys: Keys
    box: SecretBox
    connections: ConnectionStore
    state: SyncState
    webhooks: WebhookStore

    def close_oauth(self) -> CloseOAuth | None: ...

    def calendly_oauth(self) -> CalendlyOAuth | None: ...

    def refresh_lock(self, name: str) -> RedisLock: ...

    def run_lock(
        self, connection_id: str, ttl: int, wait: float = ...
    ) -> AbstractContextManager[LockHandle]: ...

    def api_http(
        self,
        api: str,
        base_url: str,
        budget: WaitBudget,
        session: requests.Session | None = ...,
    ) -> ApiHttp: ...

    def clients_for(
        self, connection: Connection, budget: WaitBudget, sleep: Callable[[float], None] = ...
    ) -> Clients: ...
