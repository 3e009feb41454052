"""The Celery app's settings: at-least-once delivery, limits below the visibility timeout."""

from __future__ import annotations

from typing import Any

import pytest

from closesync.core.errors import ConfigError
from closesync.settings import Settings
from closesync.worker.celery_app import (
    broker_url_and_options,
    celery_config,
    create_app,
    worker_queues,
)

URL = "redis://127.0.0.1:6379/3"


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_celery_config_defaults_deliver_at_least_once() -> None:
    """Late acks, reject on worker loss, prefetch 1, JSON only, results ignored."""
    conf = celery_config(settings(), URL)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_serializer"] == "json"
    assert conf["result_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["task_ignore_result"] is True
    assert conf["broker_url"] == URL


def test_celery_config_limits_come_from_settings_below_visibility() -> None:
    """Soft and hard limits and the visibility timeout are the settings' values."""
    conf = celery_config(
        settings(task_soft_time_limit=40, task_time_limit=50, broker_visibility_timeout=60), URL
    )
    assert conf["task_soft_time_limit"] == 40
    assert conf["task_time_limit"] == 50
    transport = conf["broker_transport_options"]
    assert transport["visibility_timeout"] == 60
    assert transport["unacked_restore_interval"] == 15
    assert transport["unacked_restore_throttle"] == 1
    assert transport["global_keyprefix"] == "closesync:celery:"


def test_celery_config_routes_backfill_and_drift_to_backfill_queue() -> None:
    """Syncs go to `sync`; backfills and drift runs to `backfill`; fan-outs to `fanout`."""
    routes = celery_config(settings(), URL)["task_routes"]
    assert routes["closesync.sync_connection"] == {"queue": "sync"}
    assert routes["closesync.backfill"] == {"queue": "backfill"}
    assert routes["closesync.drift_connection"] == {"queue": "backfill"}
    for fan_out in ("closesync.sync_all", "closesync.drift_check", "closesync.drain_schedule"):
        assert routes[fan_out] == {"queue": "fanout"}


def test_worker_queues_dedicated_or_default_always_take_the_fanout_queue() -> None:
    """`--queues sync` or `backfill` dedicates a worker, which still takes the fan-outs first."""
    assert worker_queues("sync,backfill") == "fanout,sync,backfill"
    assert worker_queues("sync") == "fanout,sync"
    assert worker_queues(" backfill , fanout,") == "fanout,backfill"


@pytest.mark.parametrize(
    ("soft", "hard", "visibility"),
    [(300, 300, 3600), (300, 200, 3600), (100, 3600, 3600), (100, 200, 150)],
)
def test_celery_config_limits_not_below_visibility_raise_config_error(
    soft: int, hard: int, visibility: int
) -> None:
    """soft < hard < visibility must hold, or the broker redelivers a running task."""
    bad = settings(
        task_soft_time_limit=soft, task_time_limit=hard, broker_visibility_timeout=visibility
    )
    with pytest.raises(ConfigError, match="BROKER_VISIBILITY_TIMEOUT"):
        celery_config(bad, URL)


def test_celery_config_visibility_not_above_run_lock_raises_config_error() -> None:
    """A redelivered task must find a crashed run's lock expired."""
    bad = settings(
        task_soft_time_limit=5,
        task_time_limit=8,
        broker_visibility_timeout=10,
        run_lock_ttl_seconds=30,
    )
    with pytest.raises(ConfigError, match="RUN_LOCK_TTL_SECONDS"):
        celery_config(bad, URL)


def test_broker_url_sentinel_master_name_moves_to_transport_options() -> None:
    """`?master_name=` leaves the Sentinel URL and becomes a transport option."""
    url, options = broker_url_and_options(
        "sentinel://:pw@s1:26379/0?master_name=main;sentinel://:pw@s2:26379/0"
    )
    assert url == "sentinel://:pw@s1:26379/0;sentinel://:pw@s2:26379/0"
    assert options == {"master_name": "main"}


def test_broker_url_sentinel_without_master_defaults_to_mymaster() -> None:
    """A Sentinel URL without a master name uses Sentinel's conventional `mymaster`."""
    assert broker_url_and_options("sentinel://s1:26379")[1] == {"master_name": "mymaster"}


def test_broker_url_plain_redis_is_unchanged() -> None:
    """A redis:// URL passes through without transport options."""
    assert broker_url_and_options(URL) == (URL, {})


def test_create_app_sentinel_url_configures_master_on_broker_and_backend() -> None:
    """The app built from a Sentinel URL carries the master name for broker and results."""
    app = create_app(settings(), "sentinel://s1:26379/0?master_name=main")
    assert app.conf.broker_transport_options["master_name"] == "main"
    assert app.conf.result_backend_transport_options["master_name"] == "main"
    assert app.conf.broker_url == "sentinel://s1:26379/0"


def test_celery_entry_app_for_flower_has_the_prefix_and_the_task_events_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`celery -A closesync.worker.celery_entry flower` gets closesync's broker, key prefix and
    task events (CELERY_TASK_EVENTS), read from the environment."""
    import importlib

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/3")
    monkeypatch.setenv("REDIS_PREFIX", "flowertest")
    monkeypatch.setenv("CELERY_TASK_EVENTS", "true")
    import closesync.worker.celery_entry as entry

    app = importlib.reload(entry).app
    try:
        assert app.conf.broker_url == "redis://127.0.0.1:1/3"
        assert app.conf.broker_transport_options["global_keyprefix"] == "flowertest:celery:"
        assert app.conf.worker_send_task_events is True
        assert app.conf.task_send_sent_event is True
    finally:
        app.close()
    monkeypatch.delenv("CELERY_TASK_EVENTS")
    quiet = importlib.reload(entry).app
    assert quiet.conf.worker_send_task_events is False
    quiet.close()
