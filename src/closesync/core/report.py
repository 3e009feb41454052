"""The report every run leaves behind: what it did, what it held, what failed. Pure data."""

from __future__ import annotations

import secrets
from enum import StrEnum

from pydantic import BaseModel, Field


class RunMode(StrEnum):
    SYNC = "sync"
    BACKFILL = "backfill"
    DRIFT = "drift"


class Outcome(StrEnum):
    OK = "ok"  # everything planned was written (held deletions are not failures)
    PARTIAL = "partial"  # the run finished, but some links were refused or unmappable
    FAILED = "failed"  # the run stopped early (API error, rate limit, auth); retry later
    SKIPPED = "skipped"  # not run: paused, needs re-authorization, already running, or removed


def new_run_id() -> str:
    return "run_" + secrets.token_hex(6)


class RunReport(BaseModel):
    """One run of one connection. `failed` maps a source_id (or event type uri) to its error."""

    run_id: str = Field(default_factory=new_run_id)
    connection_id: str
    mode: RunMode = RunMode.SYNC
    # A dry run plans and reports but writes nothing (not to Close, not to the records).
    dry_run: bool = False
    started_at: float
    finished_at: float | None = None
    outcome: Outcome = Outcome.OK
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: dict[str, str] = Field(default_factory=dict)
    held_deletions: list[str] = Field(default_factory=list)
    held_reason: str | None = None
    kept: dict[str, str] = Field(default_factory=dict)
    api_calls: dict[str, int] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)
    # Why a failed run failed, for the caller deciding on retries: rate_limited, transient, auth,
    # forbidden, locked, deadline (stopped between steps by its deadline), error; on a skipped
    # run, "locked" or "removed" (the connection is being removed). `retry_after` is the wait
    # (seconds) a rate limit asked for.
    failure: str | None = None
    retry_after: float | None = None
    # Planned writes, filled by a dry run (and for the record by every run): "create <source_id>".
    planned: list[str] = Field(default_factory=list)

    @property
    def error(self) -> str | None:
        return self.errors[-1] if self.errors else None
