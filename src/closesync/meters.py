"""The Prometheus metrics closesync counts as it works, and the one-line functions that count.

Why a module of its own, this low: the places that see what an operator must count are deep in
the stack (the HTTP layer sees every API call and 429, the token keeper every refresh, the rate
budget every Close organization, the engine every run), and they must not import the wiring
that exposes the metrics. So the metric objects live here, with nothing but prometheus_client
and the core's data types beneath them: no Redis, no HTTP, no Celery. Exposing them (a port,
`/metrics`, the multiprocess collector under `--pool prefork`) and the gauges read from Redis at
scrape time are `closesync.wiring.metrics`'s.

Every metric here has labels, so that no sample file is made at import time: under prefork the
multiprocess directory is cleaned when the worker starts, after this module was imported. A
labelled series appears only once counted, and `increase()` misses its first count (the jump from
nothing to 1): so every process that serves metrics pre-creates the known label sets at 0
(`precreate`, `precreate_task_labels`) once its multiprocess directory, if any, is clean.

Labels are bounded and never secret: an API ("Close", "Calendly"), an endpoint group (a method
and a path template: "POST /scheduling_link/integration/"), a status class, a run mode and
outcome, a Celery task name, a Close organization id. Never a token, an email, a connection id
or a user id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from prometheus_client import Counter, Histogram

from closesync.core.connection import SIDE_LABEL
from closesync.core.report import Outcome, RunMode, RunReport

RUNS = Counter(
    "closesync_runs_total",
    "Runs of a connection finished, by mode (sync, backfill, drift) and outcome (ok, partial, "
    "failed, skipped).",
    ["mode", "outcome"],
)
# Seconds: from a second (nothing to write) to the soft time limit's default of 240.
RUN_DURATION = Histogram(
    "closesync_run_duration_seconds",
    "Seconds one run of a connection lasted, from its start to its report, by mode.",
    ["mode"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 240, 600),
)
LINKS = Counter(
    "closesync_links_total",
    "Scheduling links by what a run did with them: created, updated or deleted in Close, held "
    "(a deletion kept back by the mass-delete guard) or rejected (refused by Close, or "
    "unmappable).",
    ["action"],
)
API_CALLS = Counter(
    "closesync_api_calls_total",
    "HTTP requests sent to an API, by API, endpoint group (method and path template) and status "
    "class (2xx, 3xx, 4xx, 5xx, or error: no response).",
    ["api", "group", "status_class"],
)
RATE_LIMITED = Counter(
    "closesync_rate_limited_total",
    "Responses with status 429 (Too Many Requests), by API.",
    ["api"],
)
RATE_LIMIT_WAIT = Counter(
    "closesync_rate_limit_wait_seconds_total",
    "Seconds runs slept waiting for a rate limit (an announced reset, a 429, or the shared "
    "budget spent), by API.",
    ["api"],
)
TOKEN_REFRESHES = Counter(
    "closesync_token_refreshes_total",
    "OAuth token refreshes sent to a provider, by API and result: ok (the rotated grant is "
    "stored), revoked (the grant was refused: the connection needs re-authorization), "
    "rotated_elsewhere (refused because another process had just redeemed it: its grant is "
    "used), client_refused (closesync's own OAuth client was refused: configuration), error "
    "(no answer, a 5xx, or the rotated grant could not be stored).",
    ["api", "result"],
)
TASKS_COMPLETED = Counter(
    "closesync_tasks_completed_total",
    "Celery tasks a worker finished running, by task name and state (SUCCESS, FAILURE, RETRY, "
    "...).",
    ["task", "state"],
)

WebhookResult = Literal[
    "accepted", "duplicate", "bad_signature", "stale", "unknown_key", "too_large", "unavailable"
]
WEBHOOK_RESULTS: tuple[str, ...] = get_args(WebhookResult)
WEBHOOK_DELIVERIES = Counter(
    "closesync_webhook_deliveries_total",
    "Webhook deliveries received, by result: accepted (a sync was asked for), duplicate (seen "
    "before), bad_signature, stale (signed too long ago), unknown_key (no such subscription), "
    "too_large (body over the limit), unavailable (Redis did not answer: the sender retries).",
    ["result"],
)


APIS: tuple[str, ...] = tuple(SIDE_LABEL.values())
TOKEN_REFRESH_RESULTS = ("ok", "revoked", "rotated_elsewhere", "client_refused", "error")
LINK_ACTIONS = ("created", "updated", "deleted", "held", "rejected")
# The task states a healthy worker reports most: enough for a per-instance series to exist.
TASK_STATES = ("SUCCESS", "FAILURE", "RETRY")


def precreate() -> None:
    """Create every known label set of the counters at 0, so that Prometheus sees each series
    before its first count and `increase()` counts that first one (a revoked refresh, a 429)."""
    for api in APIS:
        RATE_LIMITED.labels(api)
        RATE_LIMIT_WAIT.labels(api)
        for result in TOKEN_REFRESH_RESULTS:
            TOKEN_REFRESHES.labels(api, result)
    for mode in RunMode:
        RUN_DURATION.labels(mode.value)
        for outcome in Outcome:
            RUNS.labels(mode.value, outcome.value)
    for action in LINK_ACTIONS:
        LINKS.labels(action)
    for delivery in WEBHOOK_RESULTS:
        WEBHOOK_DELIVERIES.labels(delivery)


def precreate_task_labels(tasks: Iterable[str]) -> None:
    """Create `tasks` x TASK_STATES of closesync_tasks_completed_total at 0: a worker that has
    completed nothing yet still has a series, for the per-instance no-progress alert."""
    for task in tasks:
        for state in TASK_STATES:
            TASKS_COMPLETED.labels(task, state)


def status_class(status: int | None) -> str:
    """ "2xx" .. "5xx" for a status, "error" for a call that got no response."""
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


def count_api_call(api: str, group: str, status: int | None) -> None:
    """One request sent to `api` for endpoint `group`, answered `status` (None: no answer)."""
    API_CALLS.labels(api, group, status_class(status)).inc()
    if status == 429:
        RATE_LIMITED.labels(api).inc()


def count_rate_limit_wait(api: str, seconds: float) -> None:
    """A run of `api` is about to sleep `seconds` for a rate limit."""
    if seconds > 0:
        RATE_LIMIT_WAIT.labels(api).inc(seconds)


def count_token_refresh(api: str, result: str) -> None:
    """One refresh sent to `api`'s token endpoint ended with `result`."""
    TOKEN_REFRESHES.labels(api, result).inc()


def count_task(task: str, state: str) -> None:
    """A Celery task finished (any state): what `closesync_tasks_completed_total` counts."""
    TASKS_COMPLETED.labels(task, state).inc()


def count_webhook_delivery(result: WebhookResult) -> None:
    """One webhook delivery ended with `result` (one of WEBHOOK_RESULTS, else ValueError)."""
    if result not in WEBHOOK_RESULTS:
        raise ValueError(
            f"unknown webhook delivery result {result!r}: expected one of "
            f"{', '.join(WEBHOOK_RESULTS)}"
        )
    WEBHOOK_DELIVERIES.labels(result).inc()


def observe_run(report: RunReport) -> None:
    """Count a finished run: its outcome, duration and (unless a dry run) the links it wrote."""
    RUNS.labels(report.mode.value, report.outcome.value).inc()
    if report.finished_at is not None:
        RUN_DURATION.labels(report.mode.value).observe(
            max(0.0, report.finished_at - report.started_at)
        )
    if report.dry_run:
        return
    counts = (
        report.created,
        report.updated,
        report.deleted,
        len(report.held_deletions),
        len(report.failed),
    )
    for action, count in zip(LINK_ACTIONS, counts, strict=True):
        if count:
            LINKS.labels(action).inc(count)
