"""Metrics end to end: a real worker and scheduler with METRICS_PORT, scraped over HTTP."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from closesync.sandbox import Sandbox
from tests.e2e.conftest import Deployment, converged, expected_links, wait_for
from tests.e2e.test_worker_e2e import enqueue_next_tick
from tests.redis_server import free_port

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """The body of GET /metrics on `port`, and its samples by (name, labels)."""
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels`, 0 when absent (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def scrapable(port: int) -> Samples | None:
    try:
        return scrape(port)[1]
    except requests.RequestException:
        return None


def test_worker_metrics_after_two_ticks_count_runs_links_calls_and_durations(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A scraped worker counts each tick's runs, the links they created, the calls by API, group
    and status class, and run durations; an unchanged second tick adds runs but no Close call."""
    port = free_port()
    # The budgets are read by a background thread each refresh (1 s here: the least it takes).
    deployment = deploy(METRICS_PORT=str(port), METRICS_FLEET_REFRESH_SECONDS="1")
    users = sandbox.users
    for user in users:
        deployment.add_connection(user)
    links = sum(len(expected_links(sandbox, user)) for user in users)
    deployment.start("worker", "--concurrency", "2")
    wait_for("the metrics port to answer", lambda: scrapable(port), 30)

    enqueue_next_tick(deployment)
    wait_for("Close to equal Calendly", lambda: all(converged(sandbox, u) for u in users), 30)

    def counted(runs: int) -> Samples | None:
        samples = scrapable(port)
        ok = samples and value(samples, "closesync_runs_total", mode="sync", outcome="ok")
        return samples if ok == runs else None

    first = wait_for("the three runs to be counted", lambda: counted(3), 10)
    assert value(first, "closesync_links_total", action="created") == links
    assert value(first, "closesync_links_total", action="deleted") == 0
    calendly_lists = value(
        first,
        "closesync_api_calls_total",
        api="Calendly",
        group="GET /event_types",
        status_class="2xx",
    )
    assert calendly_lists >= 3
    close_upserts = value(
        first,
        "closesync_api_calls_total",
        api="Close",
        group="POST /scheduling_link/integration/",
        status_class="2xx",
    )
    assert close_upserts == links
    assert total(first, "closesync_api_calls_total", status_class="5xx") == 0
    assert value(first, "closesync_run_duration_seconds_count", mode="sync") == 3
    assert value(first, "closesync_run_duration_seconds_sum", mode="sync") > 0
    assert (
        value(
            first,
            "closesync_tasks_completed_total",
            task="closesync.sync_connection",
            state="SUCCESS",
        )
        == 3
    )
    assert value(first, "closesync_queue_depth", queue="sync") == 0
    organizations = {user.close_organization_id for user in users}

    def budgets_reported() -> set[str] | None:
        remaining = {
            dict(labels)["organization"]
            for (name, labels) in scrapable(port) or {}
            if name == "closesync_rate_budget_remaining"
        }
        return remaining if remaining == organizations else None

    assert wait_for("the spent budgets to be reported", budgets_reported, 10) == organizations

    enqueue_next_tick(deployment)
    second = wait_for("the second tick's runs to be counted", lambda: counted(6), 30)
    # Nothing changed in Calendly: the runs listed again and wrote nothing to Close.
    assert value(second, "closesync_links_total", action="created") == links
    assert (
        value(
            second,
            "closesync_api_calls_total",
            api="Close",
            group="POST /scheduling_link/integration/",
            status_class="2xx",
        )
        == close_upserts
    )
    assert (
        value(
            second,
            "closesync_api_calls_total",
            api="Calendly",
            group="GET /event_types",
            status_class="2xx",
        )
        > calendly_lists
    )
    assert value(second, "closesync_run_duration_seconds_count", mode="sync") == 6

    body, _ = scrape(port)
    for user in users:
        for secret in (user.close_access_token, user.close_refresh_token, user.calendly_token):
            assert secret not in body


def test_scheduler_metrics_show_the_fleet_by_state_and_its_lag(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """A scraped scheduler reports every connection by state and a sync lag that the worker's
    runs keep below a few seconds (the cron ticks every second here)."""
    port = free_port()
    deployment = deploy(METRICS_PORT=str(port), METRICS_FLEET_REFRESH_SECONDS="0")
    first, *others = sandbox.users
    paused = deployment.add_connection(first)
    for user in others:
        deployment.add_connection(user)
    assert deployment.cli("connections", "pause", paused).returncode == 0
    # One host: the worker must not take the scheduler's port.
    deployment.start("worker", "--concurrency", "2", extra_env={"METRICS_PORT": ""})
    deployment.start("scheduler")

    def synced() -> Samples | None:
        samples = scrapable(port)
        if samples is None or not all(converged(sandbox, u) for u in others):
            return None
        lag = value(samples, "closesync_sync_lag_seconds")
        return samples if 0 < lag < 5 else None

    samples = wait_for("the scheduler to report a short lag", synced, 45, 0.5)
    assert value(samples, "closesync_connections", state="active") == 2
    assert value(samples, "closesync_connections", state="paused") == 1
    assert value(samples, "closesync_connections", state="needs_reauth") == 0
    assert ("closesync_queue_depth", frozenset({("queue", "sync")})) in samples


def test_prefork_worker_metrics_sum_what_its_pool_processes_counted(
    deploy: Callable[..., Deployment], sandbox: Sandbox, tmp_path: Path
) -> None:
    """Under --pool prefork the runs happen in pool processes: the worker's port serves their
    sum from the multiprocess directory, which it cleaned of an earlier worker's files."""
    directory = tmp_path / "multiproc"
    dead = directory / f"worker-999999999@{socket.gethostname()}"
    dead.mkdir(parents=True)
    (dead / "counter_999999999.db").write_bytes(b"a dead worker's samples")
    port = free_port()
    deployment = deploy(METRICS_PORT=str(port), METRICS_MULTIPROC_DIR=str(directory))
    users = sandbox.users[:2]
    for user in users:
        deployment.add_connection(user)
    deployment.start("worker", "--pool", "prefork", "--concurrency", "2")
    wait_for("the metrics port to answer", lambda: scrapable(port), 60)
    enqueue_next_tick(deployment)
    wait_for("Close to equal Calendly", lambda: all(converged(sandbox, u) for u in users), 60)

    def counted() -> Samples | None:
        samples = scrapable(port)
        runs = samples and value(samples, "closesync_runs_total", mode="sync", outcome="ok")
        return samples if runs == 2 else None

    samples = wait_for("the pool's two runs to be counted", counted, 15)
    links = sum(len(expected_links(sandbox, user)) for user in users)
    assert value(samples, "closesync_links_total", action="created") == links
    assert not dead.exists()
    # The worker's own directory, named after its node: no other worker shares it.
    assert list(directory.glob("worker-*@*/counter_*.db"))
