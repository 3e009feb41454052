"""The metrics: the counting functions, and the collectors reading real Redis at scrape time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from closesync import meters
from closesync.core.connection import ConnectionState
from closesync.core.errors import ConfigError
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.sandbox.connections import sandbox_connection
from closesync.sandbox.records import SeededUser
from closesync.store.keys import Keys
from closesync.wiring import metrics
from closesync.wiring.services import Services
from closesync.worker.liveness import (
    beat,
    check_writable,
    connect,
    forget,
    heartbeat_dir,
    last_beat,
    queues_of,
    stalled,
)
from tests.shells.test_worker_tasks import services_on

NOW = 1_800_000_000.0


def user(n: int, organization: str = "orga_1") -> SeededUser:
    return SeededUser(
        email=f"rep{n}@example.com",
        name=f"Rep {n}",
        calendly_user_uuid=f"U{n:04d}",
        calendly_user_uri=f"https://api.calendly.com/users/U{n:04d}",
        calendly_token=f"cal_pat_{n}",
        close_user_id=f"user_{n}",
        close_organization_id=organization,
        close_access_token=f"close_at_{n}",
        close_refresh_token=f"close_rt_{n}",
    )


def samples_of(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def sample(body: bytes, name: str, **labels: str) -> float | None:
    return samples_of(body).get((name, frozenset(labels.items())))


def counter(name: str, **labels: str) -> float:
    """The current value of one of closesync.meters' counters (0 before its first count)."""
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def services(redis_client: redis.Redis, keys: Keys) -> Services:
    return services_on(redis_client, keys)


def report(conn_id: str, outcome: Outcome, started: float, finished: float) -> RunReport:
    return RunReport(
        connection_id=conn_id, outcome=outcome, started_at=started, finished_at=finished
    )


def test_queue_depths_count_the_ready_messages_of_each_celery_queue(services: Services) -> None:
    """closesync_queue_depth is the LLEN of each queue under Celery's key prefix."""
    services.redis.lpush(services.keys.celery_queue("sync"), "m1", "m2")
    services.redis.lpush(services.keys.celery_queue("fanout"), "m3")
    body, _ = metrics.Exposition([metrics.QueueDepths(services)]).render()
    assert sample(body, "closesync_queue_depth", queue="sync") == 2
    assert sample(body, "closesync_queue_depth", queue="backfill") == 0
    assert sample(body, "closesync_queue_depth", queue="fanout") == 1


def test_fleet_counts_states_and_lags_from_the_oldest_last_success(services: Services) -> None:
    """Connections by state; the lag runs from the oldest last ok/partial run of the active ones
    (a failed run after it does not count), a paused connection's runs not at all."""
    ids = []
    for n in range(4):
        connection, grants = sandbox_connection(user(n), NOW - 3000)
        services.connections.save(connection, grants)
        ids.append(connection.id)
    fresh, stale, never, paused = ids
    services.connections.set_state(paused, ConnectionState.PAUSED, None)
    state = services.state
    state.push_report(fresh, report(fresh, Outcome.OK, NOW - 20, NOW - 10), 20)
    state.push_report(stale, report(stale, Outcome.PARTIAL, NOW - 700, NOW - 600), 20)
    state.push_report(stale, report(stale, Outcome.FAILED, NOW - 60, NOW - 50), 20)
    state.push_report(paused, report(paused, Outcome.OK, NOW - 9000, NOW - 9000), 20)

    numbers = metrics.read_fleet(services, NOW)
    assert numbers.states == {"active": 3, "paused": 1, "needs_reauth": 0}
    # `never` never ran: it counts from when it was added, 3000 s ago, the oldest.
    assert numbers.lag == 3000
    state.push_report(never, report(never, Outcome.OK, NOW - 5, NOW - 1), 20)
    assert metrics.read_fleet(services, NOW).lag == 600


def test_fleet_gauges_are_reused_until_the_refresh_interval_passed(services: Services) -> None:
    """A scrape within METRICS_FLEET_REFRESH_SECONDS reuses the last read; a later one reads."""
    now = [NOW]
    fleet = metrics.Fleet(services, refresh=30, clock=lambda: now[0])
    exposition = metrics.Exposition([fleet])
    body, _ = exposition.render()
    assert sample(body, "closesync_connections", state="active") == 0
    assert sample(body, "closesync_sync_lag_seconds") == 0
    connection, grants = sandbox_connection(user(1), NOW - 100)
    services.connections.save(connection, grants)
    now[0] += 29
    assert sample(exposition.render()[0], "closesync_connections", state="active") == 0
    now[0] += 1
    body, _ = exposition.render()
    assert sample(body, "closesync_connections", state="active") == 1
    assert sample(body, "closesync_sync_lag_seconds") == 130


def test_close_budget_remaining_counts_down_as_the_organization_spends(
    services: Services,
) -> None:
    """closesync_rate_budget_remaining of an organization and group drops by each request taken,
    and reads 0 while an announced reset blocks it."""
    assert services.budgets is not None
    limit = services.settings.close_org_requests_per_second
    group = "POST /scheduling_link/integration/"
    budget = services.budgets.close("orga_metrics", "user_1")
    for _ in range(3):
        assert budget.take(group) == 0
    body, _ = metrics.Exposition([metrics.CloseBudgets(services)]).render()
    got = sample(body, "closesync_rate_budget_remaining", organization="orga_metrics", group=group)
    assert got == limit - 3
    budget.block(group, 30)
    body, _ = metrics.Exposition([metrics.CloseBudgets(services)]).render()
    got = sample(body, "closesync_rate_budget_remaining", organization="orga_metrics", group=group)
    assert got == 0
    # A Calendly budget is no Close organization's: it is not reported.
    services.budgets.calendly("U0001").take("GET /event_types")
    assert all(org != "U0001" for org, _ in services.budgets.close_remaining_seen(time.time()))


def test_close_budgets_taken_in_another_process_are_reported_until_they_go_quiet(
    services: Services, redis_client: redis.Redis, keys: Keys
) -> None:
    """The pairs live in Redis, not in the taking process's memory: a budget spent through
    another process's RateBudgets (a prefork pool child) is reported by this one, and drops out
    once no one took from it for QUIET_SECONDS."""
    from closesync.store import rate_budget

    assert services.budgets is not None
    other = services_on(redis_client, keys).budgets
    assert other is not None
    assert other is not services.budgets
    group = "GET /scheduling_link/integration/"
    other.close("orga_child", "user_9").take(group)
    now = time.time()
    assert services.budgets.close_remaining_seen(now) == {
        ("orga_child", group): services.settings.close_org_requests_per_second - 1
    }
    later = now + rate_budget.QUIET_SECONDS + 1
    assert services.budgets.close_remaining_seen(later) == {}
    assert redis_client.zcard(keys.rate_budgets_seen()) == 0


def test_background_collector_serves_its_last_read_and_drops_it_when_redis_is_down(
    keys: Keys,
) -> None:
    """A background-read gauge never holds the scrape on a Redis that does not answer: the
    scrape returns within the first-read wait, without the gauge."""
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    services = services_on(down, keys)
    started = time.monotonic()
    body, _ = metrics.Exposition([metrics.CloseBudgets(services, background=True)]).render()
    assert time.monotonic() - started < metrics.FIRST_READ_WAIT_SECONDS + 1
    assert b"closesync_rate_budget_remaining{" not in body


def test_collectors_yield_nothing_when_redis_is_down_and_the_scrape_still_answers(
    keys: Keys,
) -> None:
    """A Redis that does not answer drops the Redis gauges from the scrape, not the scrape."""
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    services = services_on(down, keys)
    meters.count_api_call("Close", "GET /me/", 200)
    body, content_type = metrics.Exposition(metrics.collectors(services, "web")).render()
    assert content_type.startswith("text/plain")
    assert b"closesync_api_calls_total" in body
    assert b"closesync_queue_depth" not in body
    assert b"closesync_sync_lag_seconds" not in body


def test_render_serves_the_counters_and_the_web_collectors(services: Services) -> None:
    """render() (the web's /metrics) has the process's counters, the fleet and the queues."""
    meters.count_webhook_delivery("accepted")
    body, content_type = metrics.render(services)
    assert content_type.startswith("text/plain; version=")
    assert (sample(body, "closesync_webhook_deliveries_total", result="accepted") or 0) >= 1
    assert sample(body, "closesync_connections", state="active") == 0
    assert sample(body, "closesync_queue_depth", queue="sync") == 0


def test_count_webhook_delivery_unknown_result_raises_naming_the_known_ones() -> None:
    """A result outside the documented seven is refused, naming them."""
    bad: Any = "lost"
    with pytest.raises(ValueError, match=r"unknown webhook delivery result 'lost'.*accepted"):
        meters.count_webhook_delivery(bad)


def test_observe_run_counts_outcome_duration_and_links_but_no_links_of_a_dry_run() -> None:
    """A run adds its outcome, its duration and its links; a dry run its outcome only."""
    before = counter("closesync_links_total", action="created")
    runs = counter("closesync_runs_total", mode="backfill", outcome="partial")
    done = RunReport(
        connection_id="conn_x",
        mode=RunMode.BACKFILL,
        outcome=Outcome.PARTIAL,
        started_at=10.0,
        finished_at=12.5,
        created=4,
        failed={"a": "refused"},
        held_deletions=["b", "c"],
    )
    meters.observe_run(done)
    meters.observe_run(done.model_copy(update={"dry_run": True}))
    assert counter("closesync_runs_total", mode="backfill", outcome="partial") == runs + 2
    assert counter("closesync_links_total", action="created") == before + 4
    assert counter("closesync_links_total", action="rejected") >= 1
    assert counter("closesync_links_total", action="held") >= 2
    assert counter("closesync_run_duration_seconds_sum", mode="backfill") >= 5.0


def test_status_class_names_the_hundreds_and_a_missing_answer() -> None:
    """200 -> 2xx, 429 -> 4xx, 503 -> 5xx; no answer (None) -> error."""
    assert [meters.status_class(s) for s in (200, 204, 302, 429, 503, None)] == [
        "2xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "error",
    ]


def test_stalled_only_while_work_waits_and_past_the_limit(tmp_path: Path) -> None:
    """A worker is stuck when tasks have waited for it longer than the limit and it made no
    progress meanwhile, or it has no heartbeat; an idle worker with nothing queued is not."""
    beat(tmp_path, "closesync-1@host", 1000.0)
    beat(tmp_path, "closesync-2@host", 1090.0)
    assert last_beat(tmp_path, "closesync-1@host") == 1000.0
    nodes = ["closesync-1@host", "closesync-2@host", "closesync-3@host"]
    assert stalled(tmp_path, nodes, lambda node: 0, now=2000.0, limit=60) == []
    # Work is seen waiting from 1040 on: the check at 1100 measures from 1040 for node 1.
    assert [s.node for s in stalled(tmp_path, nodes, lambda node: 4, 1040.0, 60)] == [
        "closesync-3@host"
    ]
    stuck = stalled(tmp_path, nodes, lambda node: 4, now=1101.0, limit=60)
    assert [(s.node, s.idle) for s in stuck] == [
        ("closesync-1@host", 61.0),
        ("closesync-3@host", None),
    ]
    forget(tmp_path, "closesync-1@host")
    assert last_beat(tmp_path, "closesync-1@host") is None
    with pytest.raises(ValueError, match="not a worker node name"):
        beat(tmp_path, "../escape", 1.0)


def test_stalled_idle_worker_is_not_stuck_the_instant_work_is_enqueued(tmp_path: Path) -> None:
    """A worker idle for an hour is stuck only once work has waited the limit for it, and work
    that stopped waiting resets the count."""
    node = "closesync-1@host"
    beat(tmp_path, node, 1000.0)
    assert stalled(tmp_path, [node], lambda n: 1, now=4600.0, limit=60) == []
    assert stalled(tmp_path, [node], lambda n: 1, now=4650.0, limit=60) == []
    assert [s.idle for s in stalled(tmp_path, [node], lambda n: 1, 4661.0, 60)] == [61.0]
    assert stalled(tmp_path, [node], lambda n: 0, now=4662.0, limit=60) == []
    assert stalled(tmp_path, [node], lambda n: 1, now=4900.0, limit=60) == []


def test_health_stalls_count_only_the_queues_the_worker_consumes(
    services: Services, tmp_path: Path
) -> None:
    """A backfill-only worker is not stuck while sync work waits for others; it is once
    backfill work waits for it past WORKER_STALL_SECONDS."""
    from closesync.cli.daemon import _stalls

    services.settings = services.settings.model_copy(
        update={"heartbeat_dir": str(tmp_path), "worker_stall_seconds": 60.0}
    )
    node = "closesync-7@host"
    beat(tmp_path, node, NOW - 3600, queues=("fanout", "backfill"))
    assert queues_of(tmp_path, node) == ("fanout", "backfill")
    services.redis.lpush(services.keys.celery_queue("sync"), "m1")
    assert _stalls(services, [node], NOW) == []
    assert _stalls(services, [node], NOW + 600) == []
    services.redis.lpush(services.keys.celery_queue("backfill"), "m2")
    assert _stalls(services, [node], NOW + 600) == []
    (line,) = _stalls(services, [node], NOW + 661)
    assert f"worker {node} made no progress for 61 s while 1 tasks wait in its queues" in line
    # A beat that keeps no queues (a task starting) keeps those written at start.
    beat(tmp_path, node, NOW + 700)
    assert queues_of(tmp_path, node) == ("fanout", "backfill")


def test_heartbeat_dir_not_writable_stops_the_worker_start_naming_it(
    services: Services, tmp_path: Path
) -> None:
    """A heartbeat directory that cannot be written is a ConfigError at start, naming it and
    HEARTBEAT_DIR, not a warning per task and a restart loop."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings = services.settings.model_copy(update={"heartbeat_dir": str(blocker / "beats")})
    assert heartbeat_dir(settings) == blocker / "beats"
    with pytest.raises(ConfigError, match=r"a-file/beats is not writable.*HEARTBEAT_DIR"):
        check_writable(heartbeat_dir(settings))
    with pytest.raises(ConfigError, match="HEARTBEAT_DIR"):
        connect(settings)


def test_heartbeat_beats_when_a_task_starts_and_ends(services: Services, tmp_path: Path) -> None:
    """task_prerun beats as task_postrun does: a long run is not idle time."""
    from types import SimpleNamespace

    from celery.signals import task_postrun, task_prerun

    settings = services.settings.model_copy(update={"heartbeat_dir": str(tmp_path)})
    now = [NOW]
    disconnect = connect(settings, ("fanout", "sync"), clock=lambda: now[0])
    try:

        class Task:
            """What Celery's signals hand over: a task with a name and a request."""

            name = "closesync.sync_connection"
            request = SimpleNamespace(hostname="closesync-9@host")

        task = Task()
        task_prerun.send(sender=task, task_id="t1", task=task, args=(), kwargs={})
        assert last_beat(tmp_path, "closesync-9@host") == NOW
        now[0] += 200
        task_postrun.send(sender=task, task_id="t1", task=task, state="SUCCESS")
        assert last_beat(tmp_path, "closesync-9@host") == NOW + 200
    finally:
        disconnect()


def test_precreate_makes_every_known_series_before_its_first_count() -> None:
    """After precreate a revoked refresh or a 429 series exists at 0, so increase() sees the
    first one; task series exist per task before any completes."""
    from prometheus_client import REGISTRY

    meters.precreate()
    meters.precreate_task_labels(["closesync.test_only_task"])
    labels = {"api": "Calendly", "result": "revoked"}
    assert REGISTRY.get_sample_value("closesync_token_refreshes_total", labels) is not None
    assert REGISTRY.get_sample_value("closesync_rate_limited_total", {"api": "Close"}) is not None
    assert (
        REGISTRY.get_sample_value(
            "closesync_tasks_completed_total",
            {"task": "closesync.test_only_task", "state": "SUCCESS"},
        )
        == 0
    )


def test_sync_interval_gauge_exports_each_cadence_in_use(services: Services) -> None:
    """With webhooks on, the hourly safety-net poll is exported beside SYNC_CRON's interval,
    so the lag alert's threshold is 2 x 3600 s at the defaults, not 2 x 300."""
    from closesync.cli.daemon import sync_intervals

    settings = services.settings.model_copy(
        update={
            "webhooks_enabled": True,
            "sync_cron": "*/5 * * * *",
            "sync_cron_with_webhooks": "0 * * * *",
        }
    )
    assert sync_intervals(settings, NOW) == {"poll": 300.0, "webhooks": 3600.0}
    off = settings.model_copy(update={"webhooks_enabled": False})
    assert sync_intervals(off, NOW) == {"poll": 300.0}
    gauge = metrics.SyncIntervalGauge(lambda: sync_intervals(settings, NOW))
    body, _ = metrics.Exposition([gauge]).render()
    assert sample(body, "closesync_sync_interval_seconds", cadence="webhooks") == 3600
    assert sample(body, "closesync_sync_interval_seconds", cadence="poll") == 300


def test_process_multiproc_dirs_are_per_process_and_dead_ones_are_pruned(
    services: Services, tmp_path: Path
) -> None:
    """Each worker and web process counts in a directory of its own under the base; one left by
    a process of this host that no longer runs is removed."""
    import os
    import socket

    settings = services.settings.model_copy(update={"metrics_multiproc_dir": str(tmp_path)})
    host = socket.gethostname()
    dead = tmp_path / f"worker-999999999@{host}"
    dead.mkdir()
    (dead / "counter_999999999.db").write_bytes(b"old")
    elsewhere = tmp_path / "worker-999999999@another-host"
    elsewhere.mkdir()
    worker = metrics.process_multiproc_dir(settings, "worker")
    web = metrics.process_multiproc_dir(settings, "web")
    assert worker == str(tmp_path / f"worker-{os.getpid()}@{host}")
    assert web == str(tmp_path / f"web-{os.getpid()}@{host}")
    assert not dead.exists()
    assert elsewhere.exists()


def test_reexec_argv_keeps_the_interpreter_flags() -> None:
    """The prefork re-exec starts the same interpreter with the same flags (-X, -W) again."""
    import subprocess
    import sys

    code = "from closesync.wiring.metrics import reexec_argv; print(reexec_argv())"
    done = subprocess.run(
        [sys.executable, "-X", "utf8", "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    argv = eval(done.stdout)  # noqa: S307 - our own repr of a list of str
    assert argv[:5] == [sys.executable, "-X", "utf8", "-W", "ignore"]
    assert argv[5:7] == ["-c", code]


def test_multiproc_dir_clean_keeps_only_this_process_files(tmp_path: Path) -> None:
    """Starting under prefork deletes the sample files of earlier processes, not its own."""
    import os

    (tmp_path / "counter_123456789.db").write_bytes(b"old")
    own = tmp_path / f"counter_{os.getpid()}.db"
    own.write_bytes(b"mine")
    metrics.clean_multiproc_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [own.name]
