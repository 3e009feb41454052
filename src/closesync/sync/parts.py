"""What the engine and a run share: the clients of a run, its lock handle, the engine's settings.

A module of its own so that `engine` (outcomes) and `run` (steps) both import it and neither
imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from closesync.apis.calendly.client import CalendlyClient
from closesync.apis.close.client import CloseClient
from closesync.apis.credentials import TokenKeeper
from closesync.apis.http import ApiHttp
from closesync.core.connection import Connection
from closesync.core.errors import DeadlineReached, RunLocked
from closesync.core.mapping import MappingOptions
from closesync.core.plan import DELETE_CONFIRM_SECONDS, MassDeleteRule
from closesync.store.sync_state import SyncState

Progress = Callable[[int, int], None]


@dataclass
class Clients:
    """The API clients of one connection's run, sharing its wait budget and call counters."""

    calendly: CalendlyClient
    close: CloseClient
    calendly_http: ApiHttp
    close_http: ApiHttp
    calendly_tokens: TokenKeeper
    close_tokens: TokenKeeper

    def api_calls(self) -> dict[str, int]:
        """Calls made so far, per `api METHOD endpoint`."""
        calls: dict[str, int] = {}
        for name, http in (("calendly", self.calendly_http), ("close", self.close_http)):
            for group, count in http.calls_by_endpoint.items():
                calls[f"{name} {group}"] = count
        return calls


class LockHandle(Protocol):
    """What a held run lock offers the run: `held()` is False once it can no longer be trusted."""

    def held(self) -> bool: ...


class LockLost(RunLocked):
    """The run lock expired or was taken while the run lasted; the run stops writing."""


@dataclass(frozen=True)
class Deadline:
    """When a run must stop, checked between its steps (before a listing, a fetch, a write).

    A worker's run stops here rather than at an arbitrary line: a step under way finishes and is
    recorded, so a run stopped by its deadline loses nothing and resumes where it stopped. `at`
    is on `clock`'s scale (monotonic seconds; tests pass a clock of their own); `what` names the
    limit for the report ("TASK_SOFT_TIME_LIMIT").
    """

    at: float
    seconds: float
    what: str
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def after(
        cls, seconds: float, what: str, clock: Callable[[], float] = time.monotonic
    ) -> Deadline:
        """The deadline `seconds` from now."""
        return cls(at=clock() + seconds, seconds=seconds, what=what, clock=clock)

    def check(self, step: str) -> None:
        """DeadlineReached, naming `step` (what would have come next), once the deadline passed."""
        if self.clock() >= self.at:
            raise DeadlineReached(
                f"run stopped at its deadline ({self.what}, {self.seconds:g} s) before {step}; "
                "what it wrote is recorded"
            )


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs of the settings."""

    mapping: MappingOptions
    mass_delete: MassDeleteRule
    reports_kept: int = 20
    run_lock_ttl: int = 30
    # Our OAuth application's id, to recognise our links in Close (None: any THIRD_PARTY link
    # whose source_id has closesync's format for this Calendly user).
    close_client_id: str | None = None
    calendly_api_url: str = "https://api.calendly.com"
    # Seconds between two complete listings that miss an event type before its link goes.
    delete_confirm_seconds: float = DELETE_CONFIRM_SECONDS


class RunDeps(Protocol):
    """What a run needs of its engine (the engine is one; tests may pass another)."""

    @property
    def config(self) -> EngineConfig: ...
    @property
    def state(self) -> SyncState: ...

    def clock(self) -> float: ...

    def shared_clock(self) -> float: ...

    def clients_for(self, connection: Connection) -> Clients: ...
